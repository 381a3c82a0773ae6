#!/usr/bin/env python3
"""How many tokens a calibration needs: statistics from N tokens against a reference of many more.

For each N, calibrates the model on the first N tokens of the text exactly as `pytriatt calibrate MODEL
-o OUT --tokens N` does (same text, windows of --ctx tokens), stores the statistics in a GGUF (a
statistics-only one, as `run --calibrate` caches) and reads them back with Calibration.from_gguf. The
reference is a calibration of --reference tokens read from the text *after* everything the samples read
(disjoint, so the error includes what changes from one text to another, as it does for a user's own
--text). Per query head:

    q_mean error = ||qbar_N - qbar_ref|| / ||qbar_ref||     (complex means over all RoPE bands)
    q_abs  error = ||A_N - A_ref|| / ||A_ref||              (mean moduli over all bands)

reported as the median and the 90th percentile over the heads of every layer. `floor` is the same
error between the two halves of the reference (reference/2 tokens each): what two long stretches of the
text differ by (sampling noise at that size plus the difference between texts).

    python tools/calib_settle.py                                         # smollm2-135m, 256..4096 vs 16384
    python tools/calib_settle.py --tokens 256,1024 --reference 8192 --json
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pytriatt import models  # noqa: E402
from pytriatt.calibrate import calibrate, write_sidecar  # noqa: E402
from pytriatt.calibration import Calibration  # noqa: E402
from pytriatt.context import Model  # noqa: E402
from pytriatt.corpus import default_text  # noqa: E402


def head_errors(a: Calibration, ref: Calibration) -> dict:
    """Relative errors per head of a's statistics against ref's; median and 90th percentile over heads."""
    dq = np.linalg.norm((a.q_mean - ref.q_mean).astype(np.complex128), axis=-1)
    nq = np.linalg.norm(ref.q_mean.astype(np.complex128), axis=-1)
    da = np.linalg.norm((a.q_abs_mean - ref.q_abs_mean).astype(np.float64), axis=-1)
    na = np.linalg.norm(ref.q_abs_mean.astype(np.float64), axis=-1)
    eq, ea = (dq / nq).ravel(), (da / na).ravel()
    return {"q_mean_median": float(np.median(eq)), "q_mean_p90": float(np.percentile(eq, 90)),
            "q_abs_median": float(np.median(ea)), "q_abs_p90": float(np.percentile(ea, 90))}


def chars_for(model, text: str, n_tokens: int) -> int:
    """The offset of the first paragraph break in text after which at least n_tokens tokens lie before it."""
    c = 4 * n_tokens
    while len(model.tokenize(text[:c], add_bos=False)) < n_tokens and c < len(text):
        c += n_tokens
    brk = text.find("\n\n", c)
    return brk + 2 if brk >= 0 else len(text)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m", help="model name or GGUF path (default smollm2-135m)")
    ap.add_argument("--tokens", default="256,512,1024,2048,4096", help="calibration sizes to compare")
    ap.add_argument("--reference", type=int, default=16384, help="reference size in tokens (default 16384)")
    ap.add_argument("--ctx", type=int, default=4096, help="window length (default 4096, calibrate's)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()

    path = models.get(args.model) if args.model in models.MODELS else Path(args.model)
    sizes = sorted(int(x) for x in args.tokens.split(","))
    text = default_text()
    model = Model(path)
    try:
        # the reference starts after the text the longest sample reads (at a paragraph break)
        start = chars_for(model, text, max(sizes))
        ref_text = text[start:]
        half = args.reference // 2
        cut = chars_for(model, ref_text, half)     # the reference's two halves, for the floor
    finally:
        model.close()

    def run(t: str, n: int, tmp: Path, tag: str) -> tuple:
        t0 = time.perf_counter()
        cal, res = calibrate(path, text=t, max_tokens=n, n_ctx=args.ctx, progress=False)
        out = write_sidecar(path, cal, tmp / f"{tag}.calib.gguf")
        stored = Calibration.from_gguf(out, model=path)
        print(f"calib_settle: {tag}: {res.n_tokens} tokens in {time.perf_counter() - t0:.1f} s",
              file=sys.stderr, flush=True)
        return stored, res.n_tokens

    rows = []
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        ref, n_ref = run(ref_text, args.reference, tmp, f"reference-{args.reference}")
        ref_a, _ = run(ref_text[:cut], half, tmp, f"reference-first-{half}")
        ref_b, _ = run(ref_text[cut:], half, tmp, f"reference-second-{half}")
        for n in sizes:
            cal, got = run(text, n, tmp, f"sample-{n}")
            rows.append(dict(tokens=n, tokens_read=got, **head_errors(cal, ref)))
        floor = dict(head_errors(ref_a, ref_b), tokens=half)

    report = {"model": args.model, "reference_tokens": n_ref, "ctx": args.ctx, "reference_offset_chars": start,
              "rows": rows, "floor": floor}
    if args.json:
        json.dump(report, sys.stdout, indent=1)
        print()
        return 0
    print(f"{args.model}: statistics from N tokens of pydoc_data.topics vs {n_ref} tokens read after them "
          f"(relative error per head; median / 90th percentile over heads)")
    print("| tokens | q_mean median | q_mean p90 | q_abs median | q_abs p90 |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['tokens']} | {r['q_mean_median']:.3f} | {r['q_mean_p90']:.3f} | {r['q_abs_median']:.3f} "
              f"| {r['q_abs_p90']:.3f} |")
    if floor:
        print(f"| floor: {floor['tokens']} vs {floor['tokens']} (the reference's halves) | "
              f"{floor['q_mean_median']:.3f} | {floor['q_mean_p90']:.3f} | {floor['q_abs_median']:.3f} | "
              f"{floor['q_abs_p90']:.3f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
