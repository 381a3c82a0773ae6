// triatt-score.cpp: per-layer raw TriAttention scores of post-RoPE keys (see triatt-core.h).

#include "triatt-core.h"
#include "triatt-pool.h"

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <limits>

#ifndef M_PI
#define M_PI 3.14159265358979323846
#endif

#if defined(__SSE2__) || defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#define TRIATT_SSE 1
#elif defined(__ARM_NEON) && defined(__aarch64__)
#include <arm_neon.h>
#define TRIATT_NEON 1
#endif

// Two kernels compute the same scores:
//  - a portable one (plain loops written to vectorize: independent accumulators, no
//    cross-iteration reductions), compiled for the build's baseline ISA;
//  - on x86-64 with GCC/Clang, an AVX2+FMA one (intrinsics, compiled with a target
//    attribute, so no special build flags are needed), chosen at run time when the CPU
//    has AVX2 and FMA. Define TRIATT_NO_AVX2 to leave it out.
#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__)) && !defined(TRIATT_NO_AVX2)
#define TRIATT_AVX2_DISPATCH 1
#define TRIATT_AVX2_FN __attribute__((target("avx2,fma,f16c")))
#endif

// helpers are inlined into the kernels (and so compiled for the kernel's ISA)
#if defined(__GNUC__)
#define TRIATT_INLINE inline __attribute__((always_inline))
#elif defined(_MSC_VER)
#define TRIATT_INLINE __forceinline
#else
#define TRIATT_INLINE inline
#endif

namespace {

// tests and benchmarks can force the portable kernel where AVX2 is available
std::atomic<bool> triatt_force_generic{false};

// Key rows are streamed once from memory; a row of a large model is a page or more,
// where hardware prefetchers stop, so the kernels prefetch a few rows ahead.
#define TRIATT_PREFETCH_ROWS 4

TRIATT_INLINE void triatt_prefetch(const void * p, int64_t n_bytes) {
    const char * c = (const char *) p;
#if defined(__GNUC__)
    for (int64_t j = 0; j < n_bytes; j += 64) {
        __builtin_prefetch(c + j, 0, 3);
    }
#elif defined(TRIATT_SSE)
    for (int64_t j = 0; j < n_bytes; j += 64) {
        _mm_prefetch(c + j, _MM_HINT_T0);
    }
#else
    (void) c;
    (void) n_bytes;
#endif
}

// IEEE half -> float (portable; the AVX2 kernel uses F16C instead)
TRIATT_INLINE float triatt_f16_to_f32(uint16_t h) {
    const uint32_t sign = (uint32_t) (h & 0x8000u) << 16;
    const uint32_t expo = (h >> 10) & 0x1fu;
    const uint32_t mant = h & 0x3ffu;
    uint32_t bits;
    if (expo == 0) {
        const float v = (float) mant * 5.9604644775390625e-08f; // subnormal (or zero): mant * 2^-24
        return sign ? -v : v;
    } else if (expo == 31) {
        bits = sign | 0x7f800000u | (mant << 13);               // inf / nan
    } else {
        bits = sign | ((expo + 112u) << 23) | (mant << 13);
    }
    float f;
    std::memcpy(&f, &bits, sizeof(f));
    return f;
}

TRIATT_INLINE int64_t triatt_pad16(int64_t n) {
    return (n + 15) / 16 * 16;
}

struct triatt_kernel_args {
    const void *  keys;
    int           key_type; // triatt_key_type
    int64_t       row_stride; // elements
    int           n_head;
    int           n_head_kv;
    int           head_dim;
    int           n_rot;    // this layer's rotary dims
    int           n_freq;   // n_rot / 2
    int           pairing;
    int           n_off;    // synthetic queries per head: 1 (mean) or |D| (max)
    bool          trig;
    bool          norm;
    const float * W;        // [n_off][n_head][n_rot], in the key's dim order
    const float * Nw;       // [n_head][nw_stride]: s (A_f - |qbar_f|)
    int64_t       nw_stride;
    float *       out;      // [n][n_head]
    float *       scratch;  // [n_threads][scratch_stride]: band moduli, converted keys
    int64_t       scratch_stride;
    int64_t       chunk;
    int64_t       n;
};

TRIATT_INLINE const void * triatt_key_addr(const triatt_kernel_args & a, int64_t i, int g) {
    const size_t esz = a.key_type == TRIATT_KEY_F16 ? 2 : 4;
    return (const char *) a.keys + ((size_t) i * a.row_stride + (size_t) g * a.head_dim) * esz;
}

TRIATT_INLINE int64_t triatt_head_bytes(const triatt_kernel_args & a) {
    return (int64_t) a.head_dim * (a.key_type == TRIATT_KEY_F16 ? 2 : 4);
}

// key (i, g) as floats: in place for F32, converted into buf (head_dim floats) for F16
TRIATT_INLINE const float * triatt_key_f32(const triatt_kernel_args & a, int64_t i, int g, float * buf) {
    const void * p = triatt_key_addr(a, i, g);
    if (a.key_type == TRIATT_KEY_F32) {
        return (const float *) p;
    }
    const uint16_t * h = (const uint16_t *) p;
    for (int d = 0; d < a.head_dim; ++d) {
        buf[d] = triatt_f16_to_f32(h[d]);
    }
    return buf;
}

// G dot products sharing one vector: res[h] = sum_d w1[h*ws1 + d] x1[d] + sum_d w2[h*ws2 + d] x2[d]
// for h < G. 16 lanes per head and G heads give 2G independent vector accumulators
// (enough to hide FMA latency) and load x once for all G heads; the horizontal sums
// happen once per head at the end.
template <int G>
TRIATT_INLINE void triatt_dots(const float * w1, int64_t ws1, const float * x1, int n1,
                        const float * w2, int64_t ws2, const float * x2, int n2, float * res) {
    float acc[G][16];
    float tail[G];
    for (int h = 0; h < G; ++h) {
        tail[h] = 0.0f;
        for (int j = 0; j < 16; ++j) {
            acc[h][j] = 0.0f;
        }
    }
    int d = 0;
    for (; d + 16 <= n1; d += 16) {
        for (int h = 0; h < G; ++h) {
            const float * w = w1 + h * ws1 + d;
            for (int j = 0; j < 16; ++j) {
                acc[h][j] += w[j] * x1[d + j];
            }
        }
    }
    for (; d < n1; ++d) {
        for (int h = 0; h < G; ++h) {
            tail[h] += w1[h * ws1 + d] * x1[d];
        }
    }
    d = 0;
    for (; d + 16 <= n2; d += 16) {
        for (int h = 0; h < G; ++h) {
            const float * w = w2 + h * ws2 + d;
            for (int j = 0; j < 16; ++j) {
                acc[h][j] += w[j] * x2[d + j];
            }
        }
    }
    for (; d < n2; ++d) {
        for (int h = 0; h < G; ++h) {
            tail[h] += w2[h * ws2 + d] * x2[d];
        }
    }
    for (int h = 0; h < G; ++h) {
        float * a = acc[h];
        for (int j = 0; j < 8; ++j) {
            a[j] += a[j + 8];
        }
        for (int j = 0; j < 4; ++j) {
            a[j] += a[j + 4];
        }
        res[h] = ((a[0] + a[2]) + (a[1] + a[3])) + tail[h];
    }
}

// the same for any number of heads, in blocks of up to 4
TRIATT_INLINE void triatt_dots_n(int n_heads, const float * w1, int64_t ws1, const float * x1, int n1,
                          const float * w2, int64_t ws2, const float * x2, int n2, float * res) {
    int h = 0;
    for (; h + 4 <= n_heads; h += 4) {
        triatt_dots<4>(w1 + h * ws1, ws1, x1, n1, w2 + h * ws2, ws2, x2, n2, res + h);
    }
    switch (n_heads - h) {
        case 3: triatt_dots<3>(w1 + h * ws1, ws1, x1, n1, w2 + h * ws2, ws2, x2, n2, res + h); break;
        case 2: triatt_dots<2>(w1 + h * ws1, ws1, x1, n1, w2 + h * ws2, ws2, x2, n2, res + h); break;
        case 1: triatt_dots<1>(w1 + h * ws1, ws1, x1, n1, w2 + h * ws2, ws2, x2, n2, res + h); break;
        default: break;
    }
}

// |x_f| of the n_freq bands of a rotary vector
TRIATT_INLINE void triatt_band_moduli(const float * x, int n_freq, int pairing, float * mag) {
    if (pairing == TRIATT_PAIRING_NEOX) {
        const float * re = x;
        const float * im = x + n_freq;
        for (int f = 0; f < n_freq; ++f) {
            mag[f] = re[f] * re[f] + im[f] * im[f];
        }
    } else {
        for (int f = 0; f < n_freq; ++f) {
            mag[f] = x[2 * f] * x[2 * f] + x[2 * f + 1] * x[2 * f + 1];
        }
    }
    int f = 0;
#if defined(TRIATT_SSE)
    for (; f + 4 <= n_freq; f += 4) {
        _mm_storeu_ps(mag + f, _mm_sqrt_ps(_mm_loadu_ps(mag + f)));
    }
#elif defined(TRIATT_NEON)
    for (; f + 4 <= n_freq; f += 4) {
        vst1q_f32(mag + f, vsqrtq_f32(vld1q_f32(mag + f)));
    }
#endif
    for (; f < n_freq; ++f) {
        mag[f] = std::sqrt(mag[f]);
    }
}

void triatt_score_rows_generic(const triatt_kernel_args & a, int64_t i0, int64_t i1, float * scratch) {
    const int n_group = a.n_head / a.n_head_kv;
    const int n_rot   = a.n_rot;
    const int n_freq  = a.n_freq;
    const int64_t wstride_off = (int64_t) a.n_head * n_rot;
    float * mag  = scratch;
    float * kbuf = scratch + triatt_pad16(a.n_freq) * 2;
    float res[64];
    float tmp[64];

    for (int64_t i = i0; i < i1; ++i) {
        float * o = a.out + i * a.n_head;
        const bool pf = i + TRIATT_PREFETCH_ROWS < a.n;
        for (int g = 0; g < a.n_head_kv; ++g) {
            if (pf) {
                triatt_prefetch(triatt_key_addr(a, i + TRIATT_PREFETCH_ROWS, g), triatt_head_bytes(a));
            }
            const float * k  = triatt_key_f32(a, i, g, kbuf);
            const float * w  = a.W + (int64_t) g * n_group * n_rot;
            const float * nw = a.Nw + (int64_t) g * n_group * a.nw_stride;
            if (a.norm) {
                triatt_band_moduli(k, n_freq, a.pairing, mag);
            }
            for (int h0 = 0; h0 < n_group; h0 += 64) {
                const int nh = std::min(64, n_group - h0);
                if (a.n_off == 1) {
                    // S_trig + S_norm in one pass: [W_h | Nw_h] . [k | |k_f|]
                    triatt_dots_n(nh, w + (int64_t) h0 * n_rot, n_rot, k, a.trig ? n_rot : 0,
                                  nw + (int64_t) h0 * a.nw_stride, a.nw_stride, mag, a.norm ? n_freq : 0, res);
                } else {
                    // max over the offsets of the trig term, then the norm term
                    for (int j = 0; j < nh; ++j) {
                        res[j] = -std::numeric_limits<float>::infinity();
                    }
                    for (int od = 0; od < a.n_off; ++od) {
                        triatt_dots_n(nh, w + od * wstride_off + (int64_t) h0 * n_rot, n_rot, k, n_rot,
                                      nullptr, 0, nullptr, 0, tmp);
                        for (int j = 0; j < nh; ++j) {
                            res[j] = std::max(res[j], tmp[j]);
                        }
                    }
                    if (a.norm) {
                        triatt_dots_n(nh, nw + (int64_t) h0 * a.nw_stride, a.nw_stride, mag, n_freq,
                                      nullptr, 0, nullptr, 0, tmp);
                        for (int j = 0; j < nh; ++j) {
                            res[j] += tmp[j];
                        }
                    }
                }
                for (int j = 0; j < nh; ++j) {
                    o[g * n_group + h0 + j] = res[j];
                }
            }
        }
    }
}

#if defined(TRIATT_AVX2_DISPATCH)

TRIATT_AVX2_FN TRIATT_INLINE float triatt_hsum_avx2(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

// 8 key values as floats (F16 keys are converted in registers with F16C)
TRIATT_AVX2_FN TRIATT_INLINE __m256 triatt_load8(const float * p) {
    return _mm256_loadu_ps(p);
}
TRIATT_AVX2_FN TRIATT_INLINE __m256 triatt_load8(const uint16_t * p) {
    return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *) p));
}
TRIATT_INLINE float triatt_load1(const float * p) {
    return *p;
}
TRIATT_INLINE float triatt_load1(const uint16_t * p) {
    return triatt_f16_to_f32(*p);
}

// |k_f| of bands f..f+7 (f + 8 <= n_freq)
template <int PAIRING, typename KT>
TRIATT_AVX2_FN TRIATT_INLINE __m256 triatt_mod8_avx2(const KT * x, int f, int n_freq) {
    if (PAIRING == TRIATT_PAIRING_NEOX) {
        const __m256 re = triatt_load8(x + f);
        const __m256 im = triatt_load8(x + n_freq + f);
        return _mm256_sqrt_ps(_mm256_fmadd_ps(re, re, _mm256_mul_ps(im, im)));
    }
    const __m256 a = triatt_load8(x + 2 * f);
    const __m256 b = triatt_load8(x + 2 * f + 8);
    // hadd: [a01 a23 b01 b23 | a45 a67 b45 b67] -> 64-bit blocks (0 2 1 3): bands f..f+7 in order
    const __m256 h = _mm256_hadd_ps(_mm256_mul_ps(a, a), _mm256_mul_ps(b, b));
    return _mm256_sqrt_ps(_mm256_castpd_ps(_mm256_permute4x64_pd(_mm256_castps_pd(h), 0xD8)));
}

template <int PAIRING, typename KT>
TRIATT_INLINE float triatt_mod1(const KT * x, int f, int n_freq) {
    float re, im;
    if (PAIRING == TRIATT_PAIRING_NEOX) {
        re = triatt_load1(x + f);
        im = triatt_load1(x + n_freq + f);
    } else {
        re = triatt_load1(x + 2 * f);
        im = triatt_load1(x + 2 * f + 1);
    }
    return std::sqrt(re * re + im * im);
}

// Two keys against the same G synthetic queries (each weight load feeds two FMAs):
//   res_x[h] = W_h . k_x[0:n1] + Nw_h . |k_x,f| (f < n2)
// with the band moduli formed on the fly. One accumulator per (head, key): 2G chains.
template <int G, int PAIRING, typename KT>
TRIATT_AVX2_FN TRIATT_INLINE void triatt_dots2_avx2(const float * w1, int64_t ws1, const KT * ka, const KT * kb, int n1,
                                                    const float * w2, int64_t ws2, int n2, int n_freq,
                                                    float * res_a, float * res_b) {
    __m256 acc_a[G];
    __m256 acc_b[G];
    float  tail_a[G];
    float  tail_b[G];
    for (int h = 0; h < G; ++h) {
        acc_a[h]  = _mm256_setzero_ps();
        acc_b[h]  = _mm256_setzero_ps();
        tail_a[h] = 0.0f;
        tail_b[h] = 0.0f;
    }
    int d = 0;
    for (; d + 8 <= n1; d += 8) {
        const __m256 va = triatt_load8(ka + d);
        const __m256 vb = triatt_load8(kb + d);
        for (int h = 0; h < G; ++h) {
            const __m256 wv = _mm256_loadu_ps(w1 + h * ws1 + d);
            acc_a[h] = _mm256_fmadd_ps(wv, va, acc_a[h]);
            acc_b[h] = _mm256_fmadd_ps(wv, vb, acc_b[h]);
        }
    }
    for (; d < n1; ++d) {
        const float va = triatt_load1(ka + d);
        const float vb = triatt_load1(kb + d);
        for (int h = 0; h < G; ++h) {
            tail_a[h] += w1[h * ws1 + d] * va;
            tail_b[h] += w1[h * ws1 + d] * vb;
        }
    }
    int f = 0;
    for (; f + 8 <= n2; f += 8) {
        const __m256 ma = triatt_mod8_avx2<PAIRING>(ka, f, n_freq);
        const __m256 mb = triatt_mod8_avx2<PAIRING>(kb, f, n_freq);
        for (int h = 0; h < G; ++h) {
            const __m256 wv = _mm256_loadu_ps(w2 + h * ws2 + f);
            acc_a[h] = _mm256_fmadd_ps(wv, ma, acc_a[h]);
            acc_b[h] = _mm256_fmadd_ps(wv, mb, acc_b[h]);
        }
    }
    for (; f < n2; ++f) {
        const float ma = triatt_mod1<PAIRING>(ka, f, n_freq);
        const float mb = triatt_mod1<PAIRING>(kb, f, n_freq);
        for (int h = 0; h < G; ++h) {
            tail_a[h] += w2[h * ws2 + f] * ma;
            tail_b[h] += w2[h * ws2 + f] * mb;
        }
    }
    for (int h = 0; h < G; ++h) {
        res_a[h] = triatt_hsum_avx2(acc_a[h]) + tail_a[h];
        res_b[h] = triatt_hsum_avx2(acc_b[h]) + tail_b[h];
    }
}

// all query heads of KV head g, for keys ka and kb (kb may be ka)
template <int PAIRING, typename KT>
TRIATT_AVX2_FN TRIATT_INLINE void triatt_group_avx2(const triatt_kernel_args & a, int g, const KT * ka, const KT * kb,
                                                    float * o_a, float * o_b) {
    const int n_group = a.n_head / a.n_head_kv;
    const int n_rot   = a.n_rot;
    const int n1      = a.trig ? n_rot : 0;
    const int n2      = a.norm ? a.n_freq : 0;
    int h = g * n_group;
    const int h_end = h + n_group;
    for (; h + 4 <= h_end; h += 4) {
        triatt_dots2_avx2<4, PAIRING>(a.W + (int64_t) h * n_rot, n_rot, ka, kb, n1,
                                      a.Nw + (int64_t) h * a.nw_stride, a.nw_stride, n2, a.n_freq, o_a + h, o_b + h);
    }
    switch (h_end - h) {
        case 3: triatt_dots2_avx2<3, PAIRING>(a.W + (int64_t) h * n_rot, n_rot, ka, kb, n1,
                                              a.Nw + (int64_t) h * a.nw_stride, a.nw_stride, n2, a.n_freq, o_a + h, o_b + h); break;
        case 2: triatt_dots2_avx2<2, PAIRING>(a.W + (int64_t) h * n_rot, n_rot, ka, kb, n1,
                                              a.Nw + (int64_t) h * a.nw_stride, a.nw_stride, n2, a.n_freq, o_a + h, o_b + h); break;
        case 1: triatt_dots2_avx2<1, PAIRING>(a.W + (int64_t) h * n_rot, n_rot, ka, kb, n1,
                                              a.Nw + (int64_t) h * a.nw_stride, a.nw_stride, n2, a.n_freq, o_a + h, o_b + h); break;
        default: break;
    }
}

template <int PAIRING, typename KT>
TRIATT_AVX2_FN void triatt_score_rows_avx2(const triatt_kernel_args & a, int64_t i0, int64_t i1, float * scratch) {
    const KT * keys = (const KT *) a.keys;
    const int64_t head_bytes = (int64_t) a.head_dim * sizeof(KT);
    int64_t i = i0;
    // pairs of keys
    for (; i + 2 <= i1; i += 2) {
        const KT * row_a = keys + i * a.row_stride;
        const KT * row_b = row_a + a.row_stride;
        float * o_a = a.out + i * a.n_head;
        float * o_b = o_a + a.n_head;
        const bool pf = i + 1 + TRIATT_PREFETCH_ROWS < a.n;
        for (int g = 0; g < a.n_head_kv; ++g) {
            const int64_t off = (int64_t) g * a.head_dim;
            if (pf) {
                triatt_prefetch(row_a + TRIATT_PREFETCH_ROWS * a.row_stride + off, head_bytes);
                triatt_prefetch(row_b + TRIATT_PREFETCH_ROWS * a.row_stride + off, head_bytes);
            }
            triatt_group_avx2<PAIRING>(a, g, row_a + off, row_b + off, o_a, o_b);
        }
    }
    // the last key of an odd count: the same arithmetic as in a pair (paired with itself),
    // so that a key's scores never depend on its neighbour or on the thread split;
    // the copy's results go to scratch (n_head floats)
    if (i < i1) {
        const KT * row = keys + i * a.row_stride;
        float * o = a.out + i * a.n_head;
        for (int g = 0; g < a.n_head_kv; ++g) {
            const KT * k = row + (int64_t) g * a.head_dim;
            triatt_group_avx2<PAIRING>(a, g, k, k, o, scratch);
        }
    }
}

bool triatt_cpu_has_avx2() {
    static const bool ok = [] {
        __builtin_cpu_init();
        return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
    }();
    return ok;
}

#endif // TRIATT_AVX2_DISPATCH

void triatt_score_task(void * ctx, int64_t task, int thread) {
    const triatt_kernel_args & a = *(const triatt_kernel_args *) ctx;
    const int64_t i0 = task * a.chunk;
    const int64_t i1 = std::min(a.n, i0 + a.chunk);
    float * scratch = a.scratch + thread * a.scratch_stride;
#if defined(TRIATT_AVX2_DISPATCH)
    // the AVX2 kernel covers the default (mean over offsets); max over offsets is an ablation
    if (a.n_off == 1 && !triatt_force_generic && triatt_cpu_has_avx2()) {
        const bool f16 = a.key_type == TRIATT_KEY_F16;
        if (a.pairing == TRIATT_PAIRING_NEOX) {
            f16 ? triatt_score_rows_avx2<TRIATT_PAIRING_NEOX, uint16_t>(a, i0, i1, scratch)
                : triatt_score_rows_avx2<TRIATT_PAIRING_NEOX, float>(a, i0, i1, scratch);
        } else {
            f16 ? triatt_score_rows_avx2<TRIATT_PAIRING_NORM, uint16_t>(a, i0, i1, scratch)
                : triatt_score_rows_avx2<TRIATT_PAIRING_NORM, float>(a, i0, i1, scratch);
        }
        return;
    }
#endif
    triatt_score_rows_generic(a, i0, i1, scratch);
}

} // namespace

const char * triatt_kernel_name(void) {
#if defined(TRIATT_AVX2_DISPATCH)
    if (!triatt_force_generic && triatt_cpu_has_avx2()) {
        return "avx2";
    }
#endif
    return "generic";
}

bool triatt_force_generic_kernel(bool force) {
    return triatt_force_generic.exchange(force);
}

// ---------------------------------------------------------------------------
// scorer
// ---------------------------------------------------------------------------

struct triatt_scorer {
    const triatt_calib * cal = nullptr;

    std::vector<double> omega;  // [n_layer][n_freq] (0 beyond a layer's n_rot/2)
    std::vector<float>  mscale; // [n_layer]

    // offsets D and C_f = mean_D e^{i omega_f delta} per layer, for the current offsets_max
    int64_t             offsets_max = -1;
    std::vector<double> offsets;
    std::vector<double> c_re;   // [n_layer][n_freq]
    std::vector<double> c_im;

    // per-round workspace
    std::vector<double> rot_re; // [n_off][n_freq]: e^{i omega_f (t + delta)} (max) or e^{i omega_f t} C_f (mean)
    std::vector<double> rot_im;
    std::vector<float>  W;      // [n_off][n_head][n_rot]
    std::vector<float>  scratch;

    // round-independent: the norm weights s (A_f - |qbar_f|), [n_layer][n_head][n_freq]
    std::vector<float>  Nw;

    triatt_pool pool;
};

triatt_scorer * triatt_scorer_init(const triatt_calib * cal) {
    std::string err;
    if (cal == nullptr || !triatt_calib_check(*cal, err)) {
        return nullptr;
    }
    triatt_scorer * sc = new triatt_scorer();
    sc->cal = cal;
    sc->omega.assign((size_t) cal->n_layer * cal->n_freq, 0.0);
    sc->mscale.assign(cal->n_layer, 1.0f);
    for (int32_t il = 0; il < cal->n_layer; ++il) {
        triatt_rope_omega(cal->rope[il], sc->omega.data() + (size_t) il * cal->n_freq, &sc->mscale[il]);
    }
    const size_t n_stat = (size_t) cal->n_layer * cal->n_head * cal->n_freq;
    sc->Nw.resize(n_stat);
    for (size_t i = 0; i < n_stat; ++i) {
        const double s = sc->mscale[i / ((size_t) cal->n_head * cal->n_freq)];
        sc->Nw[i] = (float) (s * ((double) cal->q_abs_mean[i] -
                                  std::hypot((double) cal->q_mean_re[i], (double) cal->q_mean_im[i])));
    }
    return sc;
}

void triatt_scorer_free(triatt_scorer * sc) {
    delete sc;
}

static void triatt_set_offsets(triatt_scorer * sc, int64_t offsets_max) {
    if (sc->offsets_max == offsets_max) {
        return;
    }
    const triatt_calib & cal = *sc->cal;
    sc->offsets.clear();
    for (int64_t d = 1; d <= offsets_max; d *= 2) {
        sc->offsets.push_back((double) d);
        if (d > std::numeric_limits<int64_t>::max() / 2) {
            break;
        }
    }
    const size_t nf = (size_t) cal.n_layer * cal.n_freq;
    sc->c_re.assign(nf, 0.0);
    sc->c_im.assign(nf, 0.0);
    const double inv = 1.0 / (double) sc->offsets.size();
    for (size_t i = 0; i < nf; ++i) {
        double re = 0.0, im = 0.0;
        for (double d : sc->offsets) {
            re += std::cos(sc->omega[i] * d);
            im += std::sin(sc->omega[i] * d);
        }
        sc->c_re[i] = re * inv;
        sc->c_im[i] = im * inv;
    }
    sc->offsets_max = offsets_max;
}

// the arguments every use of layer il's statistics needs
static bool triatt_check_layer(const triatt_scorer * sc, int32_t il, const triatt_score_params & params, std::string & err) {
    if (sc == nullptr) {
        err = "scorer is null";
        return false;
    }
    const triatt_calib & cal = *sc->cal;
    if (il < 0 || il >= cal.n_layer) {
        err = "layer " + std::to_string(il) + " out of range [0, " + std::to_string(cal.n_layer) + ")";
        return false;
    }
    if (!cal.has_kv.empty() && !cal.has_kv[il]) {
        err = "layer " + std::to_string(il) + " has no KV cache of its own: nothing to score";
        return false;
    }
    if (params.offsets_max < 1) {
        err = "offsets_max must be >= 1";
        return false;
    }
    return true;
}

// The synthetic queries of layer il at round position t (triatt-core.h): n_off sets of n_head queries, the
// query of set od and head h at W + (od*n_head + h)*head_stride, its n_rot values in the key's dim order
// (zeros without the trig term). n_off is 1 (mean over the offsets) or |D| (max). Returns n_off.
static int triatt_build_queries(triatt_scorer * sc, int32_t il, int64_t t, const triatt_score_params & params,
                                float * W, int64_t head_stride) {
    const triatt_calib & cal = *sc->cal;
    const int n_head = cal.n_head;
    const int n_freq = cal.rope[il].n_rot / 2;
    const int n_rot  = cal.rope[il].n_rot;
    const int F      = cal.n_freq; // stride of the statistics arrays
    const double s   = sc->mscale[il];
    const double * om = sc->omega.data() + (size_t) il * F;

    triatt_set_offsets(sc, params.offsets_max);
    const bool max_agg = params.offset_agg == TRIATT_OFFSET_AGG_MAX;
    const int  n_off   = (max_agg && params.trig) ? (int) sc->offsets.size() : 1;
    if (!params.trig) {
        for (int h = 0; h < n_head; ++h) {
            std::fill(W + (int64_t) h * head_stride, W + (int64_t) h * head_stride + n_rot, 0.0f);
        }
        return n_off;
    }

    // rotation factors shared by all heads
    sc->rot_re.resize((size_t) n_off * n_freq);
    sc->rot_im.resize((size_t) n_off * n_freq);
    const double * cre = sc->c_re.data() + (size_t) il * F;
    const double * cim = sc->c_im.data() + (size_t) il * F;
    for (int f = 0; f < n_freq; ++f) {
        const double a  = std::fmod(om[f] * (double) t, 2.0 * M_PI);
        const double er = std::cos(a), ei = std::sin(a);
        if (max_agg) {
            for (int od = 0; od < n_off; ++od) {
                const double b = om[f] * sc->offsets[od];
                const double cr = std::cos(b), ci = std::sin(b);
                sc->rot_re[(size_t) od * n_freq + f] = er * cr - ei * ci;
                sc->rot_im[(size_t) od * n_freq + f] = er * ci + ei * cr;
            }
        } else {
            sc->rot_re[f] = er * cre[f] - ei * cim[f];
            sc->rot_im[f] = er * cim[f] + ei * cre[f];
        }
    }

    const int half = n_rot / 2;
    for (int h = 0; h < n_head; ++h) {
        const size_t base = ((size_t) il * n_head + h) * F;
        const float * qr = cal.q_mean_re.data() + base;
        const float * qi = cal.q_mean_im.data() + base;
        for (int od = 0; od < n_off; ++od) {
            float * w = W + ((int64_t) od * n_head + h) * head_stride;
            for (int f = 0; f < n_freq; ++f) {
                const double rr = sc->rot_re[(size_t) od * n_freq + f];
                const double ri = sc->rot_im[(size_t) od * n_freq + f];
                // W_f = s * qbar_f * rot_f; Re(W conj(k)) = W_re k_re + W_im k_im
                const float wr = (float) (s * ((double) qr[f] * rr - (double) qi[f] * ri));
                const float wi = (float) (s * ((double) qr[f] * ri + (double) qi[f] * rr));
                if (cal.pairing == TRIATT_PAIRING_NEOX) {
                    w[f]        = wr;
                    w[f + half] = wi;
                } else {
                    w[2 * f]     = wr;
                    w[2 * f + 1] = wi;
                }
            }
        }
    }
    return n_off;
}

bool triatt_scorer_queries(triatt_scorer * sc, int32_t il, int64_t t, const triatt_score_params & params,
                           float * W, int64_t head_stride, std::string * err) {
    std::string msg;
    if (triatt_check_layer(sc, il, params, msg)) {
        if (params.trig && params.offset_agg != TRIATT_OFFSET_AGG_MEAN) {
            msg = "the max over offsets has one query per offset, not one per head";
        } else if (W == nullptr || head_stride < sc->cal->rope[il].n_rot) {
            msg = "W must hold n_head queries of at least n_rot values each";
        } else {
            triatt_build_queries(sc, il, t, params, W, head_stride);
            return true;
        }
    }
    if (err) {
        *err = msg;
    }
    return false;
}

const float * triatt_scorer_norm_weights(const triatt_scorer * sc, int32_t il) {
    if (sc == nullptr || il < 0 || il >= sc->cal->n_layer) {
        return nullptr;
    }
    return sc->Nw.data() + (size_t) il * sc->cal->n_head * sc->cal->n_freq;
}

bool triatt_score_layer(
        triatt_scorer * sc, int32_t il,
        const void * keys, triatt_key_type key_type, int64_t n, int64_t row_stride,
        int64_t t, const triatt_score_params & params,
        float * out, std::string * err) {
    auto fail = [err](const std::string & msg) {
        if (err) {
            *err = msg;
        }
        return false;
    };
    std::string msg;
    if (!triatt_check_layer(sc, il, params, msg)) {
        return fail(msg);
    }
    const triatt_calib & cal = *sc->cal;
    if (key_type != TRIATT_KEY_F32 && key_type != TRIATT_KEY_F16) {
        return fail("unknown key type");
    }
    if (n < 0) {
        return fail("n must be >= 0");
    }
    const int64_t row_len = (int64_t) cal.n_head_kv * cal.head_dim;
    if (row_stride < row_len) {
        return fail("row_stride must be >= n_head_kv * head_dim");
    }
    if (n == 0) {
        return true;
    }
    if (keys == nullptr || out == nullptr) {
        return fail("keys and out must not be null");
    }

    const int n_head = cal.n_head;
    const int n_rot  = cal.rope[il].n_rot;
    const int n_freq = n_rot / 2;
    const int F      = cal.n_freq;
    triatt_set_offsets(sc, params.offsets_max);
    const int n_off_max = (params.offset_agg == TRIATT_OFFSET_AGG_MAX && params.trig) ? (int) sc->offsets.size() : 1;
    sc->W.resize((size_t) n_off_max * n_head * n_rot);
    const int n_off = triatt_build_queries(sc, il, t, params, sc->W.data(), n_rot);

    const int n_threads = (int) std::max<int64_t>(1, std::min<int64_t>(params.n_threads, (n + 15) / 16));
    sc->pool.resize(std::max(1, params.n_threads));
    // per thread: band moduli and a converted F16 key (generic kernel), an output row (AVX2 kernel)
    const int64_t scratch_stride = 2 * triatt_pad16(F) + 2 * triatt_pad16(cal.head_dim) + triatt_pad16(n_head);
    const size_t need = (size_t) sc->pool.n_threads() * scratch_stride;
    if (sc->scratch.size() < need) {
        sc->scratch.resize(need);
    }

    triatt_kernel_args a;
    a.keys           = keys;
    a.key_type       = key_type;
    a.row_stride     = row_stride;
    a.n_head         = n_head;
    a.n_head_kv      = cal.n_head_kv;
    a.head_dim       = cal.head_dim;
    a.n_rot          = n_rot;
    a.n_freq         = n_freq;
    a.pairing        = cal.pairing;
    a.n_off          = n_off;
    a.trig           = params.trig;
    a.norm           = params.norm;
    a.W              = sc->W.data();
    a.Nw             = sc->Nw.data() + (size_t) il * n_head * F;
    a.nw_stride      = F;
    a.out            = out;
    a.scratch        = sc->scratch.data();
    a.scratch_stride = scratch_stride;
    a.n              = n;
    // a few chunks per thread balance the load; one chunk when single-threaded
    a.chunk          = n_threads == 1 ? n : std::max<int64_t>(16, (n + 4 * n_threads - 1) / (4 * n_threads));

    const int64_t n_tasks = (n + a.chunk - 1) / a.chunk;
    sc->pool.run(n_tasks, triatt_score_task, &a);
    return true;
}
