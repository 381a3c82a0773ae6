"""`pytriatt bench`: decode speed, scoring cost and KV memory of eviction policies against full attention."""

from __future__ import annotations

import argparse

from ..benchmark import format_report, parse_policies, plot_report, run_bench
from .common import (CliError, add_cache_types, add_calib_options, add_gpu_layers, add_model_argument, add_round_options,
                     add_threads, number_list, plot_output,
                     calib_file, gpu_layers, load_checked, print_json, threads, writing)

HELP = """\
Measure decode speed, scoring cost and KV memory of KV eviction policies against full attention,
in one run, on one model.

For each policy and position P: prefill to P with the policy attached (it evicts during the
prefill), then time --window single-token decode steps at P. Reported: decode tok/s, prefill tok/s,
the policy's scoring + eviction time as a share of decode time, the KV bytes llama.cpp allocated,
peak host RSS, and policy/full ratios -- among them the target metric "tok/s at P vs full at
position = budget" (full is also measured at the budget position for that).

POLICY specs (the spelling `pytriatt eval --policies` takes too): NAME[@head|@layer][/paper|/w=N|/h=N]
[+shift][:TYPE]. NAME: full, tri, streaming, random, snapkv; "@head" / "@layer" evict per KV head (of
each layer), e.g. tri@head; "/paper" runs the paper's exact protections, "/w=N" / "/h=N" a window or
horizon of its own; "+shift" compacts positions after each round; ":TYPE" sets that policy's K/V cache
type, e.g. tri:q8_0 (default: -ctk/-ctv).

examples:
  pytriatt bench qwen2.5-0.5b --budget 512 --positions 512,8192
  pytriatt bench qwen2.5-0.5b --budget 512 --positions 512,8192 --policies full,tri,tri:q8_0 --json
  pytriatt bench model.gguf --budget 2048 --positions 2048,32768 -ngl 99 --parallel auto --plot tps.png
  pytriatt bench smollm2-135m --budget 256 --positions 256,2048 --policies full,streaming

tri needs a calibrated model: without triattention.* metadata (and without --calib) a
calibration (--calib-tokens) is run once and cached as a statistics-only GGUF under
$PYTRIATT_CACHE/calibrated, keyed by the model's sha256, the size and the recipe (format
version, text, versions: a stale one is never reused; the cache run, serve and eval share).
"""


def cmd_bench(args) -> int:
    path = load_checked(args.model)
    for flag, v in (("--budget", args.budget), ("--window", args.window), ("--repeat", args.repeat),
                    ("--interval", args.interval), ("--n-batch", args.n_batch)):
        if v < 1:
            raise CliError(f"{flag} must be positive")
    policies = parse_policies(args.policies, args.cache_type_k, args.cache_type_v)
    calib = calib_file(args.calib)
    parallel = args.parallel
    if parallel is not None and parallel != "auto":
        try:
            parallel = int(parallel)
        except ValueError:
            raise CliError(f"--parallel takes a number of sequences or 'auto' (got {parallel!r})") from None
        if parallel < 1:
            raise CliError("--parallel must be at least 1")
    out = plot_output(args.plot) if args.plot else None
    rep = run_bench(path, budget=args.budget, positions=number_list(args.positions, "--positions"), policies=policies,
                    window=args.window, repeat=args.repeat, interval=args.interval, n_batch=args.n_batch,
                    sink=args.sink, threads=threads(args), score_threads=args.score_threads,
                    n_gpu_layers=gpu_layers(args), calib=calib, calib_tokens=args.calib_tokens,
                    parallel=parallel, parallel_position=args.parallel_position, kv_unified=args.kv_unified,
                    interleave=not args.sequential, progress=not args.quiet, horizon=args.horizon)
    if args.plot:
        with writing(out):
            plot_report(rep, out)
        rep["plot"] = str(out)
    if args.json:
        print_json(rep)
    else:
        print(format_report(rep))
        if args.plot:
            print(f"wrote {rep['plot']}")
    return 0


def add_parser(sub) -> None:
    p = sub.add_parser("bench", help="decode speed, scoring cost and KV memory of eviction policies vs full attention",
                       description=HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_argument(p)
    p.add_argument("--budget", type=int, default=2048, help="KV tokens an evicting policy keeps (default 2048)")
    p.add_argument("--positions", default="2048,8192,32768",
                   help="comma-separated positions to measure decode speed at (default 2048,8192,32768)")
    p.add_argument("--policies", default="full,tri",
                   help="comma-separated POLICY specs, e.g. full,tri,tri@head,tri/paper,tri:q8_0 (default full,tri); "
                        "see above")
    p.add_argument("--window", type=int, default=128,
                   help="decode steps timed at each position (default 128 = the default interval: an evicting "
                        "policy's window then holds exactly one round, so its cost is amortized as in use)")
    p.add_argument("--repeat", type=int, default=1,
                   help="windows per position, alternating between the policies; rates are over their total time "
                        "(default 1; on a busy machine use short windows and many repeats)")
    add_round_options(p, window=False)        # --window here is the timed decode steps
    p.add_argument("-b", "--n-batch", type=int, default=512,
                   help="prefill batch size (default 512); an evicting policy's context holds "
                        "budget + max(interval, n_batch) cells, rounded up to 256")
    add_cache_types(p, flash=False)
    add_gpu_layers(p)
    add_threads(p)
    p.add_argument("--score-threads", type=int, default=0, help="tri: scoring threads (default 0 = --threads)")
    p.add_argument("--parallel", metavar="N|auto",
                   help="also decode N sequences of the first evicting policy together in one context and compare "
                        "their aggregate tok/s with one full sequence at the largest position; auto: as many as "
                        "fit in that full sequence's KV memory")
    p.add_argument("--parallel-position", type=int, default=None,
                   help="position the parallel sequences are brought to (default 4 x budget: past a few rounds "
                        "a step's cost no longer depends on the position)")
    p.add_argument("--kv-unified", action="store_true",
                   help="parallel: one KV stream shared by all sequences (default: one stream per sequence)")
    add_calib_options(p, calibrate=False)
    p.add_argument("--sequential", action="store_true",
                   help="run the policies one after another (per-policy peak RSS) instead of interleaving them "
                        "position by position (ratios robust to changing machine load; one process-wide peak RSS)")
    p.add_argument("--plot", metavar="PNG", help="draw decode tok/s against position per policy (needs matplotlib)")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress on stderr")
    p.set_defaults(func=cmd_bench)
