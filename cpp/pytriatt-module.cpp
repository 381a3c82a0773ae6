// pytriatt._core: Python bindings of the TriAttention core in cpp/.
// The core itself has no Python or llama.cpp dependency; this file only converts
// between numpy arrays and the core's plain C++ types. The documented Python API is
// pytriatt.core (pytriatt/core.py), which wraps these low-level functions.

#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include "triatt-core.h"
#include "triatt-policy.h"

#include <memory>
#include <mutex>
#include <stdexcept>
#include <string>
#include <vector>

namespace py = pybind11;

#ifndef PYTRIATT_VERSION
#define PYTRIATT_VERSION "unknown"
#endif

static py::dict build_info() {
    py::dict info;
    info["version"] = PYTRIATT_VERSION;
#if defined(__clang__)
    info["compiler"] = std::string("clang ") + __clang_version__;
#elif defined(__GNUC__)
    info["compiler"] = std::string("gcc ") + __VERSION__;
#elif defined(_MSC_VER)
    info["compiler"] = "msvc " + std::to_string(_MSC_VER);
#else
    info["compiler"] = "unknown";
#endif
#if defined(_OPENMP)
    info["openmp"] = true;
#else
    info["openmp"] = false;
#endif
    info["cplusplus"] = (long) __cplusplus;
#if defined(__AVX2__)
    info["simd"] = "avx2 (build flags)";
#elif defined(__GNUC__) && defined(__x86_64__) && defined(__linux__) && !defined(TRIATT_NO_CLONES)
    info["simd"] = "x86-64-v3 clone selected at load time when available, else sse2";
#elif defined(__ARM_NEON)
    info["simd"] = "neon";
#else
    info["simd"] = "baseline";
#endif
    return info;
}

using f32_array = py::array_t<float, py::array::c_style | py::array::forcecast>;
using i32_array = py::array_t<int32_t, py::array::c_style | py::array::forcecast>;

// calibration statistics + RoPE + scorer workspace; one lock per object
class py_calib {
public:
    py_calib(f32_array q_mean_re, f32_array q_mean_im, f32_array q_abs_mean,
             int32_t n_head_kv, int32_t head_dim, int32_t pairing,
             std::vector<triatt_rope_layer> rope, std::vector<bool> has_kv) {
        if (q_mean_re.ndim() != 3 || q_mean_im.ndim() != 3 || q_abs_mean.ndim() != 3) {
            throw py::value_error("q_mean_re, q_mean_im and q_abs_mean must be 3-d [n_layer, n_head, n_freq]");
        }
        for (int d = 0; d < 3; ++d) {
            if (q_mean_im.shape(d) != q_mean_re.shape(d) || q_abs_mean.shape(d) != q_mean_re.shape(d)) {
                throw py::value_error("q_mean_re, q_mean_im and q_abs_mean must have the same shape");
            }
        }
        cal.n_layer   = (int32_t) q_mean_re.shape(0);
        cal.n_head    = (int32_t) q_mean_re.shape(1);
        cal.n_freq    = (int32_t) q_mean_re.shape(2);
        cal.n_head_kv = n_head_kv;
        cal.head_dim  = head_dim;
        cal.pairing   = (triatt_pairing) pairing;
        cal.rope      = std::move(rope);
        cal.has_kv.clear();
        for (bool b : has_kv) {
            cal.has_kv.push_back(b ? 1 : 0);
        }
        const size_t n = (size_t) q_mean_re.size();
        cal.q_mean_re.assign(q_mean_re.data(), q_mean_re.data() + n);
        cal.q_mean_im.assign(q_mean_im.data(), q_mean_im.data() + n);
        cal.q_abs_mean.assign(q_abs_mean.data(), q_abs_mean.data() + n);
        std::string err;
        if (!triatt_calib_check(cal, err)) {
            throw py::value_error("invalid calibration: " + err);
        }
        scorer.reset(triatt_scorer_init(&cal));
        if (!scorer) {
            throw std::runtime_error("triatt_scorer_init failed");
        }
    }

    // keys: float16 arrays are scored as they are (F16 kernel input); anything else is
    // converted to C-contiguous float32
    py::array_t<float> score(int32_t il, py::array keys_in, int64_t t, int64_t offsets_max,
                             bool trig, bool norm, int32_t offset_agg, int32_t n_threads) {
        const bool f16 = keys_in.dtype().kind() == 'f' && keys_in.dtype().itemsize() == 2;
        py::array keys;
        if (f16) {
            keys = py::array::ensure(keys_in, py::array::c_style);
        } else {
            keys = f32_array::ensure(keys_in);
        }
        if (!keys) {
            throw py::value_error("keys must be a numeric array");
        }
        int64_t n = 0;
        const int64_t row = (int64_t) cal.n_head_kv * cal.head_dim;
        if (keys.ndim() == 3) {
            if (keys.shape(1) != cal.n_head_kv || keys.shape(2) != cal.head_dim) {
                throw py::value_error("keys must have shape [n, n_head_kv=" + std::to_string(cal.n_head_kv) +
                                      ", head_dim=" + std::to_string(cal.head_dim) + "], got [" +
                                      std::to_string(keys.shape(0)) + ", " + std::to_string(keys.shape(1)) + ", " +
                                      std::to_string(keys.shape(2)) + "]");
            }
            n = keys.shape(0);
        } else if (keys.ndim() == 2) {
            if (keys.shape(1) != row) {
                throw py::value_error("2-d keys must have shape [n, n_head_kv*head_dim=" + std::to_string(row) + "]");
            }
            n = keys.shape(0);
        } else {
            throw py::value_error("keys must have shape [n, n_head_kv, head_dim]");
        }
        if (offset_agg != TRIATT_OFFSET_AGG_MEAN && offset_agg != TRIATT_OFFSET_AGG_MAX) {
            throw py::value_error("unknown offset aggregation");
        }
        py::array_t<float> out({ (py::ssize_t) n, (py::ssize_t) cal.n_head });
        triatt_score_params p;
        p.offsets_max = offsets_max;
        p.trig        = trig;
        p.norm        = norm;
        p.offset_agg  = (triatt_offset_agg) offset_agg;
        p.n_threads   = n_threads;
        std::string err;
        bool ok;
        {
            const void * kp = keys.data();
            float * op = out.mutable_data();
            py::gil_scoped_release nogil;
            std::lock_guard<std::mutex> lk(mutex);
            ok = triatt_score_layer(scorer.get(), il, kp, f16 ? TRIATT_KEY_F16 : TRIATT_KEY_F32, n, row, t, p, op, &err);
        }
        if (!ok) {
            throw py::value_error(err);
        }
        return out;
    }

    py::tuple omega(int32_t il) const {
        if (il < 0 || il >= cal.n_layer) {
            throw py::index_error("layer out of range");
        }
        const int nf = cal.rope[il].n_rot / 2;
        py::array_t<double> om(nf);
        float s = 1.0f;
        triatt_rope_omega(cal.rope[il], om.mutable_data(), &s);
        return py::make_tuple(om, s);
    }

    triatt_calib cal;
    std::unique_ptr<triatt_scorer, void (*)(triatt_scorer *)> scorer{ nullptr, triatt_scorer_free };
    std::mutex mutex;
};

static py::tuple py_rope_omega(const triatt_rope_layer & rl, int32_t head_dim) {
    std::string err;
    if (!triatt_rope_layer_check(rl, head_dim, err)) {
        throw py::value_error(err);
    }
    py::array_t<double> om(rl.n_rot / 2);
    float s = 1.0f;
    triatt_rope_omega(rl, om.mutable_data(), &s);
    return py::make_tuple(om, s);
}

static py::tuple py_select(int32_t rank, std::vector<f32_array> layer_scores, i32_array pos,
                           int64_t budget, int64_t sink, int64_t window, int64_t prompt_len,
                           uint64_t seed, int32_t n_head_kv, int32_t kv_agg) {
    if (pos.ndim() != 1) {
        throw py::value_error("positions must be 1-d");
    }
    const int64_t n = pos.shape(0);
    int32_t n_head = 0;
    std::vector<const float *> ptrs;
    for (size_t l = 0; l < layer_scores.size(); ++l) {
        const auto & a = layer_scores[l];
        if (a.ndim() != 2 || a.shape(0) != n) {
            throw py::value_error("scores of layer " + std::to_string(l) + " must have shape [n=" +
                                  std::to_string(n) + ", n_head]");
        }
        if (l == 0) {
            n_head = (int32_t) a.shape(1);
        } else if (a.shape(1) != n_head) {
            throw py::value_error("all layers' scores must have the same number of heads");
        }
        ptrs.push_back(a.data());
    }
    triatt_select_params p;
    p.rank       = (triatt_rank) rank;
    p.budget     = budget;
    p.n_sink     = sink;
    p.n_window   = window;
    p.prompt_len = prompt_len;
    p.seed       = seed;
    p.kv_agg     = (triatt_kv_agg) kv_agg;
    if (n_head_kv <= 0) {
        n_head_kv = n_head;
    }

    std::unique_ptr<triatt_selector, void (*)(triatt_selector *)> sel(triatt_selector_init(), triatt_selector_free);
    py::array_t<int64_t> keep(n);
    py::array_t<float> token(n);
    std::string err;
    int64_t n_keep;
    int64_t n_prot;
    {
        const int32_t * pp = pos.data();
        int64_t * kp = keep.mutable_data();
        py::gil_scoped_release nogil;
        n_keep = triatt_select(sel.get(), p, n, pp, ptrs.empty() ? nullptr : ptrs.data(), (int32_t) ptrs.size(),
                               n_head, n_head_kv, kp, &err);
        if (n_keep >= 0 && n > 0) {
            std::copy(triatt_selector_token_scores(sel.get()), triatt_selector_token_scores(sel.get()) + n,
                      token.mutable_data());
        }
        n_prot = triatt_selector_n_protected(sel.get());
    }
    if (n_keep < 0) {
        throw py::value_error(err);
    }
    keep.resize({ (py::ssize_t) n_keep });
    return py::make_tuple(keep, token, n_prot);
}

PYBIND11_MODULE(_core, m) {
    m.doc() = "TriAttention core (C++), shared with the patched llama.cpp. Use pytriatt.core, not this module.";
    m.attr("__version__") = PYTRIATT_VERSION;
    m.def("build_info", &build_info, "How this extension was compiled (version, compiler, C++ standard, SIMD).");

    m.attr("PAIRING_NEOX")    = (int) TRIATT_PAIRING_NEOX;
    m.attr("PAIRING_NORM")    = (int) TRIATT_PAIRING_NORM;
    m.attr("OFFSET_AGG_MEAN") = (int) TRIATT_OFFSET_AGG_MEAN;
    m.attr("OFFSET_AGG_MAX")  = (int) TRIATT_OFFSET_AGG_MAX;
    m.attr("KV_AGG_MAX")      = (int) TRIATT_KV_AGG_MAX;
    m.attr("KV_AGG_MEAN")     = (int) TRIATT_KV_AGG_MEAN;
    m.attr("RANK_SCORES")     = (int) TRIATT_RANK_SCORES;
    m.attr("RANK_RECENT")     = (int) TRIATT_RANK_RECENT;
    m.attr("RANK_RANDOM")     = (int) TRIATT_RANK_RANDOM;
    m.attr("CALIB_VERSION")       = (int) TRIATT_CALIB_VERSION;
    m.attr("DEFAULT_OFFSETS_MAX") = (int64_t) TRIATT_DEFAULT_OFFSETS_MAX;

    py::class_<triatt_rope_layer>(m, "RopeLayer", "One layer's ggml_rope_ext parameters (struct triatt_rope_layer).")
        .def(py::init<>())
        .def_readwrite("rope", &triatt_rope_layer::rope)
        .def_readwrite("n_rot", &triatt_rope_layer::n_rot)
        .def_readwrite("freq_base", &triatt_rope_layer::freq_base)
        .def_readwrite("freq_scale", &triatt_rope_layer::freq_scale)
        .def_readwrite("ext_factor", &triatt_rope_layer::ext_factor)
        .def_readwrite("attn_factor", &triatt_rope_layer::attn_factor)
        .def_readwrite("beta_fast", &triatt_rope_layer::beta_fast)
        .def_readwrite("beta_slow", &triatt_rope_layer::beta_slow)
        .def_readwrite("n_ctx_orig", &triatt_rope_layer::n_ctx_orig)
        .def_readwrite("freq_factors", &triatt_rope_layer::freq_factors);

    // the policy contract (triatt-policy.h): pytriatt.policy reads the names, defaults and rules from here
    py::class_<triatt_policy_settings>(m, "PolicySettings",
                                       "A policy's numeric parameters with the defaults (struct triatt_policy_settings).")
        .def(py::init<>())
        .def_readwrite("type", &triatt_policy_settings::type)
        .def_readwrite("budget", &triatt_policy_settings::budget)
        .def_readwrite("interval", &triatt_policy_settings::interval)
        .def_readwrite("sink", &triatt_policy_settings::n_sink)
        .def_readwrite("window", &triatt_policy_settings::n_window)
        .def_readwrite("horizon", &triatt_policy_settings::horizon)
        .def_readwrite("snap_window", &triatt_policy_settings::snap_window)
        .def_readwrite("granularity", &triatt_policy_settings::granularity)
        .def_readwrite("shift", &triatt_policy_settings::shift);
    m.def("policy_table", [] {
        py::list rows;
        for (int32_t t = 0; const triatt_policy_info * p = triatt_policy_get(t); ++t) {
            py::dict row;
            row["name"] = p->name;
            row["evicts"] = p->evicts;
            row["rank"] = (int) p->rank;
            row["scores_keys"] = p->rank == TRIATT_RANK_SCORES;
            row["per_head"] = p->per_head;
            row["needs_calib"] = p->needs_calib;
            row["summary"] = p->summary;
            rows.append(row);
        }
        return rows;
    }, "The policies in type order: [{name, evicts, rank, scores_keys, per_head, needs_calib, summary}].");
    m.def("granularity_names", [] {
        std::vector<std::string> names;
        for (int32_t g = 0; const char * name = triatt_granularity_name(g); ++g) {
            names.emplace_back(name);
        }
        return names;
    }, "The granularities in enum order (shared, head, layer).");
    m.def("policy_resolve", &triatt_policy_resolve, py::arg("settings"),
          "The settings with window and horizon of -1 replaced by the default rules.");
    m.def("policy_check", [](const triatt_policy_settings & s, int64_t n_ctx, const std::string & prefix) {
        return triatt_policy_check(s, n_ctx, prefix.c_str());
    }, py::arg("settings"), py::arg("n_ctx"), py::arg("prefix"),
          "'' when the settings can run, else what is wrong, options spelled with prefix ('--', 'kv_', '').");
    m.def("policy_n_cells", &triatt_policy_n_cells, py::arg("budget"), py::arg("interval"), py::arg("n_batch"),
          "KV cells one sequence needs (triatt_policy_n_cells).");
    m.def("default_window", &triatt_default_window, py::arg("budget"), py::arg("sink"), py::arg("interval"),
          "The recent window a tri round protects by default (triatt_default_window).");
    m.def("default_horizon", &triatt_default_horizon,
          "The horizon (largest future distance) tri scores with by default (triatt_default_horizon).");

    m.def("kernel_name", &triatt_kernel_name, "The scoring kernel in use: 'avx2' or 'generic'.");
    m.def("force_generic_kernel", &triatt_force_generic_kernel, py::arg("force"),
          "Force the portable kernel (tests, benchmarks); returns the previous setting.");

    m.def("rope_omega", &py_rope_omega, py::arg("layer"), py::arg("head_dim"),
          "(omega float64[n_rot/2], mscale) of one layer, as ggml's rope computes them.");

    py::class_<py_calib>(m, "Calib", "Calibration statistics + RoPE + scorer workspace (struct triatt_calib).")
        .def(py::init<f32_array, f32_array, f32_array, int32_t, int32_t, int32_t, std::vector<triatt_rope_layer>, std::vector<bool>>(),
             py::arg("q_mean_re"), py::arg("q_mean_im"), py::arg("q_abs_mean"), py::arg("n_head_kv"),
             py::arg("head_dim"), py::arg("pairing"), py::arg("rope"), py::arg("has_kv"))
        .def("score", &py_calib::score, py::arg("layer"), py::arg("keys"), py::arg("t"), py::arg("offsets_max"),
             py::arg("trig"), py::arg("norm"), py::arg("offset_agg"), py::arg("n_threads"))
        .def("omega", &py_calib::omega, py::arg("layer"));

    m.def("select", &py_select, py::arg("rank"), py::arg("layer_scores"), py::arg("positions"), py::arg("budget"),
          py::arg("sink"), py::arg("window"), py::arg("prompt_len"), py::arg("seed"), py::arg("n_head_kv"),
          py::arg("kv_agg"),
          "-> (keep: int64 candidate indices ascending, token_scores: float32[n], n_protected)");
}
