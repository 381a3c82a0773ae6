// pytriatt._core: Python bindings of the TriAttention core in cpp/.
// The core itself has no Python or llama.cpp dependency; this file only converts
// between numpy arrays and the core's plain C++ types.

#include <pybind11/pybind11.h>

#include <string>

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
    return info;
}

PYBIND11_MODULE(_core, m) {
    m.doc() = "TriAttention core (C++), shared with the patched llama.cpp";
    m.attr("__version__") = PYTRIATT_VERSION;
    m.def("build_info", &build_info, "How this extension was compiled (version, compiler, C++ standard).");
}
