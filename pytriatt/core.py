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
"""

from __future__ import annotations

import hashlib
import os
from typing import Any, Dict, List, Optional, Sequence, Union

import numpy as np

from . import _core

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

CALIB_VERSION = int(_core.CALIB_VERSION)
DEFAULT_OFFSETS_MAX = int(_core.DEFAULT_OFFSETS_MAX)
POLICIES = ("tri", "streaming", "random")  # "triattention" is accepted for "tri"

PathLike = Union[str, "os.PathLike[str]"]

# llama_model_rope_type() of llama.cpp (vendored 0c1e570), by general.architecture:
# "norm" pairs x[2f], x[2f+1]; "neox" pairs x[f], x[f+n_rot/2]; "none": no RoPE.
# Architectures whose rope type depends on the file (M-RoPE variants) are left out.
_NORM_ARCHS = (
    "llama", "llada", "llama4", "deci", "baichuan", "starcoder", "internlm2", "minicpm", "xverse",
    "command-r", "cohere2", "cohere2moe", "olmo", "arctic", "deepseek", "deepseek2", "deepseek2-ocr",
    "deepseek32", "deepseek4", "muse-glimmer", "plm", "chatglm", "granite", "granitemoe",
    "granitehybrid", "graniteswitch", "granite_swa", "chameleon", "bailingmoe", "neo-bert", "smollm3",
    "arcee", "ernie4_5", "ernie4_5-moe", "mistral3", "eagle3", "mistral4", "llama-embed", "maincoder",
    "glm-dsa", "dots3note", "nanbeige", "pockettts", "hy_v4",
)
_NEOX_ARCHS = (
    "falcon", "falcon-h1", "grok", "dbrx", "bert", "jina-bert-v3", "modern-bert", "nomic-bert",
    "nomic-bert-moe", "eurobert", "stablelm", "bitnet", "qwen", "qwen2", "dream", "qwen2moe", "qwen3",
    "qwen3moe", "llada-moe", "rnd1", "olmo2", "olmoe", "phi2", "phi3", "phimoe", "plamo", "plamo2",
    "plamo3", "gemma", "gemma2", "gemma3", "gemma3n", "gemma4", "gemma4-assistant", "gemma-embedding",
    "starcoder2", "openelm", "gptneox", "codeshell", "orion", "nemotron", "exaone", "exaone4",
    "exaone-moe", "minicpm3", "bailingmoe2", "dots1", "hunyuan-moe", "jais2", "gpt-oss",
    "hunyuan-dense", "hy_v3", "lfm2", "lfm2moe", "smallthinker", "seed_oss", "grovemoe", "apertus",
    "minimax-01", "minimax-m2", "minimax-m3", "cogvlm", "pangu-embedded", "afmoe", "laguna",
    "qwen3next", "mimo2", "step35", "spark2_5", "talkie", "mellum", "maple", "hrm_text",
)
_NONE_ARCHS = (
    "clip", "gpt2", "gptj", "mpt", "refact", "bloom", "mamba", "mamba2", "jamba", "jina-bert-v2", "t5",
    "t5encoder", "jais", "rwkv6", "rwkv6qwen2", "rwkv7", "arwkv7", "wavtokenizer-dec", "nemotron_h",
    "nemotron_h_moe", "kimi-linear", "kimi-k3", "glm5-next",
)
ROPE_PAIRING: Dict[str, str] = {
    **{a: "norm" for a in _NORM_ARCHS},
    **{a: "neox" for a in _NEOX_ARCHS},
    **{a: "none" for a in _NONE_ARCHS},
}
# architectures whose rope type depends on the file: M-RoPE when {arch}.rope.dimension_sections is set
# (vision variants), else this pairing (llama_model_rope_type)
_MROPE_OR = {"glm4": "norm", "glm4moe": "neox", "hunyuan_vl": "neox"}

# Architectures whose RoPE reading RopeSpec.from_gguf reproduces exactly (checked
# against llama.cpp's graph in tests/test_core_rope_exact.py for llama, qwen2, qwen3,
# qwen3moe, granite, gemma3 and gpt-oss; qwen2moe builds RoPE exactly like qwen2). Other
# architectures may have per-layer RoPE rules of their own (NoPE layers, MLA, their
# own YaRN keys...): from_gguf refuses them unless strict=False.
VERIFIED_ARCHS = ("llama", "qwen2", "qwen2moe", "qwen3", "qwen3moe", "granite", "gemma3", "gpt-oss", "phi3",
                  "olmo2", "glm4", "exaone", "smollm3")

# architectures whose graph passes llama_model::get_rope_factors (rope_freqs, else LongRoPE's long or
# short factors) to ggml_rope_ext
_FREQ_FACTOR_ARCHS = (
    "llama", "llama4", "deci", "phi3", "minicpm3", "cohere2", "cohere2moe", "deepseek", "exaone", "exaone4",
    "exaone-moe", "granite", "granitehybrid", "graniteswitch", "granite_swa", "bailingmoe", "arcee",
    "hunyuan-moe", "hunyuan_vl", "hy_v3", "apertus", "mistral3", "eagle3", "step35", "nanbeige",
)


def _no_rope_layers(arch: str, n_layer: int) -> List[bool]:
    """Per layer: True where the graph applies no RoPE (NoPE layers). SmolLM3 leaves out RoPE in every
    4th layer (llama.cpp's n_no_rope_layer_step, fixed to 4 for it); its keys are cached unrotated."""
    if arch == "smollm3":
        return [(il + 1) % 4 == 0 for il in range(n_layer)]
    return [False] * n_layer

_SCALING_TYPES = ("none", "linear", "yarn", "longrope")

_PAIRING_CODE = {"neox": int(_core.PAIRING_NEOX), "norm": int(_core.PAIRING_NORM)}


class CalibrationError(ValueError):
    """A GGUF file's TriAttention metadata is missing, malformed or inconsistent."""


class FingerprintMismatchError(CalibrationError):
    """Statistics belong to another model than the one they are used with."""


def _f32(x: float) -> float:
    return float(np.float32(x))


def _per_layer(value, n_layer: int, name: str, conv=float) -> List[Any]:
    if value is None:
        return [None] * n_layer
    if np.ndim(value) == 0:
        return [conv(value)] * n_layer
    vals = list(value)
    if len(vals) != n_layer:
        raise ValueError(f"{name}: expected a scalar or {n_layer} per-layer values, got {len(vals)}")
    return [conv(v) for v in vals]


# ---------------------------------------------------------------------------
# RoPE
# ---------------------------------------------------------------------------


class RopeSpec:
    """Everything that determines each layer's RoPE frequencies omega_f and magnitude scale s.

    The parameters are the ones llama.cpp passes to ``ggml_rope_ext`` for each layer
    (after resolving the model's hyperparameters and the context parameters; use
    :meth:`from_gguf` to get them from a model file). Scalars apply to every layer;
    ``n_rot``, ``freq_base``, ``freq_scale``, ``freq_factors``, ``rope_layers`` and
    ``kv_layers`` may also be given per layer.

    Args:
        n_layer: number of layers (llama.cpp's block count).
        head_dim: key/query head size.
        n_rot: rotary dims (the first ``n_rot`` of each head); default ``head_dim``.
        pairing: ``"neox"`` (x[f] with x[f+n_rot/2]) or ``"norm"`` (x[2f] with x[2f+1]).
        freq_base, freq_scale: RoPE base and frequency scale (1/scaling factor).
        ext_factor: YaRN extrapolation mix (0 = no YaRN ramp).
        attn_factor: ggml's magnitude factor before the YaRN correction.
        beta_fast, beta_slow, n_ctx_orig: YaRN correction range and original context.
        freq_factors: ``None`` or ``n_rot/2`` per-band divisors (llama's ``rope_freqs``).
        rope_layers: per-layer bools; False marks a layer without RoPE (omega = 0).
        kv_layers: per-layer bools; False marks a layer without a KV cache of its own.
        arch, scaling_type: informational (what from_gguf found).
    """

    def __init__(
        self,
        n_layer: int,
        head_dim: int,
        n_rot: Union[int, Sequence[int], None] = None,
        *,
        pairing: str = "neox",
        freq_base: Union[float, Sequence[float]] = 10000.0,
        freq_scale: Union[float, Sequence[float]] = 1.0,
        ext_factor: float = 0.0,
        attn_factor: float = 1.0,
        beta_fast: float = 32.0,
        beta_slow: float = 1.0,
        n_ctx_orig: int = 0,
        freq_factors=None,
        rope_layers: Optional[Sequence[bool]] = None,
        kv_layers: Optional[Sequence[bool]] = None,
        arch: str = "",
        scaling_type: str = "none",
    ):
        n_layer = int(n_layer)
        head_dim = int(head_dim)
        if n_layer < 1 or head_dim < 1:
            raise ValueError("n_layer and head_dim must be positive")
        if pairing not in _PAIRING_CODE:
            raise ValueError(f"pairing must be 'neox' or 'norm', got {pairing!r}")
        if scaling_type not in _SCALING_TYPES:
            raise ValueError(f"scaling_type must be one of {_SCALING_TYPES}, got {scaling_type!r}")
        self.n_layer = n_layer
        self.head_dim = head_dim
        self.pairing = pairing
        self.arch = arch
        self.scaling_type = scaling_type

        n_rots = _per_layer(head_dim if n_rot is None else n_rot, n_layer, "n_rot", int)
        bases = _per_layer(freq_base, n_layer, "freq_base")
        scales = _per_layer(freq_scale, n_layer, "freq_scale")
        ropes = _per_layer(True if rope_layers is None else rope_layers, n_layer, "rope_layers", bool)
        kvs = _per_layer(True if kv_layers is None else kv_layers, n_layer, "kv_layers", bool)
        if freq_factors is None:
            ffs = [None] * n_layer
        elif isinstance(freq_factors, (list, tuple)) and len(freq_factors) == n_layer and all(
            e is None or np.ndim(e) == 1 for e in freq_factors
        ):
            ffs = list(freq_factors)  # per layer
        else:
            ffs = [freq_factors] * n_layer

        # a file may hold any number: the C++ layer takes int32 (the core then checks the rotary range)
        if not 0 < int(head_dim) < 2**31:
            raise ValueError(f"head_dim {head_dim} is out of range")
        for il, n in enumerate(n_rots):
            if not 0 <= n <= head_dim:
                raise ValueError(f"layer {il}: n_rot {n} is outside 0..head_dim ({head_dim})")
        if not -2**31 <= int(n_ctx_orig) < 2**31:
            raise ValueError(f"n_ctx_orig {n_ctx_orig} is out of range")
        self.layers: List[Any] = []
        for il in range(n_layer):
            rl = _core.RopeLayer()
            rl.rope = ropes[il]
            rl.n_rot = n_rots[il]
            rl.freq_base = bases[il]
            rl.freq_scale = scales[il]
            rl.ext_factor = float(ext_factor)
            rl.attn_factor = float(attn_factor)
            rl.beta_fast = float(beta_fast)
            rl.beta_slow = float(beta_slow)
            rl.n_ctx_orig = int(n_ctx_orig)
            if ffs[il] is not None:
                rl.freq_factors = [float(v) for v in np.asarray(ffs[il], dtype=np.float32).ravel()]
            try:
                _core.rope_omega(rl, head_dim)
            except ValueError as e:
                raise ValueError(f"layer {il}: {e}") from None
            self.layers.append(rl)
        self.kv_layers: List[bool] = kvs

    # --- derived values -------------------------------------------------

    @property
    def n_rot(self) -> int:
        """Largest number of rotary dims over the layers (2 * the bands per head)."""
        return max(rl.n_rot for rl in self.layers)

    @property
    def n_freq(self) -> int:
        return self.n_rot // 2

    def layer(self, il: int):
        """The ``_core.RopeLayer`` of layer ``il`` (ggml_rope_ext parameters)."""
        return self.layers[il]

    def omega(self, il: int) -> np.ndarray:
        """omega_f of layer ``il`` (float64 ``[n_rot_l/2]``, radians per position)."""
        return _core.rope_omega(self.layers[il], self.head_dim)[0]

    def mscale(self, il: int) -> float:
        """The magnitude scale s ggml multiplies layer ``il``'s rotated dims with."""
        return float(_core.rope_omega(self.layers[il], self.head_dim)[1])

    def rotate(self, x, positions, il: int, inverse: bool = False) -> np.ndarray:
        """Apply (or undo) layer ``il``'s RoPE to ``x[..., n, n_heads, head_dim]`` in float64.

        The reference of what ggml does: band f of the first n_rot dims is multiplied
        by ``s * exp(i omega_f p)``; the other dims are left as they are.
        """
        x = np.array(x, dtype=np.float64, copy=True)
        p = np.asarray(positions, dtype=np.float64)
        rl = self.layers[il]
        om, s = _core.rope_omega(rl, self.head_dim)
        ang = p[:, None] * om[None, :]  # [n, F]
        if inverse:
            ang = -ang
        c = np.cos(ang)[:, None, :]
        sn = np.sin(ang)[:, None, :]
        scale = (1.0 / s) if inverse else s
        F = rl.n_rot // 2
        re, im = _split(x, F, self.pairing)
        nre = (re * c - im * sn) * scale
        nim = (re * sn + im * c) * scale
        _merge(x, nre, nim, F, self.pairing)
        return x

    def __repr__(self) -> str:
        l0 = self.layers[0]
        return (
            f"RopeSpec(arch={self.arch!r}, n_layer={self.n_layer}, head_dim={self.head_dim}, "
            f"n_rot={self.n_rot}, pairing={self.pairing!r}, scaling={self.scaling_type!r}, "
            f"freq_base={l0.freq_base}, freq_scale={l0.freq_scale}, ext_factor={l0.ext_factor}, "
            f"attn_factor={l0.attn_factor})"
        )

    # --- from a model file ----------------------------------------------

    @classmethod
    def from_gguf(
        cls,
        path_or_reader,
        *,
        strict: bool = True,
        n_ctx: int = 0,
        rope_scaling_type: Optional[str] = None,
        rope_freq_base: float = 0.0,
        rope_freq_scale: float = 0.0,
        yarn_ext_factor: float = -1.0,
        yarn_attn_factor: float = -1.0,
        yarn_beta_fast: float = -1.0,
        yarn_beta_slow: float = -1.0,
        yarn_orig_ctx: int = 0,
    ) -> "RopeSpec":
        """Read the RoPE of a GGUF model exactly as llama.cpp resolves it.

        The keyword arguments are llama.cpp's context parameters (same names and
        "from the model" defaults as ``llama_context_default_params`` / llama-cpp-python's
        ``Llama``): pass the values your context uses if you override them.
        ``n_ctx`` (0 = the model's training context) only matters for longrope models.

        Raises NotImplementedError for an architecture without RoPE, with M-RoPE, or
        (with ``strict=True``) one not in :data:`VERIFIED_ARCHS`.
        """
        r = _reader(path_or_reader)
        return _rope_from_reader(
            r, strict=strict, n_ctx=n_ctx, rope_scaling_type=rope_scaling_type,
            rope_freq_base=rope_freq_base, rope_freq_scale=rope_freq_scale,
            yarn_ext_factor=yarn_ext_factor, yarn_attn_factor=yarn_attn_factor,
            yarn_beta_fast=yarn_beta_fast, yarn_beta_slow=yarn_beta_slow, yarn_orig_ctx=yarn_orig_ctx,
        )


def _split(x: np.ndarray, F: int, pairing: str):
    if pairing == "neox":
        return x[..., 0:F], x[..., F:2 * F]
    return x[..., 0:2 * F:2], x[..., 1:2 * F:2]


def _merge(x: np.ndarray, re, im, F: int, pairing: str) -> None:
    if pairing == "neox":
        x[..., 0:F] = re
        x[..., F:2 * F] = im
    else:
        x[..., 0:2 * F:2] = re
        x[..., 1:2 * F:2] = im


# ---------------------------------------------------------------------------
# GGUF reading
# ---------------------------------------------------------------------------


def _reader(path_or_reader):
    import gguf

    if isinstance(path_or_reader, gguf.GGUFReader):
        return path_or_reader
    path = os.fspath(path_or_reader)
    if not os.path.exists(path):
        raise FileNotFoundError(f"no such GGUF file: {path}")
    # gguf's reader trusts the file: an array claiming 2^60 elements makes it loop for ever. The
    # header parser of gguf_io bounds every length by the file size and says what is wrong.
    from . import gguf_io

    try:
        gguf_io.read_header(path)
    except ValueError as e:
        raise CalibrationError(f"not a readable GGUF file: {e}") from None
    try:
        return gguf.GGUFReader(path, "r")
    except Exception as e:  # gguf raises ValueError/struct errors for non-GGUF files
        raise CalibrationError(f"{path}: not a readable GGUF file ({e})") from None


def _field(r, key: str):
    return r.fields.get(key)


def _scalar(r, key: str, default=None):
    f = _field(r, key)
    if f is None:
        return default
    import gguf

    t = f.types[0]
    if t == gguf.GGUFValueType.ARRAY:
        raise CalibrationError(f"GGUF key {key} is an array, expected a scalar")
    if t == gguf.GGUFValueType.STRING:
        return bytes(f.parts[f.data[0]]).decode("utf-8", errors="replace")
    v = f.parts[f.data[0]][0]
    if t == gguf.GGUFValueType.BOOL:
        return bool(v)
    return v.item()


_INT_TYPE_NAMES = ("UINT8", "INT8", "UINT16", "INT16", "UINT32", "INT32", "UINT64", "INT64")

# llama.cpp refuses more layers than this (LLAMA_MAX_LAYERS is 512); the bound keeps a hostile
# block count from making per-layer lists of billions of entries
_MAX_LAYERS = 4096


def _type_name(f) -> str:
    import gguf

    t = gguf.GGUFValueType(f.types[0]).name.lower()
    if f.types[0] == gguf.GGUFValueType.ARRAY and len(f.types) > 1:
        t += f" of {gguf.GGUFValueType(f.types[-1]).name.lower()}"
    return t


def _int(r, key: str, default=None):
    """An integer hyperparameter: any GGUF integer type (llama.cpp refuses other types too)."""
    f = _field(r, key)
    if f is None:
        return default
    import gguf

    if gguf.GGUFValueType(f.types[0]).name not in _INT_TYPE_NAMES:
        raise CalibrationError(f"GGUF key {key} has type {_type_name(f)}, expected an integer: the file is malformed")
    return int(f.parts[f.data[0]][0])


def _calib_u32(r, key: str, where: str) -> int:
    """A required uint32 key of the calibration (docs/calibration-format.md), as libllama reads it."""
    f = _field(r, key)
    if f is None:
        raise CalibrationError(f"{where}: {key} is missing; re-create the calibration with pytriatt calibrate")
    import gguf

    if f.types[0] != gguf.GGUFValueType.UINT32:
        raise CalibrationError(f"{where}: {key} has type {_type_name(f)}, expected uint32 "
                               f"(docs/calibration-format.md); re-create the calibration with pytriatt calibrate")
    return int(f.parts[f.data[0]][0])


def _array(r, key: str, dtype=None) -> Optional[np.ndarray]:
    """A numeric GGUF array as one numpy array (no per-element Python objects)."""
    f = _field(r, key)
    if f is None:
        return None
    import gguf

    if f.types[0] != gguf.GGUFValueType.ARRAY:
        raise CalibrationError(f"GGUF key {key} is a scalar, expected an array")
    if len(f.types) > 1 and f.types[-1] == gguf.GGUFValueType.STRING:
        raise CalibrationError(f"GGUF key {key} is an array of strings, expected numbers")
    n = len(f.data)
    if n == 0:
        return np.zeros(0, dtype=dtype or np.float32)
    first = f.parts[f.data[0]]
    base = r.data
    try:
        off = first.__array_interface__["data"][0] - base.__array_interface__["data"][0]
        arr = np.frombuffer(base, dtype=first.dtype, count=n, offset=off)
        if arr[-1] != f.parts[f.data[-1]][0] and not (np.isnan(arr[-1]) and np.isnan(f.parts[f.data[-1]][0])):
            raise ValueError
    except Exception:
        arr = np.concatenate([f.parts[i] for i in f.data])
    return np.array(arr, dtype=dtype or arr.dtype)


def _scalar_or_array(r, key: str, n_layer: int, default):
    f = _field(r, key)
    if f is None:
        return [default] * n_layer
    import gguf

    if f.types[0] == gguf.GGUFValueType.ARRAY:
        if gguf.GGUFValueType(f.types[-1]).name not in _INT_TYPE_NAMES:
            raise CalibrationError(f"GGUF key {key} has type {_type_name(f)}, expected integers: the file is malformed")
        a = _array(r, key)
        if len(a) != n_layer:
            raise CalibrationError(f"GGUF key {key}: {len(a)} values for {n_layer} layers")
        return [int(v) for v in a]
    return [_int(r, key)] * n_layer


def _arch(r) -> str:
    arch = _scalar(r, "general.architecture")
    if not arch:
        raise CalibrationError("GGUF file has no general.architecture")
    return str(arch)


def _tensor(r, name: str) -> Optional[np.ndarray]:
    for t in r.tensors:
        if t.name == name:
            import gguf

            if t.tensor_type != gguf.GGMLQuantizationType.F32:
                raise NotImplementedError(f"tensor {name} has type {t.tensor_type.name}, expected F32")
            return np.array(t.data, dtype=np.float32).ravel()
    return None


def _model_shape(r) -> Dict[str, Any]:
    arch = _arch(r)
    n_layer = _int(r, f"{arch}.block_count")
    if n_layer is None:
        raise CalibrationError(f"GGUF file has no {arch}.block_count")
    if not 0 < n_layer <= _MAX_LAYERS:
        raise CalibrationError(f"{arch}.block_count is {n_layer}, expected 1..{_MAX_LAYERS}: the file is malformed")
    n_embd = _int(r, f"{arch}.embedding_length", 0)
    heads = _scalar_or_array(r, f"{arch}.attention.head_count", n_layer, 0)
    heads_kv = _scalar_or_array(r, f"{arch}.attention.head_count_kv", n_layer, None)
    heads_kv = [h if hk is None else hk for h, hk in zip(heads, heads_kv)]
    attn = [h for h in heads if h > 0]
    if not attn:
        raise NotImplementedError(f"architecture {arch!r}: no attention heads")
    n_head = attn[0]
    head_dim = _int(r, f"{arch}.attention.key_length", n_embd // n_head if n_embd else 0)
    return dict(arch=arch, n_layer=n_layer, n_embd=n_embd, heads=heads, heads_kv=heads_kv, head_dim=head_dim)


def _rope_from_reader(
    r, *, strict, n_ctx, rope_scaling_type, rope_freq_base, rope_freq_scale,
    yarn_ext_factor, yarn_attn_factor, yarn_beta_fast, yarn_beta_slow, yarn_orig_ctx,
) -> RopeSpec:
    shape = _model_shape(r)
    arch = shape["arch"]
    n_layer = shape["n_layer"]
    pairing = ROPE_PAIRING.get(arch)
    if arch in _MROPE_OR:
        pairing = None if _field(r, f"{arch}.rope.dimension_sections") is not None else _MROPE_OR[arch]
    if pairing is None:
        raise NotImplementedError(
            f"architecture {arch!r}: unknown or M-RoPE rope type; TriAttention supports NORM and NEOX RoPE")
    if pairing == "none":
        raise NotImplementedError(f"architecture {arch!r} does not use RoPE: TriAttention scoring does not apply")
    if strict and arch not in VERIFIED_ARCHS:
        raise NotImplementedError(
            f"architecture {arch!r}: RoPE reading not verified against llama.cpp (verified: "
            f"{', '.join(VERIFIED_ARCHS)}); pass strict=False to use the generic reading")
    key = lambda name, default=None: _scalar(r, f"{arch}.{name}", default)  # noqa: E731
    ikey = lambda name, default=None: _int(r, f"{arch}.{name}", default)  # noqa: E731

    head_dim = shape["head_dim"]
    heads = shape["heads"]
    if any(h != heads[0] for h in heads) or any(h != shape["heads_kv"][0] for h in shape["heads_kv"]):
        raise NotImplementedError(f"architecture {arch!r}: per-layer head counts are not supported")

    # --- llama_model_base::load_hparams ---
    n_ctx_train = ikey("context_length", 0)
    n_ctx_orig_yarn = ikey("rope.scaling.original_context_length", n_ctx_train)
    freq_base_train = _f32(key("rope.freq_base", 10000.0))
    scaling_train = str(key("rope.scaling.type", "linear"))
    if scaling_train not in _SCALING_TYPES:
        raise CalibrationError(f"unknown {arch}.rope.scaling.type {scaling_train!r}")
    ropescale = key("rope.scaling.factor")
    if ropescale is None:
        ropescale = key("rope.scale_linear", 0.0)
    ropescale = _f32(ropescale)
    freq_scale_train = 1.0 if ropescale == 0.0 else _f32(1.0 / np.float32(ropescale))
    rope_attn_factor = _f32(key("rope.scaling.attn_factor", 1.0))
    n_rot_full = ikey("rope.dimension_count", head_dim)
    head_dim_swa = ikey("attention.key_length_swa", head_dim)
    n_rot_swa = ikey("rope.dimension_count_swa", n_rot_full)
    if arch in ("llama", "deci", "falcon", "llama-embed") and n_rot_full != head_dim:
        raise CalibrationError(f"invalid n_rot: {n_rot_full}, expected {head_dim}")
    # yarn_* hyperparameters: only some architectures read them (others keep the defaults)
    yarn_ext_h, yarn_attn_h, beta_fast_h, beta_slow_h, log_mul = -1.0, 1.0, 32.0, 1.0, 0.0
    if arch in ("grok", "mistral3", "deepseek2", "deepseek32", "glm-dsa"):
        if strict:
            raise NotImplementedError(f"architecture {arch!r} has its own YaRN keys")
        yarn_ext_h = _f32(key("rope.scaling.yarn_ext_factor", yarn_ext_h))
        yarn_attn_h = _f32(key("rope.scaling.yarn_attn_factor", yarn_attn_h))
        beta_fast_h = _f32(key("rope.scaling.yarn_beta_fast", beta_fast_h))
        beta_slow_h = _f32(key("rope.scaling.yarn_beta_slow", beta_slow_h))
        log_mul = _f32(key("rope.scaling.yarn_log_multiplier", 0.0))

    # --- per-arch: sliding-window layers (gemma3 load_arch_hparams / load_swa_pattern) ---
    is_swa = [False] * n_layer
    freq_base_swa = 10000.0
    freq_scale_swa = 1.0
    if arch in ("gemma3", "gpt-oss"):
        # gemma3: 5 local layers for a global one, local base 10000; gpt-oss (llama_model_openai_moe):
        # alternate (pattern 2), the local layers' base and scale those of the global ones unless given
        n_swa = ikey("attention.sliding_window", 0)
        if n_swa > 0:
            f = _field(r, f"{arch}.attention.sliding_window_pattern")
            import gguf

            if f is not None and f.types[0] == gguf.GGUFValueType.ARRAY:
                pat = _array(r, f"{arch}.attention.sliding_window_pattern")
                if len(pat) < n_layer:
                    raise CalibrationError(f"{arch}.attention.sliding_window_pattern: {len(pat)} values for {n_layer} layers")
                is_swa = [bool(v) for v in pat[:n_layer]]
            else:
                n_pattern = ikey("attention.sliding_window_pattern", 6 if arch == "gemma3" else 2)
                is_swa = [n_pattern == 0 or (il % n_pattern < n_pattern - 1) for il in range(n_layer)]
            freq_base_swa = _f32(key("rope.freq_base_swa", 10000.0 if arch == "gemma3" else freq_base_train))
            if arch == "gpt-oss":
                freq_scale_swa = freq_scale_train

    # --- llama_context: context parameters over hyperparameters ---
    ext = _f32(yarn_ext_factor) if yarn_ext_factor >= 0 else yarn_ext_h
    attn = _f32(yarn_attn_factor) if yarn_attn_factor >= 0 else yarn_attn_h
    beta_fast = _f32(yarn_beta_fast) if yarn_beta_fast >= 0 else beta_fast_h
    beta_slow = _f32(yarn_beta_slow) if yarn_beta_slow >= 0 else beta_slow_h
    freq_base = _f32(rope_freq_base) if rope_freq_base != 0 else freq_base_train
    freq_scale = _f32(rope_freq_scale) if rope_freq_scale != 0 else freq_scale_train
    n_ctx_orig = yarn_orig_ctx if yarn_orig_ctx != 0 else (n_ctx_orig_yarn if n_ctx_orig_yarn != 0 else n_ctx_train)
    scaling = rope_scaling_type if rope_scaling_type is not None else scaling_train
    if scaling not in _SCALING_TYPES:
        raise ValueError(f"rope_scaling_type must be one of {_SCALING_TYPES}, got {scaling!r}")
    if scaling == "none":
        freq_scale = 1.0
    if ext < 0:
        ext = 1.0 if scaling == "yarn" else 0.0
    if ext != 0:
        f32 = np.float32

        def get_mscale(scale, mscale):
            return f32(1.0) if scale <= 1.0 else f32(f32(0.1) * f32(mscale) * f32(np.log(f32(scale)))) + f32(1.0)

        factor = f32(1.0) / f32(freq_scale)
        if log_mul != 0.0:
            mscale = 1.0
            if arch == "deepseek2" and log_mul != 1.0:
                mscale = log_mul
            attn = _f32(get_mscale(factor, mscale) / get_mscale(factor, log_mul))
        else:
            attn = _f32(get_mscale(factor, 1.0))
        attn = _f32(f32(attn) * (f32(1.0) / (f32(1.0) + f32(0.1) * f32(np.log(factor)))))
    attn = _f32(np.float32(attn) * np.float32(rope_attn_factor))

    # --- rope factors (llama_model::get_rope_factors) ---
    freq_factors = None
    if arch in _FREQ_FACTOR_ARCHS:
        freq_factors = _tensor(r, "rope_freqs.weight")
        if freq_factors is None:
            # LongRoPE (Phi-3): whatever the scaling type says, the long factors once the context's
            # sequence length exceeds the original context, the short ones otherwise
            n_ctx_seq = n_ctx if n_ctx else n_ctx_train
            freq_factors = _tensor(r, "rope_factors_long.weight" if n_ctx_seq > n_ctx_orig_yarn else "rope_factors_short.weight")
        if freq_factors is not None and len(freq_factors) < n_rot_full // 2:
            raise CalibrationError(f"rope factors hold {len(freq_factors)} values, expected {n_rot_full // 2}")
        if freq_factors is not None:
            freq_factors = freq_factors[: n_rot_full // 2]

    if any(is_swa) and head_dim_swa != head_dim:
        raise NotImplementedError(f"architecture {arch!r}: different head sizes for sliding-window layers")

    # llm_graph_context takes n_rot = hparams.n_rot() (the rule of layer 0) for every layer
    n_rot = n_rot_swa if is_swa[0] else n_rot_full
    return RopeSpec(
        n_layer,
        head_dim,
        n_rot,
        pairing=pairing,
        freq_base=[freq_base_swa if s else freq_base for s in is_swa],
        freq_scale=[freq_scale_swa if s else freq_scale for s in is_swa],
        ext_factor=ext,
        attn_factor=attn,
        beta_fast=beta_fast,
        beta_slow=beta_slow,
        n_ctx_orig=n_ctx_orig,
        freq_factors=freq_factors,
        rope_layers=[not nope for nope in _no_rope_layers(arch, n_layer)],
        kv_layers=[h > 0 for h in shape["heads_kv"]],
        arch=arch,
        scaling_type=scaling,
    )


def model_fingerprint(path_or_reader) -> str:
    """What identifies the model a calibration belongs to (``triattention.model_fingerprint``).

    ``"<arch>:<name>:<sha256 prefix>"``, the hash over the architecture, the attention and
    RoPE hyperparameters and the tokenizer's token list, and ``general.name``. It does not
    depend on the tensor data, so quantizations of one model share it (the statistics
    transfer); models of another shape, RoPE, vocabulary or name do not.
    """
    r = _reader(path_or_reader)
    shape = _model_shape(r)
    arch = shape["arch"]
    name = str(_scalar(r, "general.name", "") or "")
    h = hashlib.sha256()
    parts = [
        f"arch={arch}", f"name={name}", f"n_layer={shape['n_layer']}", f"n_embd={shape['n_embd']}",
        f"head_dim={shape['head_dim']}", "heads=" + ",".join(map(str, shape["heads"])),
        "heads_kv=" + ",".join(map(str, shape["heads_kv"])),
    ]
    for k in ("rope.dimension_count", "rope.freq_base", "rope.freq_base_swa", "rope.scaling.type",
              "rope.scaling.factor", "attention.sliding_window", "context_length"):
        v = _scalar(r, f"{arch}.{k}")
        if v is not None:
            parts.append(f"{k}={v}")
    h.update("\n".join(parts).encode())
    tok = _field(r, "tokenizer.ggml.tokens")
    if tok is not None:
        for i in tok.data:
            h.update(bytes(tok.parts[i]))
            h.update(b"\0")
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in name)[:48]
    return f"{arch}:{safe}:{h.hexdigest()[:24]}"


# ---------------------------------------------------------------------------
# Calibration
# ---------------------------------------------------------------------------

_KEY = "triattention."


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
            n_head_kv, rope.head_dim, _PAIRING_CODE[rope.pairing], list(rope.layers), list(rope.kv_layers),
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

    def score_layers(self, keys_by_layer, positions=None, t: int = 0, **kw) -> List[Optional[np.ndarray]]:
        """:meth:`score` for every layer (``None`` where ``keys_by_layer[l]`` is None)."""
        return [None if k is None else self.score(l, k, positions, t, **kw) for l, k in enumerate(keys_by_layer)]

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
        writes the statistics into a copy of the model). With a separate ``model``, its
        fingerprint must equal the stored one (:class:`FingerprintMismatchError`
        otherwise, unless ``check_fingerprint=False``). ``rope_overrides`` are passed to
        :meth:`RopeSpec.from_gguf` (context parameters such as ``rope_freq_base``).
        """
        r = _reader(path)
        where = os.fspath(path) if isinstance(path, (str, os.PathLike)) else "GGUF"
        if _field(r, _KEY + "version") is None:
            raise CalibrationError(
                f"{where}: no TriAttention calibration (no {_KEY}version key); "
                f"create one with: pytriatt calibrate MODEL.gguf -o MODEL.tri.gguf")
        version = _calib_u32(r, _KEY + "version", where)
        if version != CALIB_VERSION:
            raise CalibrationError(f"{where}: calibration format version {version}, this pytriatt reads {CALIB_VERSION}")
        L, H, F = (_calib_u32(r, _KEY + k, where) for k in ("n_layer", "n_head", "n_freq"))
        arrays = {}
        import gguf

        for k in ("q_mean_real", "q_mean_imag", "q_abs_mean"):
            f = _field(r, _KEY + k)
            if f is None:
                raise CalibrationError(f"{where}: missing {_KEY}{k}")
            # (gguf's reader records no element type for an empty array: the size check decides then)
            if f.types[0] != gguf.GGUFValueType.ARRAY or (len(f.types) > 1 and f.types[-1] != gguf.GGUFValueType.FLOAT32):
                raise CalibrationError(f"{where}: {_KEY}{k} has type {_type_name(f)}, expected an array of float32 "
                                       f"(docs/calibration-format.md); re-create the calibration")
            a = _array(r, _KEY + k, np.float32)
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
            f = _field(r, _KEY + k)
            if f is not None and (f.types[0] == gguf.GGUFValueType.ARRAY
                                  or (key_t == "a string") != (f.types[0] == gguf.GGUFValueType.STRING)):
                raise CalibrationError(f"{where}: {_KEY}{k} has type {_type_name(f)}, expected {key_t}")
        fp = str(_scalar(r, _KEY + "model_fingerprint", "") or "")
        mr = r if model is None else _reader(model)
        # the shape against the model's before its RoPE is read (a hostile block count costs nothing then)
        shape = _model_shape(mr)
        if (L, H) != (shape["n_layer"], shape["heads"][0]):
            raise FingerprintMismatchError(
                f"{where}: statistics shaped [n_layer={L}, n_head={H}] do not fit the model "
                f"[n_layer={shape['n_layer']}, n_head={shape['heads'][0]}]: calibrate this model (pytriatt calibrate)")
        if model is not None and check_fingerprint:
            mfp = model_fingerprint(mr)
            if fp != mfp:
                raise FingerprintMismatchError(
                    f"the statistics in {where} belong to model {fp!r}, not to {mfp!r}: "
                    f"calibrate this model (pytriatt calibrate) or pass check_fingerprint=False")
        rope = RopeSpec.from_gguf(mr, strict=strict, **rope_overrides)
        if (L, H, F) != (rope.n_layer, shape["heads"][0], rope.n_freq):
            raise FingerprintMismatchError(
                f"{where}: statistics shaped [n_layer={L}, n_head={H}, n_freq={F}] do not fit the model "
                f"[n_layer={rope.n_layer}, n_head={shape['heads'][0]}, n_freq={rope.n_freq}]")
        q_mean = arrays["q_mean_real"].astype(np.complex64) + 1j * arrays["q_mean_imag"].astype(np.complex64)
        return cls(
            q_mean, arrays["q_abs_mean"], rope,
            n_head_kv=shape["heads_kv"][0],
            calib_tokens=max(0, _int(r, _KEY + "calib_tokens", 0)),
            calib_source=str(_scalar(r, _KEY + "calib_source", "") or ""),
            model_fingerprint=fp,
        )


# ---------------------------------------------------------------------------
# selection
# ---------------------------------------------------------------------------

_POLICY_CODE = {
    "tri": int(_core.POLICY_TRIATTENTION),
    "triattention": int(_core.POLICY_TRIATTENTION),
    "streaming": int(_core.POLICY_STREAMING),
    "random": int(_core.POLICY_RANDOM),
}


def select(
    policy: str,
    scores,
    positions,
    t: int,
    budget: int,
    sink: int = 0,
    window: int = 0,
    prompt_len: int = 0,
    seed: int = 0,
    *,
    n_head_kv: Optional[int] = None,
    kv_agg: str = "max",
    return_scores: bool = False,
):
    """Choose the cached tokens to KEEP; returns their positions, ascending (int32).

    Args:
        policy: ``"tri"`` (TriAttention: rank by ``scores``; ``"triattention"`` is an alias), ``"streaming"`` (newest first)
            or ``"random"`` (seeded; depends only on ``seed`` and the positions).
        scores: for ``"tri"``, the raw per-layer scores: a sequence of float32
            ``[n, n_head]`` arrays (``None`` entries, e.g. layers without KV, are skipped)
            or one ``[n_layer, n, n_head]`` array. Ignored (may be None) otherwise.
        positions: the candidates' positions ``[n]`` (all cached tokens of the sequence).
        t: the current position; every candidate position must be ``<= t``.
        budget: how many tokens to keep, protected ones included. ``budget >= n``
            keeps everything.
        sink: protect the ``sink`` oldest candidates (smallest positions).
        window: protect the ``window`` newest candidates.
        prompt_len: protect every candidate with position ``< prompt_len``.
        seed: for ``"random"``.
        n_head_kv: KV heads of the model (GQA groups of consecutive query heads);
            default: n_head (no grouping).
        kv_agg: token score = ``"max"`` (default) or ``"mean"`` over KV heads.
        return_scores: also return the token-level scores ``[n]`` (float32, aligned
            with ``positions``; protected = +inf).

    Raises ValueError if the protected tokens alone exceed the budget. Ties keep the
    newer position. The evicted positions are ``np.setdiff1d(positions, keep)``.
    """
    code = _POLICY_CODE.get(policy)
    if code is None:
        raise ValueError(f"policy must be one of {POLICIES}, got {policy!r}")
    pos = np.asarray(positions)
    if pos.ndim != 1:
        raise ValueError("positions must be 1-d")
    if pos.size and (pos.min() < np.iinfo(np.int32).min or pos.max() > np.iinfo(np.int32).max):
        raise ValueError("positions must fit in int32 (llama_pos)")
    pos = pos.astype(np.int32, copy=False)
    if pos.size and int(pos.max()) > int(t):
        raise ValueError(f"a candidate position ({int(pos.max())}) is after t ({int(t)})")
    if kv_agg not in ("max", "mean"):
        raise ValueError(f"kv_agg must be 'max' or 'mean', got {kv_agg!r}")
    for name, v in (("budget", budget), ("sink", sink), ("window", window), ("prompt_len", prompt_len)):
        if int(v) < 0:
            raise ValueError(f"{name} must be >= 0")
    layers: List[np.ndarray] = []
    if code == _POLICY_CODE["tri"]:
        if scores is None:
            raise ValueError("the tri policy needs the per-layer raw scores")
        it = list(scores) if not isinstance(scores, np.ndarray) or scores.ndim == 3 else [scores]
        layers = [np.ascontiguousarray(s, dtype=np.float32) for s in it if s is not None]
        if pos.size and not layers:
            raise ValueError("the tri policy needs the raw scores of at least one layer")
        for l, s in enumerate(layers):
            if s.ndim != 2 or s.shape[0] != pos.size:
                raise ValueError(f"scores of layer {l} must be [n={pos.size}, n_head], got {s.shape}")
        if layers and n_head_kv is not None:
            if layers[0].shape[1] % int(n_head_kv) != 0:
                raise ValueError(f"n_head ({layers[0].shape[1]}) must be a multiple of n_head_kv ({n_head_kv})")
    keep_idx, token, _n_prot = _core.select(
        code, layers, pos, int(budget), int(sink), int(window), int(prompt_len),
        int(seed) & 0xFFFFFFFFFFFFFFFF, int(n_head_kv or 0),
        int(_core.KV_AGG_MAX if kv_agg == "max" else _core.KV_AGG_MEAN),
    )
    keep = np.sort(pos[keep_idx])
    if return_scores:
        return keep, token
    return keep


def select_heads(
    scores,
    positions,
    t: int,
    budget: int,
    sink: int = 0,
    window: int = 0,
    prompt_len: int = 0,
    *,
    n_head_kv: int,
    granularity: str = "head",
) -> np.ndarray:
    """Per-head TriAttention selection: every KV head chooses its own tokens to keep.

    ``scores`` are the raw per-layer scores of ``select`` (``[n_layer][n, n_head]``). With
    ``granularity="head"`` (the paper's per-head pruning) KV head g ranks the candidates by its own
    query heads' z-scores, max over its GQA group, mean over the layers, and the result is
    ``[n_head_kv, k]``; with ``"layer"`` every layer's KV heads choose separately: ``[n_layer,
    n_head_kv, k]``. Each row holds kept positions, ascending; protections are those of ``select``.
    """
    if granularity not in ("head", "layer"):
        raise ValueError(f"granularity must be 'head' or 'layer', got {granularity!r}")
    it = list(scores) if not isinstance(scores, np.ndarray) or scores.ndim == 3 else [scores]
    layers = [np.asarray(s, dtype=np.float32) for s in it if s is not None]
    if not layers:
        raise ValueError("select_heads needs the raw scores of at least one layer")
    n_head = layers[0].shape[1]
    if n_head % int(n_head_kv) != 0:
        raise ValueError(f"n_head ({n_head}) must be a multiple of n_head_kv ({n_head_kv})")
    n_gqa = n_head // int(n_head_kv)

    def one(ls, g):
        group = [s[:, g * n_gqa:(g + 1) * n_gqa] for s in ls]
        return select("tri", group, positions, t, budget, sink, window, prompt_len, n_head_kv=1)

    if granularity == "head":
        return np.stack([one(layers, g) for g in range(int(n_head_kv))])
    return np.stack([np.stack([one([s], g) for g in range(int(n_head_kv))]) for s in layers])
