"""`pytriatt eval`: what a KV policy keeps of the model's quality, at each memory budget.

    pytriatt eval MODEL --task nll|passkey|agree|dfs|recall|ruler --policies full,tri,streaming,random,snapkv
                  --budgets 128,256,512,1024 [--json] [--plot out.png] [--shift]

Every task but recall runs the policy inside llama_decode (the patch's real eviction);
recall replays the true attention against each policy's choice. The tasks live in
pytriatt/evaluation/ (nll, passkey, agree, dfs, recall, ruler); their functions (run_nll, run_passkey,
run_agree, run_dfs, run_recall, run_ruler) can be called from Python and return the same rows.
"""

from __future__ import annotations

import sys
import time
from typing import Dict, List, Optional, Sequence

import numpy as np

from . import common
from ..errors import UserError
from ..policy import DEFAULT_HORIZON, DEFAULT_INTERVAL, DEFAULT_SINK, DEFAULT_WINDOW, validate
from .common import EvalError, check_supported, model_name, policy_settings, say, split_policy

TASKS = ("nll", "passkey", "agree", "dfs", "recall", "ruler")
DEFAULT_METRIC = {"nll": "ppl_ratio", "passkey": "acc", "agree": "prefix", "dfs": "acc", "recall": "recall",
                  "ruler": "acc"}
SHIFT_POLICIES = ("tri", "streaming")


# -- running ----------------------------------------------------------------------------

def evaluate(model_path, task: str, policies: Sequence[str], budgets: Sequence[int], *, shift: bool = False,
             progress: bool = True, calib=None, calib_tokens: Optional[int] = None, name: Optional[str] = None,
             runtime: Optional[dict] = None, **opts) -> List[dict]:
    """Run one task for every policy and budget (full once); returns the result rows.
    runtime: llama.cpp settings of every model and context the task opens (common.RUNTIME's keys:
    n_gpu_layers, n_threads, type_k, type_v, flash_attn)."""
    saved = dict(common.RUNTIME)
    common.RUNTIME.update(runtime or {})
    try:
        return _evaluate(model_path, task, policies, budgets, shift=shift, progress=progress, calib=calib,
                         calib_tokens=calib_tokens, name=name, **opts)
    finally:
        common.RUNTIME.clear()
        common.RUNTIME.update(saved)


def _evaluate(model_path, task, policies, budgets, *, shift, progress, calib, calib_tokens, name, **opts):
    from . import agree as agree_task, dfs as dfs_task, nll as nll_task, passkey as passkey_task
    from . import recall as recall_task, ruler as ruler_task

    if task not in TASKS:
        raise EvalError(f"unknown task {task!r} (known: {', '.join(TASKS)})")
    budgets = sorted(set(int(b) for b in budgets))
    if task != "recall":
        check_supported(policies)
        # libllama's rule for the protections (pytriatt.policy.validate), per policy and budget
        for p in policies:
            if p == "full":
                continue
            base, gran = split_policy(p)
            settings = dict(dict(window=opts.get("window", DEFAULT_WINDOW), horizon=opts.get("horizon", DEFAULT_HORIZON)),
                            **policy_settings(p))
            for b in budgets:
                try:
                    validate(base, b, interval=opts.get("interval", DEFAULT_INTERVAL), sink=opts.get("sink", DEFAULT_SINK),
                             **settings)
                except UserError as e:
                    raise EvalError(f"policy {p}, budget {b}: {e}") from None
    budgets = _budgets_with_rounds(task, policies, budgets, opts)
    name = name or model_name(model_path)
    if task == "recall":
        # recall computes every choice in NumPy/the core: no llama.cpp policy is attached
        known = set(recall_task.RECALL_POLICIES) | set(recall_task.TRI_ABLATIONS) | set(recall_task.PERHEAD_POLICIES)
        bad = [p for p in policies if p not in known]
        if bad:
            raise EvalError(f"unknown policy {bad[0]!r} for recall (known: {', '.join(sorted(known))})")
    needs_tri = any(p == "tri" or p.startswith(("tri-", "tri@", "tri/")) for p in policies)
    if needs_tri and calib is None:
        from ..calibrate import QUICK_TOKENS, ensure_calibrated
        calib = ensure_calibrated(model_path, tokens=calib_tokens or QUICK_TOKENS, progress=progress,
                                  n_gpu_layers=common.RUNTIME["n_gpu_layers"])
    opts = dict(opts, calib=calib, name=name)

    if task == "recall":
        if shift:
            say(progress, "recall: positions do not matter to a one-shot choice; --shift ignored")
        t0 = time.perf_counter()
        rows = recall_task.run_recall(model_path, list(policies), budgets, progress=progress, **opts)
        say(progress, f"recall: {time.perf_counter() - t0:.1f} s")
        return rows

    # nll always reads the text with full attention: the perplexity ratio is paired with it
    runs = [("full", None, False)] if "full" in policies or task == "nll" else []
    for p in policies:
        if p == "full":
            continue
        for b in budgets:
            runs.append((p, b, False))
            if shift and p in SHIFT_POLICIES:
                runs.append((p, b, True))
    rows: List[dict] = []
    reference = None
    per_token: Dict[tuple, np.ndarray] = {}
    for policy, budget, sh in runs:
        t0 = time.perf_counter()
        kw = dict(opts, shift=sh)
        label = f"{task} {policy}" + (f" budget {budget}" if budget else "") + (" shift" if sh else "")
        say(progress, f"eval: {label} ...")
        if task == "nll":
            r, nll = nll_task.run_nll(model_path, policy, budget, reference=reference, **kw)
            per_token[(policy, budget, sh)] = nll
            if policy == "full":
                reference = nll
                r = nll_task.nll_rows(name, "full", None, None, nll, nll, interval=opts.get("interval", 128))
                if "full" not in policies:
                    r = []
        elif task == "passkey":
            r = passkey_task.run_passkey(model_path, policy, budget, **kw)
        elif task == "agree":
            r = agree_task.run_agree(model_path, policy, budget, **kw)
        elif task == "ruler":
            r = ruler_task.run_ruler(model_path, policy, budget, progress=progress, **kw)
        else:
            r = dfs_task.run_dfs(model_path, policy, budget, **kw)
        rows.extend(r)
        say(progress, f"eval: {label}: {time.perf_counter() - t0:.1f} s")
    if task == "nll":
        rows.extend(_paired_to_streaming(per_token, name, opts.get("interval", 128)))
    return rows


def longest_sequence(task: str, opts: dict) -> Optional[int]:
    """The most tokens a sequence of the task holds (prompt or text, plus what is generated); None: known only
    once the problems are made (dfs, sized by --nodes)."""
    from .ruler import CATEGORIES, GEN
    defaults = {"nll": 2048, "recall": 2048, "passkey": 1024, "agree": 512, "ruler": 4096}
    if task not in defaults:
        return None
    tokens = int(opts.get("tokens") or defaults[task])
    if task == "passkey":
        return tokens + int(opts.get("digits", 5)) + 4
    if task == "agree":
        return tokens + int(opts.get("gen") or 128)
    if task == "ruler":
        return tokens + int(opts.get("gen") or max(GEN[c] for c in opts.get("categories") or CATEGORIES))
    return tokens       # nll reads the text; recall's round starts end an interval before it does


def _budgets_with_rounds(task: str, policies: Sequence[str], budgets: List[int], opts: dict) -> List[int]:
    """The budgets under which an eviction round can happen. A round runs only once a sequence would exceed
    budget + interval (docs/eviction.md; recall: a round start past the budget); under a larger budget every
    policy keeps every token, as full attention does. None of them: EvalError saying what to change; some:
    the others are skipped, said in one line on stderr."""
    longest = longest_sequence(task, opts)
    if longest is None or all(p == "full" for p in policies):
        return budgets
    interval = int(opts.get("interval", DEFAULT_INTERVAL))
    idle = [b for b in budgets if longest <= b + interval]
    if not idle:
        return budgets
    what = f"{task}'s sequences hold at most {longest} tokens"
    if len(idle) == len(budgets):
        fix = f"raise --tokens so that sequences exceed {min(idle) + interval}"
        if longest - interval > 1:
            fix += f", or lower --budgets below {longest - interval}"
        raise EvalError(f"no eviction round can happen: {what}, and a round runs only once a sequence exceeds "
                        f"budget + interval ({min(idle)} + {interval} = {min(idle) + interval}): every policy "
                        f"would keep every token; {fix}")
    s = "s" if len(idle) > 1 else ""
    print(f"pytriatt: note: eval: budget{s} {', '.join(map(str, idle))} skipped: {what}, within budget + "
          f"interval ({interval}), so no eviction round would happen (raise --tokens to include them)",
          file=sys.stderr, flush=True)
    return [b for b in budgets if b not in idle]


def _paired_to_streaming(per_token: Dict[tuple, np.ndarray], name: str, interval: int) -> List[dict]:
    """ppl_vs_streaming rows: each evicting policy against streaming at the same budget and
    position mode, paired chunk by chunk; below 1 means it predicts the text better than
    keeping the sink and the most recent tokens does. ppl_vs_shared rows: a per-head policy
    (tri@head, tri@layer, snapkv@...) against the same policy with one shared token set."""
    from .nll import paired_ratio_row
    rows = []
    for (policy, budget, sh), nll in per_token.items():
        base = per_token.get(("streaming", budget, sh))
        if policy in ("full", "streaming") or base is None:
            continue
        rows.append(paired_ratio_row(name, policy, "shift" if sh else "gaps", budget, nll, base,
                                     "ppl_vs_streaming", interval=interval))
    # per-head variants (tri@head, ...) against the same policy with one shared token set
    for (policy, budget, sh), nll in per_token.items():
        shared, _, gran = policy.partition("@")    # tri/paper@head against tri/paper
        base = per_token.get((shared, budget, sh))
        if gran and base is not None:
            rows.append(paired_ratio_row(name, policy, "shift" if sh else "gaps", budget, nll, base,
                                         "ppl_vs_shared", interval=interval))
    return rows


# -- output -----------------------------------------------------------------------------

def _label(r: dict) -> str:
    return r["policy"] + (f" ({r['position']})" if r["position"] == "shift" else "")


def _fmt(r: dict) -> str:
    v = f"{r['value']:.3f}"
    if r["ci_low"] is not None and r["ci_high"] is not None and r["ci_low"] != r["ci_high"]:
        v += f" [{r['ci_low']:.3f}, {r['ci_high']:.3f}]"
    return v


def format_table(rows: Sequence[dict], metrics: Optional[Sequence[str]] = None) -> str:
    """One table per metric: a line per policy (and position mode), a column per budget; full
    attention, which has no budget, in a column of its own. Markdown-compatible."""
    if not rows:
        return "(no results)"
    out = []
    all_metrics = []
    for r in rows:
        if r["metric"] not in all_metrics:
            all_metrics.append(r["metric"])
    for metric in metrics or all_metrics:
        rs = [r for r in rows if r["metric"] == metric]
        if not rs:
            continue
        budgets = sorted({r["budget"] for r in rs if r["budget"] is not None})
        labels = []
        for r in rs:
            if _label(r) not in labels:
                labels.append(_label(r))
        n = sorted({r["n"] for r in rs})
        ci = "; value [95% interval]" if any(r.get("ci_low") is not None for r in rs) else ""
        out.append(f"{rs[0]['task']} {metric} ({rs[0]['model']}; n = {', '.join(map(str, n))}{ci})")
        full_col = "all tokens (no budget)"
        head = ["policy"] + ([f"budget {b}" for b in budgets] if budgets else []) + ([full_col] if any(
            r["budget"] is None for r in rs) else [])
        lines = [head]
        for lab in labels:
            cells = [lab]
            for b in budgets:
                hit = [r for r in rs if _label(r) == lab and r["budget"] == b]
                cells.append(_fmt(hit[0]) if hit else "")
            if head[-1] == full_col:
                hit = [r for r in rs if _label(r) == lab and r["budget"] is None]
                cells.append(_fmt(hit[0]) if hit else "")
            lines.append(cells)
        out.append("| " + " | ".join(lines[0]) + " |")
        out.append("|" + "---|" * len(lines[0]))
        out.extend("| " + " | ".join(c) + " |" for c in lines[1:])
        out.append("")
    return "\n".join(out).rstrip()


def plot_rows(rows: Sequence[dict], metric: str, out, title: str = "") -> None:
    """metric against budget, one line per policy (full attention as a horizontal line)."""
    from ..report import require_matplotlib
    plt = require_matplotlib()

    rs = [r for r in rows if r["metric"] == metric]
    if not rs:
        raise EvalError(f"no rows of metric {metric!r} to plot (metrics: "
                        f"{', '.join(sorted({r['metric'] for r in rows}))})")
    fig, ax = plt.subplots(figsize=(6, 4))
    labels = []
    for r in rs:
        if _label(r) not in labels:
            labels.append(_label(r))
    for lab in labels:
        pts = sorted((r for r in rs if _label(r) == lab), key=lambda r: r["budget"] or 0)
        if pts[0]["budget"] is None:
            ax.axhline(pts[0]["value"], color="k", ls="--", lw=1, label=lab)
            continue
        x = [r["budget"] for r in pts]
        y = [r["value"] for r in pts]
        line, = ax.plot(x, y, marker="o", label=lab)
        lo = [r["ci_low"] if r["ci_low"] is not None else r["value"] for r in pts]
        hi = [r["ci_high"] if r["ci_high"] is not None else r["value"] for r in pts]
        ax.fill_between(x, lo, hi, color=line.get_color(), alpha=0.15)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("KV budget (tokens)")
    ax.set_ylabel(metric)
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
