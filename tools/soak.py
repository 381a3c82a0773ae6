#!/usr/bin/env python3
"""Soak test: one long generation in a fixed KV budget through llama-cpp-python's Llama.

Generates --tokens tokens (greedy, past end-of-generation tokens) with a KV eviction policy and
checks, after every token, that the sequence's cached positions never exceed budget + interval.
Reports throughput, resident memory after the warm-up versus at the end, the largest number of
cached cells, and whether the policy's counters add up (tokens evicted = tokens decoded - tokens
cached).

    python tools/soak.py                                   # 20,000 tokens, smollm2-135m, budget 256, tri
    python tools/soak.py --policy streaming --tokens 2000
    python tools/soak.py --json > soak.json

The tri policy needs the model's TriAttention statistics: --calib FILE, or the model itself if it
carries them, or else a calibrated copy is made once (pytriatt calibrate, --calib-tokens tokens of
Python's documentation) in $PYTRIATT_CACHE/soak. Exit status 1 if a check failed.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

PROMPT = ("Write a long story about a lighthouse keeper who finds a message in a bottle, "
          "and tell what happened next in many chapters.")


def rss_bytes() -> int:
    """Resident set size of this process (Linux /proc; psutil elsewhere)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        import psutil
        return psutil.Process().memory_info().rss


def soak(model, *, tokens: int = 20000, budget: int = 256, interval: int = 128, policy: str = "tri",
         calib=None, n_batch: int = 128, warmup: int = 0, threads=None, progress_every: int = 1000,
         log=None) -> dict:
    """Run the soak; returns the figures (see the module docstring). ``warmup`` defaults to
    min(1000, tokens // 4) tokens: RSS is measured after it and at the end."""
    import llama_cpp

    import pytriatt
    log = log or (lambda *a: print(*a, file=sys.stderr, flush=True))
    model = Path(model)
    kw = {}
    if policy == "tri":
        from pytriatt.calibrate import ensure_calibrated
        kw["kv_calib"] = str(calib or ensure_calibrated(model, tokens=2048))
    warmup = warmup or min(1000, tokens // 4)
    if policy != "full":
        kw.update(kv_policy=policy, kv_budget=budget, kv_interval=interval)
    llm = llama_cpp.Llama(str(model), n_ctx=tokens + 256, n_batch=n_batch, verbose=False, seed=1,
                          **({"n_threads": threads, "n_threads_batch": threads} if threads else {}), **kw)
    prompt = llm.tokenize(PROMPT.encode())
    limit = budget + interval
    n, max_cells, over = 0, 0, []
    rss_warm = None
    t0 = time.perf_counter()
    t_warm = None
    for tok in llm.generate(prompt, temp=0.0, reset=True):
        n += 1
        cached = pytriatt.seq_positions(llm, 0)
        max_cells = max(max_cells, int(cached.size))
        if cached.size > limit and len(over) < 10:
            over.append((n, int(cached.size)))
        if n == warmup:
            rss_warm, t_warm = rss_bytes(), time.perf_counter()
        if progress_every and n % progress_every == 0:
            dt = time.perf_counter() - t0
            log(f"soak: {n}/{tokens} tokens, {n / dt:.1f} tok/s, {cached.size} cached, "
                f"RSS {rss_bytes() / 2**20:.1f} MiB")
        if n >= tokens:
            break
    t1 = time.perf_counter()
    rss_end = rss_bytes()
    st = llm.kv_policy_stats(0)
    cached = pytriatt.seq_positions(llm, 0)
    decoded = llm.n_tokens  # prompt + generated - 1: the last sampled token is not decoded yet
    growth = (rss_end - rss_warm) / rss_warm * 100.0 if rss_warm else None
    res = {
        "model": str(model), "policy": policy, "budget": budget, "interval": interval, "n_batch": n_batch,
        "kv_cells": llm.kv_cells, "prompt_tokens": len(prompt), "tokens_generated": n, "tokens_decoded": decoded,
        "seconds": round(t1 - t0, 2), "tokens_per_s": round(n / (t1 - t0), 2),
        "tokens_per_s_after_warmup": round((n - warmup) / (t1 - t_warm), 2) if t_warm and n > warmup else None,
        "warmup_tokens": warmup, "rss_after_warmup_mib": round(rss_warm / 2**20, 2) if rss_warm else None,
        "rss_end_mib": round(rss_end / 2**20, 2), "rss_growth_pct": round(growth, 3) if growth is not None else None,
        "max_cached_cells": max_cells, "limit": limit, "steps_over_limit": over,
        "tokens_cached": int(cached.size), "tokens_evicted": int(st["n_evicted"]), "rounds": int(st["n_rounds"]),
        "newest_position": int(cached[-1]) if cached.size else None,
    }
    res["counters_add_up"] = res["tokens_evicted"] == decoded - res["tokens_cached"]
    res["ok"] = bool(not over and res["counters_add_up"] and n == tokens
                     and (growth is None or growth < 2.0))
    llm.close() if hasattr(llm, "close") else None
    return res


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", nargs="?", default="smollm2-135m", help="GGUF path or model name (default smollm2-135m)")
    ap.add_argument("--tokens", type=int, default=20000, help="tokens to generate (default 20000)")
    ap.add_argument("--budget", type=int, default=256, help="KV tokens kept after a round (default 256)")
    ap.add_argument("--interval", type=int, default=128, help="round when budget + interval is reached (default 128)")
    ap.add_argument("--policy", default="tri", choices=["tri", "streaming", "random"], help="eviction policy (default tri)")
    ap.add_argument("--calib", help="tri: GGUF with the model's triattention.* statistics (default: made once)")
    ap.add_argument("--n-batch", type=int, default=128, help="llama.cpp batch size (default 128)")
    ap.add_argument("--warmup", type=int, default=0, help="tokens before the first RSS reading (default min(1000, tokens/4))")
    ap.add_argument("-t", "--threads", type=int, default=None, help="CPU threads (default: llama-cpp-python's)")
    ap.add_argument("--json", action="store_true", help="print the figures as one JSON object")
    args = ap.parse_args(argv)
    if args.tokens < 1 or args.budget < 1 or args.interval < 1:
        ap.error("--tokens, --budget and --interval must be positive")
    from pytriatt import models
    model = Path(args.model)
    if not model.is_file():
        if args.model not in models.MODELS:
            ap.error(f"{args.model}: no such file, and not a known model name ({', '.join(sorted(models.MODELS))})")
        model = models.get(args.model)
    res = soak(model, tokens=args.tokens, budget=args.budget, interval=args.interval, policy=args.policy,
               calib=args.calib, n_batch=args.n_batch, warmup=args.warmup, threads=args.threads)
    if args.json:
        print(json.dumps(res, indent=1))
    else:
        print(f"{res['tokens_generated']} tokens ({res['policy']}, budget {res['budget']} + interval {res['interval']}) "
              f"in {res['seconds']} s: {res['tokens_per_s']} tok/s ({res['tokens_per_s_after_warmup']} after warm-up)")
        print(f"RSS after {res['warmup_tokens']} tokens {res['rss_after_warmup_mib']} MiB, at the end "
              f"{res['rss_end_mib']} MiB: growth {res['rss_growth_pct']}%")
        print(f"max cached cells {res['max_cached_cells']} (limit {res['limit']}, KV cells {res['kv_cells']}); "
              f"steps over the limit: {len(res['steps_over_limit'])}")
        print(f"counters: {res['tokens_evicted']} evicted = {res['tokens_decoded']} decoded - {res['tokens_cached']} "
              f"cached: {'yes' if res['counters_add_up'] else 'NO'} ({res['rounds']} rounds)")
        print("soak: OK" if res["ok"] else "soak: FAILED")
    return 0 if res["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
