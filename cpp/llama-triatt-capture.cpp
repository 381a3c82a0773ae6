// llama-triatt-capture.cpp: TriAttention calibration, the llama.cpp side.
//
// Accumulates, for every layer, query head and RoPE band, the complex mean and the
// mean modulus of the pre-RoPE queries while llama_decode runs, through the context's
// eval callback (llama_context_params.cb_eval): no copy of the queries leaves C++.
//
// The pre-RoPE query of layer il is the input of the GGML_OP_ROPE node named "Qcur-<il>"
// (after q_norm where the model has one). The allocator may let that ROPE node overwrite
// its input in place, so the input is read when it is produced: the scheduler is asked to
// stop after every node whose name starts with "Qcur", the data of the non-ROPE ones is
// staged by address, and a ROPE node accumulates the staged copy of its src[0]. The band pairing and
// the number of rotary dims come from the ROPE node's own parameters.
//
// A layer without RoPE (NoPE: llama_hparams::has_rope, the graph's own rule since patch llama.cpp/0006)
// has no ROPE node: its query is the last "Qcur-<il>" node shaped [head_dim, n_head, n_tokens], taken
// once the graph has moved on to another layer (or when the statistics are read), with the model's
// pairing over its n_rot dims. Its
// statistics are the same E[q_f] and E|q_f|, which the distance-free NoPE score uses.
//
// Compiled into libllama only (it needs ggml); declared in llama.h by the pytriatt patch.

#include "llama.h"
#include "llama-model.h"

#include "ggml-backend.h"
#include "ggml.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <map>
#include <string>
#include <vector>

struct llama_triatt_capture {
    int32_t n_layer = 0;
    int32_t n_head  = 0;
    int32_t n_freq  = 0; // bands of the widest rotary layer seen so far

    // per layer: sums over tokens, [n_head][n_freq_l] (allocated when the layer is first seen)
    struct layer_sums {
        int32_t n_freq = 0;
        uint64_t n_tokens = 0;
        std::vector<double> re, im, abs;
    };
    std::vector<layer_sums> layers;

    // data of the Qcur* nodes computed since the last ROPE, by data address: the ROPE input may be
    // a view (reshape) of the node that was observed, which shares its address
    std::map<const void *, std::vector<float>> staged;
    std::vector<uint8_t> raw;

    int32_t n_missed = 0; // ROPE nodes whose input was not staged (should stay 0)
    std::string error;

    // NoPE layers: which layers have no RoPE, the model's pairing and rotary dims, and the last
    // query node of the NoPE layer being computed (accumulated when the graph leaves the layer)
    std::vector<uint8_t> nope;
    std::vector<int32_t> n_rot;
    bool neox = false;
    int32_t pending_il = -1;
    std::vector<float> pending_q;
    int32_t pending_head_dim = 0;
    int64_t pending_tokens = 0;
};

static bool triatt_is_qcur(const ggml_tensor * t) {
    return strncmp(ggml_get_name(t), "Qcur", 4) == 0;
}

// "Qcur-12" -> 12; -1 if the name carries no layer index
static int32_t triatt_layer_of(const ggml_tensor * t) {
    const char * dash = strrchr(ggml_get_name(t), '-');
    if (!dash || !dash[1]) {
        return -1;
    }
    char * end = nullptr;
    const long il = strtol(dash + 1, &end, 10);
    return (*end == '\0' || *end == ' ') ? (int32_t) il : -1;
}

// copy a (possibly strided, possibly non-host) 3-d tensor into a contiguous float array
static bool triatt_stage(llama_triatt_capture * cap, const ggml_tensor * t, std::vector<float> & out) {
    if (t->type != GGML_TYPE_F32 && t->type != GGML_TYPE_F16) {
        return false;
    }
    const size_t nbytes = ggml_nbytes(t);
    cap->raw.resize(nbytes);
    ggml_backend_tensor_get(t, cap->raw.data(), 0, nbytes);

    const int64_t ne0 = t->ne[0], ne1 = t->ne[1], ne2 = t->ne[2] * t->ne[3];
    out.resize((size_t) (ne0 * ne1 * ne2));
    size_t k = 0;
    for (int64_t i3 = 0; i3 < t->ne[3]; ++i3) {
        for (int64_t i2 = 0; i2 < t->ne[2]; ++i2) {
            for (int64_t i1 = 0; i1 < ne1; ++i1) {
                const uint8_t * row = cap->raw.data() + i1*t->nb[1] + i2*t->nb[2] + i3*t->nb[3];
                for (int64_t i0 = 0; i0 < ne0; ++i0) {
                    const uint8_t * p = row + i0*t->nb[0];
                    out[k++] = t->type == GGML_TYPE_F32 ? *(const float *) p
                                                        : ggml_fp16_to_fp32(*(const ggml_fp16_t *) p);
                }
            }
        }
    }
    return true;
}

// adds n_tokens queries [n_tokens][n_head][head_dim] of layer il to its sums, bands paired over n_rot dims
static void triatt_accumulate(llama_triatt_capture * cap, int32_t il, int32_t head_dim, int32_t n_head,
                              int64_t n_tokens, int32_t n_rot, bool neox, const std::vector<float> & q) {
    if (il < 0 || il >= cap->n_layer || n_head != cap->n_head || n_rot <= 0 || n_rot > head_dim || n_rot % 2 ||
        (int64_t) q.size() != n_tokens * n_head * head_dim) {
        cap->n_missed++;
        return;
    }
    const int32_t n_freq = n_rot / 2;

    auto & ls = cap->layers[il];
    if (ls.n_freq == 0) {
        ls.n_freq = n_freq;
        ls.re.assign((size_t) n_head * n_freq, 0.0);
        ls.im.assign((size_t) n_head * n_freq, 0.0);
        ls.abs.assign((size_t) n_head * n_freq, 0.0);
        if (n_freq > cap->n_freq) {
            cap->n_freq = n_freq;
        }
    } else if (ls.n_freq != n_freq) {
        cap->n_missed++;
        return;
    }

    for (int64_t it = 0; it < n_tokens; ++it) {
        for (int32_t h = 0; h < n_head; ++h) {
            const float * x = q.data() + (it*n_head + h)*head_dim;
            double * re = ls.re.data()  + (size_t) h*n_freq;
            double * im = ls.im.data()  + (size_t) h*n_freq;
            double * ab = ls.abs.data() + (size_t) h*n_freq;
            for (int32_t f = 0; f < n_freq; ++f) {
                const double a = neox ? x[f] : x[2*f];
                const double b = neox ? x[f + n_freq] : x[2*f + 1];
                re[f] += a;
                im[f] += b;
                ab[f] += std::sqrt(a*a + b*b);
            }
        }
    }
    ls.n_tokens += (uint64_t) n_tokens;
}

static void triatt_accumulate_rope(llama_triatt_capture * cap, const ggml_tensor * rope, const std::vector<float> & q) {
    const ggml_tensor * src = rope->src[0];
    const int32_t mode = ((const int32_t *) rope->op_params)[2];
    triatt_accumulate(cap, triatt_layer_of(rope), (int32_t) src->ne[0], (int32_t) src->ne[1], src->ne[2] * src->ne[3],
                      ((const int32_t *) rope->op_params)[1], (mode & GGML_ROPE_TYPE_NEOX) != 0, q);
}

// the query of the NoPE layer the graph just left
static void triatt_flush_nope(llama_triatt_capture * cap) {
    if (cap->pending_il >= 0) {
        const int32_t il = cap->pending_il;
        triatt_accumulate(cap, il, cap->pending_head_dim, cap->n_head, cap->pending_tokens, cap->n_rot[il], cap->neox,
                          cap->pending_q);
        cap->pending_il = -1;
    }
}

struct llama_triatt_capture * llama_triatt_capture_init(const struct llama_model * model) {
    if (!model) {
        return nullptr;
    }
    auto * cap = new llama_triatt_capture;
    cap->n_layer = llama_model_n_layer(model);
    cap->n_head  = llama_model_n_head(model);
    cap->layers.resize(cap->n_layer);
    cap->nope.resize(cap->n_layer);
    cap->n_rot.resize(cap->n_layer);
    cap->neox = llama_model_rope_type(model) == LLAMA_ROPE_TYPE_NEOX;
    for (int32_t il = 0; il < cap->n_layer; ++il) {
        cap->nope[il]  = !model->hparams.has_rope((uint32_t) il);
        cap->n_rot[il] = (int32_t) model->hparams.n_rot(il);
    }
    return cap;
}

void llama_triatt_capture_free(struct llama_triatt_capture * cap) {
    delete cap;
}

bool llama_triatt_capture_cb_eval(struct ggml_tensor * t, bool ask, void * user_data) {
    auto * cap = (llama_triatt_capture *) user_data;
    if (!triatt_is_qcur(t)) {
        return ask ? false : true;
    }
    if (ask) {
        return true; // observe it: the scheduler computes up to this node and calls us again
    }
    const int32_t il = triatt_layer_of(t);
    if (cap->pending_il >= 0 && il != cap->pending_il) {
        triatt_flush_nope(cap); // the graph moved on to another layer
    }
    if (il >= 0 && il < cap->n_layer && cap->nope[il]) {
        // a NoPE layer: keep its latest query node of the right shape (views of the projection come last)
        if (t->ne[1] == cap->n_head && t->ne[0] % 2 == 0 && triatt_stage(cap, t, cap->pending_q)) {
            cap->pending_il       = il;
            cap->pending_head_dim = (int32_t) t->ne[0];
            cap->pending_tokens   = t->ne[2] * t->ne[3];
        }
        return true;
    }
    if (t->op == GGML_OP_ROPE) {
        const ggml_tensor * src = t->src[0];
        auto it = cap->staged.find(src->data);
        if (it == cap->staged.end() || (int64_t) it->second.size() != ggml_nelements(src)) {
            cap->n_missed++;
        } else {
            triatt_accumulate_rope(cap, t, it->second);
        }
        cap->staged.clear();
        return true;
    }
    std::vector<float> & buf = cap->staged[t->data];
    if (!triatt_stage(cap, t, buf)) {
        cap->staged.erase(t->data);
    }
    return true;
}

// the readers take a const capture (llama.h); the last NoPE layer's query is still pending after a decode,
// so they complete it first (the capture is always created mutable by llama_triatt_capture_init)
static const llama_triatt_capture * triatt_complete(const llama_triatt_capture * cap) {
    if (cap) {
        triatt_flush_nope(const_cast<llama_triatt_capture *>(cap));
    }
    return cap;
}

int32_t llama_triatt_capture_n_freq(const struct llama_triatt_capture * cap) {
    return triatt_complete(cap) ? cap->n_freq : -1;
}

int32_t llama_triatt_capture_n_missed(const struct llama_triatt_capture * cap) {
    return triatt_complete(cap) ? cap->n_missed : -1;
}

int64_t llama_triatt_capture_get(
        const struct llama_triatt_capture * cap,
        double * mean_re, double * mean_im, double * abs_mean,
        uint64_t * n_tokens, int32_t n_freq) {
    if (!triatt_complete(cap) || n_freq < cap->n_freq) {
        return -1;
    }
    const size_t n = (size_t) cap->n_layer * cap->n_head * n_freq;
    for (double * a : { mean_re, mean_im, abs_mean }) {
        if (a) {
            std::fill(a, a + n, 0.0);
        }
    }
    uint64_t n_max = 0;
    for (int32_t il = 0; il < cap->n_layer; ++il) {
        const auto & ls = cap->layers[il];
        if (n_tokens) {
            n_tokens[il] = ls.n_tokens;
        }
        if (ls.n_tokens == 0) {
            continue; // a layer without RoPE'd queries (no KV, or never seen): zeros
        }
        n_max = std::max(n_max, ls.n_tokens);
        const double inv = 1.0 / (double) ls.n_tokens;
        for (int32_t h = 0; h < cap->n_head; ++h) {
            for (int32_t f = 0; f < ls.n_freq; ++f) {
                const size_t src = (size_t) h*ls.n_freq + f;
                const size_t dst = ((size_t) il*cap->n_head + h)*n_freq + f;
                if (mean_re)  { mean_re[dst]  = ls.re[src]  * inv; }
                if (mean_im)  { mean_im[dst]  = ls.im[src]  * inv; }
                if (abs_mean) { abs_mean[dst] = ls.abs[src] * inv; }
            }
        }
    }
    return (int64_t) n_max;
}
