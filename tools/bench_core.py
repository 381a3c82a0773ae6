#!/usr/bin/env python3
"""Benchmark one TriAttention round of the C++ core (scoring + ranking).

Default shape: a Qwen3-8B cache (36 layers, 32 query / 8 KV heads, head_dim 128,
NEOX RoPE, base 1e6) holding 2176 tokens (budget 2048 + interval 128): every layer's
post-RoPE keys are scored (S_trig + S_norm, mean over 17 offsets) and the 2176 tokens
ranked down to 2048. Keys are one distinct array per layer, float32 (321 MB) and
float16 (160 MB, llama.cpp's default K cache type, scored without conversion).
Results and the machine they were measured on: docs/benchmarks-core.md.

    python tools/bench_core.py --repeat 20          # table for f32/f16 keys, 1 and 2 threads
    python tools/bench_core.py --threads 1 2 4 --key-types f16 --json
    python tools/bench_core.py --generic            # the portable kernel (no AVX2)

The decode-step comparison is an estimate: a memory-bound decode step of a model of
--model-gb bytes at --decode-gbs effective bandwidth (defaults: Qwen3-8B Q4_K_M,
4.68 GB; 12 GB/s, from the 24 tok/s measured here for the 491 MB Qwen2.5-0.5B).
"""

import argparse
import json
import statistics
import sys
import time

import numpy as np


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n-layer", type=int, default=36)
    ap.add_argument("--n-head", type=int, default=32)
    ap.add_argument("--n-head-kv", type=int, default=8)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--tokens", type=int, default=2176, help="cached tokens scored per round")
    ap.add_argument("--budget", type=int, default=2048)
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--repeat", type=int, default=10)
    ap.add_argument("--offset-agg", choices=["mean", "max"], default="mean")
    ap.add_argument("--key-types", nargs="+", choices=["f32", "f16"], default=["f32", "f16"],
                    help="key storage: f32, or f16 as llama.cpp's default K cache (read directly)")
    ap.add_argument("--generic", action="store_true", help="force the portable kernel (no AVX2)")
    ap.add_argument("--model-gb", type=float, default=4.68, help="model size for the decode-step estimate")
    ap.add_argument("--decode-gbs", type=float, default=12.0, help="effective decode bandwidth, GB/s")
    ap.add_argument("--json", action="store_true", help="print the results as JSON")
    args = ap.parse_args(argv)

    from pytriatt import _core
    from pytriatt.core import Calibration, RopeSpec, select

    _core.force_generic_kernel(bool(args.generic))
    rng = np.random.default_rng(0)
    L, H, Hkv, D, n = args.n_layer, args.n_head, args.n_head_kv, args.head_dim, args.tokens
    rope = RopeSpec(L, D, pairing="neox", freq_base=1e6)
    F = rope.n_freq
    qm = (rng.standard_normal((L, H, F)) + 1j * rng.standard_normal((L, H, F))).astype(np.complex64)
    cal = Calibration(qm, (np.abs(qm) * 1.2).astype(np.float32), rope, n_head_kv=Hkv)
    t = 40000
    positions = np.sort(rng.choice(t, size=n, replace=False)).astype(np.int32)
    keys32 = [rng.standard_normal((n, Hkv, D), dtype=np.float32) for _ in range(L)]
    keysets = {"f32": keys32}
    if "f16" in args.key_types:
        keysets["f16"] = [k.astype(np.float16) for k in keys32]
    if "f32" not in args.key_types:
        del keysets["f32"]

    def one_round(keys, threads):
        t0 = time.perf_counter()
        raw = [cal.score(l, keys[l], None, t, threads=threads, offset_agg=args.offset_agg) for l in range(L)]
        t1 = time.perf_counter()
        keep = select("tri", raw, positions, t, args.budget, sink=4, window=128, n_head_kv=Hkv)
        t2 = time.perf_counter()
        assert len(keep) == min(args.budget, n)
        return (t1 - t0) * 1e3, (t2 - t1) * 1e3

    decode_ms = args.model_gb / args.decode_gbs * 1e3
    rows = []
    for kt, keys in keysets.items():
        key_mb = sum(k.nbytes for k in keys) / 1e6
        base = None
        for th in args.threads:
            one_round(keys, th)  # warm-up: thread pool, workspace, page faults
            sc, rk = zip(*(one_round(keys, th) for _ in range(args.repeat)))
            tot = [a + b for a, b in zip(sc, rk)]
            r = dict(
                keys=kt,
                key_mb=round(key_mb, 1),
                threads=th,
                score_ms=statistics.median(sc),
                rank_ms=statistics.median(rk),
                total_ms=statistics.median(tot),
                total_min_ms=min(tot),
                key_gbs=key_mb / 1e3 / (statistics.median(sc) / 1e3),
            )
            base = base or r["total_ms"]
            r["speedup"] = base / r["total_ms"]
            r["vs_decode_step"] = r["total_ms"] / decode_ms
            rows.append(r)

    info = dict(
        shape=dict(n_layer=L, n_head=H, n_head_kv=Hkv, head_dim=D, tokens=n, budget=args.budget,
                   offset_agg=args.offset_agg),
        build=_core.build_info(),
        kernel=_core.kernel_name(),
        decode_step_estimate_ms=round(decode_ms, 1),
        results=rows,
    )
    if args.json:
        json.dump(info, sys.stdout, indent=2)
        print()
        return 0
    print(f"TriAttention round: {L} layers x {n} tokens, {H} q / {Hkv} kv heads, head_dim {D}, "
          f"offsets {args.offset_agg}; keep {args.budget}")
    print(f"build: {info['build']['compiler']}; kernel: {info['kernel']}")
    print(f"{'keys':>4} {'MB':>5} {'threads':>7} {'score ms':>9} {'rank ms':>8} {'total ms':>9} {'min ms':>7} "
          f"{'keys GB/s':>9} {'speedup':>7} {'x decode step*':>14}")
    for r in rows:
        print(f"{r['keys']:>4} {r['key_mb']:>5.0f} {r['threads']:>7} {r['score_ms']:>9.1f} {r['rank_ms']:>8.2f} "
              f"{r['total_ms']:>9.1f} {r['total_min_ms']:>7.1f} {r['key_gbs']:>9.1f} {r['speedup']:>7.2f} "
              f"{r['vs_decode_step']:>14.3f}")
    r0 = rows[0]
    print(f"* one decode step estimated at {decode_ms:.0f} ms ({args.model_gb} GB model at {args.decode_gbs} GB/s); "
          f"a round runs once per 128 decoded tokens: amortized {r0['total_ms'] / 128:.2f} ms per token "
          f"({r0['vs_decode_step'] / 128 * 100:.2f}% of a step) for {r0['keys']} keys on {r0['threads']} thread(s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
