"""Calibration: a model's per-head query statistics plus its RoPE, what scoring needs; the raw scores of
cached keys (through the C++ core) and the ``triattention.*`` GGUF metadata that stores the statistics
(docs/calibration-format.md)."""

from __future__ import annotations

import os
from typing import Any, Dict, Optional

import numpy as np

from . import _core, gguf_io
from .errors import CalibrationError, FingerprintMismatchError
from .fingerprint import calibration_mismatch
from .gguf_model import ModelMeta, model_shape, open_model
from .rope import PAIRING_CODE, RopeSpec

__all__ = ["Calibration", "CALIB_VERSION", "DEFAULT_OFFSETS_MAX", "CALIB_KEY_PREFIX"]

CALIB_VERSION = int(_core.CALIB_VERSION)
DEFAULT_OFFSETS_MAX = int(_core.DEFAULT_OFFSETS_MAX)

CALIB_KEY_PREFIX = "triattention."
_KEY = CALIB_KEY_PREFIX


class Calibration:
    """Per-head query statistics of a model plus its RoPE: what scoring needs.

    Args:
        q_mean: complex ``[n_layer, n_head, n_freq]``: E[q_f] of the pre-RoPE queries
            (band f paired as the model's RoPE pairs dimensions).
        q_abs_mean: ``[n_layer, n_head, n_freq]``: E[|q_f|].
        rope: the model's :class:`RopeSpec` (``n_freq`` must equal ``rope.n_rot // 2``).
        n_head_kv: KV heads (GQA groups); default n_head.
        head_dim: default ``rope.head_dim`` (must agree).
        calib_tokens, calib_source, model_fingerprint: provenance (stored in GGUF).

    Layers without a KV cache (``rope.kv_layers``) have all-zero statistics and cannot
    be scored; layers without RoPE are scored with omega = 0.
    """

    def __init__(
        self,
        q_mean,
        q_abs_mean,
        rope: RopeSpec,
        *,
        n_head_kv: Optional[int] = None,
        head_dim: Optional[int] = None,
        calib_tokens: int = 0,
        calib_source: str = "",
        model_fingerprint: str = "",
    ):
        q_mean = np.asarray(q_mean)
        q_abs_mean = np.asarray(q_abs_mean, dtype=np.float32)
        if q_mean.ndim != 3 or q_abs_mean.shape != q_mean.shape:
            raise ValueError(
                f"q_mean and q_abs_mean must be [n_layer, n_head, n_freq] of one shape, got "
                f"{q_mean.shape} and {q_abs_mean.shape}")
        if not isinstance(rope, RopeSpec):
            raise TypeError("rope must be a RopeSpec")
        L, H, F = q_mean.shape
        if L != rope.n_layer:
            raise ValueError(f"statistics have {L} layers, the RoPE spec {rope.n_layer}")
        if F != rope.n_freq:
            raise ValueError(f"statistics have {F} bands, the RoPE spec n_rot/2 = {rope.n_freq}")
        if head_dim is not None and int(head_dim) != rope.head_dim:
            raise ValueError(f"head_dim {head_dim} != rope.head_dim {rope.head_dim}")
        n_head_kv = H if n_head_kv is None else int(n_head_kv)
        if n_head_kv < 1 or H % n_head_kv != 0:
            raise ValueError(f"n_head ({H}) must be a multiple of n_head_kv ({n_head_kv})")
        self.rope = rope
        self.q_mean = q_mean.astype(np.complex64)
        self.q_abs_mean = q_abs_mean
        self.calib_tokens = int(calib_tokens)
        self.calib_source = str(calib_source)
        self.model_fingerprint = str(model_fingerprint)
        self._c = _core.Calib(
            np.ascontiguousarray(self.q_mean.real, dtype=np.float32),
            np.ascontiguousarray(self.q_mean.imag, dtype=np.float32),
            np.ascontiguousarray(q_abs_mean, dtype=np.float32),
            n_head_kv, rope.head_dim, PAIRING_CODE[rope.pairing], list(rope.layers), list(rope.kv_layers),
        )
        self.n_layer = L
        self.n_head = H
        self.n_head_kv = n_head_kv
        self.head_dim = rope.head_dim
        self.n_freq = F

    @property
    def n_rot(self) -> int:
        return self.rope.n_rot

    @property
    def pairing(self) -> str:
        return self.rope.pairing

    def omega(self, layer: int) -> np.ndarray:
        """omega_f of ``layer`` (float64 ``[n_rot/2]``, radians per position)."""
        return self._c.omega(int(layer))[0]

    def mscale(self, layer: int) -> float:
        """YaRN magnitude scale s of ``layer`` (1 without YaRN)."""
        return float(self._c.omega(int(layer))[1])

    def mean_resultant_length(self) -> np.ndarray:
        """R = |E q_f| / E|q_f| per layer, head and band (``[L, H, F]``; 0 where E|q_f| = 0)."""
        a = self.q_abs_mean.astype(np.float64)
        with np.errstate(invalid="ignore", divide="ignore"):
            R = np.where(a > 0, np.abs(self.q_mean.astype(np.complex128)) / a, 0.0)
        return R

    def score(
        self,
        layer: int,
        keys,
        positions=None,
        t: int = 0,
        *,
        offsets_max: int = DEFAULT_OFFSETS_MAX,
        trig: bool = True,
        norm: bool = True,
        offset_agg: str = "mean",
        threads: int = 1,
    ) -> np.ndarray:
        """Raw scores S_trig + S_norm of one layer's cached keys: float32 ``[n, n_head]``.

        Args:
            layer: layer index.
            keys: post-RoPE keys ``[n, n_head_kv, head_dim]`` (converted to float32).
            positions: their positions ``[n]``. Only checked (length, ``<= t``): the
                synthetic-query identity reads the position from the key's phase.
            t: the current position (round start).
            offsets_max: D = {1, 2, 4, ..., <= offsets_max}.
            trig, norm: include S_trig / S_norm (ablations).
            offset_agg: ``"mean"`` over the offsets (paper) or ``"max"``.
            threads: worker threads for this call.
        """
        keys = np.asarray(keys)
        if positions is not None:
            positions = np.asarray(positions)
            if positions.ndim != 1 or (keys.ndim >= 1 and positions.shape[0] != keys.shape[0]):
                raise ValueError(f"positions must be [n] with n = {keys.shape[0] if keys.ndim else '?'}")
            if positions.size and int(positions.max()) > int(t):
                raise ValueError(f"a key position ({int(positions.max())}) is after t ({int(t)})")
        agg = {"mean": int(_core.OFFSET_AGG_MEAN), "max": int(_core.OFFSET_AGG_MAX)}.get(offset_agg)
        if agg is None:
            raise ValueError(f"offset_agg must be 'mean' or 'max', got {offset_agg!r}")
        if keys.ndim == 3 and keys.shape[0] == 0:
            return np.zeros((0, self.n_head), dtype=np.float32)
        return self._c.score(int(layer), keys, int(t), int(offsets_max), bool(trig), bool(norm), agg, int(threads))

    def __repr__(self) -> str:
        return (
            f"Calibration(n_layer={self.n_layer}, n_head={self.n_head}, n_head_kv={self.n_head_kv}, "
            f"head_dim={self.head_dim}, n_rot={self.n_rot}, pairing={self.pairing!r}, "
            f"calib_tokens={self.calib_tokens}, fingerprint={self.model_fingerprint!r})"
        )

    # --- GGUF ---------------------------------------------------------------

    def gguf_fields(self) -> Dict[str, Any]:
        """The ``triattention.*`` metadata of this calibration (docs/calibration-format.md)."""
        return {
            _KEY + "version": CALIB_VERSION,
            _KEY + "n_layer": self.n_layer,
            _KEY + "n_head": self.n_head,
            _KEY + "n_freq": self.n_freq,
            _KEY + "q_mean_real": np.ascontiguousarray(self.q_mean.real, dtype=np.float32).ravel(),
            _KEY + "q_mean_imag": np.ascontiguousarray(self.q_mean.imag, dtype=np.float32).ravel(),
            _KEY + "q_abs_mean": np.ascontiguousarray(self.q_abs_mean, dtype=np.float32).ravel(),
            _KEY + "calib_tokens": self.calib_tokens,
            _KEY + "calib_source": self.calib_source,
            _KEY + "model_fingerprint": self.model_fingerprint,
        }

    def add_to_gguf(self, writer) -> None:
        """Add the ``triattention.*`` keys to a ``gguf.GGUFWriter`` (before its KV data is written)."""
        import gguf

        f = self.gguf_fields()
        for k in ("version", "n_layer", "n_head", "n_freq"):
            writer.add_uint32(_KEY + k, int(f[_KEY + k]))
        for k in ("q_mean_real", "q_mean_imag", "q_abs_mean"):
            writer.add_key_value(_KEY + k, [float(v) for v in f[_KEY + k]], gguf.GGUFValueType.ARRAY,
                                 sub_type=gguf.GGUFValueType.FLOAT32)
        writer.add_uint64(_KEY + "calib_tokens", int(f[_KEY + "calib_tokens"]))
        writer.add_string(_KEY + "calib_source", f[_KEY + "calib_source"])
        writer.add_string(_KEY + "model_fingerprint", f[_KEY + "model_fingerprint"])

    @classmethod
    def from_gguf(
        cls,
        path,
        model=None,
        *,
        check_fingerprint: bool = True,
        strict: bool = True,
        **rope_overrides,
    ) -> "Calibration":
        """Load the ``triattention.*`` statistics of ``path`` with the RoPE of ``model``.

        ``model`` (path or GGUFReader) defaults to ``path`` itself (the calibration tool
        writes the statistics into a copy of the model). With a separate ``model``, the statistics
        must belong to it by the rule libllama applies when the policy attaches
        (:func:`pytriatt.fingerprint.calibration_mismatch`; :class:`FingerprintMismatchError`
        otherwise, unless ``check_fingerprint=False``). ``rope_overrides`` are passed to
        :meth:`RopeSpec.from_gguf` (context parameters such as ``rope_freq_base``).
        """
        r = open_model(path)
        where = os.fspath(path) if isinstance(path, (str, os.PathLike)) else "GGUF"
        if r.field(_KEY + "version") is None:
            raise CalibrationError(
                f"{where}: no TriAttention calibration (no {_KEY}version key); "
                f"create one with: pytriatt calibrate MODEL.gguf -o MODEL.tri.gguf")
        version = _calib_u32(r, _KEY + "version", where)
        if version != CALIB_VERSION:
            raise CalibrationError(f"{where}: calibration format version {version}, this pytriatt reads {CALIB_VERSION}")
        L, H, F = (_calib_u32(r, _KEY + k, where) for k in ("n_layer", "n_head", "n_freq"))
        arrays = {}
        for k in ("q_mean_real", "q_mean_imag", "q_abs_mean"):
            f = r.field(_KEY + k)
            if f is None:
                raise CalibrationError(f"{where}: missing {_KEY}{k}")
            # an empty array's element type is not checked: the size check below decides then
            if f.type != gguf_io.T_ARRAY or (len(f.value) and f.item_type != gguf_io.T_FLOAT32):
                raise CalibrationError(f"{where}: {_KEY}{k} has type {r.type_name(_KEY + k)}, expected an array of "
                                       f"float32 (docs/calibration-format.md); re-create the calibration")
            a = r.array(_KEY + k, np.float32)
            if a.size != L * H * F:
                raise CalibrationError(
                    f"{where}: {_KEY}{k} holds {a.size} values, expected n_layer*n_head*n_freq = {L}*{H}*{F}")
            if not np.all(np.isfinite(a)):
                raise CalibrationError(f"{where}: {_KEY}{k} holds non-finite values")
            arrays[k] = a.reshape(L, H, F)
        if np.any(arrays["q_abs_mean"] < 0):
            raise CalibrationError(f"{where}: {_KEY}q_abs_mean (E|q_f|) holds negative values; the statistics "
                                   f"are corrupt: re-create the calibration")
        # |E q_f| <= E|q_f| always holds (float32 rounding aside): otherwise the arrays are not statistics
        # of one set of queries (swapped, scaled or corrupt) and S_norm would reward the wrong keys
        mod = np.hypot(arrays["q_mean_real"].astype(np.float64), arrays["q_mean_imag"].astype(np.float64))
        a64 = arrays["q_abs_mean"].astype(np.float64)
        if np.any(mod > a64 * (1 + 1e-4) + 1e-30):
            raise CalibrationError(f"{where}: |E q_f| exceeds E|q_f| (q_mean vs q_abs_mean); the statistics are "
                                   f"inconsistent: re-create the calibration")
        for k, key_t in (("calib_tokens", "an integer"), ("calib_source", "a string"),
                         ("model_fingerprint", "a string")):
            f = r.field(_KEY + k)
            if f is not None and (f.type == gguf_io.T_ARRAY
                                  or (key_t == "a string") != (f.type == gguf_io.T_STRING)):
                raise CalibrationError(f"{where}: {_KEY}{k} has type {r.type_name(_KEY + k)}, expected {key_t}")
        fp = str(r.scalar(_KEY + "model_fingerprint", "") or "")
        mr = r if model is None else open_model(model)
        # the shape against the model's before its RoPE is read (a hostile block count costs nothing then)
        shape = model_shape(mr)
        if (L, H) != (shape["n_layer"], shape["heads"][0]):
            raise FingerprintMismatchError(
                f"{where}: statistics shaped [n_layer={L}, n_head={H}] do not fit the model "
                f"[n_layer={shape['n_layer']}, n_head={shape['heads'][0]}]: calibrate this model (pytriatt calibrate)")
        if model is not None and check_fingerprint:
            # the rule libllama applies at attach (fingerprint.calibration_mismatch), so that what Python
            # accepts is what the policy will accept
            problem = calibration_mismatch(r, mr)
            if problem:
                raise FingerprintMismatchError(problem + " (or pass check_fingerprint=False)")
        rope = RopeSpec.from_gguf(mr, strict=strict, **rope_overrides)
        if (L, H, F) != (rope.n_layer, shape["heads"][0], rope.n_freq):
            raise FingerprintMismatchError(
                f"{where}: statistics shaped [n_layer={L}, n_head={H}, n_freq={F}] do not fit the model "
                f"[n_layer={rope.n_layer}, n_head={shape['heads'][0]}, n_freq={rope.n_freq}]")
        q_mean = arrays["q_mean_real"].astype(np.complex64) + 1j * arrays["q_mean_imag"].astype(np.complex64)
        return cls(
            q_mean, arrays["q_abs_mean"], rope,
            n_head_kv=shape["heads_kv"][0],
            calib_tokens=max(0, r.integer(_KEY + "calib_tokens", 0)),
            calib_source=str(r.scalar(_KEY + "calib_source", "") or ""),
            model_fingerprint=fp,
        )


def _calib_u32(r: ModelMeta, key: str, where: str) -> int:
    """A required uint32 key of the calibration (docs/calibration-format.md), as libllama reads it."""
    f = r.field(key)
    if f is None:
        raise CalibrationError(f"{where}: {key} is missing; re-create the calibration with pytriatt calibrate")
    if f.type != gguf_io.T_UINT32:
        raise CalibrationError(f"{where}: {key} has type {r.type_name(key)}, expected uint32 "
                               f"(docs/calibration-format.md); re-create the calibration with pytriatt calibrate")
    return int(f.value)
