"""Calibration: measure each layer's and query head's pre-RoPE query centre, per RoPE band.

The model runs through the patched llama.cpp over some text; the statistics are
accumulated in C++ inside decode (llama_triatt_capture, attached as the context's
eval callback), in double precision. The result is a pytriatt.core.Calibration,
which `pytriatt calibrate` embeds into a copy of the GGUF (docs/calibration-format.md).
"""

from __future__ import annotations

import ctypes
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Optional, Sequence

import numpy as np

from . import _llama

DEFAULT_SOURCE = "pydoc_data.topics"


def default_text() -> str:
    """Python's own documentation topics (~1 MB of English prose), shipped with every Python."""
    from pydoc_data import topics
    return "\n\n".join(topics.topics[k] for k in sorted(topics.topics))


def read_texts(files: Sequence[str | os.PathLike]) -> str:
    parts = []
    for f in files:
        p = Path(f)
        if p.is_dir():
            raise ValueError(f"{p} is a directory; --text takes text files")
        if not p.is_file():
            raise FileNotFoundError(f"text file not found: {p}")
        parts.append(p.read_text(encoding="utf-8", errors="replace"))
    text = "\n\n".join(parts)
    if not text.strip():
        raise ValueError("the calibration text is empty: give --text files with some prose, "
                         "or leave --text out to use Python's documentation")
    return text


class _Progress:
    """A one-line progress bar on stderr: tokens, tokens/s, ETA."""

    def __init__(self, total: int, enabled: bool = True):
        self.total, self.enabled, self.t0, self.done = total, enabled and total > 0, time.perf_counter(), 0

    def update(self, n: int) -> None:
        self.done += n
        if not self.enabled:
            return
        dt = time.perf_counter() - self.t0
        rate = self.done / dt if dt > 0 else 0.0
        eta = (self.total - self.done) / rate if rate > 0 else 0.0
        width = 28
        fill = int(width * self.done / self.total)
        sys.stderr.write(f"\rcalibrating [{'#' * fill}{'.' * (width - fill)}] {self.done}/{self.total} tokens "
                         f"{rate:7.1f} tok/s  ETA {eta:5.0f} s ")
        sys.stderr.flush()

    def close(self) -> None:
        if self.enabled:
            sys.stderr.write("\n")


@dataclass
class CaptureResult:
    q_mean: np.ndarray        # complex128 [n_layer, n_head, n_freq]
    q_abs_mean: np.ndarray    # float64 [n_layer, n_head, n_freq]
    n_tokens: int             # query vectors per layer (the largest over layers)
    tokens_per_layer: np.ndarray
    seconds: float


def capture(model, windows: Iterable[Sequence[int]], *, n_ctx: int, n_batch: int = 512,
            n_threads: Optional[int] = None, progress: bool = True, total: int = 0) -> CaptureResult:
    """Decode each window of tokens as a fresh sequence (positions 0..) and accumulate the statistics.

    model: a pytriatt.context.Model."""
    from .context import Context

    lc = _llama.require_patched("calibration capture")
    cap = lc.llama_triatt_capture_init(model.ptr)
    if not cap:
        raise RuntimeError("llama_triatt_capture_init failed")
    bar = _Progress(total, progress)
    t0 = time.perf_counter()
    try:
        with Context(model, n_ctx=n_ctx, n_batch=min(n_batch, n_ctx), n_threads=n_threads,
                     cb_eval=lc.llama_triatt_capture_cb_eval, cb_eval_user_data=cap) as ctx:
            for win in windows:
                if not len(win):
                    continue
                ctx.clear()
                for start in range(0, len(win), ctx.n_batch):
                    chunk = list(win[start:start + ctx.n_batch])
                    ctx.decode(chunk, pos0=start, logits="none")
                    bar.update(len(chunk))
        seconds = time.perf_counter() - t0
        bar.close()
        missed = lc.llama_triatt_capture_n_missed(cap)
        if missed:
            raise RuntimeError(f"{missed} query RoPE nodes could not be read: this model's graph is not "
                               f"one the calibration understands")
        n_layer, n_head = lc.llama_model_n_layer(model.ptr), lc.llama_model_n_head(model.ptr)
        n_freq = lc.llama_triatt_capture_n_freq(cap)
        if n_freq <= 0:
            raise ValueError("no RoPE'd queries were seen: the model has no rotary attention "
                             "(TriAttention needs RoPE), or no token was decoded")
        shape = (n_layer, n_head, n_freq)
        re, im, ab = (np.zeros(shape, np.float64) for _ in range(3))
        per_layer = np.zeros(n_layer, np.uint64)
        dp = ctypes.POINTER(ctypes.c_double)
        n = lc.llama_triatt_capture_get(cap, re.ctypes.data_as(dp), im.ctypes.data_as(dp), ab.ctypes.data_as(dp),
                                        per_layer.ctypes.data_as(ctypes.POINTER(ctypes.c_uint64)), n_freq)
        if n < 0:
            raise RuntimeError("llama_triatt_capture_get failed")
    finally:
        lc.llama_triatt_capture_free(cap)
    return CaptureResult(re + 1j * im, ab, int(n), per_layer, seconds)


def token_windows(tokens: Sequence[int], n_ctx: int, bos: Optional[int]) -> list[list[int]]:
    """Split a token stream into windows of n_ctx tokens, each starting with BOS when the model uses one."""
    step = n_ctx - (1 if bos is not None else 0)
    out = []
    for i in range(0, len(tokens), step):
        w = list(tokens[i:i + step])
        out.append(([bos] if bos is not None else []) + w)
    return out


def calibrate(model_path, *, text: Optional[str] = None, source: str = DEFAULT_SOURCE, max_tokens: int = 32768,
              n_ctx: int = 4096, n_gpu_layers: int = 0, n_threads: Optional[int] = None,
              progress: bool = True):
    """Run the model over `text` (default: Python's documentation) and return (Calibration, CaptureResult)."""
    from .context import Model
    from .core import Calibration, RopeSpec, model_fingerprint

    if max_tokens <= 0:
        raise ValueError("--tokens must be positive")
    if n_ctx < 16:
        raise ValueError("--ctx must be at least 16")
    from .core import _reader

    header = _reader(model_path)   # parsed once (after a bounds-checked look): the RoPE and the fingerprint read it
    rope = RopeSpec.from_gguf(header)   # refuses architectures without a supported RoPE, clearly
    fingerprint = model_fingerprint(header)
    model = Model(model_path, n_gpu_layers=n_gpu_layers)
    try:
        if text is None:
            text = default_text()
        if not text.strip():
            raise ValueError("the calibration text is empty")
        tokens = model.tokenize(text, add_bos=False)[:max_tokens]
        if not tokens:
            raise ValueError("the calibration text produced no tokens")
        bos = model._lc.llama_vocab_bos(model.vocab)
        add_bos = bool(model._lc.llama_vocab_get_add_bos(model.vocab)) and bos >= 0
        windows = token_windows(tokens, n_ctx, bos if add_bos else None)
        total = sum(len(w) for w in windows)
        res = capture(model, windows, n_ctx=n_ctx, n_threads=n_threads, progress=progress, total=total)
        n_head_kv = model._lc.llama_model_n_head_kv(model.ptr)
        head_dim = rope.head_dim
    finally:
        model.close()
    cal = Calibration(res.q_mean, res.q_abs_mean, rope, n_head_kv=n_head_kv, head_dim=head_dim,
                      calib_tokens=res.n_tokens, calib_source=source, model_fingerprint=fingerprint)
    return cal, res


def merge(calibrations: Sequence) -> "object":
    """Merge statistics of the same model from several runs, weighted by their token counts."""
    from .core import Calibration

    if not calibrations:
        raise ValueError("nothing to merge")
    first = calibrations[0]
    for c in calibrations[1:]:
        if c.model_fingerprint != first.model_fingerprint:
            raise ValueError(f"cannot merge statistics of different models: {first.model_fingerprint} "
                             f"and {c.model_fingerprint}")
        if c.q_mean.shape != first.q_mean.shape:
            raise ValueError(f"cannot merge statistics of different shapes: {first.q_mean.shape} "
                             f"and {c.q_mean.shape}")
    w = np.array([float(c.calib_tokens) for c in calibrations])
    if w.sum() <= 0:
        raise ValueError("the statistics to merge carry no token counts (triattention.calib_tokens)")
    q_mean = sum(wi * c.q_mean.astype(np.complex128) for wi, c in zip(w, calibrations)) / w.sum()
    q_abs = sum(wi * c.q_abs_mean.astype(np.float64) for wi, c in zip(w, calibrations)) / w.sum()
    sources = []
    for c in calibrations:
        if c.calib_source not in sources:
            sources.append(c.calib_source)
    return Calibration(q_mean, q_abs, first.rope, n_head_kv=first.n_head_kv, head_dim=first.head_dim,
                       calib_tokens=int(w.sum()), calib_source=" + ".join(sources),
                       model_fingerprint=first.model_fingerprint)


# -- the `pytriatt calibrate` command -------------------------------------------------

CLI_HELP = """\
Run the model over calibration text and write a copy of its GGUF that carries the
TriAttention statistics (triattention.* metadata; the tensors are copied unchanged).
The input is never modified; the output appears only once complete.

examples:
  pytriatt calibrate model.gguf -o model.tri.gguf                 # Python's docs, 32768 tokens
  pytriatt calibrate model.gguf -o model.tri.gguf --text a.txt b.txt --tokens 65536 -ngl 99
  pytriatt calibrate model.gguf -o model.tri.gguf --merge run1.tri.gguf run2.tri.gguf
"""


def add_parser(sub) -> None:
    from .cliargs import add_model_argument
    import argparse

    p = sub.add_parser("calibrate", help="measure the query statistics of a model and embed them in a GGUF copy",
                       description=CLI_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_argument(p)
    p.add_argument("-o", "--output", required=True, help="the GGUF to write (never the input)")
    p.add_argument("--text", nargs="+", metavar="FILE", help="calibration text files (default: Python's "
                   "documentation, pydoc_data.topics)")
    p.add_argument("--tokens", type=int, default=32768, help="tokens of text to use (default 32768, as the paper; "
                                                               "smollm2-135m calibrates at about 140 tokens/s on 2 "
                                                               "CPU cores)")
    p.add_argument("-c", "--ctx-size", "--ctx", dest="ctx", type=int, default=4096, help="window length: the text is decoded in windows of "
                   "this many tokens (default 4096)")
    p.add_argument("-ngl", "--n-gpu-layers", type=int, default=0, help="layers to offload to the GPU")
    p.add_argument("-t", "--threads", type=int, default=None, help="CPU threads (default: all cores)")
    p.add_argument("--merge", nargs="+", metavar="GGUF", help="instead of running the model, merge the "
                   "statistics these calibrated files carry (same model), weighted by their token counts")
    p.add_argument("--force", action="store_true", help="overwrite an existing output file")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")


def cmd_calibrate(args, resolve_model) -> dict:
    """Run `pytriatt calibrate`; returns the summary (printed by the caller). Errors raise ValueError & co."""
    from . import gguf_io, modelinfo
    from .core import Calibration, model_fingerprint

    src = resolve_model(args.model)
    dst = Path(args.output).expanduser()
    gguf_io.read_header(src)                    # a corrupt or truncated input fails here, in one line
    gguf_io.check_output(src, dst, args.force)  # ... and an unusable output before an hour of work
    carried = gguf_io.has_prefix(src, "triattention.")

    if args.merge:
        if args.text:
            raise ValueError("--merge combines existing statistics; it takes no --text")
        fp = model_fingerprint(src)
        cals = []
        for m in args.merge:
            c = Calibration.from_gguf(m, model=src, check_fingerprint=False)
            if c.model_fingerprint != fp:
                raise ValueError(f"{m} holds statistics of another model ({c.model_fingerprint}); "
                                 f"{src} is {fp}: merge only runs of the same model")
            cals.append(c)
        cal, res = merge(cals), None
    else:
        text = read_texts(args.text) if args.text else None
        source = ", ".join(Path(t).name for t in args.text) if args.text else DEFAULT_SOURCE
        cal, res = calibrate(src, text=text, source=source, max_tokens=args.tokens, n_ctx=args.ctx,
                             n_gpu_layers=args.n_gpu_layers, n_threads=args.threads,
                             progress=not (args.quiet or args.json))
    written = gguf_io.write_with_metadata(src, dst, cal.gguf_fields(), force=args.force)
    summary = {
        "input": str(src), "output": str(dst), "tokens": cal.calib_tokens, "source": cal.calib_source,
        "merged": [str(m) for m in args.merge] if args.merge else None,
        "seconds": round(res.seconds, 2) if res else None,
        "tokens_per_s": round(res.n_tokens / res.seconds, 1) if res and res.seconds > 0 else None,
        "replaced_existing": bool(carried or written.get("replaced")),
        "fingerprint": cal.model_fingerprint,
        "profile": modelinfo.concentration_profile(cal),
    }
    return summary


def format_summary(s: dict) -> str:
    from . import modelinfo

    lines = []
    if s["replaced_existing"]:
        lines.append(f"note: {s['input']} already carried TriAttention statistics; {s['output']} has the new ones")
    how = (f"merged {len(s['merged'])} files" if s["merged"]
           else f"{s['tokens']} tokens of {s['source']} in {s['seconds']} s ({s['tokens_per_s']} tok/s)")
    lines.append(f"wrote {s['output']}: {how}")
    lines.append(modelinfo.format_profile(s["profile"]))
    return "\n".join(lines)
