"""`pytriatt eval`: what a KV policy keeps of the model's quality, at each memory budget."""

from __future__ import annotations

import argparse

from ..corpus import read_text
from ..errors import EvalError
from ..evaluation import DEFAULT_METRIC, TASKS, evaluate, format_table, plot_rows
from .. import policy as kv_policy
from ..evaluation.common import model_name, say
from .common import (CliError, add_cache_types, add_calib_options, add_gpu_layers, add_model_argument,
                     add_round_options, add_threads, calib_file, number_list, plot_output, flash_attn, gpu_layers, print_json, load_checked, threads,
                     writing)

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
  ruler    RULER's synthetic tasks (Hsieh et al. 2024) in prompts of --tokens tokens of prose
           (Python's docs or --text) with needles at sentence boundaries, --samples prompts
           per category, answered greedily (up to --gen tokens): niah_single (one "special
           magic number" needle), niah_multikey (+ 3 distractor keys), niah_multivalue (4
           values of one key), niah_multiquery (4 keys asked at once), vt (variable tracking:
           every variable of a chain VAR A = 12345, VAR B = VAR A, ...), cwe (the 10 most common
           words of a numbered list). --categories picks some. Metrics: acc_<category> = share
           of the answers found in the output (RULER's string match; n = answers, Wilson 95%
           intervals), acc = RULER's average of the categories.
  recall   with the full cache, at --samples round starts: the share of the next
           interval's true attention mass (softmax over positions so far, per head,
           averaged) on the tokens each policy would keep. Adds `oracle` (the best single
           token set in hindsight) and, with --ablations, tri without its trig term
           (tri-notrig), without its norm term (tri-nonorm), mean over KV heads
           (tri-kvmean) and max over offsets (tri-offmax). tri-perhead and oracle-perhead
           (diagnostics, --policies) let every KV head of every layer keep its own tokens:
           their gap to tri/oracle is what sharing costs.

Policies: full, tri (TriAttention; the model needs statistics: --calib FILE, or it is
calibrated once on the fly and cached in $PYTRIATT_CACHE/calibrated), streaming (sink + most
recent), random, snapkv (needs a build with the SnapKV policy). Per-head eviction inside
llama_decode: tri@head (every KV head keeps its own tokens, shared by the layers: the paper's
mode), tri@layer (every KV head of every layer), snapkv@head, snapkv@layer. Settings of one
policy: tri/paper (the paper's exact protections), tri/w=N (window), tri/h=N (horizon). The
spelling is the bench command's too: NAME[@head|@layer][/paper|/w=N|/h=N]. --shift adds tri and
streaming with positions compacted after each round (needs a build with it).

examples:
  pytriatt eval smollm2-135m --task nll --budgets 128,256,512 --tokens 2048
  pytriatt eval qwen2.5-0.5b --task passkey --policies full,tri,streaming --budgets 256 --json
  pytriatt eval smollm2-135m --task recall --budgets 64,128,256,512 --ablations --plot recall.png
  pytriatt eval qwen2.5-0.5b --task ruler --tokens 4096 --samples 4 --policies full,tri,streaming --budgets 512
"""


def add_parser(sub) -> None:
    p = sub.add_parser("eval", help="measure what a KV policy keeps of the model's quality at each budget",
                       description=HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_argument(p)
    p.add_argument("--task", required=True, choices=TASKS)
    p.add_argument("--policies", default="full,tri,streaming,random",
                   help="comma-separated: full, tri, streaming, random, snapkv, each with @head/@layer and /paper, /w=N, "
                        "/h=N (recall also: oracle, tri-perhead, oracle-perhead and the tri ablations) "
                        "(default full,tri,streaming,random)")
    p.add_argument("--budgets", default="128,256,512", help="comma-separated KV budgets in tokens (default 128,256,512)")
    p.add_argument("--shift", action="store_true", help="also run tri and streaming with positions compacted")
    p.add_argument("--tokens", "-c", "--ctx-size", dest="tokens", type=int, help="sequence length: nll/recall text tokens (default 2048), passkey prompt "
                                              "(default 1024), agree prompt (default 512), ruler prompt (default 4096)")
    p.add_argument("--samples", type=int, help="passkey keys per depth (default 5), agree prompts (4), dfs trees (4), "
                                               "recall round starts (6), ruler prompts per category (4)")
    p.add_argument("--gen", type=int, help="agree: tokens to generate (default 128); ruler: at most, per prompt "
                                           "(default 32 to 120 by category)")
    p.add_argument("--depths", help="passkey: relative depths of the key (default 0.1,0.5,0.9); ruler: the depths "
                                    "needles are drawn from (default 0.25,0.3,...,0.75)")
    p.add_argument("--categories", help="ruler: comma-separated, of niah_single, niah_multikey, niah_multivalue, "
                                        "niah_multiquery, vt, cwe (default all)")
    p.add_argument("--nodes", type=int, default=20, help="dfs: nodes per tree (default 20)")
    p.add_argument("--queries", type=int, default=16, help="recall: queries replayed per round start (default 16)")
    p.add_argument("--ablations", action="store_true", help="recall: add tri-notrig, tri-nonorm, tri-kvmean, tri-offmax")
    p.add_argument("--text", metavar="FILE", help="nll/agree/recall text, ruler haystack (default: Python's docs, "
                                                  "pydoc_data.topics)")
    add_round_options(p)
    p.add_argument("--snap-window", type=int, default=kv_policy.DEFAULT_SNAP_WINDOW,
                   help=f"snapkv: observation window (default {kv_policy.DEFAULT_SNAP_WINDOW})")
    add_calib_options(p, calibrate=False)
    add_gpu_layers(p)
    add_cache_types(p)
    add_threads(p)
    p.add_argument("--seed", type=int, default=0, help="seed of keys, trees, random eviction (default 0)")
    p.add_argument("--metric", help="metric to plot (default: ppl_ratio, acc, prefix, acc, recall, acc by task)")
    p.add_argument("--plot", metavar="PNG", help="draw the metric against the budget, one line per policy")
    p.add_argument("--json", action="store_true", help="print the result rows as JSON")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress on stderr")
    p.set_defaults(func=cmd_eval)


def _task_opts(args) -> dict:
    o = dict(interval=args.interval, sink=args.sink, window=args.window, horizon=args.horizon, seed=args.seed,
             snap_window=args.snap_window)
    defaults = {"nll": (2048, None), "recall": (2048, 6), "passkey": (1024, 5), "agree": (512, 4), "dfs": (None, 4),
                "ruler": (4096, 4)}
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
    if tokens is not None:
        o["tokens"] = tokens
    if samples is not None:
        o["samples"] = samples
    if args.text and args.task in ("nll", "agree", "recall", "ruler"):
        o["text"] = read_text(args.text)
    elif args.text:
        raise EvalError(f"--text applies to nll, agree and recall (and ruler's haystack), not {args.task}")
    if args.task == "agree":
        o["gen"] = args.gen or 128
    if args.task == "passkey":
        o["depths"] = number_list(args.depths or "0.1,0.5,0.9", "--depths", float)
    if args.categories and args.task != "ruler":
        raise EvalError(f"--categories applies to ruler, not {args.task}")
    if args.task == "ruler":
        from ..evaluation.ruler import CATEGORIES
        if args.gen is not None:
            o["gen"] = args.gen
        if args.depths:
            o["depths"] = number_list(args.depths, "--depths", float)
            if any(d > 1 for d in o["depths"]):
                raise EvalError(f"--depths are shares of the haystack, within 0..1, got {args.depths!r}")
        if args.categories is not None:
            cats = [c.strip() for c in args.categories.split(",") if c.strip()]
            bad = [c for c in cats if c not in CATEGORIES]
            if bad or not cats:
                raise EvalError(f"--categories takes some of {', '.join(CATEGORIES)}, got {args.categories!r}")
            o["categories"] = cats
    if args.task == "dfs":
        o["nodes"] = args.nodes
    if args.task == "recall":
        o["queries"] = args.queries
        o["ablations"] = args.ablations
    return o


def cmd_eval(args) -> int:
    try:
        path = load_checked(args.model)
        policies = [p.strip() for p in args.policies.split(",") if p.strip()]
        if not policies:
            raise EvalError("--policies is empty")
        if args.task == "recall" and args.ablations:
            from ..evaluation.recall import TRI_ABLATIONS
            policies += [p for p in TRI_ABLATIONS if p not in policies]
        if args.task == "recall" and "oracle" not in policies:
            policies.append("oracle")
        budgets = number_list(args.budgets, "--budgets")
        opts = _task_opts(args)
        if args.plot:
            plot_output(args.plot)
        runtime = dict(n_gpu_layers=gpu_layers(args), n_threads=threads(args), type_k=args.cache_type_k,
                       type_v=args.cache_type_v, flash_attn=flash_attn(args))
        rows = evaluate(path, args.task, policies, budgets, shift=args.shift, progress=not args.quiet,
                        calib=calib_file(args.calib), calib_tokens=args.calib_tokens, name=model_name(path),
                        runtime=runtime, **opts)
    except EvalError as e:
        raise CliError(str(e)) from None
    if args.plot:
        metric = args.metric or DEFAULT_METRIC[args.task]
        with writing(args.plot):
            plot_rows(rows, metric, args.plot, title=f"{model_name(path)}: {args.task} {metric}")
        say(not args.quiet, f"eval: wrote {args.plot}")
    if args.json:
        print_json(rows)
    else:
        print(format_table(rows))
    return 0
