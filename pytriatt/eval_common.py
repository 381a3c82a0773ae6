"""Shared pieces of `pytriatt eval`: result rows, confidence intervals, policies run through
llama.cpp's eviction; the evaluation text and its tokens come from pytriatt.corpus.

Every task module (eval_tasks, eval_recall) builds on these; pytriatt/evaluate.py runs a task over
policies and budgets, pytriatt/cli/eval.py is the command line.
"""

from __future__ import annotations

import ctypes
import math
import os
import sys
from pathlib import Path
from typing import Dict, Iterable, Optional, Sequence, Union

import numpy as np

from . import _llama
# the evaluation text comes from pytriatt.corpus (default_text here is corpus.eval_text)
from .corpus import EVAL_TEXT_OFFSET, read_text, text_tokens  # noqa: F401
from .corpus import eval_text as default_text  # noqa: F401
from .errors import EvalError  # noqa: F401

# policies `pytriatt eval` knows are the contract's (pytriatt.policy); "tri@head" / "tri@layer" (and
# snapkv@...) run them per head: every KV head (of every layer) keeps its own tokens
from .policy import GRANULARITIES, PER_HEAD_POLICIES, POLICIES, c_params, cells_needed  # noqa: E402


def split_policy(name: str):
    """'tri@head' -> ('tri', 'head'); 'tri' -> ('tri', 'shared')."""
    base, _, gran = name.partition("@")
    return base, gran or "shared"
POSITION_MODES = ("gaps", "shift")
ROW_KEYS = ("model", "policy", "position", "budget", "task", "n", "metric", "value", "ci_low", "ci_high")

PathLike = Union[str, "os.PathLike[str]"]


# -- result rows ------------------------------------------------------------------------

def row(model: str, policy: str, position: Optional[str], budget: Optional[int], task: str, n: int,
        metric: str, value: float, ci: Optional[Sequence[float]] = None) -> dict:
    """One result: what was run (model, policy, position mode, budget, task), over how many
    samples (n), which metric and its value, and a 95% confidence interval where sampling
    is involved (None otherwise)."""
    lo, hi = (None, None) if ci is None else (float(ci[0]), float(ci[1]))
    return {"model": model, "policy": policy, "position": position if policy != "full" else None,
            "budget": None if policy == "full" else budget, "task": task, "n": int(n), "metric": metric,
            "value": float(value), "ci_low": lo, "ci_high": hi}


def wilson(k: int, n: int, z: float = 1.96) -> tuple:
    """Wilson score interval of a proportion k/n (95% by default); (0, 1) when n == 0."""
    if n <= 0:
        return (0.0, 1.0)
    p = k / n
    d = 1 + z * z / n
    c = (p + z * z / (2 * n)) / d
    h = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / d
    return (max(0.0, c - h), min(1.0, c + h))


def mean_ci(values: Iterable[float], z: float = 1.96) -> tuple:
    """Mean and its normal-approximation 95% interval (mean +- z * sd / sqrt(n)).

    With fewer than two values the interval is (mean, mean)."""
    v = np.asarray(list(values), dtype=np.float64)
    if v.size == 0:
        return float("nan"), (float("nan"), float("nan"))
    m = float(v.mean())
    if v.size < 2:
        return m, (m, m)
    h = z * float(v.std(ddof=1)) / math.sqrt(v.size)
    return m, (m - h, m + h)


# -- models -----------------------------------------------------------------------------

_models: Dict[tuple, object] = {}

# llama.cpp settings of the models and contexts the tasks open (pytriatt eval's -ngl, -t, -ctk, -ctv, -fa);
# evaluate(runtime=...) sets them for one run
RUNTIME: Dict[str, object] = dict(n_gpu_layers=0, n_threads=None, type_k=None, type_v=None, flash_attn=None)


def load_model(model_or_path):
    """A pytriatt.context.Model (loaded once per path, GPU layers and process)."""
    from .context import Model
    if isinstance(model_or_path, Model):
        return model_or_path
    path = os.fspath(Path(model_or_path).resolve())
    key = (path, RUNTIME["n_gpu_layers"])
    m = _models.get(key)
    if m is None or getattr(m, "ptr", None) is None:
        m = Model(path, n_gpu_layers=RUNTIME["n_gpu_layers"])
        _models[key] = m
    return m


def model_name(path: PathLike) -> str:
    """The short name of a model for result rows: its pytriatt model name, else the file stem."""
    from . import models
    p = Path(path)
    for name in models.MODELS:
        try:
            if models.model_path(name).resolve() == p.resolve():
                return name
        except (OSError, ValueError):
            pass
    return p.name[:-5] if p.name.endswith(".gguf") else p.name


# -- policies ---------------------------------------------------------------------------

def check_supported(policies: Sequence[str], shift: bool = False) -> None:
    """Refuse, in one line, policy names `pytriatt eval` does not know."""
    for name in policies:
        p, gran = split_policy(name)
        if p not in POLICIES:
            raise EvalError(f"unknown policy {name!r} (known: {', '.join(POLICIES)}, and tri@head, tri@layer, "
                            "snapkv@head, snapkv@layer for per-head eviction)")
        if gran not in GRANULARITIES or (gran != "shared" and p not in PER_HEAD_POLICIES):
            raise EvalError(f"policy {name!r}: per-head eviction is tri@head, tri@layer, snapkv@head or snapkv@layer")


def attach_policy(ctx, policy: str, budget: int, *, interval: int = 128, sink: int = 4, window: int = 1,
                  seed: int = 0, calib: Optional[PathLike] = None, shift: bool = False,
                  snap_window: int = 32, kv_agg: str = "max") -> None:
    """Attach an eviction policy to a pytriatt Context; it runs inside llama_decode.

    Like Context.set_kv_policy, plus the snapkv policy and the shift position mode of
    newer builds (refused with a clear message where the build lacks them)."""
    if policy == "full":
        return
    lc = _llama.require_patched("kv policy")
    check_supported([policy], shift)
    policy, gran = split_policy(policy)
    p = c_params(lc, policy, budget, interval=interval, sink=sink, window=window, per_head=gran, shift=shift,
                 calib=calib if calib is not None else ctx.model.path, seed=seed, kv_agg=kv_agg,
                 snap_window=snap_window if policy == "snapkv" else None)
    if lc.llama_set_kv_policy(ctx.ctx_ptr, ctypes.byref(p)) != 0:
        raise EvalError(f"policy {policy}: " + lc.llama_kv_policy_last_error().decode("utf-8", "replace"))


def open_context(model, policy: str, budget: Optional[int], n_tokens: int, *, interval: int = 128,
                 n_batch: Optional[int] = None, **policy_kw):
    """A Context for one sequence of up to n_tokens tokens with `policy` attached.

    With a policy the context holds only budget + max(interval, n_batch) cells (what
    Llama(kv_policy=...) allocates), so an eviction that failed would show as a full
    cache, not pass unnoticed."""
    from .context import Context
    n_batch = n_batch or interval
    if policy == "full" or budget is None:
        n_cells = n_tokens + 1
    else:
        if budget < 1:
            raise EvalError("budgets must be positive")
        n_cells = min(n_tokens + 1, cells_needed(budget, interval, n_batch))
    # a sliding-window model's local layers keep their window in their own cache, sized as without a policy
    n_swa = model._lc.llama_model_n_swa(model.ptr)
    n_ctx_swa = n_swa + n_batch if n_swa > 0 and policy != "full" and budget is not None else None
    ctx = Context(model, n_ctx=max(n_cells, 16), n_batch=n_batch, n_ctx_swa=n_ctx_swa,
                  n_threads=RUNTIME["n_threads"], type_k=RUNTIME["type_k"], type_v=RUNTIME["type_v"],
                  flash_attn=RUNTIME["flash_attn"])
    try:
        attach_policy(ctx, policy, budget or 0, interval=interval, **policy_kw)
    except Exception:
        ctx.close()
        raise
    return ctx


# -- numerics ---------------------------------------------------------------------------

def log_softmax_at(logits: np.ndarray, targets: Sequence[int]) -> np.ndarray:
    """-log p(target) for each row of logits [n, n_vocab] (float64 accumulation)."""
    lg = np.asarray(logits, dtype=np.float32)
    mx = lg.max(axis=1, keepdims=True)
    lse = np.log(np.exp(lg - mx).sum(axis=1, dtype=np.float64)) + mx[:, 0]
    return lse - lg[np.arange(len(targets)), np.asarray(targets)]


def say(progress: bool, msg: str) -> None:
    if progress:
        print(msg, file=sys.stderr, flush=True)
