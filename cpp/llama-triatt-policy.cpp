// llama-triatt-policy.cpp: the KV eviction policy glue between llama.cpp and the TriAttention core.
// See llama-triatt-policy.h. The algorithm (scoring, ranking) lives in triatt-*.cpp.

#include "llama-triatt-policy.h"
#include "llama-triatt-score-backend.h"

#include "llama-batch.h"
#include "llama-context.h"
#include "llama-kv-cache-iswa.h"
#include "llama-kv-cache.h"
#include "llama-impl.h"
#include "llama-model.h"

#include "ggml-backend.h"
#include "gguf.h"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdlib>
#include <cstring>

static thread_local std::string g_kv_policy_error;

static double triatt_now_ms() {
    return std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

// in-place orthonormal Walsh-Hadamard transform of n (a power of two) values, in the same
// (Sylvester) order as the matrix llama.cpp rotates quantized K with
static void triatt_hadamard(float * x, int32_t n) {
    for (int32_t h = 1; h < n; h *= 2) {
        for (int32_t i = 0; i < n; i += 2*h) {
            for (int32_t j = i; j < i + h; ++j) {
                const float a = x[j];
                const float b = x[j + h];
                x[j]     = a + b;
                x[j + h] = a - b;
            }
        }
    }
    const float scale = 1.0f / std::sqrt((float) n);
    for (int32_t i = 0; i < n; ++i) {
        x[i] *= scale;
    }
}

// the cache holding the full-attention layers: the plain cache, or the base of the SWA pair
static llama_kv_cache * triatt_full_cache(llama_context & ctx) {
    llama_memory_i * mem = ctx.get_memory();
    if (auto * kv = dynamic_cast<llama_kv_cache *>(mem)) {
        return kv;
    }
    if (auto * iswa = dynamic_cast<llama_kv_cache_iswa *>(mem)) {
        return iswa->get_base();
    }
    return nullptr;
}

// the calibration must belong to this model: a copy of it (pytriatt calibrate writes the model with the
// statistics added) carries the same architecture hyper-parameters ({arch}.*, general.architecture/name)
// and vocabulary size; quantizations of one model share them, so their statistics transfer
static bool triatt_check_same_model(gguf_context * g, const char * path, const llama_model & model, std::string & err) {
    char key[256];
    char val[1024];
    const int32_t n_meta = llama_model_meta_count(&model);
    std::string arch;
    if (llama_model_meta_val_str(&model, "general.architecture", val, sizeof(val)) >= 0) {
        arch = val;
    }
    const bool full_copy = gguf_find_key(g, (arch + ".block_count").c_str()) >= 0;
    for (int32_t i = 0; i < n_meta; ++i) {
        if (llama_model_meta_key_by_index(&model, i, key, sizeof(key)) < 0 ||
            llama_model_meta_val_str_by_index(&model, i, val, sizeof(val)) < 0) {
            continue;
        }
        const std::string k = key;
        const bool identity = k == "general.architecture" || k == "general.name";
        const bool hparam   = k.rfind(arch + ".", 0) == 0;
        if (!identity && !(hparam && full_copy)) {
            continue;
        }
        const int64_t id = gguf_find_key(g, key);
        const std::string theirs = id >= 0 ? gguf_kv_to_str(g, (int) id) : std::string("(absent)");
        if (theirs.substr(0, sizeof(val) - 1) != val) {
            err = std::string(path) + " holds statistics of another model (" + k + " '" + theirs.substr(0, 64) +
                  "', this model: '" + std::string(val).substr(0, 64) + "'): calibrate this model";
            return false;
        }
    }
    const int64_t id_tok = gguf_find_key(g, "tokenizer.ggml.tokens");
    const int32_t n_vocab = llama_vocab_n_tokens(llama_model_get_vocab(&model));
    if (full_copy && id_tok >= 0 && (gguf_get_kv_type(g, id_tok) != GGUF_TYPE_ARRAY || (int64_t) gguf_get_arr_n(g, id_tok) != n_vocab)) {
        err = std::string(path) + " holds statistics of a model with another vocabulary: calibrate this model";
        return false;
    }
    return true;
}

// read the triattention.* statistics of a GGUF file into cal (shape fields must already be set); every
// value is checked before use: the file may come from anywhere
static bool triatt_read_calib(const char * path, const llama_model & model, triatt_calib & cal, std::string & err) {
    gguf_init_params gp = { /*.no_alloc =*/ true, /*.ctx =*/ nullptr };
    gguf_context * g = gguf_init_from_file(path, gp);
    if (!g) {
        err = std::string("cannot read ") + path + " as GGUF";
        return false;
    }
    bool ok = true;
    // 0: read, 1: absent, 2: wrong type
    auto u32 = [&](const char * key, uint32_t & out) {
        const int64_t id = gguf_find_key(g, key);
        if (id < 0) {
            return 1;
        }
        if (gguf_get_kv_type(g, id) != GGUF_TYPE_UINT32) {
            err = std::string(path) + ": " + key + " is not a uint32: the file is damaged; calibrate the model again";
            return 2;
        }
        out = gguf_get_val_u32(g, id);
        return 0;
    };
    uint32_t version = 0, n_layer = 0, n_head = 0, n_freq = 0;
    int rc = 0;
    for (auto [key, out] : { std::pair<const char *, uint32_t *>{ "triattention.version", &version },
                             { "triattention.n_layer", &n_layer }, { "triattention.n_head", &n_head },
                             { "triattention.n_freq", &n_freq } }) {
        rc = std::max(rc, u32(key, *out));
        if (rc == 2) {
            break;
        }
    }
    if (rc == 1) {
        err = std::string(path) + " carries no TriAttention statistics (triattention.* metadata); "
              "add them with: pytriatt calibrate MODEL -o OUT.gguf, and use OUT.gguf (Python: kv_calib=, "
              "llama.cpp: --kv-calib); or use the streaming policy, which needs no statistics";
        ok = false;
    } else if (rc == 2) {
        ok = false;
    } else if (version != TRIATT_CALIB_VERSION) {
        err = std::string(path) + ": unsupported triattention.version " + std::to_string(version);
        ok = false;
    } else if (n_layer != (uint32_t) cal.n_layer || n_head != (uint32_t) cal.n_head || n_freq < 1 ||
               n_freq > (uint32_t) cal.head_dim / 2) {
        err = std::string(path) + " holds statistics for another model shape (" + std::to_string(n_layer) + " layers, " +
              std::to_string(n_head) + " heads, " + std::to_string(n_freq) + " bands; this model has " +
              std::to_string(cal.n_layer) + ", " + std::to_string(cal.n_head) + ", at most " +
              std::to_string(cal.head_dim / 2) + "): calibrate this model";
        ok = false;
    }
    ok = ok && triatt_check_same_model(g, path, model, err);
    const size_t n = (size_t) n_layer * n_head * n_freq;
    auto arr = [&](const char * key, std::vector<float> & out) {
        const int64_t id = gguf_find_key(g, key);
        if (id < 0 || gguf_get_kv_type(g, id) != GGUF_TYPE_ARRAY || gguf_get_arr_type(g, id) != GGUF_TYPE_FLOAT32 ||
            gguf_get_arr_n(g, id) != n) {
            err = std::string(path) + ": " + key + " is missing or not " + std::to_string(n) + " float32 values";
            return false;
        }
        const float * d = (const float *) gguf_get_arr_data(g, id);
        out.assign(d, d + n);
        for (float v : out) {
            if (!std::isfinite(v)) {
                err = std::string(path) + ": " + key + " holds non-finite values";
                return false;
            }
        }
        return true;
    };
    if (ok) {
        cal.n_freq = (int32_t) n_freq;
        ok = arr("triattention.q_mean_real", cal.q_mean_re) && arr("triattention.q_mean_imag", cal.q_mean_im) &&
             arr("triattention.q_abs_mean", cal.q_abs_mean);
    }
    // statistics, not just numbers: E|q| >= 0 and |E q| <= E|q| (up to rounding)
    for (size_t i = 0; ok && i < n; ++i) {
        const float a = cal.q_abs_mean[i];
        const float m = std::hypot(cal.q_mean_re[i], cal.q_mean_im[i]);
        if (a < 0.0f || m > a * (1.0f + 1e-4f) + 1e-12f) {
            err = std::string(path) + ": the statistics are inconsistent (|E q| > E|q| or E|q| < 0 at index " +
                  std::to_string(i) + "): the file is damaged; calibrate the model again";
            ok = false;
        }
    }
    gguf_free(g);
    return ok;
}

llama_kv_policy::~llama_kv_policy() {
    triatt_score_backend_free(scorer_be);
    ggml_gallocr_free(move_galloc);
    triatt_scorer_free(scorer);
    triatt_selector_free(selector);
}

bool triatt_layer_has_rope(const llama_model & model, int32_t il) {
    const auto & hp = model.hparams;
    if (!hp.has_rope((uint32_t) il)) {
        return false;
    }
    // the architectures whose graph skips RoPE by n_no_rope_layer_step (each reads it its own way)
    const uint32_t step = hp.n_no_rope_layer_step;
    switch (model.arch) {
        case LLM_ARCH_SMOLLM3:
            return step == 0 || (il + 1) % step != 0;
        case LLM_ARCH_LLAMA4:
        case LLM_ARCH_AFMOE:
            return step > 0 && (il + 1) % step != 0;
        case LLM_ARCH_SMALLTHINKER:
            return step == hp.n_layer() || step == 0 || il % step != 0;
        default:
            return true;
    }
}

static const char * triatt_policy_name(llama_kv_policy_type type) {
    switch (type) {
        case LLAMA_KV_POLICY_FULL:      return "full";
        case LLAMA_KV_POLICY_TRI:       return "tri";
        case LLAMA_KV_POLICY_STREAMING: return "streaming";
        case LLAMA_KV_POLICY_RANDOM:    return "random";
        case LLAMA_KV_POLICY_SNAPKV:    return "snapkv";
    }
    return "?";
}

bool llama_kv_policy::init(llama_context & ctx, const llama_kv_policy_params & p) {
    params = p;
    if (p.type == LLAMA_KV_POLICY_FULL) {
        return true;
    }
    if (p.type != LLAMA_KV_POLICY_TRI && p.type != LLAMA_KV_POLICY_STREAMING && p.type != LLAMA_KV_POLICY_RANDOM &&
        p.type != LLAMA_KV_POLICY_SNAPKV) {
        error = "unknown KV policy type " + std::to_string((int) p.type);
        return false;
    }
    if (p.budget < 1 || p.interval < 1 || p.n_sink < 0 || p.n_window < 0) {
        error = "KV policy: budget and interval must be >= 1, sink and window >= 0";
        return false;
    }
    if (p.n_sink + std::max(p.n_window, 1) > p.budget) {
        error = "KV policy: the protected tokens (sink " + std::to_string(p.n_sink) + " + window " +
                std::to_string(std::max(p.n_window, 1)) + ") exceed the budget " + std::to_string(p.budget);
        return false;
    }
    llama_kv_cache * kv = triatt_full_cache(ctx);
    if (!kv) {
        error = std::string("KV policy: this model (") + llm_arch_name(ctx.get_model().arch) + ") keeps a recurrent "
                "state (alone or beside attention layers), not only a KV cache of tokens: token eviction does not "
                "apply; run it without a policy";
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
    if (p.shift) {
        // llama.cpp's K-shift rotates every layer its rope_pattern marks, NoPE layers included for some
        // architectures (SmolLM3): a shift would rotate keys that were cached unrotated
        for (int32_t il : layers) {
            if (!triatt_layer_has_rope(model, il)) {
                error = std::string("KV policy: shift cannot be used on this model (") + llm_arch_name(model.arch) +
                        "): layer " + std::to_string(il) + " has no RoPE (NoPE), and re-rotating shifted keys would "
                        "rotate its unrotated keys; keep the gaps (shift off)";
                return false;
            }
        }
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
    const bool scores_keys = p.type == LLAMA_KV_POLICY_TRI || p.type == LLAMA_KV_POLICY_SNAPKV;
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

    if (p.type == LLAMA_KV_POLICY_SNAPKV) {
        // the query window is the context's recent tokens: one sequence per context
        if (ctx.get_cparams().n_seq_max > 1) {
            error = "KV policy snapkv: the observation window holds the context's recent queries, so it needs a "
                    "context with one sequence (n_seq_max = 1)";
            return false;
        }
        if (p.snap_window < 1) {
            error = "KV policy snapkv: snap_window must be >= 1";
            return false;
        }
        snap.resize(hp.n_layer());
        for (int32_t il : layers) {
            snap[il].q.assign((size_t) p.snap_window * n_head * head_dim, 0.0f);
        }
        snap_kq_scale = hp.f_attention_scale != 0.0f ? hp.f_attention_scale : 1.0f / std::sqrt((float) head_dim);
        return true;
    }
    if (p.type != LLAMA_KV_POLICY_TRI) {
        return true;
    }

    // TRI: statistics + the RoPE of each scored layer, exactly as the graph applies it
    const llama_cparams & cparams = ctx.get_cparams();
    const int rope_type = llama_model_rope_type(&model);
    if (rope_type != LLAMA_ROPE_TYPE_NORM && rope_type != LLAMA_ROPE_TYPE_NEOX) {
        error = "KV policy tri: the model's RoPE type is not supported (TriAttention needs NORM or NEOX RoPE)";
        return false;
    }
    calib.n_layer   = (int32_t) hp.n_layer();
    calib.n_head    = n_head;
    calib.n_head_kv = n_head_kv;
    calib.head_dim  = head_dim;
    calib.pairing   = rope_type == LLAMA_ROPE_TYPE_NEOX ? TRIATT_PAIRING_NEOX : TRIATT_PAIRING_NORM;
    if (!p.calib_path || !*p.calib_path) {
        error = "KV policy tri needs calib_path: a GGUF carrying triattention.* statistics (pytriatt calibrate)";
        return false;
    }
    if (!triatt_read_calib(p.calib_path, model, calib, error)) {
        return false;
    }
    calib.rope.resize(calib.n_layer);
    calib.has_kv.assign(calib.n_layer, 0);
    for (int32_t il : layers) {
        calib.has_kv[il] = 1;
    }
    for (int32_t il = 0; il < calib.n_layer; ++il) {
        triatt_rope_layer & rl = calib.rope[il];
        rl.rope        = triatt_layer_has_rope(model, il); // NoPE: omega = 0, the distance-free score
        rl.n_rot       = (int32_t) hp.n_rot(il);
        rl.freq_base   = model.get_rope_freq_base(cparams, il);
        rl.freq_scale  = model.get_rope_freq_scale(cparams, il);
        rl.ext_factor  = cparams.yarn_ext_factor;
        rl.attn_factor = cparams.yarn_attn_factor;
        rl.beta_fast   = cparams.yarn_beta_fast;
        rl.beta_slow   = cparams.yarn_beta_slow;
        rl.n_ctx_orig  = (int32_t) cparams.n_ctx_orig_yarn;
        if (ggml_tensor * ff = model.get_rope_factors(cparams, il)) {
            rl.freq_factors.resize(ggml_nelements(ff));
            ggml_backend_tensor_get(ff, rl.freq_factors.data(), 0, ggml_nbytes(ff));
        }
    }
    if (!triatt_calib_check(calib, error)) {
        error = "KV policy tri: " + error;
        return false;
    }
    scorer = triatt_scorer_init(&calib);
    const char * force = getenv("PYTRIATT_SCORE_BACKEND");
    force_backend = force && strcmp(force, "1") == 0;
    return scorer != nullptr;
}

// per-head: what moving one head's rows between cells needs from the cache and the model
bool llama_kv_policy::init_per_head(llama_kv_cache & kv, const llama_model & model) {
    const auto & hp = model.hparams;
    const llama_kv_policy_params & p = params;
    if (p.granularity != LLAMA_KV_POLICY_PER_KV_HEAD && p.granularity != LLAMA_KV_POLICY_PER_LAYER_HEAD) {
        error = "KV policy: unknown granularity " + std::to_string((int) p.granularity);
        return false;
    }
    if (p.type != LLAMA_KV_POLICY_TRI && p.type != LLAMA_KV_POLICY_SNAPKV) {
        error = std::string("KV policy ") + triatt_policy_name(p.type) + ": per-head eviction ranks tokens per head, "
                "which only tri and snapkv do (streaming and random keep the same tokens in every head)";
        return false;
    }
    if (p.shift) {
        error = "KV policy: per-head eviction cannot shift positions (a cell holds a different token in each head, "
                "so no single shift re-rotates it correctly): keep the gaps (shift off) or use shared eviction";
        return false;
    }
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
                forget_free_cells(*kv, s);
            }
            for (auto & sq : snap) {
                sq.n = sq.next = 0;
            }
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

const void * llama_kv_policy::k_rows(llama_kv_cache & kv, size_t li, llama_seq_id seq_id, uint32_t n_cells,
                                     triatt_key_type & type, int64_t & stride) {
    ggml_tensor * k = kv.get_k_storage(layers[li]);
    const uint32_t stream = kv.get_stream(seq_id);
    const size_t row_bytes = k->nb[1];
    const uint8_t * base = nullptr;
    if (k->buffer && ggml_backend_buffer_is_host(k->buffer)) {
        base = (const uint8_t *) k->data + stream * k->nb[2];
    } else {
        // K lives in device memory: bring the used rows to the host
        k_host.resize(row_bytes * n_cells);
        ggml_backend_tensor_get(k, k_host.data(), stream * k->nb[2], row_bytes * n_cells);
        base = k_host.data();
    }
    if (k->type == GGML_TYPE_F32 || k->type == GGML_TYPE_F16) {
        type   = k->type == GGML_TYPE_F32 ? TRIATT_KEY_F32 : TRIATT_KEY_F16;
        stride = (int64_t) (row_bytes / ggml_type_size(k->type));
        return base;
    }
    // bf16 or quantized: convert the rows to f32, and undo the Hadamard rotation llama.cpp applies to
    // quantized K (per block of k_rot values; the rotation is its own inverse)
    const int64_t ne0 = k->ne[0];
    const auto * traits = ggml_get_type_traits(k->type);
    const int32_t k_rot = kv.get_k_rot_size();
    k_f32.resize((size_t) ne0 * n_cells);
    for (uint32_t i = 0; i < n_cells; ++i) {
        float * row = k_f32.data() + (size_t) i * ne0;
        traits->to_float(base + i * row_bytes, row, ne0);
        for (int64_t b = 0; k_rot > 0 && b + k_rot <= ne0; b += k_rot) {
            triatt_hadamard(row + b, k_rot);
        }
    }
    type   = TRIATT_KEY_F32;
    stride = ne0;
    return k_f32.data();
}

bool llama_kv_policy::score_layers_tri(llama_context & ctx, llama_kv_cache & kv, llama_seq_id seq_id, int64_t t,
                                       uint32_t n_cells) {
    triatt_score_params sp;
    sp.n_threads = params.n_threads > 0 ? params.n_threads : (int32_t) ctx.n_threads();
    scores.resize((size_t) layers.size() * n_cells * n_head);
    for (size_t li = 0; li < layers.size(); ++li) {
        ggml_tensor * k = kv.get_k_storage(layers[li]);
        const bool on_host = k->buffer && ggml_backend_buffer_is_host(k->buffer);
        if (!on_host || force_backend) {
            // score where the cache lives: the context's backend that can use K's buffer
            ggml_backend_t be = triatt_backend_of(ctx, k);
            std::string err;
            if (be && be != scorer_be_backend) {
                triatt_score_backend_free(scorer_be);
                scorer_be = triatt_score_backend_init(be, calib, err);
                scorer_be_backend = scorer_be ? be : nullptr;
            }
            if (be && scorer_be) {
                if (!triatt_score_backend_layer(scorer_be, layers[li], k, kv.get_stream(seq_id), n_cells,
                                                kv.get_k_rot_size(), t, scores.data() + li * (size_t) n_cells * n_head, err)) {
                    error = "KV policy tri: scoring layer " + std::to_string(layers[li]) + " on " +
                            ggml_backend_name(be) + " failed: " + err;
                    return false;
                }
                continue;
            }
            // no backend can read it in place: fall back to copying K to the host
        }
        triatt_key_type kt;
        int64_t stride;
        const void * keys = k_rows(kv, li, seq_id, n_cells, kt, stride);
        std::string err;
        if (!triatt_score_layer(scorer, layers[li], keys, kt, n_cells, stride, t, sp,
                                scores.data() + li * (size_t) n_cells * n_head, &err)) {
            error = "KV policy tri: scoring layer " + std::to_string(layers[li]) + " failed: " + err;
            return false;
        }
    }
    return true;
}

static float triatt_key_at(const void * keys, triatt_key_type type, size_t i) {
    return type == TRIATT_KEY_F32 ? ((const float *) keys)[i] : ggml_fp16_to_fp32(((const ggml_fp16_t *) keys)[i]);
}

// SnapKV: the attention each candidate receives from the recent queries (softmax over the candidates,
// summed over the queries), max-pooled over neighbouring candidates, per layer and query head
bool llama_kv_policy::score_layers_snap(llama_kv_cache & kv, llama_seq_id seq_id, uint32_t n_cells) {
    const int64_t n = (int64_t) cand_cell.size();
    const int32_t n_gqa = n_head / n_head_kv;
    const int32_t pool = 7; // SnapKV's kernel: keep the neighbours of attended tokens too
    cand_scores.assign(layers.size() * (size_t) n * n_head, 0.0f);
    std::vector<float> kf((size_t) n * head_dim);
    std::vector<float> mass(n);
    attn.resize(n);
    for (size_t li = 0; li < layers.size(); ++li) {
        const snap_queries & sq = snap[layers[li]];
        triatt_key_type kt;
        int64_t stride;
        const void * keys = k_rows(kv, li, seq_id, n_cells, kt, stride);
        float * out = cand_scores.data() + li * (size_t) n * n_head;
        for (int32_t h = 0; h < n_head; ++h) {
            const int32_t g = h / n_gqa;
            for (int64_t i = 0; i < n; ++i) {
                const size_t off = (size_t) cand_cell[i] * stride + (size_t) g * head_dim;
                for (int32_t d = 0; d < head_dim; ++d) {
                    kf[(size_t) i * head_dim + d] = triatt_key_at(keys, kt, off + d);
                }
            }
            std::fill(mass.begin(), mass.end(), 0.0f);
            for (int32_t w = 0; w < sq.n; ++w) {
                const float * q = sq.q.data() + ((size_t) w * n_head + h) * head_dim;
                float mx = -INFINITY;
                for (int64_t i = 0; i < n; ++i) {
                    float dot = 0.0f;
                    for (int32_t d = 0; d < head_dim; ++d) {
                        dot += q[d] * kf[(size_t) i * head_dim + d];
                    }
                    attn[i] = dot * snap_kq_scale;
                    mx = std::max(mx, attn[i]);
                }
                double sum = 0.0;
                for (int64_t i = 0; i < n; ++i) {
                    attn[i] = std::exp(attn[i] - mx);
                    sum += attn[i];
                }
                for (int64_t i = 0; i < n; ++i) {
                    mass[i] += (float) (attn[i] / sum);
                }
            }
            for (int64_t i = 0; i < n; ++i) {
                float m = 0.0f;
                for (int64_t j = std::max<int64_t>(0, i - pool/2); j <= std::min<int64_t>(n - 1, i + pool/2); ++j) {
                    m = std::max(m, mass[j]);
                }
                out[i * n_head + h] = m;
            }
        }
    }
    return true;
}

bool llama_kv_policy::snap_cb_eval(struct ggml_tensor * t, bool ask, void * user_data) {
    auto * self = (llama_kv_policy *) user_data;
    // the post-RoPE query of layer il is the ROPE node named "Qcur-<il>"
    bool mine = t->op == GGML_OP_ROPE && strncmp(ggml_get_name(t), "Qcur-", 5) == 0 && t->type == GGML_TYPE_F32;
    int32_t il = -1;
    if (mine) {
        il = atoi(ggml_get_name(t) + 5);
        mine = il >= 0 && il < (int32_t) self->snap.size() && !self->snap[il].q.empty() &&
               t->ne[0] == self->head_dim && t->ne[1] == self->n_head;
    }
    const bool theirs = self->user_cb_eval && self->user_cb_eval(t, true, self->user_cb_eval_data);
    if (ask) {
        return mine || theirs;
    }
    if (mine) {
        snap_queries & sq = self->snap[il];
        const int64_t n_tokens = t->ne[2];
        self->q_raw.resize(ggml_nbytes(t));
        ggml_backend_tensor_get(t, self->q_raw.data(), 0, ggml_nbytes(t));
        const int32_t window = self->params.snap_window;
        for (int64_t i = std::max<int64_t>(0, n_tokens - window); i < n_tokens; ++i) {
            float * dst = sq.q.data() + (size_t) sq.next * self->head_dim * self->n_head;
            for (int32_t h = 0; h < self->n_head; ++h) {
                memcpy(dst + (size_t) h * self->head_dim, self->q_raw.data() + h * t->nb[1] + i * t->nb[2],
                       self->head_dim * sizeof(float));
            }
            sq.next = (sq.next + 1) % window;
            sq.n = std::min(sq.n + 1, window);
        }
    }
    return theirs ? self->user_cb_eval(t, false, self->user_cb_eval_data) : true;
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
    sel.seed       = params.seed;
    sel.kv_agg     = params.kv_agg_mean ? TRIATT_KV_AGG_MEAN : TRIATT_KV_AGG_MAX;

    layer_ptrs.clear();
    const uint32_t n_cells = cells.used_max_p1();
    if (params.type == LLAMA_KV_POLICY_TRI) {
        sel.policy = TRIATT_POLICY_TRIATTENTION;
        // score every used cell in cell order (zero-copy rows), then gather the candidates' rows
        if (!score_layers_tri(ctx, *kv, seq_id, pos_max, n_cells)) {
            return false;
        }
        cand_scores.resize(layers.size() * (size_t) n * n_head);
        for (size_t li = 0; li < layers.size(); ++li) {
            const float * src = scores.data() + li * (size_t) n_cells * n_head;
            float * dst = cand_scores.data() + li * (size_t) n * n_head;
            for (int64_t i = 0; i < n; ++i) {
                memcpy(dst + i * n_head, src + (size_t) cand_cell[i] * n_head, n_head * sizeof(float));
            }
        }
    } else if (params.type == LLAMA_KV_POLICY_SNAPKV) {
        sel.policy = TRIATT_POLICY_TRIATTENTION; // the same aggregation over heads and layers as tri
        if (!score_layers_snap(*kv, seq_id, n_cells)) {
            return false;
        }
    } else {
        sel.policy = params.type == LLAMA_KV_POLICY_STREAMING ? TRIATT_POLICY_STREAMING : TRIATT_POLICY_RANDOM;
    }
    if (sel.policy == TRIATT_POLICY_TRIATTENTION) {
        for (size_t li = 0; li < layers.size(); ++li) {
            layer_ptrs.push_back(cand_scores.data() + li * (size_t) n * n_head);
        }
    }
    const double t1 = triatt_now_ms();

    keep.resize(n);
    n_moved = 0;
    int64_t n_keep = 0;
    bool per_head = sel.policy == TRIATT_POLICY_TRIATTENTION && params.granularity != LLAMA_KV_POLICY_SHARED;
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

//
// glue called by llama_context
//

void llama_kv_policy_free_impl(llama_kv_policy * policy) {
    delete policy;
}

bool llama_kv_policy_before_batch(llama_kv_policy * policy, llama_context & ctx, llama_batch_allocr & balloc) {
    if (!policy->before_batch(ctx, balloc)) {
        LLAMA_LOG_ERROR("%s: %s\n", __func__, policy->error.c_str());
        g_kv_policy_error = policy->error; // llama_decode returns -1: say why through llama_kv_policy_last_error()
        return false;
    }
    return true;
}

//
// C API
//

struct llama_kv_policy_params llama_kv_policy_default_params(void) {
    llama_kv_policy_params p = {};
    p.type           = LLAMA_KV_POLICY_FULL;
    p.budget         = 2048;
    p.interval       = 128;
    p.n_sink         = 0;
    p.n_window       = 1;
    p.protect_prompt = false;
    p.shift          = false;
    p.kv_agg_mean    = false;
    p.seed           = 0;
    p.n_threads      = 0;
    p.snap_window    = 32;
    p.calib_path     = nullptr;
    p.granularity    = LLAMA_KV_POLICY_SHARED;
    return p;
}

int32_t llama_set_kv_policy(struct llama_context * ctx, const struct llama_kv_policy_params * params) {
    g_kv_policy_error.clear();
    if (!ctx || !params) {
        g_kv_policy_error = "llama_set_kv_policy: null context or params";
        return -1;
    }
    auto * policy = new llama_kv_policy;
    if (!policy->init(*ctx, *params)) {
        g_kv_policy_error = policy->error;
        delete policy;
        return -1;
    }
    // the user's eval callback: the one installed now, unless it is the previous snapkv policy's
    ggml_backend_sched_eval_callback user_cb = ctx->get_cparams().cb_eval;
    void * user_cb_data = ctx->get_cparams().cb_eval_user_data;
    if (ctx->kv_policy && user_cb == llama_kv_policy::snap_cb_eval) {
        user_cb      = ctx->kv_policy->user_cb_eval;
        user_cb_data = ctx->kv_policy->user_cb_eval_data;
    }
    if (params->type == LLAMA_KV_POLICY_SNAPKV) {
        policy->user_cb_eval      = user_cb;
        policy->user_cb_eval_data = user_cb_data;
        ctx->set_eval_callback(llama_kv_policy::snap_cb_eval, policy);
    } else {
        ctx->set_eval_callback(user_cb, user_cb_data);
    }
    llama_kv_policy_free_impl(ctx->kv_policy);
    ctx->kv_policy = params->type == LLAMA_KV_POLICY_FULL ? (delete policy, nullptr) : policy;
    return 0;
}

void llama_kv_policy_set_prompt(struct llama_context * ctx, llama_seq_id seq_id, llama_pos n_prompt) {
    if (!ctx || !ctx->kv_policy || seq_id < 0 || n_prompt < 0) {
        return;
    }
    auto & st = ctx->kv_policy->seqs[seq_id];
    st.prompt_len      = n_prompt;
    st.prompt_declared = true;
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
    const llama_kv_policy * policy = ctx->kv_policy;
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

const char * llama_kv_policy_last_error(void) {
    return g_kv_policy_error.c_str();
}

struct llama_kv_policy_stats llama_get_kv_policy_stats(const struct llama_context * ctx, llama_seq_id seq_id) {
    llama_kv_policy_stats st = {};
    if (!ctx) {
        return st;
    }
    if (const llama_kv_policy * policy = ctx->kv_policy) {
        if (seq_id < 0) {
            st = policy->total;
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
