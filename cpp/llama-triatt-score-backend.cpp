// llama-triatt-score-backend.cpp: TriAttention scores computed by a ggml graph on the K cache's backend.
// See llama-triatt-score-backend.h.

#include "llama-triatt-score-backend.h"

#include "ggml-alloc.h"

#include <cmath>
#include <cstdint>
#include <vector>

struct triatt_score_backend {
    ggml_backend_t       backend = nullptr;
    const triatt_calib * cal     = nullptr;

    // the CPU scorer (borrowed): it builds the synthetic queries and norm weights, so both paths use the same
    triatt_scorer * scorer = nullptr;

    // per-call host staging
    std::vector<float> W;    // [n_head][head_dim]: synthetic queries in the key's dim order, 0 beyond n_rot
    std::vector<float> nw;   // [n_head][n_freq]: norm weights of the layer's bands

    // the orthonormal Walsh-Hadamard matrix [k_rot][k_rot], in a backend buffer of its own: built and uploaded
    // once per k_rot (a cache's k_rot never changes), not once per layer and round
    ggml_context *        h_ctx = nullptr;
    ggml_backend_buffer_t h_buf = nullptr;
    ggml_tensor *         h     = nullptr;

    std::vector<uint8_t> meta;  // ggml context memory (tensor and graph headers only)
    ggml_gallocr_t       galloc = nullptr;
};

triatt_score_backend * triatt_score_backend_init(ggml_backend_t backend, const triatt_calib & cal, triatt_scorer * scorer,
                                                 std::string & err) {
    if (backend == nullptr || scorer == nullptr) {
        err = backend ? "no CPU scorer" : "no backend";
        return nullptr;
    }
    if (!triatt_calib_check(cal, err)) {
        return nullptr;
    }
    auto * sb = new triatt_score_backend();
    sb->backend = backend;
    sb->cal     = &cal;
    sb->scorer  = scorer;
    sb->meta.resize(ggml_tensor_overhead() * 64 + ggml_graph_overhead());
    sb->galloc = ggml_gallocr_new(ggml_backend_get_default_buffer_type(backend));
    if (!sb->galloc) {
        err = "cannot create a graph allocator for the backend";
        triatt_score_backend_free(sb);
        return nullptr;
    }
    return sb;
}

static void triatt_backend_free_hadamard(triatt_score_backend * sb) {
    ggml_backend_buffer_free(sb->h_buf);
    if (sb->h_ctx) {
        ggml_free(sb->h_ctx);
    }
    sb->h_ctx = nullptr;
    sb->h_buf = nullptr;
    sb->h     = nullptr;
}

void triatt_score_backend_free(triatt_score_backend * sb) {
    if (sb) {
        ggml_gallocr_free(sb->galloc);
        triatt_backend_free_hadamard(sb);
        delete sb;
    }
}

// the parity of the set bits of x (what __builtin_popcount(x) & 1 gives, without the builtin)
static int triatt_parity(uint32_t x) {
    x ^= x >> 16;
    x ^= x >> 8;
    x ^= x >> 4;
    x ^= x >> 2;
    x ^= x >> 1;
    return (int) (x & 1);
}

// the orthonormal Sylvester-Hadamard matrix of order n (a power of two): H[i][j] = (-1)^popcount(i & j) / sqrt(n),
// the matrix llama.cpp rotates quantized K with (symmetric, its own inverse); on the backend, made once per n
static ggml_tensor * triatt_backend_hadamard(triatt_score_backend * sb, int32_t n, std::string & err) {
    if (sb->h && sb->h->ne[0] == n) {
        return sb->h;
    }
    triatt_backend_free_hadamard(sb);
    ggml_init_params ip = { /*.mem_size =*/ ggml_tensor_overhead(), /*.mem_buffer =*/ nullptr, /*.no_alloc =*/ true };
    sb->h_ctx = ggml_init(ip);
    if (!sb->h_ctx) {
        err = "ggml_init failed";
        return nullptr;
    }
    ggml_tensor * h = ggml_new_tensor_2d(sb->h_ctx, GGML_TYPE_F32, n, n);
    sb->h_buf = ggml_backend_alloc_ctx_tensors(sb->h_ctx, sb->backend);
    if (!sb->h_buf) {
        err = "cannot allocate the Hadamard matrix on the backend";
        triatt_backend_free_hadamard(sb);
        return nullptr;
    }
    std::vector<float> H((size_t) n * n);
    const float scale = 1.0f / std::sqrt((float) n);
    for (int32_t i = 0; i < n; ++i) {
        for (int32_t j = 0; j < n; ++j) {
            H[(size_t) i * n + j] = triatt_parity((uint32_t) (i & j)) ? -scale : scale;
        }
    }
    ggml_backend_tensor_set(h, H.data(), 0, ggml_nbytes(h));
    sb->h = h;
    return h;
}

bool triatt_score_backend_layer(triatt_score_backend * sb, int32_t il, const ggml_tensor * k_storage, uint32_t stream,
                                uint32_t n_cells, int32_t k_rot, int64_t t, float * scores, std::string & err,
                                const triatt_score_params & params) {
    if (sb == nullptr) {
        err = "no workspace";
        return false;
    }
    const triatt_calib & cal = *sb->cal;
    if (il < 0 || il >= cal.n_layer) {
        err = "layer " + std::to_string(il) + " out of range [0, " + std::to_string(cal.n_layer) + ")";
        return false;
    }
    if (!cal.has_kv.empty() && !cal.has_kv[il]) {
        err = "layer " + std::to_string(il) + " has no KV cache of its own: nothing to score";
        return false;
    }
    if (k_storage == nullptr || k_storage->buffer == nullptr || k_storage->data == nullptr) {
        err = "the K tensor is not allocated";
        return false;
    }
    const int64_t head_dim  = cal.head_dim;
    const int64_t n_head    = cal.n_head;
    const int64_t n_head_kv = cal.n_head_kv;
    const int64_t n_embd    = n_head_kv * head_dim;
    const int64_t n_rot     = cal.rope[il].n_rot;
    const int64_t n_freq    = n_rot / 2;
    const ggml_type type    = k_storage->type;
    if (k_storage->ne[0] != n_embd) {
        err = "K rows hold " + std::to_string(k_storage->ne[0]) + " values, expected n_head_kv * head_dim = " + std::to_string(n_embd);
        return false;
    }
    if (stream >= (uint32_t) k_storage->ne[2] || n_cells > (uint32_t) k_storage->ne[1]) {
        err = "stream or n_cells out of the K tensor's range";
        return false;
    }
    if (type != GGML_TYPE_F32 && type != GGML_TYPE_F16 && type != GGML_TYPE_BF16 &&
        !(ggml_is_quantized(type) && ggml_get_type_traits(type)->to_float)) {
        err = std::string("K type ") + ggml_type_name(type) + " cannot be converted to f32";
        return false;
    }
    if (k_rot < 0 || (k_rot > 0 && ((k_rot & (k_rot - 1)) != 0 || n_embd % k_rot != 0 || k_rot % ggml_blck_size(type) != 0))) {
        err = "k_rot must be 0 or a power of two dividing the K row (and a whole number of " +
              std::string(ggml_type_name(type)) + " blocks)";
        return false;
    }
    if (n_cells == 0) {
        return true;
    }
    if (scores == nullptr) {
        err = "scores must not be null";
        return false;
    }

    // the round's synthetic queries and the layer's norm weights, as the CPU scorer builds them
    sb->W.assign((size_t) n_head * head_dim, 0.0f);
    if (!triatt_scorer_queries(sb->scorer, il, t, params, sb->W.data(), head_dim, &err)) {
        return false;
    }
    const float * Nw_il = triatt_scorer_norm_weights(sb->scorer, il);
    sb->nw.assign((size_t) n_head * n_freq, 0.0f);
    for (int64_t h = 0; h < n_head && params.norm; ++h) {
        for (int64_t f = 0; f < n_freq; ++f) {
            sb->nw[h * n_freq + f] = Nw_il[h * cal.n_freq + f];
        }
    }

    ggml_init_params ip = { /*.mem_size =*/ sb->meta.size(), /*.mem_buffer =*/ sb->meta.data(), /*.no_alloc =*/ true };
    ggml_context * ctx = ggml_init(ip);
    if (!ctx) {
        err = "ggml_init failed";
        return false;
    }

    // the stream's first n_cells rows: contiguous
    ggml_tensor * k = ggml_view_2d(ctx, const_cast<ggml_tensor *>(k_storage), n_embd, n_cells, k_storage->nb[1],
                                   (size_t) stream * k_storage->nb[2]);
    ggml_tensor * kf = type == GGML_TYPE_F32 ? k : ggml_cast(ctx, k, GGML_TYPE_F32);   // [n_embd, n_cells]

    if (k_rot > 0) {
        // stored rows are H k per block of k_rot values; H is symmetric, so H . (H k) = k, block by block
        ggml_tensor * H = triatt_backend_hadamard(sb, k_rot, err);
        if (!H) {
            ggml_free(ctx);
            return false;
        }
        ggml_tensor * blocks = ggml_reshape_2d(ctx, kf, k_rot, n_embd / k_rot * n_cells);
        kf = ggml_reshape_2d(ctx, ggml_mul_mat(ctx, H, blocks), n_embd, n_cells);
    }

    // trig term: per KV head g, [head_dim, n_cells] x the queries of its group; ggml's mul_mat broadcasts
    // dim 2 as query head h -> KV head h / (n_head / n_head_kv), the GQA mapping
    ggml_tensor * W = ggml_new_tensor_3d(ctx, GGML_TYPE_F32, head_dim, 1, n_head);
    ggml_set_input(W);
    ggml_tensor * kp = ggml_view_3d(ctx, kf, head_dim, n_cells, n_head_kv, kf->nb[1], head_dim * sizeof(float), 0);
    ggml_tensor * s_trig = ggml_mul_mat(ctx, kp, W);     // [n_cells, 1, n_head]

    // norm term: band magnitudes |k_f| of the rotary dims, then the same product with the norm weights
    ggml_tensor * sq = ggml_sqr(ctx, kf);
    ggml_tensor * m2 = nullptr;
    if (cal.pairing == TRIATT_PAIRING_NEOX) {
        // band f pairs dims f and f + n_rot/2
        ggml_tensor * re = ggml_view_3d(ctx, sq, n_freq, n_head_kv, n_cells, head_dim * sizeof(float), sq->nb[1], 0);
        ggml_tensor * im = ggml_view_3d(ctx, sq, n_freq, n_head_kv, n_cells, head_dim * sizeof(float), sq->nb[1],
                                        n_freq * sizeof(float));
        m2 = ggml_add(ctx, ggml_cont(ctx, re), ggml_cont(ctx, im));                          // [n_freq, n_head_kv, n_cells]
    } else {
        // band f pairs dims 2f and 2f + 1
        ggml_tensor * pairs = ggml_view_4d(ctx, sq, 2, n_freq, n_head_kv, n_cells, 2 * sizeof(float),
                                           head_dim * sizeof(float), sq->nb[1], 0);
        m2 = ggml_reshape_3d(ctx, ggml_sum_rows(ctx, ggml_cont(ctx, pairs)), n_freq, n_head_kv, n_cells);
    }
    ggml_tensor * mag = ggml_sqrt(ctx, m2);
    ggml_tensor * Nw = ggml_new_tensor_3d(ctx, GGML_TYPE_F32, n_freq, 1, n_head);
    ggml_set_input(Nw);
    ggml_tensor * mp = ggml_view_3d(ctx, mag, n_freq, n_cells, n_head_kv, mag->nb[2], mag->nb[1], 0);
    ggml_tensor * s_norm = ggml_mul_mat(ctx, mp, Nw);    // [n_cells, 1, n_head]

    // [n_cells, n_head] -> [n_head, n_cells]: the caller's [n_cells][n_head] layout
    ggml_tensor * s = ggml_add(ctx, s_trig, s_norm);
    ggml_tensor * res = ggml_cont(ctx, ggml_transpose(ctx, ggml_reshape_2d(ctx, s, n_cells, n_head)));
    ggml_set_output(res);

    ggml_cgraph * gf = ggml_new_graph(ctx);
    ggml_build_forward_expand(gf, res);

    bool ok = false;
    for (int i = 0; i < ggml_graph_n_nodes(gf); ++i) {
        ggml_tensor * node = ggml_graph_node(gf, i);
        if (!ggml_backend_supports_op(sb->backend, node)) {
            err = std::string("the backend ") + ggml_backend_name(sb->backend) + " does not support " + ggml_op_desc(node) +
                  " on " + ggml_type_name(node->src[0] ? node->src[0]->type : node->type);
            ggml_free(ctx);
            return false;
        }
    }
    if (!ggml_gallocr_alloc_graph(sb->galloc, gf)) {
        err = "cannot allocate the scoring graph on the backend";
    } else {
        ggml_backend_tensor_set(W, sb->W.data(), 0, ggml_nbytes(W));
        ggml_backend_tensor_set(Nw, sb->nw.data(), 0, ggml_nbytes(Nw));
        if (ggml_backend_graph_compute(sb->backend, gf) != GGML_STATUS_SUCCESS) {
            err = "the scoring graph failed on the backend";
        } else {
            ggml_backend_tensor_get(res, scores, 0, ggml_nbytes(res));
            ok = true;
        }
    }
    ggml_free(ctx);
    return ok;
}
