// triatt-core.h: the TriAttention KV-cache scoring and selection core.
//
// No Python and no llama.cpp dependency: the same sources are compiled into the
// pytriatt._core extension and into libllama (by the llama.cpp patches).
// C++17, plain structs, a small set of free functions.
//
// Method (arXiv 2604.04921, see docs/method.md): per layer l, query
// head h and frequency band f the calibration holds the complex mean qbar_f of the
// pre-RoPE queries and the mean modulus A_f = E|q_f|. A cached key k (post-RoPE, as
// llama.cpp stores it) at position p is scored at round position t by
//
//   S_trig = mean_{delta in D} sum_f s^2 |qbar_f| |kpre_f| cos(omega_f (t + delta - p) + phi_f)
//   S_norm = sum_f s^2 (A_f - |qbar_f|) |kpre_f|
//
// with D = {1, 2, 4, ..., offsets_max}, phi_f = arg(qbar_f conj(kpre_f)), kpre the key
// with RoPE removed and s the YaRN magnitude scale. llama.cpp's stored key is
// kpost_f = s kpre_f e^{i omega_f p} (ggml's rope multiplies cos and sin by s), so
//
//   S_trig = sum_f Re(W_f conj(kpost_f)),  W_f = s qbar_f e^{i omega_f t} C_f,
//   C_f    = mean_{delta in D} e^{i omega_f delta},
//   S_norm = sum_f s (A_f - |qbar_f|) |kpost_f|.
//
// W is computed once per round and head: the trig term is one dot product of the
// cached key with a synthetic query; neither RoPE inversion nor per-key
// trigonometry is needed, and key positions are not needed either (the phase of
// kpost carries them).
//
// A vector x of the rotary part (its first n_rot dims) is read as n_rot/2 complex
// numbers x_f = x_re + i x_im:
//   NEOX pairing (qwen2, qwen3, gemma3, ...): x_re = x[f], x_im = x[f + n_rot/2]
//   NORM pairing (llama, ...):                x_re = x[2f], x_im = x[2f + 1]
// Dims n_rot..head_dim-1 of a partially rotary head are not scored.

#pragma once

#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

#define TRIATT_CALIB_VERSION 1
#define TRIATT_DEFAULT_OFFSETS_MAX 65536

enum triatt_pairing {
    TRIATT_PAIRING_NEOX = 0, // x[f] with x[f + n_rot/2]  (GGML_ROPE_TYPE_NEOX)
    TRIATT_PAIRING_NORM = 1, // x[2f] with x[2f + 1]      (GGML_ROPE_TYPE_NORMAL)
};

enum triatt_offset_agg {
    TRIATT_OFFSET_AGG_MEAN = 0, // mean over the offsets (paper default; uses the synthetic-query identity)
    TRIATT_OFFSET_AGG_MAX  = 1, // max over the offsets (one dot product per offset)
};

enum triatt_kv_agg {
    TRIATT_KV_AGG_MAX  = 0, // token score = max over KV heads of the layer-averaged group scores
    TRIATT_KV_AGG_MEAN = 1, // token score = mean over KV heads
};

enum triatt_key_type {
    TRIATT_KEY_F32 = 0, // float
    TRIATT_KEY_F16 = 1, // IEEE half (llama.cpp's default K cache type), converted on the fly
};

// how triatt_select ranks the unprotected candidates
enum triatt_rank {
    TRIATT_RANK_SCORES = 0, // by the layers' raw scores, aggregated over heads and layers (tri, snapkv)
    TRIATT_RANK_RECENT = 1, // by position, newest first (streaming: the sink and the most recent tokens)
    TRIATT_RANK_RANDOM = 2, // by a seeded hash of the position (random)
};

// ---------------------------------------------------------------------------
// RoPE
// ---------------------------------------------------------------------------

// One layer's rotary embedding, with the values llama.cpp passes to
// ggml_rope_ext() for that layer (i.e. after llama_context resolved the model's
// hyperparameters and the context parameters).
struct triatt_rope_layer {
    bool    rope        = true;     // false: the layer applies no RoPE (NoPE): omega_f = 0, s = 1
    int32_t n_rot       = 0;        // rotary dims: the first n_rot dims of each head; even, <= head_dim
    float   freq_base   = 10000.0f;
    float   freq_scale  = 1.0f;     // 1 / rope scaling factor (1: no scaling)
    float   ext_factor  = 0.0f;     // YaRN extrapolation mix factor (0: plain or linear scaling)
    float   attn_factor = 1.0f;     // magnitude factor (ggml's mscale before the YaRN correction)
    float   beta_fast   = 32.0f;
    float   beta_slow   = 1.0f;
    int32_t n_ctx_orig  = 0;        // YaRN original context length
    std::vector<float> freq_factors; // empty, or n_rot/2 per-band divisors (the rope_freqs tensor)
};

// Checks a layer's parameters against head_dim; on failure returns false and sets err.
bool triatt_rope_layer_check(const triatt_rope_layer & rl, int32_t head_dim, std::string & err);

// The effective angular frequency of each band (radians per position), such that
// ggml's rope rotates band f of a vector at position p by omega[f] * p, and the
// magnitude scale s that ggml multiplies the rotated vector with.
// omega must hold n_rot/2 values. For YaRN, the per-band mix of the interpolated
// and extrapolated angles is folded into omega[f] (both are linear in p).
void triatt_rope_omega(const triatt_rope_layer & rl, double * omega, float * mscale);

// ---------------------------------------------------------------------------
// Calibration statistics
// ---------------------------------------------------------------------------

struct triatt_calib {
    int32_t n_layer   = 0;
    int32_t n_head    = 0;  // query heads
    int32_t n_head_kv = 0;  // KV heads (GQA: query head h reads KV head h / (n_head / n_head_kv))
    int32_t head_dim  = 0;
    int32_t n_freq    = 0;  // bands per head in the arrays below: max over layers of n_rot/2
    triatt_pairing pairing = TRIATT_PAIRING_NEOX;

    std::vector<triatt_rope_layer> rope;   // [n_layer]
    std::vector<uint8_t>           has_kv; // [n_layer]; 0: the layer has no KV cache of its own (never scored)

    // [n_layer][n_head][n_freq], row-major; bands >= n_rot_l/2 of a layer are 0
    std::vector<float> q_mean_re;
    std::vector<float> q_mean_im;
    std::vector<float> q_abs_mean;
};

// Checks sizes and consistency; on failure returns false and sets err.
bool triatt_calib_check(const triatt_calib & cal, std::string & err);

// ---------------------------------------------------------------------------
// Scoring
// ---------------------------------------------------------------------------

struct triatt_score_params {
    int64_t           offsets_max = TRIATT_DEFAULT_OFFSETS_MAX; // D = {1, 2, 4, ..., <= offsets_max}; >= 1
    bool              trig        = true;  // include S_trig
    bool              norm        = true;  // include S_norm
    triatt_offset_agg offset_agg  = TRIATT_OFFSET_AGG_MEAN;
    int32_t           n_threads   = 1;
};

// The scorer owns the per-round workspace and a small thread pool. After the first
// round with a given shape and thread count it does not allocate. Not thread-safe:
// one scorer per concurrent caller. The calibration must outlive the scorer.
struct triatt_scorer;

triatt_scorer * triatt_scorer_init(const triatt_calib * cal);
void            triatt_scorer_free(triatt_scorer * sc);

// Raw scores of n cached keys of layer il at round position t.
//   keys: key i, KV head g starts at element i*row_stride + g*head_dim (post-RoPE), of key_type
//   out:  [n][n_head] row-major, out[i*n_head + h] = S_trig + S_norm of key i for query head h
// Returns false (and sets err) for invalid arguments (layer out of range, layer without
// KV cache, offsets_max < 1, row_stride too small).
bool triatt_score_layer(
        triatt_scorer * sc, int32_t il,
        const void * keys, triatt_key_type key_type, int64_t n, int64_t row_stride,
        int64_t t, const triatt_score_params & params,
        float * out, std::string * err);

// The synthetic queries triatt_score_layer dots layer il's keys with at round position t (mean over
// the offsets of params; S_trig of a key for query head h = W_h . key over the rotary dims), for a
// scorer that computes the products elsewhere (llama-triatt-score-backend.cpp):
//   W: query head h's n_rot values at W + h*head_stride, in the key's dim order (the rest untouched;
//      zeros without the trig term)
// Returns false (and sets err) for the arguments triatt_score_layer refuses, and for the max over
// offsets (one query per offset).
bool triatt_scorer_queries(triatt_scorer * sc, int32_t il, int64_t t, const triatt_score_params & params,
                           float * W, int64_t head_stride, std::string * err);

// The norm-term weights s (A_f - |qbar_f|) of layer il: [n_head][cal.n_freq] (bands >= n_rot/2 are 0),
// or null if il is out of range. S_norm of a key for head h = sum_f w[h][f] |k_f|.
const float * triatt_scorer_norm_weights(const triatt_scorer * sc, int32_t il);

// The scoring kernel in use: "avx2" (x86-64 CPUs with AVX2 and FMA, chosen at run
// time; no special build flags needed) or "generic" (portable loops).
const char * triatt_kernel_name(void);

// Forces the generic kernel (tests, benchmarks); returns the previous setting.
bool triatt_force_generic_kernel(bool force);

// ---------------------------------------------------------------------------
// Ranking and selection
// ---------------------------------------------------------------------------



struct triatt_select_params {
    triatt_rank   rank       = TRIATT_RANK_SCORES;
    int64_t       budget     = 0;  // tokens to keep (protected ones included)
    int64_t       n_sink     = 0;  // protect the n_sink oldest candidates (smallest positions)
    int64_t       n_window   = 0;  // protect the n_window newest candidates (largest positions)
    int64_t       prompt_len = 0;  // protect every candidate with position < prompt_len
    uint64_t      seed       = 0;  // TRIATT_RANK_RANDOM
    triatt_kv_agg kv_agg     = TRIATT_KV_AGG_MAX;
};

// Selection workspace (reused between rounds; allocation-free in steady state).
struct triatt_selector;

triatt_selector * triatt_selector_init(void);
void              triatt_selector_free(triatt_selector * sel);

// Chooses the candidates to keep.
//   pos:          [n] positions of the candidates
//   layer_scores: n_layers pointers to raw scores [n][n_head] (TRIATT_RANK_SCORES only;
//                 ignored otherwise, may be null)
//   keep:         capacity n; receives the indices (into pos) of the kept candidates, ascending
// Ranking (RANK_SCORES): per layer and query head, z-score the raw scores over the
// unprotected candidates (population std, floored at 1e-6); per KV head take the max over
// its query heads; average over the layers; token score = max (or mean) over KV heads.
// RANK_RECENT ranks by position (newest first); RANK_RANDOM by a hash of (seed, position).
// Protected candidates (sink / window / prompt) are kept first and count against the
// budget; the remaining slots go to the best-ranked unprotected candidates. Ties (equal
// scores) keep the newer position; equal positions keep the later index.
// Non-finite raw scores are left out of a head's mean and std, and such a token ranks
// last. If budget >= n everything is kept. If the protected candidates alone exceed the
// budget, returns -1 and sets err. Returns the number of kept candidates.
// (llama.cpp must never evict a sequence's newest position: use n_window >= 1 there.)
int64_t triatt_select(
        triatt_selector * sel, const triatt_select_params & params,
        int64_t n, const int32_t * pos,
        const float * const * layer_scores, int32_t n_layers, int32_t n_head, int32_t n_head_kv,
        int64_t * keep, std::string * err);

// Per-candidate token scores of the last successful triatt_select() call ([n]; protected
// candidates are +inf, tokens without a finite score -inf). Valid until the next call.
const float * triatt_selector_token_scores(const triatt_selector * sel);

// Number of protected candidates of the last triatt_select() call.
int64_t triatt_selector_n_protected(const triatt_selector * sel);
