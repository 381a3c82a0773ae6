// llama-triatt-score-snapkv.cpp: the snapkv policy's scorer (the SnapKV baseline, docs/eviction.md).
//
// A cached key's score for a query head is the attention the snap_window most recent post-RoPE queries
// paid it: softmax over the candidates per query, summed over the queries, max-pooled over 7 neighbouring
// candidates. The queries are captured while decoding by the context's eval callback
// (triatt_snapkv_cb_eval, chained to the user's), one ring buffer per scored layer; they are the
// context's recent tokens, so the policy needs a context with one sequence.

#include "llama-triatt-score.h"

#include "llama-triatt-kv.h"

#include "llama-context.h"
#include "llama-kv-cache.h"
#include "llama-model.h"

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>

namespace {

float triatt_key_at(const void * keys, triatt_key_type type, size_t i) {
    return type == TRIATT_KEY_F32 ? ((const float *) keys)[i] : ggml_fp16_to_fp32(((const ggml_fp16_t *) keys)[i]);
}

struct llama_kv_scorer_snapkv : llama_kv_scorer {
    triatt_score_shape shape;
    int32_t window   = 0;
    float   kq_scale = 1.0f;

    // the post-RoPE queries of the most recent tokens, per layer (ring buffers of window x n_head x head_dim;
    // empty for layers that are not scored)
    struct snap_queries {
        std::vector<float> q;
        int32_t n    = 0; // queries held
        int32_t next = 0; // ring slot the next query goes to
    };
    std::vector<snap_queries> snap;

    ggml_backend_sched_eval_callback user_cb_eval      = nullptr;
    void *                           user_cb_eval_data = nullptr;

    std::vector<uint8_t> q_raw;    // a captured query node
    triatt_key_rows      key_rows;
    std::vector<float>   attn;     // [n_cand] attention of one query
    std::vector<float>   kf;       // [n_cand, head_dim] one KV head's candidate keys as f32
    std::vector<float>   mass;     // [n_cand] attention summed over the window's queries

    triatt_rank rank() const override {
        return TRIATT_RANK_SCORES; // the same aggregation over heads and layers as tri
    }

    void reset() override {
        for (auto & sq : snap) {
            sq.n = sq.next = 0;
        }
    }

    bool score(const triatt_round_cands & cand, std::vector<float> & out_all, std::string & /*err*/) override {
        const std::vector<uint32_t> & cand_cell = cand.cells;
        const std::vector<int32_t> & layers = shape.layers;
        const int32_t n_head    = shape.n_head;
        const int32_t n_head_kv = shape.n_head_kv;
        const int32_t head_dim  = shape.head_dim;
        const int64_t n = (int64_t) cand_cell.size();
        const int32_t n_gqa = n_head / n_head_kv;
        const int32_t pool = 7; // SnapKV's kernel: keep the neighbours of attended tokens too
        out_all.assign(layers.size() * (size_t) n * n_head, 0.0f);
        kf.resize((size_t) n * head_dim);
        mass.resize(n);
        attn.resize(n);
        for (size_t li = 0; li < layers.size(); ++li) {
            const snap_queries & sq = snap[layers[li]];
            triatt_key_type kt;
            int64_t stride;
            const void * keys = key_rows.get(cand.kv, layers[li], cand.kv.get_stream(cand.seq_id), cand.n_cells, kt, stride);
            float * out = out_all.data() + li * (size_t) n * n_head;
            for (int32_t h = 0; h < n_head; ++h) {
                const int32_t g = h / n_gqa;
                if (h % n_gqa == 0) {
                    // the query heads of one KV head share its keys: convert them once
                    for (int64_t i = 0; i < n; ++i) {
                        const size_t off = (size_t) cand_cell[i] * stride + (size_t) g * head_dim;
                        for (int32_t d = 0; d < head_dim; ++d) {
                            kf[(size_t) i * head_dim + d] = triatt_key_at(keys, kt, off + d);
                        }
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
                        attn[i] = dot * kq_scale;
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
};

} // namespace

bool triatt_snapkv_cb_eval(struct ggml_tensor * t, bool ask, void * user_data) {
    // the policy registers its scorer through the base class pointer: cast back the same way
    auto * self = static_cast<llama_kv_scorer_snapkv *>(static_cast<llama_kv_scorer *>(user_data));
    // the post-RoPE query of layer il is the ROPE node named "Qcur-<il>"
    bool mine = t->op == GGML_OP_ROPE && strncmp(ggml_get_name(t), "Qcur-", 5) == 0 && t->type == GGML_TYPE_F32;
    int32_t il = -1;
    if (mine) {
        il = atoi(ggml_get_name(t) + 5);
        mine = il >= 0 && il < (int32_t) self->snap.size() && !self->snap[il].q.empty() &&
               t->ne[0] == self->shape.head_dim && t->ne[1] == self->shape.n_head;
    }
    const bool theirs = self->user_cb_eval && self->user_cb_eval(t, true, self->user_cb_eval_data);
    if (ask) {
        return mine || theirs;
    }
    if (mine) {
        auto & sq = self->snap[il];
        const int64_t n_tokens = t->ne[2];
        self->q_raw.resize(ggml_nbytes(t));
        ggml_backend_tensor_get(t, self->q_raw.data(), 0, ggml_nbytes(t));
        const int32_t window = self->window;
        for (int64_t i = std::max<int64_t>(0, n_tokens - window); i < n_tokens; ++i) {
            float * dst = sq.q.data() + (size_t) sq.next * self->shape.head_dim * self->shape.n_head;
            for (int32_t h = 0; h < self->shape.n_head; ++h) {
                memcpy(dst + (size_t) h * self->shape.head_dim, self->q_raw.data() + h * t->nb[1] + i * t->nb[2],
                       self->shape.head_dim * sizeof(float));
            }
            sq.next = (sq.next + 1) % window;
            sq.n = std::min(sq.n + 1, window);
        }
    }
    return theirs ? self->user_cb_eval(t, false, self->user_cb_eval_data) : true;
}

llama_kv_scorer_ptr triatt_scorer_snapkv_init(llama_context & ctx, const llama_kv_policy_params & p,
                                              const triatt_score_shape & shape, std::string & err) {
    // the query window is the context's recent tokens: one sequence per context
    if (ctx.get_cparams().n_seq_max > 1) {
        err = "KV policy snapkv: the observation window holds the context's recent queries, so it needs a "
              "context with one sequence (n_seq_max = 1)";
        return nullptr;
    }
    if (p.snap_window < 1) {
        err = "KV policy snapkv: snap_window must be >= 1";
        return nullptr;
    }
    const auto & hp = ctx.get_model().hparams;
    auto sc = std::make_unique<llama_kv_scorer_snapkv>();
    sc->shape  = shape;
    sc->window = p.snap_window;
    sc->snap.resize(hp.n_layer());
    for (int32_t il : shape.layers) {
        sc->snap[il].q.assign((size_t) p.snap_window * shape.n_head * shape.head_dim, 0.0f);
    }
    sc->kq_scale = hp.f_attention_scale != 0.0f ? hp.f_attention_scale : 1.0f / std::sqrt((float) shape.head_dim);
    return sc;
}

void triatt_snapkv_set_user_cb(llama_kv_scorer & scorer, ggml_backend_sched_eval_callback cb, void * cb_data) {
    auto & sc = static_cast<llama_kv_scorer_snapkv &>(scorer);
    sc.user_cb_eval      = cb;
    sc.user_cb_eval_data = cb_data;
}

void triatt_snapkv_get_user_cb(void * user_data, ggml_backend_sched_eval_callback & cb, void * & cb_data) {
    const auto * sc = static_cast<const llama_kv_scorer_snapkv *>(static_cast<const llama_kv_scorer *>(user_data));
    cb      = sc->user_cb_eval;
    cb_data = sc->user_cb_eval_data;
}
