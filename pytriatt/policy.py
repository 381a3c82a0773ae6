"""The KV eviction policy contract as Python sees it: the C++ core's (cpp/triatt-policy.h) table, defaults
and rules, read from pytriatt._core.

`pytriatt run/serve/eval/bench`, `pytriatt.context.Context.set_kv_policy` and the evaluation harness
validate and build a policy here; libllama, llama.cpp's --kv-* flags and Llama(kv_*=) read the same core
through llama_kv_policy_check, so every front end accepts and refuses the same settings with one message.
"""

from __future__ import annotations

import ctypes
import os
import re
from dataclasses import dataclass, field
from typing import Optional, Union

from . import _core
from .errors import UserError

_TABLE = tuple(_core.policy_table())
POLICIES = tuple(row["name"] for row in _TABLE)                        # in llama_kv_policy_type order
EVICTING = tuple(row["name"] for row in _TABLE if row["evicts"])
SCORING_POLICIES = tuple(row["name"] for row in _TABLE if row["scores_keys"])
PER_HEAD_POLICIES = tuple(row["name"] for row in _TABLE if row["per_head"])
CALIBRATED_POLICIES = tuple(row["name"] for row in _TABLE if row["needs_calib"])
SUMMARIES = {row["name"]: row["summary"] for row in _TABLE}

_DEFAULTS = _core.PolicySettings()
DEFAULT_BUDGET = _DEFAULTS.budget
DEFAULT_INTERVAL = _DEFAULTS.interval
DEFAULT_SINK = _DEFAULTS.sink
DEFAULT_WINDOW = _DEFAULTS.window        # -1: the rule (resolved_window)
DEFAULT_HORIZON = _DEFAULTS.horizon      # -1: the rule (resolved_horizon)
DEFAULT_SNAP_WINDOW = _DEFAULTS.snap_window
PAPER_HORIZON = int(_core.DEFAULT_OFFSETS_MAX)    # the TriAttention paper's D = {1, 2, 4, ..., 2^16}
# named settings of a policy (`pytriatt eval --policies tri/paper`): the paper's exact protections
PRESETS = {"paper": dict(window=1, horizon=PAPER_HORIZON)}

# llama_kv_policy_params.granularity: what per_head= / kv_per_head= / --per-head / tri@... accept
GRANULARITIES = {name: value for value, name in enumerate(_core.granularity_names())}

# KV cache types: ggml type id, bytes per block, values per block (ggml.h / ggml.c type traits)
KV_CACHE_TYPES = {
    "f32": (0, 4, 1), "f16": (1, 2, 1), "bf16": (30, 2, 1), "q8_0": (8, 34, 32), "q4_0": (2, 18, 32),
    "q4_1": (3, 20, 32), "q5_0": (6, 22, 32), "q5_1": (7, 24, 32), "iq4_nl": (20, 18, 32),
}
# quantized V is stored untransposed, which llama.cpp does only with flash attention
UNQUANTIZED = ("f32", "f16", "bf16")


# -- a policy variant, as `pytriatt eval --policies` and `pytriatt bench --policies` name one ----------------

VARIANT_SYNTAX = "NAME[@head|@layer][/paper|/w=N|/h=N][+shift][:TYPE]"
VARIANT_EXAMPLES = "tri@head, tri/paper, tri/w=32/h=1024, tri+shift, tri:q8_0"


@dataclass(frozen=True)
class Variant:
    """One policy with its variations: per head (@head, @layer), settings (/paper, /w=N window, /h=N horizon),
    positions compacted after each round (+shift), a K/V cache type of its own (:TYPE)."""
    text: str
    policy: str
    granularity: str = "shared"
    settings: dict = field(default_factory=dict)   # window / horizon overrides
    shift: bool = False
    cache_type: Optional[str] = None

    @property
    def per_head(self) -> Optional[str]:
        return None if self.granularity == "shared" else self.granularity


def parse_variant(text: str) -> Variant:
    """A Variant from its one spelling (VARIANT_SYNTAX); a UserError that shows the spelling otherwise."""
    def bad(why: str) -> UserError:
        return UserError(f"policy {text!r}: {why} (write {VARIANT_SYNTAX}, e.g. {VARIANT_EXAMPLES})")
    m = re.fullmatch(r"([a-z0-9_]+)((?:[@/+][^@/+:]+)*)(?::([a-z0-9_]+))?", text.strip())
    if not m:
        raise bad("cannot be read")
    name, parts, ctype = m.group(1), re.findall(r"[@/+][^@/+:]+", m.group(2)), m.group(3)
    if name not in POLICIES:
        where = "" if name == text.strip() else f" in {text.strip()!r}"
        raise UserError(f"unknown KV policy {name!r}{where} (known: {', '.join(POLICIES)})")
    gran, settings, shift = "shared", {}, False
    for part in parts:
        kind, value = part[0], part[1:]
        if kind == "@":
            if value not in GRANULARITIES or value == "shared":
                raise bad(f"@{value} is not a granularity (@head, @layer)")
            gran = value
        elif kind == "+":
            if value in ("head", "layer"):
                raise bad(f"per-head eviction is written {name}@{value}")
            if value != "shift":
                raise bad(f"+{value} is not a modifier (+shift)")
            shift = True
        elif value in PRESETS:
            settings.update(PRESETS[value])
        else:
            key, eq, number = value.partition("=")
            option = {"w": "window", "h": "horizon"}.get(key, key)
            if not eq or option not in ("window", "horizon") or not number.lstrip("-").isdigit():
                raise bad(f"/{value} is not a preset ({', '.join(PRESETS)}) or w=N / h=N (window, horizon)")
            settings[option] = int(number)
    if ctype is not None and ctype not in KV_CACHE_TYPES:
        raise bad(f"unknown cache type {ctype!r} (known: {', '.join(KV_CACHE_TYPES)})")
    if name not in EVICTING and (gran != "shared" or settings or shift):
        raise bad(f"{name} evicts nothing, so @, / and + do not apply to it")
    if gran != "shared" and name not in PER_HEAD_POLICIES:
        raise bad(f"per-head eviction ranks tokens per head, which only {' and '.join(PER_HEAD_POLICIES)} do")
    return Variant(text.strip(), name, gran, settings, shift, ctype)


def granularity(per_head: Union[bool, str, None]) -> int:
    """The C enum value of per_head: False/None/"shared" (one token set), True or "head" (one per KV head,
    shared by the layers), "layer" (one per KV head of each layer)."""
    key = {False: "shared", True: "head"}[per_head] if isinstance(per_head, bool) else (per_head or "shared")
    if key not in GRANULARITIES:
        raise UserError(f"per_head must be False, True (or 'head') or 'layer', got {per_head!r}")
    return GRANULARITIES[key]


def cells_needed(lc, budget: int, interval: int, n_batch: int) -> int:
    """KV cells a sequence under an evicting policy needs: the budget, plus the tokens that arrive before
    the next round (an interval, or a whole batch when a batch is longer); the core's rule, which libllama's
    llama_kv_policy_n_cells (used by llama.cpp's common and Llama) returns too."""
    del lc  # the rule is the core's; the argument stays for the callers that size a context with libllama
    return int(_core.policy_n_cells(int(budget), int(interval), int(n_batch)))


def cells_needed_swa(lc, model_ptr, n_ubatch: int, n_seq: int = 1) -> int:
    """KV cells a sliding-window model's local cache needs to keep its window next to an evicting policy's
    budget-sized cache (0: the model has none). libllama owns the rule (llama_kv_policy_n_cells_swa)."""
    p = lc.llama_context_default_params()
    p.n_ubatch, p.n_seq_max = int(n_ubatch), int(n_seq)
    return int(lc.llama_kv_policy_n_cells_swa(model_ptr, ctypes.byref(p)))


def settings(policy: str, budget: Optional[int] = None, *, interval: int = DEFAULT_INTERVAL, sink: int = DEFAULT_SINK,
             window: int = DEFAULT_WINDOW, horizon: int = DEFAULT_HORIZON, per_head: Union[bool, str, None] = None,
             shift: bool = False, snap_window: Optional[int] = None) -> "_core.PolicySettings":
    """The core's settings struct for these options (policy: a known name)."""
    s = _core.PolicySettings()
    s.type = POLICIES.index(policy)
    if budget is not None:
        s.budget = int(budget)
    s.interval, s.sink, s.window, s.horizon = int(interval), int(sink), int(window), int(horizon)
    s.granularity, s.shift = granularity(per_head), bool(shift)
    if snap_window is not None:
        s.snap_window = int(snap_window)
    return s


def resolved_window(policy: str, budget: int, sink: int = DEFAULT_SINK, interval: int = DEFAULT_INTERVAL,
                    window: int = DEFAULT_WINDOW) -> int:
    """The recent window a policy protects: window itself, or for -1 the core's rule (as libllama resolves it)."""
    return int(_core.policy_resolve(settings(policy, budget, sink=sink, interval=interval, window=window)).window)


def resolved_horizon(budget: int, interval: int = DEFAULT_INTERVAL, horizon: int = DEFAULT_HORIZON) -> int:
    """The largest future distance tri scores for: horizon itself, or for -1 the core's rule."""
    return int(_core.policy_resolve(settings("tri", budget, interval=interval, horizon=horizon)).horizon)


def validate(policy: str, budget: Optional[int], *, interval: int = DEFAULT_INTERVAL, sink: int = DEFAULT_SINK,
             window: int = DEFAULT_WINDOW, per_head: Union[bool, str, None] = None, shift: bool = False,
             flag: str = "--", horizon: int = DEFAULT_HORIZON, n_ctx: int = 0,
             snap_window: Optional[int] = None) -> None:
    """Refuse, with what to do, the option combinations that cannot mean what was asked: the core's rules
    (triatt_policy_check, the message every front end gives), after the checks only a front end can make
    (an option given or not). flag: how options are spelled in messages ("--" for pytriatt's commands,
    "kv_" for Llama's keyword arguments, "" for plain keyword arguments). n_ctx > 0: the longest sequence."""
    def opt(name: str) -> str:
        return f"{flag}{name.replace('_', '-') if flag.startswith('--') else name}"
    if policy not in POLICIES:
        raise UserError(f"unknown KV policy {policy!r} (known: {', '.join(POLICIES)})")
    if policy not in EVICTING:
        if budget is not None:
            raise UserError(f"{opt('policy')} {policy} keeps every token, so {opt('budget')} {budget} would mean "
                            f"nothing: drop it, or pick an evicting policy ({', '.join(EVICTING)})")
        return
    if budget is None:
        raise UserError(f"{opt('policy')} {policy} needs {opt('budget')} N (the KV tokens to keep)")
    if per_head not in (None, False, True) and per_head not in GRANULARITIES:
        raise UserError(f"{opt('per_head')} must be False, True (or 'head') or 'layer', got {per_head!r}")
    why = _core.policy_check(settings(policy, budget, interval=interval, sink=sink, window=window, horizon=horizon,
                                      per_head=per_head, shift=shift, snap_window=snap_window), int(n_ctx), flag)
    if why:
        raise UserError(why)


def c_params(lc, policy: str, budget: int, *, interval: int = DEFAULT_INTERVAL, sink: int = DEFAULT_SINK,
             window: int = DEFAULT_WINDOW, protect_prompt: bool = False, per_head: Union[bool, str, None] = None,
             shift: bool = False, calib: Union[str, os.PathLike, None] = None, seed: int = 0, n_threads: int = 0,
             kv_agg: str = "max", snap_window: Optional[int] = None, horizon: int = DEFAULT_HORIZON):
    """llama_kv_policy_params for an evicting policy (the struct keeps the calibration path's bytes alive)."""
    validate(policy, budget, interval=interval, sink=sink, window=window, per_head=per_head, shift=shift, flag="",
             horizon=horizon, snap_window=snap_window)
    if policy not in EVICTING:
        raise UserError("policy full has no parameters: detach the policy instead")
    if kv_agg not in ("max", "mean"):
        raise UserError(f"kv_agg must be 'max' or 'mean', got {kv_agg!r}")
    p = lc.llama_kv_policy_default_params()
    p.type, p.budget, p.interval = POLICIES.index(policy), int(budget), int(interval)
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
