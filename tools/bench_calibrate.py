#!/usr/bin/env python3
"""Calibration throughput against plain prefill, on the same model, text and machine.

Both decode the same windows of Python's documentation through the same kind of
context; the calibration run has the query capture attached (llama_triatt_capture
as the eval callback). Runs alternate (plain, capture, plain, ...) so that machine
noise hits both alike; the table reports medians and their ratio.

    python tools/bench_calibrate.py                         # smollm2-135m and qwen2.5-0.5b
    python tools/bench_calibrate.py --models smollm2-135m --tokens 2048 --repeat 3 --json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pytriatt import _llama, models  # noqa: E402
from pytriatt.calibrate import capture, default_text, token_windows  # noqa: E402
from pytriatt.context import Context, Model  # noqa: E402


def plain_prefill(model, windows, n_ctx, n_batch) -> float:
    t0 = time.perf_counter()
    with Context(model, n_ctx=n_ctx, n_batch=n_batch) as ctx:
        for w in windows:
            ctx.clear()
            for s in range(0, len(w), n_batch):
                ctx.decode(w[s:s + n_batch], pos0=s, logits="none")
    return time.perf_counter() - t0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["smollm2-135m", "qwen2.5-0.5b"])
    ap.add_argument("--tokens", type=int, default=4096, help="tokens per run (default 4096)")
    ap.add_argument("--ctx", type=int, default=2048, help="window length (default 2048)")
    ap.add_argument("--batch", type=int, default=512)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()

    rows = []
    for name in args.models:
        path = models.get(name) if name in models.MODELS else Path(name)
        model = Model(path)
        toks = model.tokenize(default_text(), add_bos=False)[: args.tokens]
        lc = model.lc
        windows = token_windows(toks, args.ctx, lc.llama_vocab_bos(model.vocab))
        n = sum(len(w) for w in windows)
        plain_prefill(model, windows[:1], args.ctx, args.batch)  # warm-up
        t_plain, t_cap = [], []
        for _ in range(args.repeat):
            t_plain.append(plain_prefill(model, windows, args.ctx, args.batch))
            t_cap.append(capture(model, windows, n_ctx=args.ctx, n_batch=args.batch, progress=False).seconds)
        model.close()
        tp, tc = n / statistics.median(t_plain), n / statistics.median(t_cap)
        rows.append(dict(model=name, tokens=n, threads=_llama.default_threads(), prefill_tok_s=round(tp, 1),
                         calibrate_tok_s=round(tc, 1), ratio=round(tc / tp, 3)))
    if args.json:
        json.dump(rows, sys.stdout, indent=1)
        print()
    else:
        print(f"{'model':<16}{'tokens':>8}{'threads':>8}{'prefill tok/s':>15}{'calibrate tok/s':>17}{'ratio':>8}")
        for r in rows:
            print(f"{r['model']:<16}{r['tokens']:>8}{r['threads']:>8}{r['prefill_tok_s']:>15}"
                  f"{r['calibrate_tok_s']:>17}{r['ratio']:>8}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
