"""TriAttention scoring and selection: the Python API of the C++ core (``pytriatt._core``).

The C++ core in ``cpp/triatt-*.cpp`` is the same code the patched llama.cpp runs; this
module converts numpy arrays and GGUF files to and from it.

Typical use::

    import numpy as np
    from pytriatt.core import Calibration, select

    cal = Calibration.from_gguf("model.tri.gguf")          # statistics + RoPE of the model
    raw = [cal.score(l, keys[l], positions, t) for l in range(cal.n_layer)]
    keep = select("tri", raw, positions, t, budget=2048,
                  sink=4, window=128, n_head_kv=cal.n_head_kv)  # positions to KEEP, ascending
    evict = np.setdiff1d(positions, keep)

``keys[l]`` are layer ``l``'s cached keys after RoPE, float32 ``[n, n_head_kv, head_dim]``,
exactly as llama.cpp stores them, at ``positions`` (int ``[n]``); ``t`` is the current
position (the round start in the paper).

Scores (docs/method.md; ``s`` is the YaRN magnitude scale, 1 without YaRN)::

    S_trig(k) = mean_{delta in D} sum_f s^2 |qbar_f| |kpre_f| cos(omega_f (t + delta - p) + phi_f)
    S_norm(k) = sum_f s^2 (A_f - |qbar_f|) |kpre_f|
    D = {1, 2, 4, ..., offsets_max}

computed with the synthetic-query identity (one dot product per key and head; see
cpp/triatt-core.h). Ranking: z-score per query head over the unprotected candidates,
max over each GQA group, mean over layers, max (or mean) over KV heads, top ``budget``.

The pieces live in modules of their own, re-exported here (the public API): pytriatt.rope (RopeSpec, the
architecture tables), pytriatt.gguf_model (the metadata reader), pytriatt.fingerprint, pytriatt.calibration
(Calibration) and pytriatt.selection (select, select_heads).
"""

from __future__ import annotations

# pytriatt._core is the compiled core these modules drive; tools/sanitize_core.sh checks that
# pytriatt.core._core is the build it loaded
from . import _core  # noqa: F401
from .calibration import CALIB_VERSION, DEFAULT_OFFSETS_MAX, Calibration
from .errors import CalibrationError, FingerprintMismatchError
from .fingerprint import model_fingerprint
from .rope import ROPE_PAIRING, VERIFIED_ARCHS, RopeSpec
from .selection import POLICIES, select, select_heads

__all__ = [
    "RopeSpec",
    "Calibration",
    "select",
    "select_heads",
    "model_fingerprint",
    "CalibrationError",
    "FingerprintMismatchError",
    "ROPE_PAIRING",
    "VERIFIED_ARCHS",
    "CALIB_VERSION",
    "DEFAULT_OFFSETS_MAX",
    "POLICIES",
]
