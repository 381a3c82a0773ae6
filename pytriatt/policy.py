"""The KV eviction policy contract: the names, options and defaults every entry point shares.

`pytriatt run/serve/eval/bench`, `pytriatt.context.Context.set_kv_policy` and the
evaluation harness all validate and build a policy here, so the rules (which policy
takes which option, how many cells a budget needs) have one owner. The C side
(llama_kv_policy_params in the patched llama.h) is the same contract in C.
"""

from __future__ import annotations

import ctypes
import os
from typing import Optional, Union

from .errors import UserError

POLICIES = ("full", "tri", "streaming", "random", "snapkv")
EVICTING = POLICIES[1:]
PER_HEAD_POLICIES = ("tri", "snapkv")     # the policies that rank tokens, so can rank them per head

DEFAULT_INTERVAL = 128
DEFAULT_SINK = 4
# -1: the default rules of libllama's llama_kv_policy_resolve, whose values pytriatt._core computes
# (triatt_default_window / triatt_default_horizon; resolved_window / resolved_horizon below)
DEFAULT_WINDOW = -1
DEFAULT_HORIZON = -1
PAPER_HORIZON = 65536    # the TriAttention paper's D = {1, 2, 4, ..., 2^16}
# named settings of a policy (`pytriatt eval --policies tri/paper`): the paper's exact protections
PRESETS = {"paper": dict(window=1, horizon=PAPER_HORIZON)}

# llama_kv_policy_params.granularity: what per_head= / kv_per_head= / --per-head / tri@... accept
GRANULARITIES = {"shared": 0, "head": 1, "layer": 2}

# KV cache types: ggml type id, bytes per block, values per block (ggml.h / ggml.c type traits)
KV_CACHE_TYPES = {
    "f32": (0, 4, 1), "f16": (1, 2, 1), "bf16": (30, 2, 1), "q8_0": (8, 34, 32), "q4_0": (2, 18, 32),
    "q4_1": (3, 20, 32), "q5_0": (6, 22, 32), "q5_1": (7, 24, 32), "iq4_nl": (20, 18, 32),
}
# quantized V is stored untransposed, which llama.cpp does only with flash attention
UNQUANTIZED = ("f32", "f16", "bf16")


def granularity(per_head: Union[bool, str, None]) -> int:
    """The C enum value of per_head: False/None/"shared" (one token set), True or "head" (one per KV head,
    shared by the layers), "layer" (one per KV head of each layer)."""
    key = {False: "shared", True: "head"}[per_head] if isinstance(per_head, bool) else (per_head or "shared")
    if key not in GRANULARITIES:
        raise UserError(f"per_head must be False, True (or 'head') or 'layer', got {per_head!r}")
    return GRANULARITIES[key]


def cells_needed(lc, budget: int, interval: int, n_batch: int) -> int:
    """KV cells a sequence under an evicting policy needs: the budget, plus the tokens that arrive before
    the next round (an interval, or a whole batch when a batch is longer). libllama owns the rule
    (llama_kv_policy_n_cells, which llama.cpp's common and Llama(kv_policy=...) use too)."""
    p = lc.llama_kv_policy_default_params()
    p.budget, p.interval = int(budget), int(interval)
    return int(lc.llama_kv_policy_n_cells(ctypes.byref(p), int(n_batch)))


def cells_needed_swa(lc, model_ptr, n_ubatch: int, n_seq: int = 1) -> int:
    """KV cells a sliding-window model's local cache needs to keep its window next to an evicting policy's
    budget-sized cache (0: the model has none). libllama owns the rule (llama_kv_policy_n_cells_swa)."""
    p = lc.llama_context_default_params()
    p.n_ubatch, p.n_seq_max = int(n_ubatch), int(n_seq)
    return int(lc.llama_kv_policy_n_cells_swa(model_ptr, ctypes.byref(p)))


def resolved_window(policy: str, budget: int, sink: int = DEFAULT_SINK, interval: int = DEFAULT_INTERVAL,
                    window: int = DEFAULT_WINDOW) -> int:
    """The recent window a policy protects: window itself, or for -1 the rule (tri: min(interval,
    (budget - sink) / 2), at least 1; the other policies: 1), computed by the C++ core as libllama does."""
    if window >= 0:
        return window
    from . import _core
    return int(_core.default_window(budget, sink, interval)) if policy == "tri" else 1


def resolved_horizon(budget: int, interval: int = DEFAULT_INTERVAL, horizon: int = DEFAULT_HORIZON) -> int:
    """The largest future distance tri scores for: horizon itself, or for -1 the rule of the C++ core."""
    if horizon >= 1:
        return horizon
    from . import _core
    return int(_core.default_horizon(budget, interval))


def validate(policy: str, budget: Optional[int], *, interval: int = DEFAULT_INTERVAL, sink: int = DEFAULT_SINK,
             window: int = DEFAULT_WINDOW, per_head: Union[bool, str, None] = None, shift: bool = False,
             flag: str = "--", horizon: int = DEFAULT_HORIZON) -> None:
    """Refuse, with what to do, the option combinations that cannot mean what was asked.
    flag: how options are spelled in messages ("--" for the command line, "" for keyword arguments)."""
    def opt(name: str) -> str:
        return f"{flag}{name.replace('_', '-') if flag == '--' else name}"
    if policy not in POLICIES:
        raise UserError(f"unknown KV policy {policy!r} (known: {', '.join(POLICIES)})")
    if policy == "full":
        if budget is not None:
            raise UserError(f"{opt('policy')} full keeps every token, so {opt('budget')} {budget} would mean nothing: "
                            f"drop it, or pick an evicting policy ({', '.join(EVICTING)})")
        return
    if budget is None:
        raise UserError(f"{opt('policy')} {policy} needs {opt('budget')} N (the KV tokens to keep)")
    for name, value in (("budget", budget), ("interval", interval)):
        if value < 1:
            raise UserError(f"{opt(name)} {value} is out of range: it must be at least 1")
    if sink < 0:
        raise UserError(f"{opt('sink')} {sink} is out of range: it must be at least 0")
    if window < -1:
        raise UserError(f"{opt('window')} {window} is out of range: it must be at least 0 (-1: the default rule)")
    if horizon < -1 or horizon == 0:
        raise UserError(f"{opt('horizon')} {horizon} is out of range: it must be at least 1 (-1: the default rule)")
    w = max(resolved_window(policy, budget, sink, interval, window), 1)
    if sink + w > budget:
        raise UserError(f"{opt('sink')} {sink} + {opt('window')} {w} exceed {opt('budget')} {budget}: "
                        f"the protected tokens must fit in the budget")
    if per_head not in (None, False, "shared"):
        granularity(per_head)
        if policy not in PER_HEAD_POLICIES:
            raise UserError(f"{opt('per_head')} ranks tokens per head, which only "
                            f"{' and '.join(PER_HEAD_POLICIES)} do (not {policy})")
        if shift:
            raise UserError(f"{opt('per_head')} cannot be combined with {opt('shift')} (a cell holds a different token "
                            "in each head, so no single position shift is right for it): drop one of them")


def c_params(lc, policy: str, budget: int, *, interval: int = DEFAULT_INTERVAL, sink: int = DEFAULT_SINK,
             window: int = DEFAULT_WINDOW, protect_prompt: bool = False, per_head: Union[bool, str, None] = None,
             shift: bool = False, calib: Union[str, os.PathLike, None] = None, seed: int = 0, n_threads: int = 0,
             kv_agg: str = "max", snap_window: Optional[int] = None, horizon: int = DEFAULT_HORIZON):
    """llama_kv_policy_params for an evicting policy (the struct keeps the calibration path's bytes alive)."""
    validate(policy, budget, interval=interval, sink=sink, window=window, per_head=per_head, shift=shift, flag="",
             horizon=horizon)
    if policy == "full":
        raise UserError("policy full has no parameters: detach the policy instead")
    types = {"tri": lc.LLAMA_KV_POLICY_TRI, "streaming": lc.LLAMA_KV_POLICY_STREAMING,
             "random": lc.LLAMA_KV_POLICY_RANDOM, "snapkv": lc.LLAMA_KV_POLICY_SNAPKV}
    if kv_agg not in ("max", "mean"):
        raise UserError(f"kv_agg must be 'max' or 'mean', got {kv_agg!r}")
    p = lc.llama_kv_policy_default_params()
    p.type, p.budget, p.interval = types[policy], int(budget), int(interval)
    p.n_sink, p.n_window, p.protect_prompt = int(sink), int(window), bool(protect_prompt)
    p.kv_agg_mean, p.seed, p.n_threads = kv_agg == "mean", seed & 0xFFFFFFFF, int(n_threads)
    p.shift = bool(shift)
    p.horizon = int(horizon)
    p.granularity = granularity(per_head)
    if snap_window is not None:
        p.snap_window = int(snap_window)
    if calib is not None:
        p.calib_path = os.fsencode(os.fspath(calib))
    return p
