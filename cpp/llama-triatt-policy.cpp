// llama-triatt-policy.cpp: the KV eviction policy glue between llama.cpp and the TriAttention core.
// See llama-triatt-policy.h. The algorithm (scoring, ranking) lives in triatt-*.cpp.

#include "llama-triatt-policy.h"
#include "llama-triatt-calib.h"
#include "llama-triatt-kv.h"
#include "triatt-policy.h"

#include "llama-batch.h"
#include "llama-context.h"
#include "llama-kv-cache-iswa.h"
#include "llama-kv-cache.h"
#include "llama-impl.h"
#include "llama-model.h"

#include "ggml-backend.h"

#include <algorithm>
#include <chrono>
#include <cstdlib>
#include <cstring>

static thread_local std::string g_kv_policy_error;

static double triatt_now_ms() {
    return std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

llama_kv_policy::~llama_kv_policy() {
    ggml_gallocr_free(move_galloc);
    triatt_selector_free(selector);
}

static_assert((int) LLAMA_KV_POLICY_FULL == TRIATT_POLICY_FULL && (int) LLAMA_KV_POLICY_TRI == TRIATT_POLICY_TRI &&
              (int) LLAMA_KV_POLICY_STREAMING == TRIATT_POLICY_STREAMING &&
              (int) LLAMA_KV_POLICY_RANDOM == TRIATT_POLICY_RANDOM && (int) LLAMA_KV_POLICY_SNAPKV == TRIATT_POLICY_SNAPKV &&
              (int) LLAMA_KV_POLICY_SNAPKV + 1 == TRIATT_POLICY_COUNT, "llama_kv_policy_type is triatt_policy_type");
static_assert((int) LLAMA_KV_POLICY_SHARED == TRIATT_GRANULARITY_SHARED &&
              (int) LLAMA_KV_POLICY_PER_KV_HEAD == TRIATT_GRANULARITY_HEAD &&
              (int) LLAMA_KV_POLICY_PER_LAYER_HEAD == TRIATT_GRANULARITY_LAYER &&
              (int) LLAMA_KV_POLICY_PER_LAYER_HEAD + 1 == TRIATT_GRANULARITY_COUNT,
              "llama_kv_policy_granularity is triatt_granularity");

// the contract's view of the C parameters (triatt-policy.h owns the defaults and the rules)
static triatt_policy_settings triatt_settings_of(const llama_kv_policy_params & p) {
    triatt_policy_settings s;
    s.type        = (int32_t) p.type;
    s.budget      = p.budget;
    s.interval    = p.interval;
    s.n_sink      = p.n_sink;
    s.n_window    = p.n_window;
    s.horizon     = p.horizon;
    s.snap_window = p.snap_window;
    s.granularity = (int32_t) p.granularity;
    s.shift       = p.shift;
    return s;
}

static const char * triatt_policy_name(llama_kv_policy_type type) {
    const triatt_policy_info * info = triatt_policy_get((int32_t) type);
    return info ? info->name : "?";
}

bool llama_kv_policy::init(llama_context & ctx, const llama_kv_policy_params & p_in) {
    const std::string why = triatt_policy_check(triatt_settings_of(p_in), 0, "");
    if (!why.empty()) {
        error = "KV policy: " + why;
        return false;
    }
    params      = llama_kv_policy_resolve(&p_in);
    window_rule = p_in.n_window < 0;
    const llama_kv_policy_params & p = params;
    const triatt_policy_info & info = *triatt_policy_get((int32_t) p.type);
    if (!info.evicts) {
        return true;
    }
    llama_kv_cache * kv = triatt_full_cache(ctx);
    if (!kv) {
        error = std::string("KV policy: this model (") + llm_arch_name(ctx.get_model().arch) + ") uses " +
                triatt_memory_name(ctx.get_memory()) + ": token eviction does not apply; run it without a policy";
        return false;
    }
    const llama_model & model = ctx.get_model();
    const auto & hp = model.hparams;
    if (p.shift && dynamic_cast<llama_kv_cache_iswa *>(ctx.get_memory())) {
        error = "KV policy: shift cannot be used on a sliding-window model: the local layers keep their own window, "
                "whose positions a shift of the global layers' tokens would not match; keep the gaps (shift off)";
        return false;
    }
    if (p.shift && (!ctx.get_memory()->get_can_shift() || hp.n_pos_per_embd() != 1)) {
        error = "KV policy: shift needs a cache whose positions can be shifted (this model's cannot): "
                "keep the gaps (shift off)";
        return false;
    }
    for (uint32_t il : kv->get_layer_ids()) {
        layers.push_back((int32_t) il);
    }
    n_head     = (int32_t) hp.n_head(0);
    n_head_kv  = (int32_t) hp.n_head_kv(0);
    head_dim   = (int32_t) hp.n_embd_head_k(0);
    head_dim_v = (int32_t) hp.n_embd_head_v(0);
    selector   = triatt_selector_init();
    if (p.granularity != LLAMA_KV_POLICY_SHARED && !init_per_head(*kv, model)) {
        return false;
    }
    force_move_staged = getenv("PYTRIATT_MOVE_STAGED") && strcmp(getenv("PYTRIATT_MOVE_STAGED"), "1") == 0;
    force_move_graph  = getenv("PYTRIATT_MOVE_BACKEND") && strcmp(getenv("PYTRIATT_MOVE_BACKEND"), "1") == 0;

    const ggml_type tk = kv->type_k();
    const bool scores_keys = info.rank == TRIATT_RANK_SCORES;
    if (scores_keys && hp.is_mla()) {
        error = std::string("KV policy ") + triatt_policy_name(p.type) + ": this model (" + llm_arch_name(model.arch) +
                ") uses multi-head latent attention: its cache holds a compressed latent, not per-head keys, so "
                "keys cannot be scored; use the streaming or random policy";
        return false;
    }
    if (scores_keys && tk != GGML_TYPE_F32 && tk != GGML_TYPE_F16 && tk != GGML_TYPE_BF16 &&
        !ggml_get_type_traits(tk)->to_float) {
        error = std::string("KV policy ") + triatt_policy_name(p.type) + ": K cache type " + ggml_type_name(tk) +
                " cannot be read back (use f16, bf16, f32, q8_0 or q4_0)";
        return false;
    }

    const triatt_score_shape shape = { layers, n_head, n_head_kv, head_dim };
    scorer = llama_kv_scorer_init(info.name, ctx, p, shape, error);
    return scorer != nullptr;
}

// per-head: what moving one head's rows between cells needs from the cache and the model
bool llama_kv_policy::init_per_head(llama_kv_cache & kv, const llama_model & model) {
    const auto & hp = model.hparams;
    const llama_kv_policy_params & p = params;
    // the contract (triatt_policy_check) has refused per-head for policies without scores and with shift
    GGML_ASSERT(triatt_policy_get((int32_t) p.type)->per_head && !p.shift);
    if (hp.use_alibi) {
        error = "KV policy: per-head eviction needs the cached keys to carry their positions (RoPE); this model uses "
                "ALiBi, whose bias is computed from the cell's position: use shared eviction";
        return false;
    }
    for (int32_t il : layers) {
        if ((int32_t) hp.n_head_kv(il) != n_head_kv || (int32_t) hp.n_embd_head_k(il) != head_dim ||
            (int32_t) hp.n_embd_head_v(il) != head_dim_v) {
            error = "KV policy: per-head eviction needs the same KV heads and head size in every layer (layer " +
                    std::to_string(il) + " differs): use shared eviction";
            return false;
        }
    }
    for (ggml_type t : { kv.type_k(), kv.type_v() }) {
        if (head_dim % ggml_blck_size(t) != 0 || head_dim_v % ggml_blck_size(t) != 0) {
            error = std::string("KV policy: per-head eviction moves whole quantization blocks, and a head of ") +
                    std::to_string(head_dim) + " values is not a whole number of " + ggml_type_name(t) +
                    " blocks: use shared eviction or another cache type";
            return false;
        }
    }
    return true;
}

bool llama_kv_policy::before_batch(llama_context & ctx, llama_batch_allocr & balloc) {
    if (params.type == LLAMA_KV_POLICY_FULL) {
        return true;
    }
    llama_memory_i * mem = ctx.get_memory();
    for (llama_seq_id s = 0; s < (llama_seq_id) LLAMA_MAX_SEQ; ++s) {
        const llama_pos b0 = balloc.seq_pos_min(s);
        if (b0 < 0) {
            continue;
        }
        const llama_pos n_in = balloc.seq_pos_max(s) - b0 + 1;
        const llama_pos pos_max = mem->seq_pos_max(s);
        if (pos_max < 0) {
            // a fresh sequence (new, or cleared and reused): fresh counters; its prompt is what was
            // declared for it, else this batch
            seq_state & st = seqs[s];
            st.stats = {};
            if (!st.prompt_declared) {
                st.prompt_len = balloc.seq_pos_max(s) + 1;
            }
            st.prompt_declared = false;
            if (llama_kv_cache * kv = triatt_full_cache(ctx)) {
                forget_cells(*kv, s, /*held =*/ false);
            }
            scorer->reset();
            continue;
        }
        const int32_t n_cached = mem->seq_positions(s, nullptr, 0);
        if (n_cached + n_in > params.budget + params.interval && n_cached > params.budget) {
            if (!round(ctx, balloc, s, pos_max)) {
                return false;
            }
        }
    }
    return true;
}

// shift the kept tokens (keep[] of cand_pos) down to contiguous positions, and the incoming batch with them
bool llama_kv_policy::shift_down(llama_context & ctx, llama_batch_allocr & balloc, llama_seq_id seq_id, int64_t n_keep) {
    llama_memory_t mem = ctx.get_memory();
    const llama_pos base = cand_pos[keep[0]];
    for (int64_t k = 0; k < n_keep; ) {
        // a run of consecutive kept positions moves as one
        int64_t e = k + 1;
        while (e < n_keep && cand_pos[keep[e]] == cand_pos[keep[e - 1]] + 1) {
            ++e;
        }
        const llama_pos delta = (base + (llama_pos) k) - cand_pos[keep[k]];
        if (delta != 0) {
            llama_memory_seq_add(mem, seq_id, cand_pos[keep[k]], cand_pos[keep[e - 1]] + 1, delta);
        }
        k = e;
    }
    const llama_pos delta = (base + (llama_pos) n_keep - 1) - cand_pos[keep[n_keep - 1]];
    if (delta != 0 && !balloc.shift_seq_pos(seq_id, delta)) {
        error = "KV policy: shift cannot move a batch whose tokens belong to several sequences";
        return false;
    }
    return true;
}

bool llama_kv_policy::round(llama_context & ctx, llama_batch_allocr & balloc, llama_seq_id seq_id, llama_pos pos_max) {
    const double t0 = triatt_now_ms();
    llama_kv_cache * kv = triatt_full_cache(ctx);
    const llama_kv_cells & cells = kv->get_cells(seq_id);
    seq_state & st = seqs[seq_id];

    if (params.shift) {
        // the batch moves with the sequence: its tokens must belong to this sequence only
        const llama_batch & b = balloc.get_batch();
        for (int32_t i = 0; i < b.n_tokens; ++i) {
            for (int32_t j = 0; b.n_seq_id[i] > 1 && j < b.n_seq_id[i]; ++j) {
                if (b.seq_id[i][j] == seq_id) {
                    error = "KV policy: shift cannot move a batch whose tokens belong to several sequences";
                    return false;
                }
            }
        }
    }

    cand_pos.clear();
    cand_cell.clear();
    for (const auto & [p, idx] : cells.seq_pos_get(seq_id)) {
        cand_pos.push_back(p);
        cand_cell.push_back(idx);
    }
    const int64_t n = (int64_t) cand_pos.size();

    triatt_select_params sel;
    sel.budget     = params.budget;
    sel.n_sink     = params.n_sink;
    sel.n_window   = std::max(params.n_window, 1); // the newest token must stay: the next batch continues from it
    sel.prompt_len = params.protect_prompt ? st.prompt_len : 0;
    if (window_rule && params.protect_prompt) {
        // the rule's window yields to a protected prompt: a prompt that fits with the newest token fits
        const int64_t room = params.budget - std::max<int64_t>(sel.prompt_len, params.n_sink);
        sel.n_window = std::max<int64_t>(1, std::min<int64_t>(sel.n_window, room));
    }
    sel.seed       = params.seed;
    sel.kv_agg     = params.kv_agg_mean ? TRIATT_KV_AGG_MEAN : TRIATT_KV_AGG_MAX;

    // the policy's scores of the candidates, then the shared selection
    sel.rank = scorer->rank();
    const triatt_round_cands rc = { ctx, *kv, seq_id, pos_max, cells.used_max_p1(), cand_cell };
    if (!scorer->score(rc, cand_scores, error)) {
        return false;
    }
    layer_ptrs.clear();
    if (sel.rank == TRIATT_RANK_SCORES) {
        for (size_t li = 0; li < layers.size(); ++li) {
            layer_ptrs.push_back(cand_scores.data() + li * (size_t) n * n_head);
        }
    }
    const double t1 = triatt_now_ms();

    keep.resize(n);
    n_moved = 0;
    int64_t n_keep = 0;
    bool per_head = sel.rank == TRIATT_RANK_SCORES && params.granularity != LLAMA_KV_POLICY_SHARED;
    if (per_head && !round_per_head(ctx, *kv, seq_id, sel, n_keep)) {
        if (!error.empty()) {
            return false;
        }
        per_head = false; // cells shared with other sequences: evict whole cells this round
    }
    if (!per_head) {
        std::string err;
        n_keep = triatt_select(selector, sel, n, cand_pos.data(), layer_ptrs.data(), (int32_t) layer_ptrs.size(),
                               n_head, n_head_kv, keep.data(), &err);
        if (n_keep < 1) {
            error = "KV policy: " + (err.empty() ? std::string("no token kept") : err);
            return false;
        }
        // keep[] is ascending: evict the candidates it skips
        evict.clear();
        for (int64_t i = 0, k = 0; i < n; ++i) {
            if (k < n_keep && keep[k] == i) {
                ++k;
            } else {
                evict.push_back(cand_pos[i]);
            }
        }
    }
    // from the cache of the layers that were scored only: a sliding-window model's local layers keep their
    // window in their own cache, which llama.cpp bounds by itself
    const int32_t n_rm = kv->seq_rm_positions(seq_id, evict);
    if (n_rm < 0) {
        error = "KV policy: removing the evicted tokens failed";
        return false;
    }
    if (params.shift && !shift_down(ctx, balloc, seq_id, n_keep)) {
        return false;
    }
    // where the tokens that arrive from now on start: the newest token is always kept, so after a shift it sits at
    // the end of the kept run
    st.stats.pos_round_end = params.shift ? cand_pos[keep[0]] + (llama_pos) n_keep : pos_max + 1;
    const double t2 = triatt_now_ms();
    for (llama_kv_policy_stats * s : { &st.stats, &total }) {
        s->n_rounds++;
        s->n_evicted  += (uint64_t) n_rm;
        s->t_score_ms += t1 - t0;
        s->t_evict_ms += t2 - t1;
        s->n_moved    += n_moved;
    }
    return true;
}

void llama_kv_policy::state_read(llama_context & ctx, llama_seq_id seq_id) {
    if (params.type == LLAMA_KV_POLICY_FULL) {
        return;
    }
    llama_memory_i * mem = ctx.get_memory();
    llama_kv_cache * kv  = triatt_full_cache(ctx);
    const llama_seq_id s0 = seq_id < 0 ? 0 : seq_id;
    const llama_seq_id s1 = seq_id < 0 ? (llama_seq_id) llama_n_seq_max(&ctx) : seq_id + 1;
    for (llama_seq_id s = s0; s < s1; ++s) {
        // the restored tokens may be what earlier rounds left: count them all as compressed. Their prompt is
        // the one declared before the read, else none (a state does not carry it)
        seq_state & st = seqs[s];
        st.stats = {};
        st.stats.pos_round_end = mem ? mem->seq_pos_max(s) + 1 : 0;
        if (!st.prompt_declared) {
            st.prompt_len = 0;
        }
        st.prompt_declared = false;
        if (kv) {
            // per-head: which token each head held in a restored cell is not in the state; each holds the cell's
            forget_cells(*kv, s, /*held =*/ true);
        }
    }
    scorer->reset();
}

bool llama_kv_policy::check_prompt(llama_pos n_prompt) {
    if (!params.protect_prompt) {
        return true;
    }
    const int64_t n_window = window_rule ? 1 : std::max(params.n_window, 1); // the rule's window yields (round)
    const int64_t n_kept   = std::max<int64_t>(n_prompt, params.n_sink) + n_window;
    if (n_kept > params.budget) {
        error = "KV policy: protect_prompt keeps the prompt's " + std::to_string(n_prompt) + " tokens and the newest " +
                std::to_string(n_window) + ", more than the budget of " + std::to_string(params.budget) +
                ": raise the budget or turn protect_prompt off";
        return false;
    }
    return true;
}

//
// glue called by llama_context
//

void llama_kv_policy_deleter::operator()(llama_kv_policy * policy) const {
    delete policy;
}

void llama_kv_policy_state_read(llama_kv_policy & policy, llama_context & ctx, llama_seq_id seq_id) {
    policy.state_read(ctx, seq_id);
}

bool llama_kv_policy_before_batch(llama_kv_policy & policy, llama_context & ctx, llama_batch_allocr & balloc) {
    if (!policy.before_batch(ctx, balloc)) {
        LLAMA_LOG_ERROR("%s: %s\n", __func__, policy.error.c_str());
        g_kv_policy_error = policy.error; // llama_decode returns -1: say why through llama_kv_policy_last_error()
        return false;
    }
    return true;
}

//
// C API
//

struct llama_kv_policy_params llama_kv_policy_resolve(const struct llama_kv_policy_params * params) {
    llama_kv_policy_params p = *params;
    const triatt_policy_settings r = triatt_policy_resolve(triatt_settings_of(p));
    p.n_window = r.n_window;
    p.horizon  = r.horizon;
    return p;
}

struct llama_kv_policy_params llama_kv_policy_default_params(void) {
    const triatt_policy_settings d; // the contract's defaults
    llama_kv_policy_params p = {};
    p.type           = (enum llama_kv_policy_type) d.type;
    p.budget         = d.budget;
    p.interval       = d.interval;
    p.n_sink         = d.n_sink;
    p.n_window       = d.n_window;
    p.protect_prompt = false;
    p.shift          = d.shift;
    p.kv_agg_mean    = false;
    p.seed           = 0;
    p.n_threads      = 0;
    p.snap_window    = d.snap_window;
    p.calib_path     = nullptr;
    p.granularity    = (enum llama_kv_policy_granularity) d.granularity;
    p.horizon        = d.horizon;
    return p;
}

int32_t llama_kv_policy_check(const struct llama_kv_policy_params * params, int32_t n_ctx, const char * prefix,
                              char * buf, size_t buf_size) {
    const std::string why = params ? triatt_policy_check(triatt_settings_of(*params), n_ctx, prefix)
                                   : std::string("no parameters");
    if (buf && buf_size > 0) {
        snprintf(buf, buf_size, "%s", why.c_str());
    }
    return (int32_t) why.size();
}

const char * llama_kv_policy_type_name(enum llama_kv_policy_type type) {
    const triatt_policy_info * info = triatt_policy_get((int32_t) type);
    return info ? info->name : nullptr;
}

int32_t llama_kv_policy_type_from_name(const char * name) {
    return triatt_policy_from_name(name);
}

int32_t llama_kv_policy_n_cells(const struct llama_kv_policy_params * params, int32_t n_batch) {
    if (!params) {
        return -1;
    }
    return (int32_t) triatt_policy_n_cells(params->budget, params->interval, n_batch);
}

uint32_t llama_kv_policy_n_cells_swa(const struct llama_model * model, const struct llama_context_params * cparams) {
    if (!model || !cparams || llama_model_n_swa(model) <= 0) {
        return 0;
    }
    // llama_kv_cache_iswa's size without swa_full, before its cap at n_ctx
    const uint32_t n_seq = cparams->kv_unified ? cparams->n_seq_max : 1;
    return (uint32_t) llama_model_n_swa(model) * n_seq + cparams->n_ubatch;
}

int32_t llama_set_kv_policy(struct llama_context * ctx, const struct llama_kv_policy_params * params) {
    g_kv_policy_error.clear();
    if (!ctx || !params) {
        g_kv_policy_error = "llama_set_kv_policy: null context or params";
        return -1;
    }
    llama_kv_policy_ptr policy(new llama_kv_policy);
    if (!policy->init(*ctx, *params)) {
        g_kv_policy_error = policy->error;
        return -1;
    }
    // the user's eval callback: the one installed now, unless it is the previous snapkv policy's
    ggml_backend_sched_eval_callback user_cb = ctx->get_cparams().cb_eval;
    void * user_cb_data = ctx->get_cparams().cb_eval_user_data;
    if (ctx->kv_policy && user_cb == triatt_snapkv_cb_eval) {
        triatt_snapkv_get_user_cb(user_cb_data, user_cb, user_cb_data);
    }
    if (params->type == LLAMA_KV_POLICY_SNAPKV) {
        triatt_snapkv_set_user_cb(*policy->scorer, user_cb, user_cb_data);
        ctx->set_eval_callback(triatt_snapkv_cb_eval, policy->scorer.get());
    } else {
        ctx->set_eval_callback(user_cb, user_cb_data);
    }
    if (params->type == LLAMA_KV_POLICY_FULL) {
        policy.reset();
    }
    ctx->kv_policy = std::move(policy);
    return 0;
}

int32_t llama_kv_policy_set_prompt(struct llama_context * ctx, llama_seq_id seq_id, llama_pos n_prompt) {
    g_kv_policy_error.clear();
    if (!ctx || seq_id < 0 || n_prompt < 0) {
        g_kv_policy_error = "llama_kv_policy_set_prompt: null context, or a negative seq_id or n_prompt";
        return -1;
    }
    llama_kv_policy * policy = ctx->kv_policy.get();
    if (!policy) {
        return 0; // full attention: nothing to protect
    }
    if (!policy->check_prompt(n_prompt)) {
        g_kv_policy_error = policy->error;
        return -1;
    }
    auto & st = policy->seqs[seq_id];
    st.prompt_len      = n_prompt;
    st.prompt_declared = true;
    return 0;
}

int32_t llama_kv_policy_head_positions(struct llama_context * ctx, llama_seq_id seq_id, int32_t il, int32_t head_kv,
                                       llama_pos * pos, int32_t n_max) {
    if (!ctx || seq_id < 0 || seq_id >= (llama_seq_id) llama_n_seq_max(ctx) || (n_max > 0 && !pos)) {
        return -1;
    }
    llama_kv_cache * kv = triatt_full_cache(*ctx);
    if (!kv) {
        return -1;
    }
    // a sliding-window layer: its own cache, the same tokens in every head
    auto * iswa = dynamic_cast<llama_kv_cache_iswa *>(ctx->get_memory());
    const auto & hp = ctx->get_model().hparams;
    if (iswa && il >= 0 && il < (int32_t) hp.n_layer() && hp.is_swa(il)) {
        if (head_kv < 0 || head_kv >= (int32_t) hp.n_head_kv(il)) {
            return -1;
        }
        return iswa->get_swa()->seq_positions(seq_id, pos, n_max);
    }
    const llama_kv_policy * policy = ctx->kv_policy.get();
    if (policy && policy->params.granularity != LLAMA_KV_POLICY_SHARED) {
        return ctx->kv_policy->head_positions(*kv, seq_id, il, head_kv, pos, n_max);
    }
    // shared (or no policy): every head of a layer with its own cache holds the sequence's cached positions
    const auto ids = kv->get_layer_ids();
    if (std::find(ids.begin(), ids.end(), (uint32_t) il) == ids.end() || head_kv < 0 ||
        head_kv >= (int32_t) hp.n_head_kv(il)) {
        return -1;
    }
    return kv->seq_positions(seq_id, pos, n_max);
}

llama_pos llama_kv_policy_seq_reuse(const struct llama_context * ctx, llama_seq_id seq_id, llama_pos p_common) {
    if (!ctx || p_common <= 0 || !ctx->kv_policy || seq_id < 0) {
        return std::max<llama_pos>(p_common, 0);   // without a policy every common token is cached as computed
    }
    // below pos_round_end the cache is what the rounds left of the tokens seen so far: it depends on those
    // tokens alone only if the new prompt shares all of them
    const llama_pos end = llama_get_kv_policy_stats(ctx, seq_id).pos_round_end;
    return p_common >= end ? p_common : 0;
}

const char * llama_kv_policy_last_error(void) {
    return g_kv_policy_error.c_str();
}

struct llama_kv_policy_stats llama_get_kv_policy_stats(const struct llama_context * ctx, llama_seq_id seq_id) {
    llama_kv_policy_stats st = {};
    if (!ctx) {
        return st;
    }
    if (const llama_kv_policy * policy = ctx->kv_policy.get()) {
        if (seq_id < 0) {
            st = policy->total;
            st.pos_round_end = 0;
        } else if (auto it = policy->seqs.find(seq_id); it != policy->seqs.end()) {
            st = it->second.stats;
        }
    }
    llama_memory_t mem = ctx->get_memory();
    st.n_cells_used = 0;
    if (mem && seq_id >= 0) {
        st.n_cells_used = llama_memory_seq_positions(mem, seq_id, nullptr, 0);
        if (st.n_cells_used == 0) {
            // an empty sequence has no history: its counters start again with its next batch
            st.n_rounds = st.n_evicted = 0;
            st.t_score_ms = st.t_evict_ms = 0.0;
            st.pos_round_end = 0;
        }
    } else if (mem) {
        for (llama_seq_id s = 0; s < (llama_seq_id) llama_n_seq_max(ctx); ++s) {
            st.n_cells_used += std::max(0, llama_memory_seq_positions(mem, s, nullptr, 0));
        }
    }
    st.n_cells = (int32_t) llama_n_ctx(ctx);
    st.n_cells_swa = st.n_cells_used_swa = 0;
    if (auto * iswa = dynamic_cast<llama_kv_cache_iswa *>(mem)) {
        llama_kv_cache * swa = iswa->get_swa();
        st.n_cells_swa = (int32_t) swa->get_size();
        if (seq_id >= 0) {
            st.n_cells_used_swa = std::max(0, swa->seq_positions(seq_id, nullptr, 0));
        } else {
            for (llama_seq_id s = 0; s < (llama_seq_id) llama_n_seq_max(ctx); ++s) {
                st.n_cells_used_swa += std::max(0, swa->seq_positions(s, nullptr, 0));
            }
        }
    }
    st.kv_bytes = 0;
    if (mem) {
        for (const auto & [buft, size] : mem->memory_breakdown()) {
            st.kv_bytes += size;
        }
    }
    return st;
}
