"""Calibration: measure each layer's and query head's pre-RoPE query centre, per RoPE band.

The model runs through the patched llama.cpp over some text; the statistics are
accumulated in C++ inside decode (llama_triatt_capture, attached as the context's
eval callback), in double precision. The result is a pytriatt.core.Calibration,
which `pytriatt calibrate` embeds into a copy of the GGUF (docs/calibration-format.md).
"""

from __future__ import annotations

import ctypes
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Optional, Sequence

import numpy as np

from . import _llama
from .corpus import DEFAULT_SOURCE, default_text

# the calibration run, serve, eval and bench make when a model has none: one size, one cache
# (ensure_calibrated). smollm2-135m takes 37 s for it on 2 idle CPU cores (README); `pytriatt calibrate`
# uses the paper's 32768 tokens.
QUICK_TOKENS = 8192

# below this many tokens the statistics are noisy: `pytriatt calibrate` warns (measured with
# tools/calib_settle.py, docs/calibration.md "How many tokens")
RECOMMENDED_TOKENS = 2048


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
              progress: bool = True, warn: Optional[str] = None):
    """Run the model over `text` (default: Python's documentation) and return (Calibration, CaptureResult).
    warn: the option that sets max_tokens ("--tokens"): one line on stderr when fewer than RECOMMENDED_TOKENS
    tokens are read, saying what to change (None: silent)."""
    from .context import Model
    from .core import Calibration, RopeSpec, model_fingerprint

    if max_tokens <= 0:
        raise ValueError("--tokens must be positive")
    if n_ctx < 16:
        raise ValueError("--ctx must be at least 16")
    rope = RopeSpec.from_gguf(model_path)   # refuses architectures without a supported RoPE, clearly
    fingerprint = model_fingerprint(model_path)
    model = Model(model_path, n_gpu_layers=n_gpu_layers)
    try:
        if text is None:
            text = default_text()
        if not text.strip():
            raise ValueError("the calibration text is empty")
        tokens = model.tokenize(text, add_bos=False)[:max_tokens]
        if not tokens:
            raise ValueError("the calibration text produced no tokens")
        if warn and len(tokens) < RECOMMENDED_TOKENS:
            why, fix = ((f"{warn} {max_tokens}", f"raise {warn}") if len(tokens) == max_tokens
                        else ("all the text gives", "give a longer --text"))
            print(f"pytriatt: warning: calibrating on {len(tokens)} tokens ({why}): the statistics will be noisy; "
                  f"{RECOMMENDED_TOKENS} tokens or more are recommended ({fix}; docs/calibration.md)",
                  file=sys.stderr, flush=True)
        bos = model.lc.llama_vocab_bos(model.vocab)
        add_bos = bool(model.lc.llama_vocab_get_add_bos(model.vocab)) and bos >= 0
        windows = token_windows(tokens, n_ctx, bos if add_bos else None)
        total = sum(len(w) for w in windows)
        res = capture(model, windows, n_ctx=n_ctx, n_threads=n_threads, progress=progress, total=total)
        n_head_kv = model.lc.llama_model_n_head_kv(model.ptr)
        head_dim = rope.head_dim
    finally:
        model.close()
    cal = Calibration(res.q_mean, res.q_abs_mean, rope, n_head_kv=n_head_kv, head_dim=head_dim,
                      calib_tokens=res.n_tokens, calib_source=source, model_fingerprint=fingerprint)
    return cal, res


def write_sidecar(model_path, cal, dst, *, force: bool = True) -> Path:
    """A GGUF holding only metadata: the model's architecture and name and the triattention.* statistics.
    The policy reads statistics from any GGUF whose architecture and name match the model's (kv_calib=,
    --calib), so a calibration need not copy the model (8.7 GB for Qwen3-8B Q8_0)."""
    from . import gguf_io
    hdr = gguf_io.read_header(model_path)
    fields = {k: hdr.get(k) for k in ("general.architecture", "general.name") if hdr.get(k) is not None}
    fields.update(cal.gguf_fields())
    Path(dst).parent.mkdir(parents=True, exist_ok=True)
    return gguf_io.write_metadata_only(dst, fields, force=force)


def _recipe_key(n_ctx: int) -> str:
    """What decides an on-the-fly calibration besides the model and its size, as a short hash: the
    statistics' format version, the text (Python's documentation differs between Python versions), the
    window, and the code that captures the queries (pytriatt's and the patched llama-cpp-python's versions).
    A cached calibration made under another recipe is stale, and never reused."""
    import hashlib
    import json

    from . import __version__
    from .calibration import CALIB_VERSION
    llama_cpp = _llama.import_llama_cpp()
    recipe = {"format": CALIB_VERSION, "source": DEFAULT_SOURCE, "n_ctx": n_ctx,
              "text": hashlib.sha256(default_text().encode("utf-8")).hexdigest(),
              "pytriatt": __version__, "llama_cpp": getattr(llama_cpp, "__version__", "?")}
    return hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:12]


def ensure_calibrated(model_path, *, tokens: int = QUICK_TOKENS, n_gpu_layers: int = 0, n_ctx: int = 2048,
                      progress: bool = True) -> Path:
    """A GGUF carrying the model's TriAttention statistics: the model itself if it carries them, else a
    statistics-only sidecar (write_sidecar) calibrated once on `tokens` tokens of Python's documentation and
    cached under $PYTRIATT_CACHE/calibrated, keyed by the model file's sha256, the calibration size and
    the recipe (_recipe_key: format version, text, window, versions). The one cache
    `pytriatt run/serve --calibrate`, `eval` and `bench` share."""
    from . import gguf_io, models
    model_path = Path(model_path)
    if gguf_io.has_prefix(model_path, "triattention."):
        return model_path
    if tokens < 1:
        raise ValueError(f"--calib-tokens must be positive, got {tokens}")
    if progress:
        print(f"pytriatt: {model_path.name} carries no TriAttention calibration; hashing it to look for a "
              f"cached one", file=sys.stderr)
    stem = "".join(c if c.isalnum() or c in "-_." else "-" for c in model_path.stem)
    n_ctx = min(n_ctx, max(tokens, 16))
    key = f"{models.sha256_file(model_path)[:16]}-{_recipe_key(n_ctx)}"
    dst = models.cache_dir() / "calibrated" / f"{stem}-{key}-{tokens}.calib.gguf"
    if dst.is_file() and gguf_io.has_prefix(dst, "triattention."):
        return dst
    if progress:
        print(f"pytriatt: calibrating {model_path.name} on {tokens} tokens (once; cached as {dst}; "
              f"--calib-tokens sets how many)", file=sys.stderr)
    cal, _ = calibrate(model_path, max_tokens=tokens, n_ctx=n_ctx, n_gpu_layers=n_gpu_layers, progress=progress,
                       warn="--calib-tokens" if progress else None)
    return write_sidecar(model_path, cal, dst)


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
