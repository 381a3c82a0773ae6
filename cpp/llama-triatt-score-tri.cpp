// llama-triatt-score-tri.cpp: the tri policy's scorer: TriAttention scores of the cached keys.
//
// Every used cell of the sequence's stream is scored in cell order, straight from the K cache: by the
// core's CPU scorer on host rows (read in place, or converted, see llama-triatt-kv.h), or, when K lives
// in device memory, by a ggml graph on the cache's own backend (llama-triatt-score-backend.cpp) so that
// only the scores come back. PYTRIATT_SCORE_BACKEND=1 takes the backend path for host caches too (to
// test it on the CPU). The candidates' rows are then gathered from the cells' scores.

#include "llama-triatt-score.h"

#include "llama-triatt-calib.h"
#include "llama-triatt-kv.h"
#include "llama-triatt-score-backend.h"

#include "llama-context.h"
#include "llama-kv-cache.h"

#include <cstdlib>
#include <cstring>

namespace {

struct llama_kv_scorer_tri : llama_kv_scorer {
    triatt_score_shape shape;
    triatt_calib       calib;
    int32_t            n_threads = 0; // 0: the context's
    int64_t            horizon   = TRIATT_DEFAULT_OFFSETS_MAX; // the farthest future distance the scores average over

    triatt_scorer   * scorer = nullptr;
    triatt_key_rows   keys;

    // K in device memory: the scores are computed where it lives
    triatt_score_backend * scorer_be         = nullptr;
    ggml_backend_t         scorer_be_backend = nullptr;
    bool                   force_backend     = false;

    std::vector<float> cell_scores; // [n_layers][n_cells][n_head]

    ~llama_kv_scorer_tri() override {
        triatt_score_backend_free(scorer_be);
        triatt_scorer_free(scorer);
    }

    triatt_rank rank() const override {
        return TRIATT_RANK_SCORES;
    }

    bool score_cells(llama_context & ctx, llama_kv_cache & kv, llama_seq_id seq_id, int64_t t, uint32_t n_cells,
                     std::string & err) {
        const int32_t n_head = shape.n_head;
        triatt_score_params sp;
        sp.n_threads   = n_threads > 0 ? n_threads : (int32_t) ctx.n_threads();
        sp.offsets_max = horizon;
        cell_scores.resize(shape.layers.size() * (size_t) n_cells * n_head);
        for (size_t li = 0; li < shape.layers.size(); ++li) {
            const int32_t il = shape.layers[li];
            float * out = cell_scores.data() + li * (size_t) n_cells * n_head;
            ggml_tensor * k = kv.get_k_storage(il);
            const bool on_host = k->buffer && ggml_backend_buffer_is_host(k->buffer);
            if (!on_host || force_backend) {
                // score where the cache lives: the context's backend that can use K's buffer
                ggml_backend_t be = triatt_backend_of(ctx, k);
                std::string msg;
                if (be && be != scorer_be_backend) {
                    triatt_score_backend_free(scorer_be);
                    scorer_be = triatt_score_backend_init(be, calib, scorer, msg);
                    scorer_be_backend = scorer_be ? be : nullptr;
                }
                if (be && scorer_be) {
                    if (!triatt_score_backend_layer(scorer_be, il, k, kv.get_stream(seq_id), n_cells,
                                                    kv.get_k_rot_size(), t, out, msg, sp)) {
                        err = "KV policy tri: scoring layer " + std::to_string(il) + " on " + ggml_backend_name(be) +
                              " failed: " + msg;
                        return false;
                    }
                    continue;
                }
                // no backend can read it in place: fall back to copying K to the host
            }
            triatt_key_type kt;
            int64_t stride;
            const void * rows = keys.get(kv, il, kv.get_stream(seq_id), n_cells, kt, stride);
            std::string msg;
            if (!triatt_score_layer(scorer, il, rows, kt, n_cells, stride, t, sp, out, &msg)) {
                err = "KV policy tri: scoring layer " + std::to_string(il) + " failed: " + msg;
                return false;
            }
        }
        return true;
    }

    bool score(const triatt_round_cands & cand, std::vector<float> & out, std::string & err) override {
        if (!score_cells(cand.ctx, cand.kv, cand.seq_id, cand.pos_max, cand.n_cells, err)) {
            return false;
        }
        // the candidates' rows, in position order
        const int32_t n_head = shape.n_head;
        const size_t  n      = cand.cells.size();
        out.resize(shape.layers.size() * n * n_head);
        for (size_t li = 0; li < shape.layers.size(); ++li) {
            const float * src = cell_scores.data() + li * (size_t) cand.n_cells * n_head;
            float * dst = out.data() + li * n * n_head;
            for (size_t i = 0; i < n; ++i) {
                memcpy(dst + i * n_head, src + (size_t) cand.cells[i] * n_head, n_head * sizeof(float));
            }
        }
        return true;
    }
};

} // namespace

llama_kv_scorer_ptr triatt_scorer_tri_init(llama_context & ctx, const llama_kv_policy_params & p,
                                           const triatt_score_shape & shape, std::string & err) {
    auto sc = std::make_unique<llama_kv_scorer_tri>();
    sc->shape     = shape;
    sc->n_threads = p.n_threads;
    sc->horizon   = p.horizon;   // resolved: the policy passes its resolved parameters
    if (!triatt_calib_load(ctx, p.calib_path, shape.layers, sc->calib, err)) {
        return nullptr;
    }
    sc->scorer = triatt_scorer_init(&sc->calib);
    if (!sc->scorer) {
        err = "KV policy tri: cannot create the scorer";
        return nullptr;
    }
    const char * force = getenv("PYTRIATT_SCORE_BACKEND");
    sc->force_backend = force && strcmp(force, "1") == 0;
    return sc;
}
