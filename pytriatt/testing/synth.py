"""Random-weight GGUF models of real shapes (Qwen3-8B, ...) for speed measurements, written fast.

Decode speed depends on the shapes and types of the weights and of the KV cache, not on their values:
a Qwen3-8B-shaped model with random Q8_0 weights runs at the speed of the real Qwen3-8B Q8_0. This
module writes such a model without holding it in memory and without quantizing floats: each Q8_0 block
(an f16 scale and 32 int8 values) is written directly, the int8 values taken from one random pool at a
random offset per tensor, the scale chosen so that a weight's standard deviation is 1/sqrt(n_in) (the
activations stay finite through the layers). An 8.7 GB Qwen3-8B-shaped file takes about as long as the
disk needs to write it.

The vocabulary is pytriatt.testing.tiny's (any text tokenizes) padded with unused tokens to the real
vocabulary size, so the output layer costs what the real one costs.

    python -m pytriatt.testing.synth /tmp/qwen3-8b-q8.gguf                       # Qwen3-8B shape, Q8_0
    python -m pytriatt.testing.synth /tmp/small.gguf --shape small
    python -m pytriatt.testing.synth /tmp/m.gguf --shape qwen3-8b --n-layer 4    # any field overridden
"""

from __future__ import annotations

import argparse
import os
import pathlib
import sys
import time
from typing import Union

import numpy as np

SHAPES = {
    # Qwen3-8B (config.json of Qwen/Qwen3-8B): 36 layers, GQA 32/8, head_dim 128, untied output
    "qwen3-8b": dict(arch="qwen3", n_layer=36, n_embd=4096, n_head=32, n_head_kv=8, head_dim=128, n_ff=12288,
                     n_vocab=151936, n_ctx_train=40960, rope_freq_base=1000000.0, rms_eps=1e-6),
    "qwen3-0.6b": dict(arch="qwen3", n_layer=28, n_embd=1024, n_head=16, n_head_kv=8, head_dim=128, n_ff=3072,
                       n_vocab=151936, n_ctx_train=40960, rope_freq_base=1000000.0, rms_eps=1e-6),
    # small enough for tests; same code path
    "small": dict(arch="qwen3", n_layer=2, n_embd=256, n_head=4, n_head_kv=2, head_dim=64, n_ff=512,
                  n_vocab=4096, n_ctx_train=40960, rope_freq_base=1000000.0, rms_eps=1e-6),
}

_Q8_BLOCK, _Q8_BYTES = 32, 34
_INT8_STD = float(np.sqrt(np.mean(np.arange(-127, 128, dtype=np.float64) ** 2)))   # ~73.6 for uniform [-127, 127]


def shape_bytes(shape: dict) -> int:
    """Tensor bytes of a Q8_0 model of this shape (norms in f32)."""
    s = shape
    q, kv = s["n_head"] * s["head_dim"], s["n_head_kv"] * s["head_dim"]
    q8 = lambda n_out, n_in: n_out * n_in // _Q8_BLOCK * _Q8_BYTES   # noqa: E731
    per_layer = (q8(q, s["n_embd"]) + 2 * q8(kv, s["n_embd"]) + q8(s["n_embd"], q) + 2 * q8(s["n_ff"], s["n_embd"])
                 + q8(s["n_embd"], s["n_ff"]) + 4 * (2 * s["n_embd"] + 2 * s["head_dim"]))
    return s["n_layer"] * per_layer + 2 * q8(s["n_vocab"], s["n_embd"]) + 4 * s["n_embd"]


def write_synth_gguf(path: Union[str, os.PathLike], shape: Union[str, dict] = "qwen3-8b", *, seed: int = 0,
                     progress: bool = False, **overrides) -> pathlib.Path:
    """Write a random-weight Q8_0 model of `shape` (a name in SHAPES or a dict of its fields) to `path`."""
    import gguf

    from .tiny import add_vocab, tiny_vocab

    if isinstance(shape, str):
        if shape not in SHAPES:
            raise ValueError(f"unknown shape {shape!r} (known: {', '.join(SHAPES)})")
        name = shape
        shape = dict(SHAPES[shape])
    else:
        name = "custom"
        shape = dict(shape)
    unknown = set(overrides) - set(SHAPES["small"])
    if unknown:
        raise ValueError(f"unknown shape field(s): {', '.join(sorted(unknown))}")
    shape.update(overrides)
    s = shape
    if s["arch"] != "qwen3":
        raise ValueError("only the qwen3 architecture is written (Q/K norms, no biases)")
    if s["n_head"] % s["n_head_kv"]:
        raise ValueError("n_head must be a multiple of n_head_kv")
    q_dim, kv_dim = s["n_head"] * s["head_dim"], s["n_head_kv"] * s["head_dim"]
    for width in (s["n_embd"], q_dim, s["n_ff"]):
        if width % _Q8_BLOCK:
            raise ValueError(f"Q8_0 needs input widths that are multiples of 32 (got {width})")

    tokens, scores, types = tiny_vocab(s["n_vocab"])
    rng = np.random.default_rng(seed)
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()

    w = gguf.GGUFWriter(str(path), s["arch"])
    w.add_name(f"synth-{name}")
    w.add_description(f"random Q8_0 weights of the {name} shape, for speed measurements "
                      f"(pytriatt.testing.synth, seed={seed})")
    w.add_file_type(gguf.LlamaFileType.MOSTLY_Q8_0)
    w.add_context_length(s["n_ctx_train"])
    w.add_embedding_length(s["n_embd"])
    w.add_block_count(s["n_layer"])
    w.add_feed_forward_length(s["n_ff"])
    w.add_head_count(s["n_head"])
    w.add_head_count_kv(s["n_head_kv"])
    w.add_key_length(s["head_dim"])
    w.add_value_length(s["head_dim"])
    w.add_rope_dimension_count(s["head_dim"])
    w.add_rope_freq_base(float(s["rope_freq_base"]))
    w.add_layer_norm_rms_eps(float(s["rms_eps"]))
    add_vocab(w, tokens, scores, types)

    # (name, kind, n_out, n_in): kind "q8" = a Q8_0 matrix (numpy shape (n_out, n_in)), "norm" = f32 vector
    plan = [("token_embd.weight", "q8", s["n_vocab"], s["n_embd"])]
    for i in range(s["n_layer"]):
        b = f"blk.{i}"
        plan += [(f"{b}.attn_norm.weight", "norm", s["n_embd"], 0),
                 (f"{b}.attn_q.weight", "q8", q_dim, s["n_embd"]),
                 (f"{b}.attn_k.weight", "q8", kv_dim, s["n_embd"]),
                 (f"{b}.attn_v.weight", "q8", kv_dim, s["n_embd"]),
                 (f"{b}.attn_q_norm.weight", "norm", s["head_dim"], 0),
                 (f"{b}.attn_k_norm.weight", "norm", s["head_dim"], 0),
                 (f"{b}.attn_output.weight", "q8", s["n_embd"], q_dim),
                 (f"{b}.ffn_norm.weight", "norm", s["n_embd"], 0),
                 (f"{b}.ffn_gate.weight", "q8", s["n_ff"], s["n_embd"]),
                 (f"{b}.ffn_up.weight", "q8", s["n_ff"], s["n_embd"]),
                 (f"{b}.ffn_down.weight", "q8", s["n_embd"], s["n_ff"])]
    plan += [("output_norm.weight", "norm", s["n_embd"], 0), ("output.weight", "q8", s["n_vocab"], s["n_embd"])]

    for tname, kind, n_out, n_in in plan:
        if kind == "q8":
            nbytes = n_out * n_in // _Q8_BLOCK * _Q8_BYTES
            w.add_tensor_info(tname, (n_out, n_in // _Q8_BLOCK * _Q8_BYTES), np.dtype(np.uint8), nbytes,
                              raw_dtype=gguf.GGMLQuantizationType.Q8_0)
        else:
            w.add_tensor_info(tname, (n_out,), np.dtype(np.float32), n_out * 4)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()

    # one pool of random int8 values; each matrix reads it from a random offset (values, not speed, differ)
    biggest = max(n_out * n_in for _, kind, n_out, n_in in plan if kind == "q8")
    pool = rng.integers(-127, 128, size=biggest + (1 << 20), dtype=np.int8)
    done, shown = 0, 0.0
    for tname, kind, n_out, n_in in plan:
        if kind == "q8":
            n_blocks = n_out * n_in // _Q8_BLOCK
            std = 1.0 if tname == "token_embd.weight" else 1.0 / np.sqrt(n_in)
            raw = np.empty((n_blocks, _Q8_BYTES), dtype=np.uint8)
            raw[:, :2] = np.frombuffer(np.float16(std / _INT8_STD).tobytes(), dtype=np.uint8)
            off = int(rng.integers(0, pool.size - n_blocks * _Q8_BLOCK + 1))
            raw[:, 2:] = pool[off:off + n_blocks * _Q8_BLOCK].view(np.uint8).reshape(n_blocks, _Q8_BLOCK)
            w.write_tensor_data(raw)
            done += raw.nbytes
            del raw
        else:
            w.write_tensor_data((1.0 + 0.05 * rng.standard_normal(n_out)).astype(np.float32))
        if progress and time.perf_counter() - shown > 1.0:
            shown = time.perf_counter()
            sys.stderr.write(f"\rsynth: {done / 2**30:6.2f} GiB written ({shown - t0:5.1f} s) ")
    w.close()
    if progress:
        sys.stderr.write(f"\rsynth: {done / 2**30:6.2f} GiB written ({time.perf_counter() - t0:5.1f} s)\n")
    return path


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m pytriatt.testing.synth", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("output", help="GGUF file to write")
    ap.add_argument("--shape", default="qwen3-8b", choices=sorted(SHAPES), help="model shape (default qwen3-8b)")
    for field in ("n_layer", "n_embd", "n_head", "n_head_kv", "head_dim", "n_ff", "n_vocab"):
        ap.add_argument(f"--{field.replace('_', '-')}", type=int, dest=field, help=f"override the shape's {field}")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    over = {k: v for k, v in vars(args).items() if k in SHAPES["small"] and v is not None}
    try:
        shape = dict(SHAPES[args.shape], **over)
        print(f"synth: {args.output}: {args.shape} shape {over or ''}, {shape_bytes(shape) / 2**30:.2f} GiB of tensors",
              file=sys.stderr)
        write_synth_gguf(args.output, args.shape, seed=args.seed, progress=True, **over)
    except (ValueError, OSError) as e:
        print(f"synth: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
