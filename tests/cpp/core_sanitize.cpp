// core_sanitize.cpp: drives the TriAttention core (cpp/triatt-*.cpp) through its edge cases so
// that a build with -fsanitize=address,undefined (or thread) sees every code path: both scoring
// kernels, f16 and f32 keys, padded rows, partial rotary dims, NORM and NEOX pairing, YaRN and
// per-band frequency factors, layers without KV, 0/1/odd numbers of keys, selection with
// non-finite scores, unsorted and duplicate positions, every policy and the error paths.
//
// It also checks the results (scores against a double-precision evaluation of the paper's
// formula, selection invariants), so a silent miscomputation fails it as well as a sanitizer
// report. Built and run by tools/sanitize_core.sh; exit status 0 = all checks passed.
//
//   core_sanitize [--quick] [--threads]   (--threads: two scorers on two threads at once, for TSan)

#include "triatt-core.h"

#include <algorithm>
#include <atomic>
#include <cmath>
#include <complex>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <limits>
#include <random>
#include <string>
#include <thread>
#include <vector>

static std::atomic<int> g_checks{0};
static std::atomic<int> g_fail{0};

#define CHECK(cond, ...)                                                            \
    do {                                                                            \
        ++g_checks;                                                                 \
        if (!(cond)) {                                                              \
            ++g_fail;                                                               \
            fprintf(stderr, "FAIL %s:%d: %s: ", __FILE__, __LINE__, #cond);         \
            fprintf(stderr, __VA_ARGS__);                                           \
            fprintf(stderr, "\n");                                                  \
        }                                                                           \
    } while (0)

// IEEE half <-> float (round to nearest even), enough for test data
static uint16_t to_half(float f) {
    uint32_t x;
    memcpy(&x, &f, 4);
    const uint32_t sign = (x >> 16) & 0x8000u;
    int32_t exp = (int32_t) ((x >> 23) & 0xff) - 127 + 15;
    uint32_t mant = x & 0x7fffffu;
    if (exp >= 31) {
        return (uint16_t) (sign | 0x7c00u);
    }
    if (exp <= 0) {
        if (exp < -10) {
            return (uint16_t) sign;
        }
        mant |= 0x800000u;
        const int shift = 14 - exp;
        uint32_t h = mant >> shift;
        const uint32_t rem = mant & ((1u << shift) - 1), halfway = 1u << (shift - 1);
        if (rem > halfway || (rem == halfway && (h & 1))) {
            ++h;
        }
        return (uint16_t) (sign | h);
    }
    uint32_t h = ((uint32_t) exp << 10) | (mant >> 13);
    const uint32_t rem = mant & 0x1fffu;
    if (rem > 0x1000u || (rem == 0x1000u && (h & 1))) {
        ++h; // may carry into the exponent: still the right rounding
    }
    return (uint16_t) (sign | h);
}

static float from_half(uint16_t h) {
    const uint32_t sign = (uint32_t) (h & 0x8000u) << 16;
    const uint32_t exp = (h >> 10) & 0x1f, mant = h & 0x3ffu;
    float v;
    if (exp == 0) {
        v = std::ldexp((float) mant, -24);
    } else if (exp == 31) {
        v = mant ? std::numeric_limits<float>::quiet_NaN() : std::numeric_limits<float>::infinity();
    } else {
        v = std::ldexp((float) (mant | 0x400u), (int) exp - 25);
    }
    uint32_t x;
    memcpy(&x, &v, 4);
    x |= sign;
    memcpy(&v, &x, 4);
    return v;
}

struct shape {
    const char * name;
    int32_t n_layer, n_head, n_head_kv, head_dim;
    int32_t n_rot;        // of layer 0; layer 1 (if any) gets n_rot_alt
    int32_t n_rot_alt;
    triatt_pairing pairing;
    bool yarn, freq_factors, nope_layer, layer_without_kv;
};

static triatt_calib make_calib(const shape & sh, std::mt19937_64 & rng) {
    std::normal_distribution<float> nd(0.0f, 1.0f);
    std::uniform_real_distribution<float> ud(0.0f, 1.0f);
    triatt_calib cal;
    cal.n_layer   = sh.n_layer;
    cal.n_head    = sh.n_head;
    cal.n_head_kv = sh.n_head_kv;
    cal.head_dim  = sh.head_dim;
    cal.pairing   = sh.pairing;
    cal.rope.resize(sh.n_layer);
    cal.has_kv.assign(sh.n_layer, 1);
    int32_t max_rot = 0;
    for (int32_t il = 0; il < sh.n_layer; ++il) {
        triatt_rope_layer & rl = cal.rope[il];
        rl.n_rot = (il == 1 && sh.n_rot_alt) ? sh.n_rot_alt : sh.n_rot;
        rl.freq_base = il % 2 ? 1e6f : 10000.0f;
        if (sh.yarn) {
            rl.freq_scale = 0.25f;
            rl.ext_factor = 1.0f;
            rl.attn_factor = 1.0f;
            rl.n_ctx_orig = 4096;
        }
        if (sh.freq_factors) {
            for (int32_t f = 0; f < rl.n_rot / 2; ++f) {
                rl.freq_factors.push_back(1.0f + 3.0f * ud(rng));
            }
        }
        if (sh.nope_layer && il == sh.n_layer - 1) {
            rl.rope = false;
        }
        max_rot = std::max(max_rot, rl.n_rot);
    }
    if (sh.layer_without_kv && sh.n_layer > 1) {
        cal.has_kv[sh.n_layer - 1] = 0;
    }
    cal.n_freq = max_rot / 2;
    const size_t n = (size_t) cal.n_layer * cal.n_head * cal.n_freq;
    cal.q_mean_re.resize(n);
    cal.q_mean_im.resize(n);
    cal.q_abs_mean.resize(n);
    for (size_t i = 0; i < n; ++i) {
        const int32_t il = (int32_t) (i / ((size_t) cal.n_head * cal.n_freq));
        const int32_t f  = (int32_t) (i % cal.n_freq);
        if (f >= cal.rope[il].n_rot / 2 || !cal.has_kv[il]) {
            continue; // bands past a layer's n_rot/2, and layers without KV, stay 0
        }
        cal.q_mean_re[i] = nd(rng);
        cal.q_mean_im[i] = nd(rng);
        cal.q_abs_mean[i] = std::hypot(cal.q_mean_re[i], cal.q_mean_im[i]) * (1.0f + ud(rng));
    }
    return cal;
}

// S_trig + S_norm of one key by the paper's formula, in double: undo RoPE with the key's position,
// then average over the offsets explicitly (independent of the synthetic-query identity)
static double ref_score(const triatt_calib & cal, int32_t il, int32_t h, const float * kpost, int64_t p,
                        int64_t t, int64_t offsets_max) {
    const triatt_rope_layer & rl = cal.rope[il];
    const int32_t nf = rl.n_rot / 2;
    std::vector<double> om(nf);
    float s = 1.0f;
    triatt_rope_omega(rl, om.data(), &s);
    std::vector<double> offs;
    for (int64_t d = 1; d <= offsets_max; d *= 2) {
        offs.push_back((double) d);
    }
    double trig = 0.0, norm = 0.0;
    for (int32_t f = 0; f < nf; ++f) {
        const double re = cal.pairing == TRIATT_PAIRING_NEOX ? kpost[f] : kpost[2 * f];
        const double im = cal.pairing == TRIATT_PAIRING_NEOX ? kpost[f + nf] : kpost[2 * f + 1];
        const std::complex<double> kpre = std::complex<double>(re, im) * std::polar(1.0 / s, -om[f] * (double) p);
        const size_t i = ((size_t) il * cal.n_head + h) * cal.n_freq + f;
        const std::complex<double> q(cal.q_mean_re[i], cal.q_mean_im[i]);
        double acc = 0.0;
        for (double d : offs) {
            acc += std::real(q * std::conj(kpre) * std::polar(1.0, om[f] * ((double) t + d - (double) p)));
        }
        trig += (double) s * s * acc / (double) offs.size();
        norm += (double) s * s * ((double) cal.q_abs_mean[i] - std::abs(q)) * std::abs(kpre);
    }
    return trig + norm;
}

// scale of a key's score (sum of the moduli of its terms): what the tolerance is relative to
static double ref_scale(const triatt_calib & cal, int32_t il, int32_t h, const float * kpost) {
    const triatt_rope_layer & rl = cal.rope[il];
    const int32_t nf = rl.n_rot / 2;
    std::vector<double> om(nf);
    float s = 1.0f;
    triatt_rope_omega(rl, om.data(), &s);
    double sum = 0.0;
    for (int32_t f = 0; f < nf; ++f) {
        const double re = cal.pairing == TRIATT_PAIRING_NEOX ? kpost[f] : kpost[2 * f];
        const double im = cal.pairing == TRIATT_PAIRING_NEOX ? kpost[f + nf] : kpost[2 * f + 1];
        const size_t i = ((size_t) il * cal.n_head + h) * cal.n_freq + f;
        const double q = std::hypot(cal.q_mean_re[i], cal.q_mean_im[i]);
        sum += (double) s * (q + std::fabs((double) cal.q_abs_mean[i] - q)) * std::hypot(re, im);
    }
    return sum;
}

// score n random keys of every layer with both key types, both kernels and 1/3 threads, and
// compare against ref_score; keys live in a buffer of exactly the size the API promises to read
// (both_kernels: also force the generic kernel, a process-wide switch: single-threaded callers only)
static void test_scoring(const shape & sh, std::mt19937_64 & rng, const std::vector<int64_t> & ns,
                         bool both_kernels = true) {
    triatt_calib cal = make_calib(sh, rng);
    std::string err;
    CHECK(triatt_calib_check(cal, err), "%s: calib rejected: %s", sh.name, err.c_str());
    triatt_scorer * sc = triatt_scorer_init(&cal);
    CHECK(sc != nullptr, "%s: scorer_init failed", sh.name);
    if (!sc) {
        return;
    }
    std::normal_distribution<float> nd(0.0f, 1.0f);
    const int64_t row_len = (int64_t) sh.n_head_kv * sh.head_dim;
    const int32_t n_group = sh.n_head / sh.n_head_kv;
    for (int64_t n : ns) {
        for (int64_t pad : { (int64_t) 0, (int64_t) 3 }) {
            const int64_t stride = row_len + pad;
            const size_t n_elem = n > 0 ? (size_t) ((n - 1) * stride + row_len) : 0;
            std::vector<float> kf(n_elem);
            std::vector<uint16_t> kh(n_elem);
            const int64_t t = 3000 + n;
            for (size_t e = 0; e < n_elem; ++e) {
                kh[e] = to_half(nd(rng) * 2.0f);
                kf[e] = from_half(kh[e]); // the same values in both types
            }
            for (int32_t il = 0; il < sh.n_layer; ++il) {
                for (int kt = 0; kt < 2; ++kt) {
                    for (int generic = 0; generic < (both_kernels ? 2 : 1); ++generic) {
                        for (int32_t threads : { 1, 3 }) {
                            std::vector<float> out((size_t) n * sh.n_head);
                            triatt_score_params sp;
                            sp.n_threads = threads;
                            sp.offsets_max = 1 << 12;
                            const bool prev = both_kernels ? triatt_force_generic_kernel(generic != 0) : false;
                            const void * keys = n_elem ? (kt ? (const void *) kh.data() : (const void *) kf.data())
                                                       : nullptr;
                            err.clear();
                            const bool ok = triatt_score_layer(sc, il, keys, kt ? TRIATT_KEY_F16 : TRIATT_KEY_F32, n,
                                                               stride, t, sp, n ? out.data() : nullptr, &err);
                            if (both_kernels) {
                                triatt_force_generic_kernel(prev);
                            }
                            if (!cal.has_kv[il]) {
                                CHECK(!ok && !err.empty(), "%s: a layer without KV must be refused", sh.name);
                                continue;
                            }
                            CHECK(ok, "%s: score_layer failed: %s", sh.name, err.c_str());
                            if (!ok) {
                                continue;
                            }
                            for (int64_t i = 0; i < n && i < 9; ++i) {
                                for (int32_t h = 0; h < sh.n_head; ++h) {
                                    const float * k = kf.data() + i * stride + (size_t) (h / n_group) * sh.head_dim;
                                    // the score depends on kpost and t only (the phase of kpost carries the
                                    // position), so the reference may undo RoPE at p = 0
                                    const double want = ref_score(cal, il, h, k, 0, t, sp.offsets_max);
                                    const double got  = out[(size_t) i * sh.n_head + h];
                                    const double tol  = 1e-4 * ref_scale(cal, il, h, k) + 1e-5;
                                    CHECK(std::isfinite(got) && std::fabs(got - want) <= tol,
                                          "%s: layer %d key %lld head %d (%s, %s kernel, %d threads): %.6g vs %.6g",
                                          sh.name, il, (long long) i, h, kt ? "f16" : "f32",
                                          generic ? "generic" : "dispatched", threads, got, want);
                                }
                            }
                        }
                    }
                }
            }
        }
    }
    // invalid arguments are refused, never read
    std::vector<float> one((size_t) row_len, 1.0f), out(sh.n_head);
    triatt_score_params sp;
    err.clear();
    CHECK(!triatt_score_layer(sc, -1, one.data(), TRIATT_KEY_F32, 1, row_len, 10, sp, out.data(), &err), "%s", "layer -1");
    CHECK(!triatt_score_layer(sc, sh.n_layer, one.data(), TRIATT_KEY_F32, 1, row_len, 10, sp, out.data(), &err), "%s",
          "layer n_layer");
    CHECK(!triatt_score_layer(sc, 0, one.data(), TRIATT_KEY_F32, 1, row_len - 1, 10, sp, out.data(), &err), "%s",
          "short row stride");
    CHECK(!triatt_score_layer(sc, 0, nullptr, TRIATT_KEY_F32, 1, row_len, 10, sp, out.data(), &err), "%s", "null keys");
    CHECK(!triatt_score_layer(sc, 0, one.data(), TRIATT_KEY_F32, -1, row_len, 10, sp, out.data(), &err), "%s", "n < 0");
    sp.offsets_max = 0;
    CHECK(!triatt_score_layer(sc, 0, one.data(), TRIATT_KEY_F32, 1, row_len, 10, sp, out.data(), &err), "%s",
          "offsets_max 0");
    // offsets_max at the top of int64 must not overflow while doubling
    sp.offsets_max = std::numeric_limits<int64_t>::max();
    CHECK(triatt_score_layer(sc, 0, one.data(), TRIATT_KEY_F32, 1, row_len, 10, sp, out.data(), &err),
          "offsets_max INT64_MAX: %s", err.c_str());
    // max aggregation over the offsets takes its own path
    sp.offsets_max = 64;
    sp.offset_agg = TRIATT_OFFSET_AGG_MAX;
    sp.n_threads = 2;
    CHECK(triatt_score_layer(sc, 0, one.data(), TRIATT_KEY_F32, 1, row_len, 1 << 30, sp, out.data(), &err),
          "offset_agg max: %s", err.c_str());
    triatt_scorer_free(sc);
}

// (out-of-range enum values are not tried: holding one is itself undefined behaviour in C++)
static void test_calib_check(std::mt19937_64 & rng) {
    const shape sh = { "check", 2, 4, 2, 8, 8, 0, TRIATT_PAIRING_NEOX, false, false, false, false };
    std::string err;
    auto expect_bad = [&](triatt_calib cal, const char * what) {
        err.clear();
        CHECK(!triatt_calib_check(cal, err) && !err.empty(), "calib_check accepted %s", what);
        CHECK(triatt_scorer_init(&cal) == nullptr, "scorer_init accepted %s", what);
    };
    triatt_calib good = make_calib(sh, rng);
    CHECK(triatt_calib_check(good, err), "good calib: %s", err.c_str());
    triatt_calib c = good;
    c.n_freq = 0;
    expect_bad(c, "n_freq 0");
    c = good;
    c.n_freq = 3;
    expect_bad(c, "n_freq != n_rot/2");
    c = good;
    c.q_abs_mean.pop_back();
    expect_bad(c, "short q_abs_mean");
    c = good;
    c.q_mean_im[5] = std::numeric_limits<float>::quiet_NaN();
    expect_bad(c, "NaN statistic");
    c = good;
    c.q_mean_re[0] = std::numeric_limits<float>::infinity();
    expect_bad(c, "inf statistic");
    c = good;
    c.n_head_kv = 3;
    expect_bad(c, "n_head not a multiple of n_head_kv");
    c = good;
    c.rope[1].n_rot = 7;
    expect_bad(c, "odd n_rot");
    c = good;
    c.rope[0].n_rot = 10;
    expect_bad(c, "n_rot > head_dim");
    c = good;
    c.rope[0].freq_factors = { 1.0f, 2.0f };
    expect_bad(c, "freq_factors of the wrong length");
    c = good;
    c.rope[0].freq_factors = { 1.0f, 0.0f, 1.0f, 1.0f };
    expect_bad(c, "zero freq factor");
    c = good;
    c.rope[0].freq_base = -1.0f;
    expect_bad(c, "negative freq_base");
    c = good;
    c.rope.pop_back();
    expect_bad(c, "missing rope layer");
    c = good;
    c.has_kv.push_back(1);
    expect_bad(c, "has_kv of the wrong length");
    CHECK(triatt_scorer_init(nullptr) == nullptr, "%s", "scorer_init(nullptr)");
}

// selection invariants for one call
static void check_selection(const char * what, const triatt_select_params & p, int64_t n, const int32_t * pos,
                            const std::vector<const float *> & layers, int32_t n_head, int32_t n_head_kv,
                            triatt_selector * sel) {
    std::vector<int64_t> keep(std::max<int64_t>(n, 1), -7);
    std::string err;
    const int64_t n_keep = triatt_select(sel, p, n, n ? pos : nullptr, layers.empty() ? nullptr : layers.data(),
                                         (int32_t) layers.size(), n_head, n_head_kv, n ? keep.data() : nullptr, &err);
    // what must be protected
    std::vector<int64_t> order(n);
    for (int64_t i = 0; i < n; ++i) {
        order[i] = i;
    }
    std::stable_sort(order.begin(), order.end(), [pos](int64_t a, int64_t b) { return pos[a] < pos[b]; });
    std::vector<uint8_t> prot(n, 0);
    for (int64_t r = 0; r < std::min(p.n_sink, n); ++r) {
        prot[order[r]] = 1;
    }
    for (int64_t r = n - std::min(p.n_window, n); r < n; ++r) {
        prot[order[r]] = 1;
    }
    int64_t n_prot = 0;
    for (int64_t i = 0; i < n; ++i) {
        prot[i] |= pos[i] < p.prompt_len;
        n_prot += prot[i];
    }
    if (n_prot > p.budget && p.budget < n) {
        CHECK(n_keep == -1 && !err.empty(), "%s: protected %lld > budget %lld must fail, got %lld", what,
              (long long) n_prot, (long long) p.budget, (long long) n_keep);
        return;
    }
    CHECK(n_keep == std::min<int64_t>(n, p.budget), "%s: kept %lld of %lld with budget %lld (%s)", what,
          (long long) n_keep, (long long) n, (long long) p.budget, err.c_str());
    if (n_keep < 0) {
        return;
    }
    for (int64_t k = 0; k < n_keep; ++k) {
        CHECK(keep[k] >= 0 && keep[k] < n && (k == 0 || keep[k] > keep[k - 1]), "%s: keep[%lld] = %lld", what,
              (long long) k, (long long) keep[k]);
    }
    std::vector<uint8_t> kept(n, 0);
    for (int64_t k = 0; k < n_keep; ++k) {
        if (keep[k] >= 0 && keep[k] < n) {
            kept[keep[k]] = 1;
        }
    }
    for (int64_t i = 0; i < n; ++i) {
        CHECK(!prot[i] || kept[i], "%s: protected candidate %lld evicted", what, (long long) i);
    }
    const float * ts = triatt_selector_token_scores(sel);
    for (int64_t i = 0; i < n; ++i) {
        CHECK(!std::isnan(ts[i]), "%s: NaN token score at %lld", what, (long long) i);
    }
    if (p.rank == TRIATT_RANK_RECENT) {
        // every evicted unprotected candidate is older than (or as old as) every kept unprotected one
        int32_t newest_evicted = std::numeric_limits<int32_t>::min(), oldest_kept = std::numeric_limits<int32_t>::max();
        for (int64_t i = 0; i < n; ++i) {
            if (prot[i]) {
                continue;
            }
            if (kept[i]) {
                oldest_kept = std::min(oldest_kept, pos[i]);
            } else {
                newest_evicted = std::max(newest_evicted, pos[i]);
            }
        }
        CHECK(newest_evicted <= oldest_kept, "%s: streaming evicted %d but kept %d", what, newest_evicted, oldest_kept);
    }
}

static void test_selection(std::mt19937_64 & rng, bool quick) {
    triatt_selector * sel = triatt_selector_init();
    std::normal_distribution<float> nd(0.0f, 1.0f);
    const float nan = std::numeric_limits<float>::quiet_NaN(), inf = std::numeric_limits<float>::infinity();
    const std::vector<int64_t> ns = quick ? std::vector<int64_t>{ 0, 1, 2, 7, 100 }
                                          : std::vector<int64_t>{ 0, 1, 2, 3, 7, 31, 100, 257, 1000 };
    int case_no = 0;
    for (int64_t n : ns) {
        for (int trial = 0; trial < (quick ? 6 : 20); ++trial, ++case_no) {
            const int32_t n_head_kv = 1 + (int32_t) (rng() % 3), n_head = n_head_kv * (1 + (int32_t) (rng() % 3));
            const int32_t n_layers = 1 + (int32_t) (rng() % 3);
            std::vector<int32_t> pos(n);
            int32_t p = (int32_t) (rng() % 5);
            for (int64_t i = 0; i < n; ++i) {
                pos[i] = p;
                p += (int32_t) (rng() % 4); // holes, and equal positions (step 0)
            }
            if (trial % 3 == 1) {
                std::shuffle(pos.begin(), pos.end(), rng);
            }
            if (trial % 5 == 4 && n > 0) { // extreme positions
                pos[0] = std::numeric_limits<int32_t>::max();
                pos[n - 1] = std::numeric_limits<int32_t>::min();
            }
            std::vector<std::vector<float>> sc(n_layers, std::vector<float>((size_t) n * n_head));
            for (auto & l : sc) {
                for (float & v : l) {
                    const uint64_t r = rng() % 50;
                    v = r == 0 ? nan : r == 1 ? inf : r == 2 ? -inf : r == 3 ? 3e38f : nd(rng);
                }
            }
            if (trial % 7 == 3) { // a head with nothing finite
                for (auto & l : sc) {
                    for (int64_t i = 0; i < n; ++i) {
                        l[(size_t) i * n_head] = nan;
                    }
                }
            }
            std::vector<const float *> layers;
            for (auto & l : sc) {
                layers.push_back(l.data());
            }
            for (int policy = 0; policy < 3; ++policy) {
                triatt_select_params sp;
                sp.rank = (triatt_rank) policy;
                sp.budget = (int64_t) (rng() % (uint64_t) (n + 3));
                sp.n_sink = (int64_t) (rng() % 4);
                sp.n_window = (int64_t) (rng() % 4);
                sp.prompt_len = trial % 4 == 0 ? (int64_t) (rng() % 8) : 0;
                sp.seed = rng();
                sp.kv_agg = trial % 2 ? TRIATT_KV_AGG_MEAN : TRIATT_KV_AGG_MAX;
                char what[96];
                snprintf(what, sizeof(what), "select case %d n=%lld policy %d", case_no, (long long) n, policy);
                check_selection(what, sp, n, pos.data(), policy == 0 ? layers : std::vector<const float *>{},
                                n_head, n_head_kv, sel);
            }
        }
    }
    // refused arguments
    std::string err;
    int32_t pos2[2] = { 0, 1 };
    int64_t keep2[2];
    triatt_select_params sp;
    sp.budget = 1;
    CHECK(triatt_select(nullptr, sp, 2, pos2, nullptr, 0, 1, 1, keep2, &err) == -1, "%s", "null selector");
    CHECK(triatt_select(sel, sp, 2, pos2, nullptr, 0, 1, 1, keep2, &err) == -1, "%s", "tri without scores");
    const float * null_layer[1] = { nullptr };
    CHECK(triatt_select(sel, sp, 2, pos2, null_layer, 1, 1, 1, keep2, &err) == -1, "%s", "null layer scores");
    float s2[2] = { 0.0f, 1.0f };
    const float * l2[1] = { s2 };
    CHECK(triatt_select(sel, sp, 2, pos2, l2, 1, 3, 2, keep2, &err) == -1, "%s", "n_head not a multiple");
    CHECK(triatt_select(sel, sp, 2, nullptr, l2, 1, 1, 1, keep2, &err) == -1, "%s", "null pos");
    CHECK(triatt_select(sel, sp, -1, pos2, l2, 1, 1, 1, keep2, &err) == -1, "%s", "n < 0");
    sp.budget = -1;
    CHECK(triatt_select(sel, sp, 2, pos2, l2, 1, 1, 1, keep2, &err) == -1, "%s", "budget < 0");
    triatt_selector_free(sel);
}

static void test_rope(std::mt19937_64 & rng) {
    // every band's omega is finite and non-negative over a spread of parameters, including
    // the YaRN ramp's degenerate corners (n_ctx_orig tiny or huge, beta_fast == beta_slow)
    std::uniform_real_distribution<float> ud(0.0f, 1.0f);
    for (int i = 0; i < 200; ++i) {
        triatt_rope_layer rl;
        rl.n_rot = 2 * (1 + (int32_t) (rng() % 64));
        rl.freq_base = i % 10 == 0 ? 1.0000001f : 1.0f + 1e6f * ud(rng);
        rl.freq_scale = i % 7 == 0 ? 1e-4f : 0.05f + ud(rng);
        rl.ext_factor = i % 2 ? 1.0f : 0.0f;
        rl.attn_factor = 0.5f + ud(rng);
        rl.beta_fast = i % 11 == 0 ? 1.0f : 32.0f;
        rl.beta_slow = 1.0f;
        rl.n_ctx_orig = i % 3 == 0 ? 1 : i % 3 == 1 ? 2048 : std::numeric_limits<int32_t>::max();
        std::string err;
        if (!triatt_rope_layer_check(rl, 128, err)) {
            continue;
        }
        std::vector<double> om(rl.n_rot / 2);
        float s = 0.0f;
        triatt_rope_omega(rl, om.data(), &s);
        for (double w : om) {
            CHECK(std::isfinite(w) && w >= 0.0, "rope case %d: omega %g", i, w);
        }
        CHECK(std::isfinite(s) && s > 0.0f, "rope case %d: mscale %g", i, (double) s);
    }
}

int main(int argc, char ** argv) {
    bool quick = false, threads = false;
    for (int i = 1; i < argc; ++i) {
        if (!strcmp(argv[i], "--quick")) {
            quick = true;
        } else if (!strcmp(argv[i], "--threads")) {
            threads = true;
        } else {
            fprintf(stderr, "usage: %s [--quick] [--threads]\n", argv[0]);
            return 2;
        }
    }
    std::mt19937_64 rng(20260501);
    const shape shapes[] = {
        // name            L  H  Hkv hd  rot alt pairing               yarn   ff     nope   no-kv
        { "llama-like",    2, 6, 2,  16, 16, 0,  TRIATT_PAIRING_NORM, false, true,  false, false },
        { "qwen-like",     3, 4, 1,  32, 32, 0,  TRIATT_PAIRING_NEOX, false, false, true,  true  },
        { "odd-head-dim",  2, 3, 3,  10, 10, 6,  TRIATT_PAIRING_NEOX, true,  false, false, false },
        { "partial-rot",   2, 4, 2,  24, 8,  12, TRIATT_PAIRING_NORM, true,  true,  false, false },
        { "single",        1, 1, 1,  2,  2,  0,  TRIATT_PAIRING_NEOX, false, false, false, false },
        { "wide",          1, 8, 8,  72, 64, 0,  TRIATT_PAIRING_NEOX, false, false, false, false },
    };
    const std::vector<int64_t> ns = quick ? std::vector<int64_t>{ 0, 1, 17 } : std::vector<int64_t>{ 0, 1, 2, 17, 65 };
    for (const shape & sh : shapes) {
        test_scoring(sh, rng, ns);
    }
    test_calib_check(rng);
    test_selection(rng, quick);
    test_rope(rng);
    if (threads) {
        // two independent scorers + selectors at once (what two llama contexts do): nothing shared
        auto work = [&](uint64_t seed) {
            std::mt19937_64 r(seed);
            for (int i = 0; i < 3; ++i) {
                test_scoring(shapes[1], r, { 33 }, false);
            }
        };
        std::thread a(work, 1), b(work, 2);
        a.join();
        b.join();
        // one scorer called with changing thread counts (its pool is resized between jobs),
        // many times over: what a caller varying n_threads does
        const shape & sh = shapes[1];
        triatt_calib cal = make_calib(sh, rng);
        triatt_scorer * sc = triatt_scorer_init(&cal);
        const int64_t n = 64, row_len = (int64_t) sh.n_head_kv * sh.head_dim;
        std::vector<float> keys((size_t) n * row_len, 0.5f), out((size_t) n * sh.n_head), first;
        std::string err;
        for (int i = 0; i < 200; ++i) {
            triatt_score_params sp;
            sp.n_threads = 2 + i % 3;
            std::fill(out.begin(), out.end(), std::numeric_limits<float>::quiet_NaN());
            CHECK(triatt_score_layer(sc, 0, keys.data(), TRIATT_KEY_F32, n, row_len, 100, sp, out.data(), &err),
                  "resize loop: %s", err.c_str());
            if (first.empty()) {
                first = out;
            }
            CHECK(out == first, "resize loop %d: scores differ with %d threads", i, sp.n_threads);
        }
        triatt_scorer_free(sc);
    }
    printf("core_sanitize: %d checks, %d failed (kernel %s)\n", g_checks.load(), g_fail.load(), triatt_kernel_name());
    return g_fail.load() == 0 ? 0 : 1;
}
