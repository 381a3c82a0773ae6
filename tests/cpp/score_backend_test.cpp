// score_backend_test: the backend scorer (cpp/llama-triatt-score-backend.cpp) against the CPU scorer
// (triatt_score_layer) on the same cached keys, as the KV policy would read them.
//
//   score_backend_test [BACKEND]          check every case; BACKEND: CPU (default), GPU, or a device name
//   score_backend_test [BACKEND] bench    time one round of a Qwen3-8B-shaped layer stack (36 layers,
//                                         32 query / 8 KV heads, head_dim 128, 2176 cells, f16 K)
//
// Each case puts random post-RoPE keys into a K storage tensor [n_head_kv*head_dim, kv_size, n_stream]
// allocated on the backend (in the cache's type, Hadamard-rotated per block of k_rot like llama.cpp's
// quantized K), scores stream 1's first n_cells rows with the backend graph, and compares with the CPU
// scorer fed the way llama-triatt-policy.cpp feeds it (f32/f16 rows in place, other types converted to
// f32 and un-rotated). Prints one line per case; exit status 1 if any case differs by more than the
// tolerance (max |difference| / max |score| of the layer).

#include "llama-triatt-score-backend.h"
#include "triatt-core.h"

#include "ggml-alloc.h"
#include "ggml-backend.h"
#include "ggml.h"

#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <random>
#include <string>
#include <vector>

struct test_case {
    const char *   name;
    ggml_type      type;
    triatt_pairing pairing;
    int32_t        n_head, n_head_kv, head_dim, n_rot;
    int32_t        k_rot;       // 0: keys stored as is
    float          ext_factor;  // YaRN when > 0
    double         tol;
};

static void hadamard_inplace(float * x, int32_t n) {
    for (int32_t h = 1; h < n; h *= 2) {
        for (int32_t i = 0; i < n; i += 2 * h) {
            for (int32_t j = i; j < i + h; ++j) {
                const float a = x[j], b = x[j + h];
                x[j]     = a + b;
                x[j + h] = a - b;
            }
        }
    }
    const float s = 1.0f / std::sqrt((float) n);
    for (int32_t i = 0; i < n; ++i) {
        x[i] *= s;
    }
}

static triatt_calib make_calib(const test_case & tc, int32_t n_layer, std::mt19937 & rng) {
    std::normal_distribution<float> nd(0.0f, 1.0f);
    triatt_calib cal;
    cal.n_layer   = n_layer;
    cal.n_head    = tc.n_head;
    cal.n_head_kv = tc.n_head_kv;
    cal.head_dim  = tc.head_dim;
    cal.n_freq    = tc.n_rot / 2;
    cal.pairing   = tc.pairing;
    cal.rope.resize(n_layer);
    cal.has_kv.assign(n_layer, 1);
    for (auto & rl : cal.rope) {
        rl.n_rot     = tc.n_rot;
        rl.freq_base = 1000000.0f;
        if (tc.ext_factor > 0) {
            rl.freq_scale  = 0.25f;
            rl.ext_factor  = tc.ext_factor;
            rl.attn_factor = 1.0f;
            rl.n_ctx_orig  = 32768;
        }
    }
    const size_t n = (size_t) n_layer * tc.n_head * cal.n_freq;
    cal.q_mean_re.resize(n);
    cal.q_mean_im.resize(n);
    cal.q_abs_mean.resize(n);
    for (size_t i = 0; i < n; ++i) {
        cal.q_mean_re[i]  = nd(rng);
        cal.q_mean_im[i]  = nd(rng);
        cal.q_abs_mean[i] = std::hypot(cal.q_mean_re[i], cal.q_mean_im[i]) * (1.0f + std::fabs(nd(rng)));
    }
    return cal;
}

// a K storage tensor on the backend, filled with keys (f32 [n_stream][kv_size][n_embd]) in the cache's type
struct k_store {
    ggml_context *        ctx = nullptr;
    ggml_backend_buffer_t buf = nullptr;
    ggml_tensor *         k   = nullptr;
    ~k_store() {
        ggml_backend_buffer_free(buf);
        ggml_free(ctx);
    }
};

static bool make_storage(k_store & st, ggml_backend_t backend, ggml_type type, int64_t n_embd, int64_t kv_size,
                         int64_t n_stream, std::vector<float> keys, int32_t k_rot) {
    ggml_init_params ip = { ggml_tensor_overhead() * 4, nullptr, true };
    st.ctx = ggml_init(ip);
    st.k = ggml_new_tensor_3d(st.ctx, type, n_embd, kv_size, n_stream);
    st.buf = ggml_backend_alloc_ctx_tensors(st.ctx, backend);
    if (!st.buf) {
        return false;
    }
    const int64_t n_rows = kv_size * n_stream;
    if (k_rot > 0) {
        for (int64_t r = 0; r < n_rows; ++r) {
            for (int64_t b = 0; b < n_embd; b += k_rot) {
                hadamard_inplace(keys.data() + r * n_embd + b, k_rot);
            }
        }
    }
    std::vector<uint8_t> data(ggml_nbytes(st.k));
    if (type == GGML_TYPE_F32) {
        memcpy(data.data(), keys.data(), data.size());
    } else if (type == GGML_TYPE_F16) {
        ggml_fp32_to_fp16_row(keys.data(), (ggml_fp16_t *) data.data(), n_rows * n_embd);
    } else if (type == GGML_TYPE_BF16) {
        ggml_fp32_to_bf16_row(keys.data(), (ggml_bf16_t *) data.data(), n_rows * n_embd);
    } else {
        ggml_quantize_chunk(type, keys.data(), data.data(), 0, n_rows, n_embd, nullptr);
    }
    ggml_backend_tensor_set(st.k, data.data(), 0, data.size());
    return true;
}

// the CPU scorer, fed as llama-triatt-policy.cpp feeds it
static bool cpu_scores(triatt_scorer * sc, int32_t il, const ggml_tensor * k, uint32_t stream, uint32_t n_cells,
                       int32_t k_rot, int64_t t, int n_threads, std::vector<float> & out, std::string & err) {
    const size_t row_bytes = k->nb[1];
    std::vector<uint8_t> host(row_bytes * n_cells);
    ggml_backend_tensor_get(k, host.data(), stream * k->nb[2], host.size());
    std::vector<float> f32;
    const void * keys = host.data();
    triatt_key_type kt = TRIATT_KEY_F16;
    int64_t stride = (int64_t) (row_bytes / ggml_type_size(k->type));
    if (k->type == GGML_TYPE_F32) {
        kt = TRIATT_KEY_F32;
    } else if (k->type != GGML_TYPE_F16) {
        const int64_t ne0 = k->ne[0];
        f32.resize((size_t) ne0 * n_cells);
        for (uint32_t i = 0; i < n_cells; ++i) {
            float * row = f32.data() + (size_t) i * ne0;
            ggml_get_type_traits(k->type)->to_float(host.data() + i * row_bytes, row, ne0);
            for (int64_t b = 0; k_rot > 0 && b + k_rot <= ne0; b += k_rot) {
                hadamard_inplace(row + b, k_rot);
            }
        }
        keys = f32.data();
        kt = TRIATT_KEY_F32;
        stride = ne0;
    }
    triatt_score_params sp;
    sp.n_threads = n_threads;
    return triatt_score_layer(sc, il, keys, kt, n_cells, stride, t, sp, out.data(), &err);
}

static ggml_backend_t open_backend(const char * name) {
    if (strcmp(name, "CPU") == 0) {
        return ggml_backend_init_by_type(GGML_BACKEND_DEVICE_TYPE_CPU, nullptr);
    }
    if (strcmp(name, "GPU") == 0) {
        return ggml_backend_init_by_type(GGML_BACKEND_DEVICE_TYPE_GPU, nullptr);
    }
    return ggml_backend_init_by_name(name, nullptr);
}

static int run_checks(ggml_backend_t backend) {
    const test_case cases[] = {
        // name                       type             pairing             nh nkv  hd  rot krot  yarn  tol
        { "f32 neox gqa",             GGML_TYPE_F32,  TRIATT_PAIRING_NEOX, 8, 2,  64,  64,   0, 0.0f, 1e-4 },
        { "f16 neox gqa",             GGML_TYPE_F16,  TRIATT_PAIRING_NEOX, 8, 2,  64,  64,   0, 0.0f, 1e-4 },
        { "bf16 neox",                GGML_TYPE_BF16, TRIATT_PAIRING_NEOX, 4, 4,  64,  64,   0, 0.0f, 1e-4 },
        { "q8_0 neox",                GGML_TYPE_Q8_0, TRIATT_PAIRING_NEOX, 8, 2,  64,  64,   0, 0.0f, 1e-4 },
        { "q8_0 neox rotated 64",     GGML_TYPE_Q8_0, TRIATT_PAIRING_NEOX, 8, 2,  64,  64,  64, 0.0f, 1e-4 },
        { "q8_0 neox rotated 128",    GGML_TYPE_Q8_0, TRIATT_PAIRING_NEOX, 8, 2, 128, 128, 128, 0.0f, 1e-4 },
        { "q4_0 neox rotated 128",    GGML_TYPE_Q4_0, TRIATT_PAIRING_NEOX, 4, 1, 128, 128, 128, 0.0f, 1e-4 },
        { "f32 norm",                 GGML_TYPE_F32,  TRIATT_PAIRING_NORM, 6, 3,  64,  64,   0, 0.0f, 1e-4 },
        { "f16 norm gqa",             GGML_TYPE_F16,  TRIATT_PAIRING_NORM, 9, 3,  64,  64,   0, 0.0f, 1e-4 },
        { "q8_0 norm rotated 64",     GGML_TYPE_Q8_0, TRIATT_PAIRING_NORM, 8, 2,  64,  64,  64, 0.0f, 1e-4 },
        { "f16 neox partial rotary",  GGML_TYPE_F16,  TRIATT_PAIRING_NEOX, 8, 2, 128,  64,   0, 0.0f, 1e-4 },
        { "f32 norm partial rotary",  GGML_TYPE_F32,  TRIATT_PAIRING_NORM, 4, 2,  64,  32,   0, 0.0f, 1e-4 },
        { "q8_0 neox partial rot 128",GGML_TYPE_Q8_0, TRIATT_PAIRING_NEOX, 4, 2, 128,  32, 128, 0.0f, 1e-4 },
        { "f16 neox yarn",            GGML_TYPE_F16,  TRIATT_PAIRING_NEOX, 8, 2,  64,  64,   0, 1.0f, 1e-4 },
    };
    const int32_t  n_layer = 2, kv_size = 512, n_stream = 2;
    const uint32_t stream = 1, n_cells = 300;
    int n_fail = 0;
    for (const test_case & tc : cases) {
        std::mt19937 rng(1234);
        std::normal_distribution<float> nd(0.0f, 1.0f);
        triatt_calib cal = make_calib(tc, n_layer, rng);
        const int64_t n_embd = (int64_t) tc.n_head_kv * tc.head_dim;
        std::vector<float> keys((size_t) n_embd * kv_size * n_stream);
        for (auto & x : keys) {
            x = 0.5f + nd(rng);   // a common offset: scores far from zero, so relative errors mean something
        }
        k_store st;
        if (!make_storage(st, backend, tc.type, n_embd, kv_size, n_stream, keys, tc.k_rot)) {
            printf("FAIL %-28s cannot allocate the K tensor on the backend\n", tc.name);
            ++n_fail;
            continue;
        }
        std::string err;
        triatt_scorer * sc = triatt_scorer_init(&cal);
        triatt_score_backend * sb = triatt_score_backend_init(backend, cal, sc, err);
        if (!sc || !sb) {
            printf("FAIL %-28s init: %s\n", tc.name, err.c_str());
            ++n_fail;
            triatt_scorer_free(sc);
            continue;
        }
        double worst = 0.0;
        bool ok = true;
        for (int32_t il = 0; il < n_layer && ok; ++il) {
            for (int64_t t : { (int64_t) 300, (int64_t) 40000 }) {
                std::vector<float> ref((size_t) n_cells * tc.n_head), got((size_t) n_cells * tc.n_head, NAN);
                if (!cpu_scores(sc, il, st.k, stream, n_cells, tc.k_rot, t, 1, ref, err) ||
                    !triatt_score_backend_layer(sb, il, st.k, stream, n_cells, tc.k_rot, t, got.data(), err)) {
                    printf("FAIL %-28s layer %d: %s\n", tc.name, il, err.c_str());
                    ok = false;
                    break;
                }
                double scale = 0.0, diff = 0.0;
                for (size_t i = 0; i < ref.size(); ++i) {
                    scale = std::max(scale, (double) std::fabs(ref[i]));
                    diff  = std::max(diff, std::isfinite(got[i]) ? (double) std::fabs(got[i] - ref[i]) : INFINITY);
                }
                worst = std::max(worst, diff / std::max(scale, 1e-30));
            }
        }
        if (ok) {
            ok = worst <= tc.tol;
            printf("%s %-28s max |backend - cpu| / max |cpu| = %.2e (tolerance %.0e)\n", ok ? "ok  " : "FAIL", tc.name,
                   worst, tc.tol);
        }
        n_fail += ok ? 0 : 1;
        triatt_score_backend_free(sb);
        triatt_scorer_free(sc);
    }

    // invalid arguments are refused with a message, and nothing to score is not an error
    {
        std::mt19937 rng(1);
        const test_case tc = { "", GGML_TYPE_Q8_0, TRIATT_PAIRING_NEOX, 4, 2, 64, 64, 0, 0.0f, 0 };
        triatt_calib cal = make_calib(tc, 1, rng);
        k_store st;
        make_storage(st, backend, GGML_TYPE_Q8_0, 128, 256, 1, std::vector<float>(128 * 256, 1.0f), 0);
        std::string err;
        triatt_scorer * sc = triatt_scorer_init(&cal);
        const bool no_scorer = triatt_score_backend_init(backend, cal, nullptr, err) == nullptr &&
                               err.find("scorer") != std::string::npos;
        triatt_score_backend * sb = triatt_score_backend_init(backend, cal, sc, err);
        std::vector<float> out(4 * 256);
        const bool bad_rot = !triatt_score_backend_layer(sb, 0, st.k, 0, 256, 48, 10, out.data(), err) &&
                             err.find("k_rot") != std::string::npos;
        const bool bad_layer = !triatt_score_backend_layer(sb, 3, st.k, 0, 256, 0, 10, out.data(), err) &&
                               err.find("out of range") != std::string::npos;
        const bool bad_stream = !triatt_score_backend_layer(sb, 0, st.k, 1, 256, 0, 10, out.data(), err);
        const bool empty = triatt_score_backend_layer(sb, 0, st.k, 0, 0, 0, 10, nullptr, err);
        const bool ok = no_scorer && bad_rot && bad_layer && bad_stream && empty;
        printf("%s %-28s no scorer, bad k_rot, layer, stream refused; 0 cells accepted\n", ok ? "ok  " : "FAIL",
               "argument checks");
        n_fail += ok ? 0 : 1;
        triatt_score_backend_free(sb);
        triatt_scorer_free(sc);
    }
    return n_fail;
}

// one round's scores of a Qwen3-8B-shaped layer stack, K of type `type` (rotated by llama.cpp in blocks of k_rot
// values when quantized), on the backend and, for comparison, copied to the host and scored by the CPU scorer
static int bench_one(ggml_backend_t backend, ggml_type type, int32_t k_rot) {
    const test_case tc = { "qwen3-8b", type, TRIATT_PAIRING_NEOX, 32, 8, 128, 128, k_rot, 0.0f, 0 };
    const int32_t n_layer = 36, kv_size = 2560;
    const uint32_t n_cells = 2176;
    std::mt19937 rng(7);
    std::normal_distribution<float> nd(0.0f, 1.0f);
    triatt_calib cal = make_calib(tc, n_layer, rng);
    const int64_t n_embd = (int64_t) tc.n_head_kv * tc.head_dim;
    std::vector<float> keys((size_t) n_embd * kv_size);
    for (auto & x : keys) {
        x = nd(rng);
    }
    std::vector<k_store> st(n_layer);
    for (auto & s : st) {
        if (!make_storage(s, backend, tc.type, n_embd, kv_size, 1, keys, k_rot)) {
            printf("cannot allocate the K tensors\n");
            return 1;
        }
    }
    std::string err;
    triatt_scorer * sc = triatt_scorer_init(&cal);
    triatt_score_backend * sb = triatt_score_backend_init(backend, cal, sc, err);
    std::vector<float> out((size_t) n_cells * tc.n_head);
    auto now = [] { return std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now().time_since_epoch()).count(); };
    double best_backend = 1e30, best_copy = 1e30;
    for (int rep = 0; rep < 5; ++rep) {
        double t0 = now();
        for (int32_t il = 0; il < n_layer; ++il) {
            if (!triatt_score_backend_layer(sb, il, st[il].k, 0, n_cells, k_rot, 40000 + rep, out.data(), err)) {
                printf("backend scoring failed: %s\n", err.c_str());
                return 1;
            }
        }
        best_backend = std::min(best_backend, now() - t0);
        // what the policy does without the backend scorer: copy K to the host, score there (1 thread)
        t0 = now();
        for (int32_t il = 0; il < n_layer; ++il) {
            cpu_scores(sc, il, st[il].k, 0, n_cells, k_rot, 40000 + rep, 1, out, err);
        }
        best_copy = std::min(best_copy, now() - t0);
    }
    printf("backend %s, Qwen3-8B shape (36 layers, 32/8 heads, head_dim 128, %u cells, %s K%s): one round's scores\n",
           ggml_backend_name(backend), n_cells, ggml_type_name(type),
           k_rot ? (", rotated in blocks of " + std::to_string(k_rot)).c_str() : "");
    printf("  on the backend, scores brought back:    %8.2f ms\n", best_backend);
    printf("  K copied to the host, CPU scorer (1 t): %8.2f ms\n", best_copy);
    triatt_score_backend_free(sb);
    triatt_scorer_free(sc);
    return 0;
}

static int run_bench(ggml_backend_t backend) {
    return bench_one(backend, GGML_TYPE_F16, 0) || bench_one(backend, GGML_TYPE_Q8_0, 128) ? 1 : 0;
}

int main(int argc, char ** argv) {
    const char * name = argc > 1 ? argv[1] : "CPU";
    const bool bench = argc > 2 && strcmp(argv[2], "bench") == 0;
    ggml_backend_t backend = open_backend(name);
    if (!backend) {
        fprintf(stderr, "no backend %s\n", name);
        return 2;
    }
    printf("backend: %s\n", ggml_backend_name(backend));
    const int rc = bench ? run_bench(backend) : (run_checks(backend) == 0 ? 0 : 1);
    ggml_backend_free(backend);
    return rc;
}
