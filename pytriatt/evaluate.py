"""`pytriatt eval`: what a KV policy keeps of the model's quality, at each memory budget.

    pytriatt eval MODEL --task nll|passkey|agree|dfs|recall --policies full,tri,streaming,random,snapkv
                  --budgets 128,256,512,1024 [--json] [--plot out.png] [--shift]

Every task but recall runs the policy inside llama_decode (the patch's real eviction);
recall replays the true attention against each policy's choice. The tasks live in
pytriatt/eval_tasks.py and pytriatt/eval_recall.py; their functions (run_nll, run_passkey,
run_agree, run_dfs, run_recall) can be called from Python and return the same rows.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np

from .eval_common import EvalError, calibrated, check_supported, model_name, say

TASKS = ("nll", "passkey", "agree", "dfs", "recall")
DEFAULT_METRIC = {"nll": "ppl_ratio", "passkey": "acc", "agree": "prefix", "dfs": "acc", "recall": "recall"}
SHIFT_POLICIES = ("tri", "streaming")

HELP = """\
Measure how much of a model's quality a KV-cache policy keeps at each budget (tokens kept):

  nll      teacher-forced negative log-likelihood of a long text (default: Python's docs,
           from past what calibration reads), decoded in chunks of --interval with the
           policy evicting inside llama_decode. Metrics: nll, ppl_ratio (perplexity /
           full attention's, paired by chunk), ppl_vs_streaming (/ streaming's at the
           same budget, paired: below 1 = better than sink + recent), ppl_vs_shared (a
           per-head policy / the same policy with one token set), nll@A-B by position.
  passkey  a random key hidden at --depths of a --tokens long filler prompt, then the
           question; exact match per depth over --samples keys (Wilson 95% intervals).
  agree    greedy generation of --gen tokens after --samples prompts of --tokens tokens:
           prefix = share generated identically to full attention before the first
           divergence; overall = share of steps with full's greedy token when full's
           tokens are fed back (teacher forcing).
  dfs      depth-first walks of random trees (--nodes), teacher-forced: name the node
           entered (the tree is listed far back) and the node returned to (the recursion
           state, written when that node was last visited); accuracy by kind and by
           lookback (tokens back to the answer's last mention).
  recall   with the full cache, at --samples round starts: the share of the next
           interval's true attention mass (softmax over positions so far, per head,
           averaged) on the tokens each policy would keep. Adds `oracle` (the best single
           token set in hindsight) and, with --ablations, tri without its trig term
           (tri-notrig), without its norm term (tri-nonorm), mean over KV heads
           (tri-kvmean) and max over offsets (tri-offmax). tri-perhead and oracle-perhead
           (diagnostics, --policies) let every KV head of every layer keep its own tokens:
           their gap to tri/oracle is what sharing costs.

Policies: full, tri (TriAttention; the model needs statistics: --calib FILE, or it is
calibrated once on the fly and cached in $PYTRIATT_CACHE/eval), streaming (sink + most
recent), random, snapkv (needs a build with the SnapKV policy). Per-head eviction inside
llama_decode: tri@head (every KV head keeps its own tokens, shared by the layers: the paper's
mode), tri@layer (every KV head of every layer), snapkv@head, snapkv@layer. --shift adds tri and
streaming with positions compacted after each round (needs a build with it).

examples:
  pytriatt eval smollm2-135m --task nll --budgets 128,256,512 --tokens 2048
  pytriatt eval qwen2.5-0.5b --task passkey --policies full,tri,streaming --budgets 256 --json
  pytriatt eval smollm2-135m --task recall --budgets 64,128,256,512 --ablations --plot recall.png
"""


def _int_list(s: str, what: str) -> List[int]:
    try:
        out = [int(x) for x in s.split(",") if x.strip()]
    except ValueError:
        raise EvalError(f"{what} takes comma-separated whole numbers, got {s!r}") from None
    if not out or any(v <= 0 for v in out):
        raise EvalError(f"{what} takes positive numbers, got {s!r}")
    return out


def _float_list(s: str, what: str) -> List[float]:
    try:
        out = [float(x) for x in s.split(",") if x.strip()]
    except ValueError:
        raise EvalError(f"{what} takes comma-separated numbers, got {s!r}") from None
    if not out:
        raise EvalError(f"{what} is empty")
    return out


def add_parser(sub) -> None:
    from .cliargs import add_model_argument
    p = sub.add_parser("eval", help="measure what a KV policy keeps of the model's quality at each budget",
                       description=HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_argument(p)
    p.add_argument("--task", required=True, choices=TASKS)
    p.add_argument("--policies", default="full,tri,streaming,random",
                   help="comma-separated: full, tri, streaming, random, snapkv (recall also: oracle, tri-perhead, "
                        "oracle-perhead and the tri ablations) (default full,tri,streaming,random)")
    p.add_argument("--budgets", default="128,256,512", help="comma-separated KV budgets in tokens (default 128,256,512)")
    p.add_argument("--shift", action="store_true", help="also run tri and streaming with positions compacted")
    p.add_argument("--tokens", type=int, help="sequence length: nll/recall text tokens (default 2048), passkey prompt "
                                              "(default 1024), agree prompt (default 512)")
    p.add_argument("--samples", type=int, help="passkey keys per depth (default 5), agree prompts (4), dfs trees (4), "
                                               "recall round starts (6)")
    p.add_argument("--gen", type=int, default=128, help="agree: tokens to generate (default 128)")
    p.add_argument("--depths", default="0.1,0.5,0.9", help="passkey: relative depths of the key (default 0.1,0.5,0.9)")
    p.add_argument("--nodes", type=int, default=20, help="dfs: nodes per tree (default 20)")
    p.add_argument("--queries", type=int, default=16, help="recall: queries replayed per round start (default 16)")
    p.add_argument("--ablations", action="store_true", help="recall: add tri-notrig, tri-nonorm, tri-kvmean, tri-offmax")
    p.add_argument("--text", metavar="FILE", help="nll/agree/recall text (default: Python's docs, pydoc_data.topics)")
    p.add_argument("--interval", type=int, default=128, help="evict when the cache holds budget + interval (default 128)")
    p.add_argument("--sink", type=int, default=4, help="never evict the first N tokens (default 4)")
    p.add_argument("--window", type=int, default=1, help="never evict the last N tokens (default 1)")
    p.add_argument("--snap-window", type=int, default=32, help="snapkv: observation window (default 32)")
    p.add_argument("--calib", help="tri: GGUF carrying this model's triattention.* statistics (default: the model "
                                   "if it carries them, else a copy calibrated once and cached)")
    p.add_argument("--calib-tokens", type=int, default=8192, help="tokens to calibrate on when needed (default 8192)")
    p.add_argument("--seed", type=int, default=0, help="seed of keys, trees, random eviction (default 0)")
    p.add_argument("--metric", help="metric to plot (default: ppl_ratio, acc, prefix, acc, recall by task)")
    p.add_argument("--plot", metavar="PNG", help="draw the metric against the budget, one line per policy")
    p.add_argument("--json", action="store_true", help="print the result rows as JSON")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress on stderr")
    p.set_defaults(func=cmd_eval)


# -- running ----------------------------------------------------------------------------

def evaluate(model_path, task: str, policies: Sequence[str], budgets: Sequence[int], *, shift: bool = False,
             progress: bool = True, calib=None, calib_tokens: int = 8192, name: Optional[str] = None,
             **opts) -> List[dict]:
    """Run one task for every policy and budget (full once); returns the result rows."""
    from . import eval_recall, eval_tasks

    if task not in TASKS:
        raise EvalError(f"unknown task {task!r} (known: {', '.join(TASKS)})")
    budgets = sorted(set(int(b) for b in budgets))
    sink, window = opts.get("sink", 4), opts.get("window", 1)
    if any(b <= sink + window for b in budgets):
        raise EvalError(f"every budget must exceed --sink + --window ({sink + window})")
    name = name or model_name(model_path)
    if task == "recall":
        # recall computes every choice in NumPy/the core: no llama.cpp policy is attached
        known = set(eval_recall.RECALL_POLICIES) | set(eval_recall.TRI_ABLATIONS) | set(eval_recall.PERHEAD_POLICIES)
        bad = [p for p in policies if p not in known]
        if bad:
            raise EvalError(f"unknown policy {bad[0]!r} for recall (known: {', '.join(sorted(known))})")
    else:
        check_supported(policies, shift)
    needs_tri = any(p == "tri" or p.startswith(("tri-", "tri@")) for p in policies)
    if needs_tri and calib is None:
        calib = calibrated(model_path, tokens=calib_tokens, progress=progress)
    opts = dict(opts, calib=calib, name=name)

    if task == "recall":
        if shift:
            say(progress, "recall: positions do not matter to a one-shot choice; --shift ignored")
        t0 = time.perf_counter()
        rows = eval_recall.run_recall(model_path, list(policies), budgets, progress=progress, **opts)
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
            r, nll = eval_tasks.run_nll(model_path, policy, budget, reference=reference, **kw)
            per_token[(policy, budget, sh)] = nll
            if policy == "full":
                reference = nll
                r = eval_tasks.nll_rows(name, "full", None, None, nll, nll, interval=opts.get("interval", 128))
                if "full" not in policies:
                    r = []
        elif task == "passkey":
            r = eval_tasks.run_passkey(model_path, policy, budget, **kw)
        elif task == "agree":
            r = eval_tasks.run_agree(model_path, policy, budget, **kw)
        else:
            r = eval_tasks.run_dfs(model_path, policy, budget, **kw)
        rows.extend(r)
        say(progress, f"eval: {label}: {time.perf_counter() - t0:.1f} s")
    if task == "nll":
        rows.extend(_paired_to_streaming(per_token, name, opts.get("interval", 128)))
    return rows


def _paired_to_streaming(per_token: Dict[tuple, np.ndarray], name: str, interval: int) -> List[dict]:
    """ppl_vs_streaming rows: each evicting policy against streaming at the same budget and
    position mode, paired chunk by chunk; below 1 means it predicts the text better than
    keeping the sink and the most recent tokens does. ppl_vs_shared rows: a per-head policy
    (tri@head, tri@layer, snapkv@...) against the same policy with one shared token set."""
    from .eval_tasks import paired_ratio_row
    rows = []
    for (policy, budget, sh), nll in per_token.items():
        base = per_token.get(("streaming", budget, sh))
        if policy in ("full", "streaming") or base is None:
            continue
        rows.append(paired_ratio_row(name, policy, "shift" if sh else "gaps", budget, nll, base,
                                     "ppl_vs_streaming", interval=interval))
    # per-head variants (tri@head, ...) against the same policy with one shared token set
    for (policy, budget, sh), nll in per_token.items():
        shared, _, gran = policy.partition("@")
        base = per_token.get((shared, budget, sh))
        if gran and base is not None:
            rows.append(paired_ratio_row(name, policy, "shift" if sh else "gaps", budget, nll, base,
                                         "ppl_vs_shared", interval=interval))
    return rows


def _task_opts(args) -> dict:
    o = dict(interval=args.interval, sink=args.sink, window=args.window, seed=args.seed, snap_window=args.snap_window)
    defaults = {"nll": (2048, None), "recall": (2048, 6), "passkey": (1024, 5), "agree": (512, 4), "dfs": (None, 4)}
    tokens, samples = defaults[args.task]
    if args.tokens is not None:
        if args.task == "dfs":
            raise EvalError("dfs sizes its problems with --nodes, not --tokens")
        tokens = args.tokens
    if args.samples is not None:
        if args.task == "nll":
            raise EvalError("nll reads one text; size it with --tokens, not --samples")
        samples = args.samples
    for what, v in (("--tokens", tokens), ("--samples", samples), ("--interval", args.interval),
                    ("--gen", args.gen), ("--nodes", args.nodes), ("--queries", args.queries)):
        if v is not None and v < 1:
            raise EvalError(f"{what} must be positive")
    if args.sink < 0 or args.window < 1:
        raise EvalError("--sink must be >= 0 and --window >= 1 (the newest token always stays)")
    if tokens is not None:
        o["tokens"] = tokens
    if samples is not None:
        o["samples"] = samples
    if args.text and args.task in ("nll", "agree", "recall"):
        from .eval_common import read_text
        o["text"] = read_text(args.text)
    elif args.text:
        raise EvalError(f"--text applies to nll, agree and recall, not {args.task}")
    if args.task == "agree":
        o["gen"] = args.gen
    if args.task == "passkey":
        o["depths"] = _float_list(args.depths, "--depths")
    if args.task == "dfs":
        o["nodes"] = args.nodes
    if args.task == "recall":
        o["queries"] = args.queries
        o["ablations"] = args.ablations
    return o


def cmd_eval(args) -> int:
    from .cli import CliError, resolve_model

    try:
        path = resolve_model(args.model)
        policies = [p.strip() for p in args.policies.split(",") if p.strip()]
        if not policies:
            raise EvalError("--policies is empty")
        if args.task == "recall" and args.ablations:
            from .eval_recall import TRI_ABLATIONS
            policies += [p for p in TRI_ABLATIONS if p not in policies]
        if args.task == "recall" and "oracle" not in policies:
            policies.append("oracle")
        budgets = _int_list(args.budgets, "--budgets")
        opts = _task_opts(args)
        if args.plot:
            out = Path(args.plot).expanduser()
            if not out.parent.is_dir():
                raise EvalError(f"--plot {out}: the directory {out.parent} does not exist")
            _require_matplotlib()
        calib = None
        if args.calib:
            calib = Path(args.calib).expanduser()
            if not calib.is_file():
                raise EvalError(f"--calib {calib}: no such file")
        rows = evaluate(path, args.task, policies, budgets, shift=args.shift, progress=not args.quiet, calib=calib,
                        calib_tokens=args.calib_tokens, name=model_name(path), **opts)
    except EvalError as e:
        raise CliError(str(e)) from None
    if args.plot:
        metric = args.metric or DEFAULT_METRIC[args.task]
        plot_rows(rows, metric, args.plot, title=f"{model_name(path)}: {args.task} {metric}")
        say(not args.quiet, f"eval: wrote {args.plot}")
    if args.json:
        json.dump(rows, sys.stdout, indent=1)
        sys.stdout.write("\n")
    else:
        print(format_table(rows))
    return 0


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


def _require_matplotlib():
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise EvalError("--plot needs matplotlib: pip install 'pytriatt[plot]'") from None


def plot_rows(rows: Sequence[dict], metric: str, out, title: str = "") -> None:
    """metric against budget, one line per policy (full attention as a horizontal line)."""
    _require_matplotlib()
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

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
