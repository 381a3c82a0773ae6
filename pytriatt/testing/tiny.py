"""Tiny random-weight GGUF models for fast tests.

:func:`write_tiny_gguf` writes a complete, self-contained GGUF file (weights,
hyper-parameters and a small SentencePiece-style vocabulary) for one of the
llama.cpp architectures that pytriatt cares about:

* ``llama``  - plain GQA transformer (the SmolLM2 family);
* ``qwen2``  - like llama, plus q/k/v projection biases;
* ``qwen3``  - like llama, plus per-head RMS norms on Q and K;
* ``qwen3moe`` - qwen3 with a mixture of experts (``n_expert``, ``n_expert_used``);
* ``granite`` - llama with Granite's embedding, residual, attention and logit scales;
* ``gemma3`` - Q/K norms, post-attention / post-FFN norms, scaled embeddings
  and interleaved sliding-window (local) and global attention layers, so that
  llama.cpp builds its iSWA KV cache (two caches: SWA layers and full layers),
  with a separate rope base for the local layers;
* ``gpt-oss`` - alternating sliding-window and global layers (iSWA cache),
  attention sinks, YaRN rope scaling, q/k/v/o biases and a small mixture of
  experts (``n_expert``, ``n_expert_used``, ``yarn_factor`` options);
* ``phi3`` - NEOX RoPE with LongRoPE: ``rope_factors_long`` / ``rope_factors_short``
  tensors (llama.cpp picks the long ones when the context exceeds the original
  context length), the LongRoPE magnitude in ``rope.scaling.attn_factor`` and a fused
  gate/up FFN;
* ``olmo2`` - Q and K RMS norms over the whole projection (not per head),
  post-attention and post-FFN norms and no pre-norms;
* ``glm4`` - NORM RoPE over half of each head (partial rotary, as GLM-4 ships),
  q/k/v biases, post-attention and post-FFN norms, fused gate/up FFN;
* ``exaone`` - NEOX RoPE, llama-like blocks, optional ``rope_freqs``;
* ``smollm3`` - llama-like, but every 4th layer has no RoPE (NoPE); it defaults
  to 4 layers so that layer 3 is a NoPE layer.

``rope_freqs`` (llama, exaone) adds per-band frequency divisors (llama 3's rope
scaling): ``"llama3"`` computes them as Meta's llama 3 conversion does, an array
gives them outright. :data:`VARIANTS` names the variants the architecture table
tests. :func:`write_tiny_deepseek2_gguf` writes a multi-head latent attention
model (to test the refusal), :func:`write_tiny_mamba_gguf` a recurrent one.

The weights are random but deterministic for a given ``seed``: logits are
finite and depend on the input, which is all that KV-cache plumbing tests
need (they compare the model with itself, never with "good" text). The
default two-layer 64-wide model is about 1.3 MB (f32) and loads and decodes
hundreds of tokens in well under a second on one CPU thread.

The vocabulary does not depend on any file outside this module: ``<unk>``,
``<s>``, ``</s>``, the 256 byte-fallback tokens ``<0x00>`` .. ``<0xFF>``,
single ASCII characters and the prefixes of a few hundred common English words
(with and without the SentencePiece ``▁`` space marker; about 1900 tokens in
all). Any text therefore tokenizes (unknown
characters fall back to bytes) and detokenizes back to itself, up to
SentencePiece's leading-space rule. All architectures share it.

Usage::

    from pytriatt.testing.tiny import write_tiny_gguf
    path = write_tiny_gguf(tmp_path / "m.gguf", "gemma3", n_layer=2)
"""

from __future__ import annotations

import os
import pathlib
from typing import Any, Optional, Sequence, Union

import numpy as np

__all__ = ["ARCHS", "VARIANTS", "write_tiny_gguf", "write_tiny_mamba_gguf", "write_tiny_deepseek2_gguf",
           "tiny_vocab", "llama3_rope_freqs"]

ARCHS = ("llama", "qwen2", "qwen3", "qwen3moe", "granite", "gemma3", "gpt-oss", "phi3", "olmo2", "glm4",
         "exaone", "smollm3")

# named variants of an architecture, as rows of docs/architectures.md: name -> (arch, write_tiny_gguf options)
VARIANTS = {
    "llama (llama3 rope_freqs)": ("llama", {"rope_freqs": "llama3", "rope_freq_base": 500000.0}),
}

_DTYPES = ("f32", "f16", "bf16", "q8_0")

# SentencePiece token types (as in gguf.TokenType / llama.cpp's llama_token_type).
_TT_NORMAL, _TT_UNKNOWN, _TT_CONTROL, _TT_UNUSED, _TT_BYTE = 1, 2, 3, 5, 6

_SPACE = "\u2581"  # SentencePiece's visible space "▁"

_WORDS = (
    "the of and to in is it that was for on are as with his they at be this from have or "
    "by one had not but what all were when we there can an your which their said if do "
    "will each about how up out them then she many some so these would other into has "
    "more her two like him see time could no make than first been its who now people my "
    "made over did down only way find use may water long little very after words called "
    "just where most know get through back much before go good new write our used me man "
    "too any day same right look think also around another came come work three word must "
    "because does part even place well such here take why things help put years different "
    "away again off went old number great tell men say small every found still between "
    "name should home big give air line set own under read last never us left end along "
    "while might next sound below saw something thought both few those always looked show "
    "large often together asked house world going want school important until form food "
    "keep children feet land side without boy once animals life enough took four head "
    "above kind began almost live page got earth need far hand high year mother light "
    "country father let night picture being study second soon story since white ever "
    "paper hard near sentence better best across during today however sure knew try told "
    "young sun thing whole hear example heard several change answer room sea against top "
    "turned learn point city play toward five himself usually money seen didn cache key "
    "value attention token model layer python function return class import data file"
).split()


def tiny_vocab(vocab_size: Optional[int] = None):
    """Return ``(tokens, scores, token_types)`` of the built-in SentencePiece-style vocab.

    With ``vocab_size`` larger than the natural size, ``<unused{i}>`` tokens pad
    the list; a smaller value is an error.
    """
    tokens = ["<unk>", "<s>", "</s>"]
    types = [_TT_UNKNOWN, _TT_CONTROL, _TT_CONTROL]
    tokens += [f"<0x{b:02X}>" for b in range(256)]
    types += [_TT_BYTE] * 256

    pieces: list = []
    seen = set()

    def add(p: str) -> None:
        if p not in seen:
            seen.add(p)
            pieces.append(p)

    # Single characters first so that every ASCII text segments without byte fallback,
    # then every prefix of every word (with and without the space marker) so that the
    # SPM bigram merges can actually reach the whole words.
    add(_SPACE)
    for c in range(0x21, 0x7F):
        add(chr(c))
    for w in _WORDS:
        for form in (_SPACE + w, w):
            for k in range(2, len(form) + 1):
                add(form[:k])
    # Punctuation preceded by a space, and a newline-free digit pair set.
    for c in ".,;:!?()'\"-":
        add(_SPACE + c)
    for d in "0123456789":
        add(_SPACE + d)

    tokens += pieces
    types += [_TT_NORMAL] * len(pieces)
    # Longer pieces score higher, so merges grow pieces greedily; ties broken by order.
    scores = [0.0] * (3 + 256) + [float(len(p)) - 1e-4 * i for i, p in enumerate(pieces)]

    n = len(tokens)
    if vocab_size is not None:
        if vocab_size < n:
            raise ValueError(f"vocab_size={vocab_size} is smaller than the built-in vocab ({n} tokens)")
        pad = vocab_size - n
        tokens += [f"<unused{i}>" for i in range(pad)]
        types += [_TT_UNUSED] * pad
        scores += [-1e9] * pad
    return tokens, scores, types


def llama3_rope_freqs(head_dim: int, base: float, *, factor: float = 8.0, low_freq_factor: float = 1.0,
                      high_freq_factor: float = 4.0, orig_ctx: int = 8192) -> np.ndarray:
    """Llama 3's per-band frequency divisors (the ``rope_freqs`` tensor its GGUF conversion writes).

    Bands whose wavelength exceeds ``orig_ctx / low_freq_factor`` are slowed down by ``factor``,
    those shorter than ``orig_ctx / high_freq_factor`` are kept, and the ones between are blended
    smoothly: the published rule, so a tiny model's divisors span all three regimes.
    """
    freqs = 1.0 / base ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    out = []
    for f in freqs:
        wavelen = 2 * np.pi / f
        if wavelen < orig_ctx / high_freq_factor:
            out.append(1.0)
        elif wavelen > orig_ctx / low_freq_factor:
            out.append(factor)
        else:
            smooth = (orig_ctx / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
            out.append(1.0 / ((1 - smooth) / factor + smooth))
    return np.asarray(out, dtype=np.float32)


def _quant_type(dtype: str):
    import gguf

    return {
        "f32": gguf.GGMLQuantizationType.F32,
        "f16": gguf.GGMLQuantizationType.F16,
        "bf16": gguf.GGMLQuantizationType.BF16,
        "q8_0": gguf.GGMLQuantizationType.Q8_0,
    }[dtype]


def add_vocab(w, tokens, scores, types) -> None:
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_scores(scores)
    w.add_token_types(types)
    w.add_unk_token_id(0)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_add_bos_token(True)
    w.add_add_eos_token(False)
    w.add_add_space_prefix(True)


def _writer(path, arch: str, name: str, *, n_ctx: int, n_embd: int, n_layer: int, n_ff: int, n_head: int):
    """(path, a gguf.GGUFWriter for it holding the keys every tiny model has), its directory made."""
    import gguf
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    w = gguf.GGUFWriter(str(path), arch)
    w.add_name(name)
    w.add_context_length(n_ctx)
    w.add_embedding_length(n_embd)
    w.add_block_count(n_layer)
    w.add_feed_forward_length(n_ff)
    w.add_head_count(n_head)
    return path, w


def _finish(w, path: pathlib.Path) -> pathlib.Path:
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def _random_tensor(w, rng, name: str, shape, base: float, std: float) -> None:
    w.add_tensor(name, np.float32(base) + rng.standard_normal(shape, dtype=np.float32) * np.float32(std))


def write_tiny_gguf(
    path: Union[str, os.PathLike],
    arch: str = "llama",
    *,
    n_layer: Optional[int] = None,
    n_embd: int = 64,
    n_head: int = 4,
    n_head_kv: int = 2,
    head_dim: Optional[int] = None,
    n_ff: int = 128,
    n_ctx_train: int = 4096,
    rope_freq_base: float = 10000.0,
    seed: int = 0,
    dtype: str = "f32",
    vocab_size: Optional[int] = None,
    **extra: Any,
) -> pathlib.Path:
    """Write a tiny random-weight GGUF model of architecture ``arch`` to ``path``.

    Parameters mirror the GGUF hyper-parameters. ``head_dim`` defaults to
    ``n_embd // n_head`` (qwen2 requires exactly that). ``dtype`` is the type
    of the 2-D weight matrices: ``"f32"``, ``"f16"``, ``"bf16"`` or ``"q8_0"``
    (q8_0 needs every input width to be a multiple of 32); norms and biases are
    always f32. The same arguments and ``seed`` give a byte-identical file.

    Extra keyword options:

    * ``rms_eps`` (float): RMS-norm epsilon (default 1e-6; 1e-5 for llama).
    * ``init_scale`` (float, default 1.0): multiplies the projection weights'
      standard deviation (``1/sqrt(fan_in)``); larger values give peakier
      attention.
    * ``tie_embeddings`` (bool, default False): omit ``output.weight`` and reuse
      the token embedding as the output head.
    * ``name`` (str): ``general.name`` (default ``tiny-<arch>``).
    * gemma3 only: ``sliding_window`` (int, default 64), ``sliding_window_pattern``
      (int period P - layer ``i`` is local unless ``i % P == P - 1`` - or a list of
      bools, True = local; default 2, i.e. local/global alternating, starting
      local, so n_layer>=2 has both kinds), ``rope_freq_base_swa`` (local layers'
      rope base, default 10000.0), ``final_logit_softcapping`` (float, default
      none). Pass ``sliding_window=0`` for a gemma3 model without SWA.
    * llama and exaone: ``rope_freqs`` (``"llama3"`` or an array of ``n_rot/2`` divisors;
      default none): the ``rope_freqs.weight`` tensor.
    * phi3: ``longrope`` (bool, default True): ``rope_factors_long`` / ``rope_factors_short``
      tensors, ``original_context_length = n_ctx_train // 4`` and LongRoPE's magnitude
      ``sqrt(1 + ln 4 / ln(original_context_length))`` as ``rope.scaling.attn_factor``.

    ``n_layer`` defaults to 2 (4 for smollm3, whose every 4th layer has no RoPE).

    Returns the path written, as a :class:`pathlib.Path`.
    """
    import gguf

    if arch not in ARCHS:
        raise ValueError(f"unsupported arch {arch!r}; supported: {', '.join(ARCHS)}")
    if n_layer is None:
        n_layer = 4 if arch == "smollm3" else 2
    if dtype not in _DTYPES:
        raise ValueError(f"unsupported dtype {dtype!r}; supported: {', '.join(_DTYPES)}")
    if n_layer < 1:
        raise ValueError("n_layer must be >= 1")
    if n_head < 1 or n_head_kv < 1 or n_head % n_head_kv != 0:
        raise ValueError(f"n_head ({n_head}) must be a positive multiple of n_head_kv ({n_head_kv})")
    if head_dim is None:
        if n_embd % n_head:
            raise ValueError(f"n_embd ({n_embd}) is not divisible by n_head ({n_head}); pass head_dim")
        head_dim = n_embd // n_head
    if head_dim % 2:
        raise ValueError("head_dim must be even (RoPE)")
    if arch in ("qwen2", "phi3", "olmo2") and head_dim * n_head != n_embd:
        raise ValueError(f"{arch} requires head_dim * n_head == n_embd")
    # GLM-4 rotates half of each head (partial_rotary_factor 0.5 in its conversion)
    n_rot = head_dim // 2 if arch == "glm4" else head_dim
    if n_rot % 2:
        raise ValueError(f"{arch}: the rotary dims ({n_rot}) must be even")

    rms_eps = float(extra.pop("rms_eps", 1e-5 if arch == "llama" else 1e-6))
    init_scale = float(extra.pop("init_scale", 1.0))
    tie = bool(extra.pop("tie_embeddings", False))
    name = str(extra.pop("name", f"tiny-{arch}"))
    has_swa = arch in ("gemma3", "gpt-oss")
    swa = int(extra.pop("sliding_window", 64)) if has_swa else 0
    swa_pattern: Union[int, Sequence[bool]] = extra.pop("sliding_window_pattern", 2) if has_swa else 2
    rope_base_swa = float(extra.pop("rope_freq_base_swa", 10000.0)) if arch == "gemma3" else None
    has_moe = arch in ("gpt-oss", "qwen3moe")
    n_expert = int(extra.pop("n_expert", 4)) if has_moe else 0
    n_expert_used = int(extra.pop("n_expert_used", 2)) if has_moe else 0
    yarn_factor = float(extra.pop("yarn_factor", 4.0)) if arch == "gpt-oss" else 0.0
    softcap = extra.pop("final_logit_softcapping", None) if arch == "gemma3" else None
    rope_freqs = extra.pop("rope_freqs", None) if arch in ("llama", "exaone") else None
    longrope = bool(extra.pop("longrope", True)) if arch == "phi3" else False
    if extra:
        raise TypeError(f"unexpected keyword argument(s) for arch {arch!r}: {', '.join(sorted(extra))}")
    if not isinstance(swa_pattern, int):
        swa_pattern = [bool(x) for x in swa_pattern]
        if len(swa_pattern) != n_layer:
            raise ValueError(f"sliding_window_pattern has {len(swa_pattern)} entries, expected n_layer={n_layer}")

    qtype = _quant_type(dtype)
    if dtype == "q8_0":
        for width in (n_embd, n_head * head_dim, n_ff):
            if width % 32:
                raise ValueError(f"q8_0 needs input widths that are multiples of 32 (got {width})")

    tokens, scores, types = tiny_vocab(vocab_size)
    if arch == "phi3":
        # llama.cpp marks Phi-3's special tokens by name when loading its vocabulary: <|endoftext|> must exist
        tokens, scores, types = tokens + ["<|endoftext|>"], scores + [0.0], types + [_TT_CONTROL]
    n_vocab = len(tokens)
    rng = np.random.default_rng(seed)
    q_dim, kv_dim = n_head * head_dim, n_head_kv * head_dim

    path, w = _writer(path, arch, name, n_ctx=n_ctx_train, n_embd=n_embd, n_layer=n_layer, n_ff=n_ff, n_head=n_head)

    # ---- metadata -------------------------------------------------------
    w.add_description(f"tiny random-weight {arch} model for tests (pytriatt.testing.tiny, seed={seed})")
    w.add_file_type(
        {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
         "bf16": gguf.LlamaFileType.MOSTLY_BF16, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[dtype]
    )
    w.add_head_count_kv(n_head_kv)
    w.add_key_length(head_dim)
    w.add_value_length(head_dim)
    w.add_rope_dimension_count(n_rot)
    w.add_rope_freq_base(float(rope_freq_base))
    w.add_layer_norm_rms_eps(rms_eps)
    if arch == "llama":
        w.add_vocab_size(n_vocab)
    if arch == "gemma3":
        if swa > 0:
            w.add_sliding_window(swa)
            w.add_sliding_window_pattern(swa_pattern)
            w.add_rope_freq_base_swa(rope_base_swa)
        if softcap is not None:
            w.add_final_logit_softcapping(float(softcap))
    if arch == "qwen3moe":
        w.add_expert_count(n_expert)
        w.add_expert_used_count(n_expert_used)
        w.add_expert_feed_forward_length(n_ff)
    if arch == "granite":
        w.add_vocab_size(n_vocab)
        w.add_logit_scale(8.0)
        w.add_residual_scale(0.5)
        w.add_embedding_scale(2.0)
        w.add_attention_scale(1.0 / head_dim)
    if arch == "gpt-oss":
        # alternating 64-token windows (layer 0 local), attention sinks, YaRN, a mixture of experts
        w.add_sliding_window(swa)
        if not isinstance(swa_pattern, int) or swa_pattern != 2:
            w.add_sliding_window_pattern(swa_pattern)
        w.add_expert_count(n_expert)
        w.add_expert_used_count(n_expert_used)
        w.add_expert_feed_forward_length(n_ff)
        w.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        w.add_rope_scaling_factor(yarn_factor)
        w.add_rope_scaling_orig_ctx_len(n_ctx_train // int(yarn_factor))
    if arch == "phi3" and longrope:
        # Phi-3's conversion: no scaling type, the original context and LongRoPE's magnitude factor
        orig = n_ctx_train // 4
        w.add_rope_scaling_orig_ctx_len(orig)
        w.add_rope_scaling_attn_factors(float(np.sqrt(1 + np.log(n_ctx_train / orig) / np.log(orig))))

    add_vocab(w, tokens, scores, types)

    # ---- tensors (numpy shape is ggml's shape reversed: (out, in)) -------
    def mat(tname: str, n_out: int, n_in: int, std: Optional[float] = None) -> None:
        s = init_scale / np.sqrt(n_in) if std is None else std
        a = rng.standard_normal((n_out, n_in), dtype=np.float32) * np.float32(s)
        if dtype == "f32":
            w.add_tensor(tname, a)
        elif dtype == "f16":
            w.add_tensor(tname, a.astype(np.float16))
        else:
            w.add_tensor(tname, gguf.quants.quantize(a, qtype), raw_dtype=qtype)

    def vec(tname: str, n: int, base: float, std: float) -> None:
        a = (np.float32(base) + rng.standard_normal(n, dtype=np.float32) * np.float32(std)).astype(np.float32)
        w.add_tensor(tname, a)

    mat("token_embd.weight", n_vocab, n_embd, std=1.0)
    vec("output_norm.weight", n_embd, 1.0, 0.1)
    if not tie or arch == "olmo2":  # olmo2 requires its own output head
        mat("output.weight", n_vocab, n_embd)
    if rope_freqs is not None:
        ff = llama3_rope_freqs(n_rot, rope_freq_base) if isinstance(rope_freqs, str) else rope_freqs
        if isinstance(rope_freqs, str) and rope_freqs != "llama3":
            raise ValueError(f"rope_freqs must be 'llama3' or an array, got {rope_freqs!r}")
        ff = np.asarray(ff, dtype=np.float32).ravel()
        if ff.size != n_rot // 2:
            raise ValueError(f"rope_freqs needs n_rot/2 = {n_rot // 2} values, got {ff.size}")
        w.add_tensor("rope_freqs.weight", ff)
    if longrope:
        # long factors > 1 slow the low bands down, short ones stay near 1: the two sets differ everywhere
        F = n_rot // 2
        w.add_tensor("rope_factors_long.weight", np.geomspace(1.0, 16.0, F).astype(np.float32))
        w.add_tensor("rope_factors_short.weight", np.linspace(1.0, 1.5, F).astype(np.float32))

    for i in range(n_layer):
        b = f"blk.{i}"
        if arch != "olmo2":  # olmo2 normalizes after attention and FFN only
            vec(f"{b}.attn_norm.weight", n_embd, 1.0, 0.1)
        mat(f"{b}.attn_q.weight", q_dim, n_embd)
        mat(f"{b}.attn_k.weight", kv_dim, n_embd)
        mat(f"{b}.attn_v.weight", kv_dim, n_embd)
        if arch in ("qwen2", "gpt-oss", "glm4"):
            vec(f"{b}.attn_q.bias", q_dim, 0.0, 0.5)
            vec(f"{b}.attn_k.bias", kv_dim, 0.0, 0.5)
            vec(f"{b}.attn_v.bias", kv_dim, 0.0, 0.1)
        if arch in ("qwen3", "qwen3moe", "gemma3"):
            vec(f"{b}.attn_q_norm.weight", head_dim, 1.0, 0.1)
            vec(f"{b}.attn_k_norm.weight", head_dim, 1.0, 0.1)
        if arch == "olmo2":  # over the whole projection, before the heads are split
            vec(f"{b}.attn_q_norm.weight", q_dim, 1.0, 0.1)
            vec(f"{b}.attn_k_norm.weight", kv_dim, 1.0, 0.1)
        mat(f"{b}.attn_output.weight", n_embd, q_dim)
        if arch == "gpt-oss":
            vec(f"{b}.attn_output.bias", n_embd, 0.0, 0.1)
            vec(f"{b}.attn_sinks.weight", n_head, 0.0, 1.0)
            vec(f"{b}.post_attention_norm.weight", n_embd, 1.0, 0.1)
            mat(f"{b}.ffn_gate_inp.weight", n_expert, n_embd)
            vec(f"{b}.ffn_gate_inp.bias", n_expert, 0.0, 0.1)
            for part, (n_out, n_in) in (("gate", (n_ff, n_embd)), ("up", (n_ff, n_embd)), ("down", (n_embd, n_ff))):
                a = rng.standard_normal((n_expert, n_out, n_in), dtype=np.float32) * np.float32(init_scale / np.sqrt(n_in))
                w.add_tensor(f"{b}.ffn_{part}_exps.weight", a)
                w.add_tensor(f"{b}.ffn_{part}_exps.bias",
                             (rng.standard_normal((n_expert, n_out), dtype=np.float32) * np.float32(0.1)))
            continue
        if arch == "qwen3moe":
            vec(f"{b}.ffn_norm.weight", n_embd, 1.0, 0.1)
            mat(f"{b}.ffn_gate_inp.weight", n_expert, n_embd)
            for part, (n_out, n_in) in (("gate", (n_ff, n_embd)), ("up", (n_ff, n_embd)), ("down", (n_embd, n_ff))):
                a = rng.standard_normal((n_expert, n_out, n_in), dtype=np.float32) * np.float32(init_scale / np.sqrt(n_in))
                w.add_tensor(f"{b}.ffn_{part}_exps.weight", a)
            continue
        if arch in ("gemma3", "olmo2", "glm4"):
            vec(f"{b}.post_attention_norm.weight", n_embd, 1.0, 0.1)
        if arch != "olmo2":
            vec(f"{b}.ffn_norm.weight", n_embd, 1.0, 0.1)
        if arch in ("phi3", "glm4"):  # gate and up fused in one [2 n_ff] projection
            mat(f"{b}.ffn_up.weight", 2 * n_ff, n_embd)
        else:
            mat(f"{b}.ffn_gate.weight", n_ff, n_embd)
            mat(f"{b}.ffn_up.weight", n_ff, n_embd)
        mat(f"{b}.ffn_down.weight", n_embd, n_ff)
        if arch in ("gemma3", "olmo2", "glm4"):
            vec(f"{b}.post_ffw_norm.weight", n_embd, 1.0, 0.1)

    return _finish(w, path)


def write_tiny_mamba_gguf(path: Union[str, os.PathLike], *, n_layer: int = 2, n_embd: int = 32, d_state: int = 8,
                          d_conv: int = 4, seed: int = 0) -> pathlib.Path:
    """Write a tiny random-weight Mamba (recurrent, no KV cache) model.

    It exists to check that what needs per-token KV cells refuses a recurrent
    memory with a clear error instead of misbehaving."""
    tokens, scores, types = tiny_vocab()
    n_vocab, d_inner, dt_rank = len(tokens), 2 * n_embd, max(1, n_embd // 16)
    rng = np.random.default_rng(seed)
    path, w = _writer(path, "mamba", "tiny-mamba", n_ctx=4096, n_embd=n_embd, n_layer=n_layer, n_ff=0, n_head=0)
    w.add_ssm_conv_kernel(d_conv)
    w.add_ssm_inner_size(d_inner)
    w.add_ssm_state_size(d_state)
    w.add_ssm_time_step_rank(dt_rank)
    w.add_layer_norm_rms_eps(1e-5)
    add_vocab(w, tokens, scores, types)

    def t(name: str, *shape: int, base: float = 0.0, std: float = 0.1) -> None:
        _random_tensor(w, rng, name, shape, base, std)

    t("token_embd.weight", n_vocab, n_embd, std=1.0)
    t("output_norm.weight", n_embd, base=1.0)
    for i in range(n_layer):
        b = f"blk.{i}"
        t(f"{b}.attn_norm.weight", n_embd, base=1.0)
        t(f"{b}.ssm_in.weight", 2 * d_inner, n_embd)
        t(f"{b}.ssm_conv1d.weight", d_inner, d_conv)
        t(f"{b}.ssm_conv1d.bias", d_inner)
        t(f"{b}.ssm_x.weight", dt_rank + 2 * d_state, d_inner)
        t(f"{b}.ssm_dt.weight", d_inner, dt_rank)
        t(f"{b}.ssm_dt.bias", d_inner)
        t(f"{b}.ssm_a", d_inner, d_state, base=-1.0)
        t(f"{b}.ssm_d", d_inner, base=1.0)
        t(f"{b}.ssm_out.weight", n_embd, d_inner)
    return _finish(w, path)


def write_tiny_deepseek2_gguf(path: Union[str, os.PathLike], *, n_layer: int = 2, n_embd: int = 64, n_head: int = 4,
                              kv_lora_rank: int = 32, qk_nope: int = 16, qk_rope: int = 16, v_head: int = 16,
                              n_ff: int = 128, seed: int = 0) -> pathlib.Path:
    """Write a tiny random-weight DeepSeek-V2 model with multi-head latent attention (MLA).

    Laid out as llama.cpp's conversion writes MLA models: the KV cache holds one latent row
    per token (``kv_lora_rank`` values plus the ``qk_rope`` RoPE'd dims, one "KV head"),
    from which every head's key and value are reconstructed (``attn_k_b`` / ``attn_v_b``).
    All layers are dense (``leading_dense_block_count = n_layer``). It exists to check
    that what scores per-head keys refuses such a cache, naming why."""
    tokens, scores, types = tiny_vocab()
    n_vocab = len(tokens)
    rng = np.random.default_rng(seed)
    path, w = _writer(path, "deepseek2", "tiny-deepseek2", n_ctx=4096, n_embd=n_embd, n_layer=n_layer, n_ff=n_ff,
                      n_head=n_head)
    w.add_head_count_kv(1)                        # the latent is shared by all heads
    w.add_key_length(kv_lora_rank + qk_rope)      # what one cache row holds
    w.add_value_length(kv_lora_rank)
    w.add_key_length_mla(qk_nope + qk_rope)       # a head's key once reconstructed
    w.add_value_length_mla(v_head)
    w.add_rope_dimension_count(qk_rope)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-6)
    w.add_q_lora_rank(0)                          # queries straight from attn_q
    w.add_kv_lora_rank(kv_lora_rank)
    w.add_leading_dense_block_count(n_layer)
    w.add_expert_count(2)
    w.add_expert_used_count(1)
    w.add_expert_shared_count(1)
    w.add_expert_feed_forward_length(n_ff)
    w.add_vocab_size(n_vocab)
    add_vocab(w, tokens, scores, types)

    def t(name: str, *shape: int, base: float = 0.0, std: Optional[float] = None) -> None:
        _random_tensor(w, rng, name, shape, base, (1.0 / np.sqrt(shape[-1])) if std is None else std)

    t("token_embd.weight", n_vocab, n_embd, std=1.0)
    t("output_norm.weight", n_embd, base=1.0, std=0.1)
    t("output.weight", n_vocab, n_embd)
    for i in range(n_layer):
        b = f"blk.{i}"
        t(f"{b}.attn_norm.weight", n_embd, base=1.0, std=0.1)
        t(f"{b}.attn_kv_a_norm.weight", kv_lora_rank, base=1.0, std=0.1)
        t(f"{b}.attn_q.weight", n_head * (qk_nope + qk_rope), n_embd)
        t(f"{b}.attn_kv_a_mqa.weight", kv_lora_rank + qk_rope, n_embd)
        t(f"{b}.attn_k_b.weight", n_head, kv_lora_rank, qk_nope)   # ggml {qk_nope, kv_lora_rank, n_head}
        t(f"{b}.attn_v_b.weight", n_head, v_head, kv_lora_rank)    # ggml {kv_lora_rank, v_head, n_head}
        t(f"{b}.attn_output.weight", n_embd, n_head * v_head)
        t(f"{b}.ffn_norm.weight", n_embd, base=1.0, std=0.1)
        t(f"{b}.ffn_gate.weight", n_ff, n_embd)
        t(f"{b}.ffn_up.weight", n_ff, n_embd)
        t(f"{b}.ffn_down.weight", n_embd, n_ff)
    return _finish(w, path)
