"""The bridge to the patched llama-cpp-python.

Everything in pytriatt that talks to llama.cpp goes through here, so that
`import pytriatt` works with any (or no) llama-cpp-python, and whatever needs
the patch says exactly which command fixes it.
"""

from __future__ import annotations

import ctypes
import json
import os
from pathlib import Path
from typing import Any, Iterable, Optional

import numpy as np

FIX_COMMAND = "python tools/build_llama.py   (from a pytriatt checkout; tools/setup.sh does it all)"

# the C functions each feature needs; a stock build lacks all of them
PATCH_SYMBOLS = {
    "memory positions": ("llama_memory_seq_positions", "llama_memory_seq_rm_positions"),
    "calibration capture": ("llama_triatt_capture_init", "llama_triatt_capture_cb_eval",
                            "llama_triatt_capture_get"),
    "kv policy": ("llama_set_kv_policy", "llama_get_kv_policy_stats", "llama_kv_policy_last_error",
                  "llama_kv_policy_check", "KVPolicyError"),
}


class PatchMissingError(RuntimeError):
    """llama-cpp-python is missing or is not the pytriatt-patched build."""


def import_llama_cpp():
    try:
        import llama_cpp  # noqa: F401  (loads libllama)
    except ImportError as e:
        raise PatchMissingError(
            f"llama-cpp-python is not installed ({e}). Install the patched build: {FIX_COMMAND}") from e
    return llama_cpp


def patch_info() -> Optional[dict]:
    """The manifest the build script stamps into the patched package, or None (stock or absent)."""
    try:
        import importlib.util
        spec = importlib.util.find_spec("llama_cpp")
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    manifest = Path(list(spec.submodule_search_locations)[0]) / "_triatt.json"
    if not manifest.is_file():
        return None
    try:
        return json.loads(manifest.read_text())
    except (OSError, ValueError):
        return None


def require_patched(feature: str = "memory positions"):
    """Return the llama_cpp module, or raise PatchMissingError naming the fix."""
    llama_cpp = import_llama_cpp()
    missing = [s for s in PATCH_SYMBOLS[feature] if not hasattr(llama_cpp, s)]
    if missing:
        version = getattr(llama_cpp, "__version__", "?")
        raise PatchMissingError(
            f"{feature} needs the pytriatt-patched llama-cpp-python, but the installed one "
            f"({version}) lacks {', '.join(missing)}. Fix: {FIX_COMMAND}")
    return llama_cpp


def _ctx_ptr(ctx: Any):
    """Accept a raw llama_context pointer, a llama_cpp.Llama, or a pytriatt Context."""
    if hasattr(ctx, "_ctx") and hasattr(ctx._ctx, "ctx"):   # llama_cpp.Llama
        return ctx._ctx.ctx
    if hasattr(ctx, "ctx_ptr"):                              # pytriatt Context
        return ctx.ctx_ptr
    return ctx


def seq_positions(ctx: Any, seq_id: int = 0) -> np.ndarray:
    """The positions currently cached for seq_id, ascending, as an int32 array."""
    lc = require_patched()
    mem = lc.llama_get_memory(_ctx_ptr(ctx))
    n = lc.llama_memory_seq_positions(mem, seq_id, None, 0)
    if n < 0:
        raise RuntimeError(
            f"this context's memory cannot list the positions of sequence {seq_id}: either seq_id is "
            f"out of range, or the model's memory is recurrent/hybrid (no per-token KV cells), "
            f"where token eviction does not apply")
    out = np.zeros(n, dtype=np.int32)
    if n:
        got = lc.llama_memory_seq_positions(mem, seq_id, out.ctypes.data_as(ctypes.POINTER(ctypes.c_int32)), n)
        assert got == n, (got, n)
    return out


def seq_rm_positions(ctx: Any, seq_id: int, positions: Iterable[int]) -> int:
    """Remove the cells of seq_id at `positions` in one pass; return how many were removed.

    Kept cells keep their positions. Raises ValueError for the sequence's newest
    position (the next batch continues from it) and RuntimeError for memory types
    that cannot remove single tokens."""
    lc = require_patched()
    c = _ctx_ptr(ctx)
    mem = lc.llama_get_memory(c)
    pos = np.ascontiguousarray(np.asarray(list(positions) if not isinstance(positions, np.ndarray) else positions,
                                          dtype=np.int64))
    if pos.size and (pos.min() < np.iinfo(np.int32).min or pos.max() > np.iinfo(np.int32).max):
        raise ValueError("positions must fit in int32 (llama_pos)")
    pos = pos.astype(np.int32)
    n = lc.llama_memory_seq_rm_positions(mem, seq_id, pos.ctypes.data_as(ctypes.POINTER(ctypes.c_int32)),
                                         int(pos.size))
    if n >= 0:
        return n
    # -1 means one of several things; tell the user which
    if lc.llama_memory_seq_positions(mem, seq_id, None, 0) < 0:
        seq_positions(ctx, seq_id)  # raises the explanatory error
    newest = lc.llama_memory_seq_pos_max(mem, seq_id)
    if newest in set(pos.tolist()):
        raise ValueError(
            f"refusing to remove position {newest}: it is the newest token of sequence {seq_id}, "
            f"and the next batch must continue right after it. Nothing was removed.")
    raise RuntimeError(f"llama_memory_seq_rm_positions failed for sequence {seq_id}")


def built_backends() -> list[str]:
    """Names of the ggml backend libraries shipped with the installed llama_cpp (cpu, cuda, ...)."""
    lc = import_llama_cpp()
    lib = Path(lc.__file__).parent / "lib"
    names = set()
    for f in lib.glob("libggml-*.*") if lib.is_dir() else []:
        stem = f.name.split(".")[0].removeprefix("libggml-")
        if stem != "base":
            names.add(stem)
    return sorted(names)


def core_in_libllama() -> bool:
    """Whether the installed libllama carries the TriAttention core compiled from cpp/."""
    lc = import_llama_cpp()
    lib = Path(lc.__file__).parent / "lib" / "libllama.so"
    if not lib.is_file():
        return False
    try:
        so = ctypes.CDLL(str(lib))
    except OSError:
        return False
    # triatt_kernel_name() under the Itanium C++ ABI (gcc, clang)
    return hasattr(so, "_Z18triatt_kernel_namev")


def default_threads() -> int:
    return max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1))
