"""Shared pieces of `pytriatt eval`: result rows, confidence intervals, models and contexts with a policy
attached (it evicts inside llama_decode), greedy decoding under a policy.

Every task module (nll, passkey, agree, dfs, recall) builds on these; pytriatt.evaluation.runner runs a
task over policies and budgets, pytriatt/cli/eval.py is the command line. The evaluation text and its
tokens come from pytriatt.corpus.
"""

from __future__ import annotations

import ctypes
import math
import os
import sys
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence, Tuple, Union

import numpy as np

from .. import _llama
# the task modules take read_text and text_tokens from here, with the rest of their shared pieces
from ..corpus import read_text, text_tokens  # noqa: F401
from ..errors import EvalError, UserError

# policies `pytriatt eval` knows are the contract's (pytriatt.policy); "tri@head" / "tri@layer" (and
# snapkv@...) run them per head: every KV head (of every layer) keeps its own tokens
from ..policy import (DEFAULT_HORIZON, DEFAULT_INTERVAL, DEFAULT_SINK, DEFAULT_SNAP_WINDOW, DEFAULT_WINDOW,
                      c_params, cells_needed, cells_needed_swa, parse_variant)  # noqa: E402


def split_policy(name: str):
    """'tri@head' -> ('tri', 'head'); 'tri' -> ('tri', 'shared') (pytriatt.policy.parse_variant)."""
    v = _variant(name)
    return v.policy, v.granularity


def policy_settings(name: str) -> dict:
    """The window / horizon a policy variant sets after '/' ('tri/paper', 'tri/w=32/h=1024'), which override
    --window / --horizon for that policy."""
    return dict(_variant(name).settings)


def _variant(name: str):
    try:
        v = parse_variant(name)
    except UserError as e:
        raise EvalError(str(e)) from None
    if v.shift:
        raise EvalError(f"policy {name!r}: eval measures every policy with gaps and, with --shift, shifted too: "
                        "drop +shift and pass --shift")
    if v.cache_type:
        raise EvalError(f"policy {name!r}: eval runs every policy with one cache type: drop :{v.cache_type} and "
                        "pass -ctk/-ctv")
    return v


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
    from ..context import Model
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
    from .. import models
    p = Path(path)
    for name in models.MODELS:
        try:
            if models.model_path(name).resolve() == p.resolve():
                return name
        except (OSError, ValueError):
            pass
    return p.name[:-5] if p.name.endswith(".gguf") else p.name


# -- policies ---------------------------------------------------------------------------

def check_supported(policies: Sequence[str]) -> None:
    """Refuse, in one line, policy names `pytriatt eval` does not know."""
    for name in policies:
        _variant(name)


def attach_policy(ctx, policy: str, budget: int, *, interval: int = DEFAULT_INTERVAL, sink: int = DEFAULT_SINK,
                  window: int = DEFAULT_WINDOW, seed: int = 0, calib: Optional[PathLike] = None, shift: bool = False,
                  snap_window: int = DEFAULT_SNAP_WINDOW, kv_agg: str = "max", horizon: int = DEFAULT_HORIZON) -> None:
    """Attach an eviction policy to a pytriatt Context; it runs inside llama_decode.

    Like Context.set_kv_policy, plus the snapkv policy and the shift position mode of
    newer builds (refused with a clear message where the build lacks them)."""
    if policy == "full":
        return
    lc = _llama.require_patched("kv policy")
    check_supported([policy])
    settings = dict(dict(window=window, horizon=horizon), **policy_settings(policy))
    policy, gran = split_policy(policy)
    p = c_params(lc, policy, budget, interval=interval, sink=sink, per_head=gran, shift=shift,
                 calib=calib if calib is not None else ctx.model.path, seed=seed, kv_agg=kv_agg,
                 snap_window=snap_window if policy == "snapkv" else None, **settings)
    if lc.llama_set_kv_policy(ctx.ctx_ptr, ctypes.byref(p)) != 0:
        raise EvalError(f"policy {policy}: " + lc.llama_kv_policy_last_error().decode("utf-8", "replace"))


def open_context(model, policy: str, budget: Optional[int], n_tokens: int, *, interval: int = DEFAULT_INTERVAL,
                 n_batch: Optional[int] = None, **policy_kw):
    """A Context for one sequence of up to n_tokens tokens with `policy` attached.

    With a policy the context holds only budget + max(interval, n_batch) cells (what
    Llama(kv_policy=...) allocates), so an eviction that failed would show as a full
    cache, not pass unnoticed."""
    from ..context import Context
    n_batch = n_batch or interval
    if policy == "full" or budget is None:
        n_cells = n_tokens + 1
    else:
        if budget < 1:
            raise EvalError("budgets must be positive")
        n_cells = min(n_tokens + 1, cells_needed(model.lc, budget, interval, n_batch))
    # a sliding-window model's local layers keep their window in their own cache, sized as without a policy
    n_ctx_swa = None
    if policy != "full" and budget is not None:
        n_ctx_swa = cells_needed_swa(model.lc, model.ptr, n_batch) or None
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


# -- what the tasks share --------------------------------------------------------------

# keyword arguments every task passes through to the policy (attach_policy)
POLICY_KW = ("sink", "window", "horizon", "seed", "calib", "shift", "snap_window", "kv_agg")


def policy_kw(kw: dict) -> dict:
    return {k: kw[k] for k in POLICY_KW if k in kw}


def position_mode(policy: str, kw: dict) -> Optional[str]:
    return None if policy == "full" else ("shift" if kw.get("shift") else "gaps")


def result_name(model, kw: dict) -> str:
    return kw.get("name") or model_name(model.path)


def prefill(ctx, prompt: Sequence[int], interval: int) -> np.ndarray:
    """Decode the prompt in chunks of `interval` (eviction between them); the last token's logits."""
    logits = None
    for s in range(0, len(prompt), interval):
        logits = ctx.decode(list(prompt[s:s + interval]), logits="last")
    return logits


def greedy(model, prompt: Sequence[int], n: int, policy: str = "full", budget: Optional[int] = None, *,
           interval: int = 128, force: Optional[Sequence[int]] = None, stop: Sequence[int] = (),
           **kw) -> Tuple[List[int], List[int]]:
    """Greedy decoding, one token per llama_decode as in a generation, with the policy active.

    Returns (argmax at each step, tokens fed back). With `force` the given tokens are fed
    back instead of the argmax (teacher forcing): up to the first step where they differ
    this is exactly the free greedy generation. Stops after n steps or at a `stop` token."""
    model = load_model(model)
    preds, fed = [], []
    with open_context(model, policy, budget, len(prompt) + n + 1, interval=interval, **policy_kw(kw)) as ctx:
        logits = prefill(ctx, prompt, interval)
        for i in range(n):
            tok = int(np.argmax(logits))
            preds.append(tok)
            nxt = tok if force is None else int(force[i])
            fed.append(nxt)
            if force is None and tok in stop:
                break
            if i + 1 < n:
                logits = ctx.decode([nxt], logits="last")
    return preds, fed


def model_detokenize(model, tokens: Sequence[int]) -> str:
    lc = model.lc
    out = bytearray()
    buf = ctypes.create_string_buffer(64)
    for t in tokens:
        n = lc.llama_token_to_piece(model.vocab, int(t), buf, len(buf), 0, False)
        if n > 0:
            out += buf.raw[:n]
    return out.decode("utf-8", "replace")


def clip01(ci):
    return (max(0.0, ci[0]), min(1.0, ci[1]))
