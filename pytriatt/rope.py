"""RoPE as llama.cpp applies it: each architecture's pairing, the per-layer frequencies and YaRN magnitude
(RopeSpec), read from a GGUF model exactly as llama.cpp resolves its hyperparameters and context parameters.

The frequencies feed the scorer (pytriatt.calibration) and the reference rotation of the tests; the tables
below follow llama_model_rope_type() and the per-architecture loaders of the vendored llama.cpp.
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence, Union

import numpy as np

from . import _core, gguf_io
from .errors import CalibrationError
from .gguf_model import ModelMeta, model_shape, open_model

__all__ = ["RopeSpec", "ROPE_PAIRING", "VERIFIED_ARCHS", "MROPE_ARCHS", "FREQ_FACTOR_ARCHS", "SCALING_TYPES",
           "PAIRING_CODE", "no_rope_layers"]

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
MROPE_ARCHS = {"glm4": "norm", "glm4moe": "neox", "hunyuan_vl": "neox"}

# Architectures whose RoPE reading RopeSpec.from_gguf reproduces exactly (checked
# against llama.cpp's graph in tests/test_core_rope_exact.py for llama, qwen2, qwen3,
# qwen3moe, granite, gemma3 and gpt-oss; qwen2moe builds RoPE exactly like qwen2). Other
# architectures may have per-layer RoPE rules of their own (NoPE layers, MLA, their
# own YaRN keys...): from_gguf refuses them unless strict=False.
VERIFIED_ARCHS = ("llama", "qwen2", "qwen2moe", "qwen3", "qwen3moe", "granite", "gemma3", "gpt-oss", "phi3",
                  "olmo2", "glm4", "exaone", "smollm3")

# architectures whose graph passes llama_model::get_rope_factors (rope_freqs, else LongRoPE's long or
# short factors) to ggml_rope_ext
FREQ_FACTOR_ARCHS = (
    "llama", "llama4", "deci", "phi3", "minicpm3", "cohere2", "cohere2moe", "deepseek", "exaone", "exaone4",
    "exaone-moe", "granite", "granitehybrid", "graniteswitch", "granite_swa", "bailingmoe", "arcee",
    "hunyuan-moe", "hunyuan_vl", "hy_v3", "apertus", "mistral3", "eagle3", "step35", "nanbeige",
)


def no_rope_layers(arch: str, n_layer: int) -> List[bool]:
    """Per layer: True where the graph applies no RoPE (NoPE layers). SmolLM3 leaves out RoPE in every
    4th layer (llama.cpp's n_no_rope_layer_step, fixed to 4 for it); its keys are cached unrotated."""
    if arch == "smollm3":
        return [(il + 1) % 4 == 0 for il in range(n_layer)]
    return [False] * n_layer


SCALING_TYPES = ("none", "linear", "yarn", "longrope")

PAIRING_CODE = {"neox": int(_core.PAIRING_NEOX), "norm": int(_core.PAIRING_NORM)}


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
        if pairing not in PAIRING_CODE:
            raise ValueError(f"pairing must be 'neox' or 'norm', got {pairing!r}")
        if scaling_type not in SCALING_TYPES:
            raise ValueError(f"scaling_type must be one of {SCALING_TYPES}, got {scaling_type!r}")
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
        return _rope_from_model(
            open_model(path_or_reader), strict=strict, n_ctx=n_ctx, rope_scaling_type=rope_scaling_type,
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


def _rope_from_model(
    m: ModelMeta, *, strict, n_ctx, rope_scaling_type, rope_freq_base, rope_freq_scale,
    yarn_ext_factor, yarn_attn_factor, yarn_beta_fast, yarn_beta_slow, yarn_orig_ctx,
) -> RopeSpec:
    shape = model_shape(m)
    arch = shape["arch"]
    n_layer = shape["n_layer"]
    pairing = ROPE_PAIRING.get(arch)
    if arch in MROPE_ARCHS:
        pairing = None if m.field(f"{arch}.rope.dimension_sections") is not None else MROPE_ARCHS[arch]
    if pairing is None:
        raise NotImplementedError(
            f"architecture {arch!r}: unknown or M-RoPE rope type; TriAttention supports NORM and NEOX RoPE")
    if pairing == "none":
        raise NotImplementedError(f"architecture {arch!r} does not use RoPE: TriAttention scoring does not apply")
    if strict and arch not in VERIFIED_ARCHS:
        raise NotImplementedError(
            f"architecture {arch!r}: RoPE reading not verified against llama.cpp (verified: "
            f"{', '.join(VERIFIED_ARCHS)}); pass strict=False to use the generic reading")
    key = lambda name, default=None: m.scalar(f"{arch}.{name}", default)  # noqa: E731
    ikey = lambda name, default=None: m.integer(f"{arch}.{name}", default)  # noqa: E731

    head_dim = shape["head_dim"]
    heads = shape["heads"]
    if any(h != heads[0] for h in heads) or any(h != shape["heads_kv"][0] for h in shape["heads_kv"]):
        raise NotImplementedError(f"architecture {arch!r}: per-layer head counts are not supported")

    # --- llama_model_base::load_hparams ---
    n_ctx_train = ikey("context_length", 0)
    n_ctx_orig_yarn = ikey("rope.scaling.original_context_length", n_ctx_train)
    freq_base_train = _f32(key("rope.freq_base", 10000.0))
    scaling_train = str(key("rope.scaling.type", "linear"))
    if scaling_train not in SCALING_TYPES:
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
            f = m.field(f"{arch}.attention.sliding_window_pattern")
            if f is not None and f.type == gguf_io.T_ARRAY:
                pat = m.array(f"{arch}.attention.sliding_window_pattern")
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
    if scaling not in SCALING_TYPES:
        raise ValueError(f"rope_scaling_type must be one of {SCALING_TYPES}, got {scaling!r}")
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
    if arch in FREQ_FACTOR_ARCHS:
        freq_factors = m.tensor_f32("rope_freqs.weight")
        if freq_factors is None:
            # LongRoPE (Phi-3): whatever the scaling type says, the long factors once the context's
            # sequence length exceeds the original context, the short ones otherwise
            n_ctx_seq = n_ctx if n_ctx else n_ctx_train
            freq_factors = m.tensor_f32("rope_factors_long.weight" if n_ctx_seq > n_ctx_orig_yarn else "rope_factors_short.weight")
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
        rope_layers=[not nope for nope in no_rope_layers(arch, n_layer)],
        kv_layers=[h > 0 for h in shape["heads_kv"]],
        arch=arch,
        scaling_type=scaling,
    )

