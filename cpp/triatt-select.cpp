// triatt-select.cpp: ranking of scored candidates and the keep/evict decision
// (see triatt_select() in triatt-core.h for the exact rules).

#include "triatt-core.h"

#include <algorithm>
#include <cmath>
#include <limits>

struct triatt_selector {
    std::vector<float>   token;   // [n] token-level score
    std::vector<uint8_t> prot;    // [n] 1: protected
    std::vector<int64_t> order;   // [n] scratch: candidate indices
    std::vector<double>  mean;    // [n_head]
    std::vector<double>  inv_std; // [n_head]
    std::vector<int64_t> cnt;     // [n_head]
    std::vector<float>   mean_f;  // [n_head]
    std::vector<float>   inv_f;   // [n_head]
    std::vector<float>   acc;     // [n][n_head_kv]: sum over layers of the group max z-score
    int64_t              n_protected = 0;
};

triatt_selector * triatt_selector_init(void) {
    return new triatt_selector();
}

void triatt_selector_free(triatt_selector * sel) {
    delete sel;
}

const float * triatt_selector_token_scores(const triatt_selector * sel) {
    return sel->token.data();
}

int64_t triatt_selector_n_protected(const triatt_selector * sel) {
    return sel->n_protected;
}

// splitmix64: a well-mixed 64-bit hash, so RANDOM depends only on (seed, position)
static uint64_t triatt_mix64(uint64_t x) {
    x += 0x9e3779b97f4a7c15ull;
    x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
    x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
    return x ^ (x >> 31);
}

// z-score the raw scores of one layer over the unprotected candidates and add the
// per-group max to acc. Non-finite raw scores are left out of a head's mean and std;
// their z-score never wins a group max (a group with no finite z-score gives -inf,
// so the token ranks last).
static void triatt_accumulate_layer(
        triatt_selector * sel, const float * x, int64_t n, int32_t n_head, int32_t n_head_kv) {
    const int32_t n_group = n_head / n_head_kv;
    const uint8_t * prot = sel->prot.data();
    double *  sum  = sel->mean.data();
    double *  sq   = sel->inv_std.data();
    int64_t * cnt  = sel->cnt.data();
    float *   mf   = sel->mean_f.data();
    float *   inf_ = sel->inv_f.data();

    // one pass for the sums and sums of squares (double accumulators); a head whose sums
    // are not finite is recomputed over its finite scores only
    std::fill(sum, sum + n_head, 0.0);
    std::fill(sq, sq + n_head, 0.0);
    int64_t n_unprot = 0;
    for (int64_t i = 0; i < n; ++i) {
        if (prot[i]) {
            continue;
        }
        ++n_unprot;
        const float * xi = x + i * n_head;
        for (int32_t h = 0; h < n_head; ++h) {
            const double v = xi[h];
            sum[h] += v;
            sq[h]  += v * v;
        }
    }
    for (int32_t h = 0; h < n_head; ++h) {
        cnt[h] = n_unprot;
        if (!std::isfinite(sum[h]) || !std::isfinite(sq[h])) {
            sum[h] = 0.0;
            sq[h]  = 0.0;
            cnt[h] = 0;
            for (int64_t i = 0; i < n; ++i) {
                const float v = x[i * n_head + h];
                if (!prot[i] && std::isfinite(v)) {
                    sum[h] += v;
                    sq[h]  += (double) v * v;
                    cnt[h] += 1;
                }
            }
        }
        const double mean = cnt[h] > 0 ? sum[h] / (double) cnt[h] : 0.0;
        const double var  = cnt[h] > 0 ? std::max(0.0, sq[h] / (double) cnt[h] - mean * mean) : 0.0;
        mf[h]   = (float) mean;
        inf_[h] = (float) (1.0 / std::max(std::sqrt(var), 1e-6));
    }

    for (int64_t i = 0; i < n; ++i) {
        if (prot[i]) {
            continue;
        }
        const float * xi = x + i * n_head;
        float * ai = sel->acc.data() + i * n_head_kv;
        for (int32_t g = 0; g < n_head_kv; ++g) {
            float m = -std::numeric_limits<float>::infinity();
            for (int32_t j = 0; j < n_group; ++j) {
                const int32_t h = g * n_group + j;
                const float z = (xi[h] - mf[h]) * inf_[h];
                m = z > m ? z : m; // a NaN z-score never wins
            }
            ai[g] += m;
        }
    }
}

int64_t triatt_select(
        triatt_selector * sel, const triatt_select_params & p,
        int64_t n, const int32_t * pos,
        const float * const * layer_scores, int32_t n_layers, int32_t n_head, int32_t n_head_kv,
        int64_t * keep, std::string * err) {
    auto fail = [err](const std::string & msg) -> int64_t {
        if (err) {
            *err = msg;
        }
        return -1;
    };
    if (sel == nullptr) {
        return fail("selector is null");
    }
    if (n < 0 || p.budget < 0 || p.n_sink < 0 || p.n_window < 0 || p.prompt_len < 0) {
        return fail("n, budget, sink, window and prompt_len must be >= 0");
    }
    if (p.rank != TRIATT_RANK_SCORES && p.rank != TRIATT_RANK_RECENT && p.rank != TRIATT_RANK_RANDOM) {
        return fail("unknown rank");
    }
    if (p.kv_agg != TRIATT_KV_AGG_MAX && p.kv_agg != TRIATT_KV_AGG_MEAN) {
        return fail("unknown kv_agg");
    }
    if (n > 0 && (pos == nullptr || keep == nullptr)) {
        return fail("pos and keep must not be null");
    }
    if (p.rank == TRIATT_RANK_SCORES && n > 0) {
        if (n_layers < 1 || layer_scores == nullptr) {
            return fail("ranking by scores needs the raw scores of at least one layer");
        }
        if (n_head < 1 || n_head_kv < 1 || n_head % n_head_kv != 0) {
            return fail("n_head must be a positive multiple of n_head_kv");
        }
        for (int32_t l = 0; l < n_layers; ++l) {
            if (layer_scores[l] == nullptr) {
                return fail("layer_scores[" + std::to_string(l) + "] is null");
            }
        }
    }

    sel->token.resize(n);
    sel->prot.assign(n, 0);
    sel->order.resize(n);
    sel->n_protected = 0;

    // candidates by ascending position (ties: ascending index)
    int64_t * order = sel->order.data();
    bool sorted = true;
    for (int64_t i = 0; i < n; ++i) {
        order[i] = i;
        if (i > 0 && pos[i] < pos[i - 1]) {
            sorted = false;
        }
    }
    if (!sorted) {
        std::sort(order, order + n, [pos](int64_t a, int64_t b) {
            return pos[a] != pos[b] ? pos[a] < pos[b] : a < b;
        });
    }

    // protections
    uint8_t * prot = sel->prot.data();
    const int64_t n_sink   = std::min(p.n_sink, n);
    const int64_t n_window = std::min(p.n_window, n);
    for (int64_t r = 0; r < n_sink; ++r) {
        prot[order[r]] = 1;
    }
    for (int64_t r = n - n_window; r < n; ++r) {
        prot[order[r]] = 1;
    }
    int64_t n_prompt = 0;
    for (int64_t i = 0; i < n; ++i) {
        if (pos[i] < p.prompt_len) {
            prot[i] = 1;
            ++n_prompt;
        }
    }
    int64_t n_prot = 0;
    for (int64_t i = 0; i < n; ++i) {
        n_prot += prot[i];
    }
    sel->n_protected = n_prot;

    const float inf = std::numeric_limits<float>::infinity();


    // token-level scores of the unprotected candidates
    float * token = sel->token.data();
    switch (p.rank) {
        case TRIATT_RANK_SCORES: {
            sel->mean.resize(n_head);
            sel->inv_std.resize(n_head);
            sel->cnt.resize(n_head);
            sel->mean_f.resize(n_head);
            sel->inv_f.resize(n_head);
            sel->acc.assign((size_t) n * n_head_kv, 0.0f);
            for (int32_t l = 0; l < n_layers; ++l) {
                triatt_accumulate_layer(sel, layer_scores[l], n, n_head, n_head_kv);
            }
            const float inv_l = 1.0f / (float) n_layers;
            for (int64_t i = 0; i < n; ++i) {
                if (prot[i]) {
                    continue;
                }
                const float * ai = sel->acc.data() + i * n_head_kv;
                float v;
                if (p.kv_agg == TRIATT_KV_AGG_MAX) {
                    v = -inf;
                    for (int32_t g = 0; g < n_head_kv; ++g) {
                        v = std::max(v, ai[g]);
                    }
                } else {
                    double sum = 0.0;
                    for (int32_t g = 0; g < n_head_kv; ++g) {
                        sum += ai[g];
                    }
                    v = (float) (sum / n_head_kv);
                }
                token[i] = v * inv_l;
            }
        } break;
        case TRIATT_RANK_RECENT: {
            // newest first: the score is the position (ties resolved by position anyway)
            for (int64_t i = 0; i < n; ++i) {
                token[i] = (float) pos[i];
            }
        } break;
        case TRIATT_RANK_RANDOM: {
            for (int64_t i = 0; i < n; ++i) {
                const uint64_t h = triatt_mix64(p.seed ^ triatt_mix64((uint64_t) (uint32_t) pos[i]));
                token[i] = (float) (h >> 40) * (1.0f / 16777216.0f); // [0, 1)
            }
        } break;
    }
    for (int64_t i = 0; i < n; ++i) {
        if (prot[i]) {
            token[i] = inf;
        } else if (std::isnan(token[i])) {
            token[i] = -inf;
        }
    }

    if (p.budget >= n) {
        for (int64_t i = 0; i < n; ++i) {
            keep[i] = i;
        }
        return n;
    }
    if (n_prot > p.budget) {
        return fail("the protected tokens alone exceed the budget: " + std::to_string(n_prot) +
                    " protected (sink " + std::to_string(n_sink) + ", window " + std::to_string(n_window) +
                    ", prompt " + std::to_string(n_prompt) + ", overlaps counted once) > budget " +
                    std::to_string(p.budget) + "; raise the budget or lower sink/window/prompt protection");
    }

    // best (budget - n_prot) unprotected candidates: higher score, then newer position,
    // then later index
    int64_t n_cand = 0;
    for (int64_t i = 0; i < n; ++i) {
        if (!prot[i]) {
            order[n_cand++] = i;
        }
    }
    const int64_t n_take = p.budget - n_prot;
    auto better = [token, pos](int64_t a, int64_t b) {
        if (token[a] != token[b]) {
            return token[a] > token[b];
        }
        if (pos[a] != pos[b]) {
            return pos[a] > pos[b];
        }
        return a > b;
    };
    if (n_take < n_cand) {
        std::nth_element(order, order + n_take, order + n_cand, better);
    }
    for (int64_t r = 0; r < std::min(n_take, n_cand); ++r) {
        prot[order[r]] = 2; // kept (reuses the flag array)
    }
    int64_t n_keep = 0;
    for (int64_t i = 0; i < n; ++i) {
        if (prot[i]) {
            keep[n_keep++] = i;
        }
    }
    // restore the protection flags for callers that inspect them
    for (int64_t i = 0; i < n; ++i) {
        if (prot[i] == 2) {
            prot[i] = 0;
        }
    }
    return n_keep;
}
