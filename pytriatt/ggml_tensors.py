"""Reading tensors out of llama.cpp's graph from an eval callback: ggml's tensor struct, libggml-base and a
copy of a tensor's values as numpy (the recall task and the tests that compare with the graph use them)."""

from __future__ import annotations

import ctypes
import os

import numpy as np

__all__ = ["GgmlTensor", "ggml_lib", "read_tensor"]


class GgmlTensor(ctypes.Structure):
    # struct ggml_tensor of the vendored ggml (GGML_MAX_DIMS 4, GGML_MAX_OP_PARAMS 64,
    # GGML_MAX_SRC 10, GGML_MAX_NAME 64)
    _fields_ = [
        ("type", ctypes.c_int), ("buffer", ctypes.c_void_p), ("ne", ctypes.c_int64 * 4),
        ("nb", ctypes.c_size_t * 4), ("op", ctypes.c_int), ("op_params", ctypes.c_int32 * 16),
        ("flags", ctypes.c_int32), ("src", ctypes.c_void_p * 10), ("view_src", ctypes.c_void_p),
        ("view_offs", ctypes.c_size_t), ("data", ctypes.c_void_p), ("name", ctypes.c_char * 64),
        ("extra", ctypes.c_void_p), ("padding", ctypes.c_char * 8),
    ]


_F32, _F16, _I32 = 0, 1, 26


def ggml_lib():
    """libggml-base of the installed llama_cpp, with the signatures read_tensor and the eval callbacks use."""
    import llama_cpp
    lib = ctypes.CDLL(os.path.join(os.path.dirname(llama_cpp.__file__), "lib", "libggml-base.so"))
    lib.ggml_op_desc.restype = ctypes.c_char_p
    lib.ggml_op_desc.argtypes = [ctypes.c_void_p]
    lib.ggml_nbytes.restype = ctypes.c_size_t
    lib.ggml_nbytes.argtypes = [ctypes.c_void_p]
    lib.ggml_backend_tensor_get.restype = None
    lib.ggml_backend_tensor_get.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_size_t]
    return lib


def read_tensor(lib, ptr) -> np.ndarray:
    """A copy of a tensor's values in numpy order [ne3, ne2, ne1, ne0], honouring its strides, in its
    own type (f32, f16 or i32); `lib` is ggml_lib(), `ptr` the tensor's address (an eval callback's)."""
    t = GgmlTensor.from_address(ptr)
    dtype = {_F32: np.float32, _F16: np.float16, _I32: np.int32}.get(t.type)
    if dtype is None:
        raise NotImplementedError(f"tensor {t.name!r} has ggml type {t.type}")
    nbytes = lib.ggml_nbytes(ptr)
    raw = np.empty(nbytes + (-nbytes) % np.dtype(dtype).itemsize, dtype=np.uint8)
    lib.ggml_backend_tensor_get(ptr, raw.ctypes.data, 0, nbytes)
    shape = tuple(int(t.ne[i]) for i in range(3, -1, -1))
    strides = tuple(int(t.nb[i]) for i in range(3, -1, -1))
    return np.array(np.lib.stride_tricks.as_strided(raw.view(dtype), shape=shape, strides=strides))
