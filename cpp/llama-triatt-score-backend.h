// llama-triatt-score-backend.h: TriAttention scores of cached keys computed on the backend that holds them.
//
// The CPU scorer (triatt_score_layer) reads K rows from host memory. When the K cache lives in
// device memory, copying it to the host every round costs more than the scoring: instead a small
// ggml graph runs on the cache's backend and only the scores ([n_cells][n_head] floats) come back.
//
// Per layer il and round position t (see triatt-core.h for the method):
//   score[i][h] = sum_d W[h][d] k_i[g(h)][d]          (trig term: one matrix product of the cached keys
//                                                     with the round's synthetic queries W)
//               + sum_f Nw[h][f] |k_i[g(h)]_f|         (norm term: band magnitudes, then a second product)
// with g(h) = h / (n_head / n_head_kv) (GQA), W and Nw built on the host once per call by the CPU scorer's
// own triatt_scorer_queries / triatt_scorer_norm_weights (mean over the offsets), and |k_f| from the NEOX or
// NORM pairing of the rotary dims (dims n_rot..head_dim of a partially rotary head are not scored).
//
// The graph first converts the stream's first n_cells K rows to f32 (f32 is used in place), undoes
// the Walsh-Hadamard rotation llama.cpp applies to quantized K (k_rot > 0) with one matrix product,
// and then computes both terms in f32. Multiplying the quantized rows directly would be cheaper, but
// ggml then rounds the f32 operand to the K type's dot-product type (q8_0 / f16 on the CPU backend),
// about 1e-2 relative error; the norm term needs the f32 keys anyway, so one conversion serves both
// and the scores agree with the CPU scorer to float rounding.
//
// Only ggml: no llama.cpp internals, so the file builds into libllama and into test programs alike.

#pragma once

#include "triatt-core.h"

#include "ggml-backend.h"
#include "ggml.h"

#include <string>

// Workspace for one (backend, calibration) pair: the graph memory, an allocator whose buffer is reused from
// call to call (no device allocation in steady state) and the Hadamard matrix, uploaded once. It borrows the
// calibration's CPU scorer (triatt_scorer_init), whose synthetic queries and norm weights it uses.
// Not thread-safe; the calibration, the scorer and the backend must outlive it.
struct triatt_score_backend;

triatt_score_backend * triatt_score_backend_init(ggml_backend_t backend, const triatt_calib & calib, triatt_scorer * scorer,
                                                 std::string & err);
void                   triatt_score_backend_free(triatt_score_backend * sb);

// Raw scores of layer il's first n_cells cached keys of `stream`, at round position t.
//   k_storage: the layer's K tensor [n_head_kv*head_dim, kv_size, n_stream] (llama_kv_cache::get_k_storage),
//              in a buffer the backend can use; f32, f16, bf16 or a type ggml can convert to f32 (q8_0, q4_0, ...)
//   k_rot:     the Hadamard block size llama.cpp rotated quantized K with (llama_kv_cache::get_k_rot_size), 0: none
//   scores:    host memory, [n_cells][n_head] row-major, as triatt_score_layer writes it
//   params:    as for triatt_score_layer (offsets_max, trig, norm); the max over offsets is not supported
// Returns false and sets err on invalid arguments or a backend failure.
bool triatt_score_backend_layer(triatt_score_backend * sb, int32_t il, const ggml_tensor * k_storage, uint32_t stream,
                                uint32_t n_cells, int32_t k_rot, int64_t t, float * scores, std::string & err,
                                const triatt_score_params & params = triatt_score_params());
