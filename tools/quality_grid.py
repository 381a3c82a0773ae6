#!/usr/bin/env python3
"""The perplexity grid of docs/QUALITY.md: models x texts x budgets, each evicting policy against
streaming (sink + most recent) at the same budget, paired chunk by chunk.

    python tools/quality_grid.py OUT_DIR                       # the whole grid (hours on 2 cores)
    python tools/quality_grid.py OUT_DIR --models smollm2-135m --texts news --budgets 64,256
    python tools/quality_grid.py OUT_DIR --table               # only print the table of what OUT_DIR holds

Each (model, text, sequence length) is one `pytriatt eval --task nll --json` run, saved as
OUT_DIR/<model>.<text>.<tokens>.json (an existing file is not run again). A budget B is read on a
sequence of at least 4 B tokens (2048 tokens for B <= 512, 4096 for 1024). The table gives
ppl(policy) / ppl(streaming) with its 95% paired interval: below 1 the policy predicts the text better.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

TEXTS = {
    # the evaluation text of pytriatt eval (Python's docs from character 300 000; calibration reads the start)
    "pydoc": None,
    # IDLE's changelog, shipped with CPython: the held-out text of docs/QUALITY.md since 2026-11-29
    "news": "idlelib/NEWS.txt",
    # the GNU GPL v3 (Debian's base-files): legal prose nobody tuned on
    "gpl3": "/usr/share/common-licenses/GPL-3",
}
MODELS = ("smollm2-135m", "qwen2.5-0.5b", "gemma3-270m")
POLICIES = "full,streaming,snapkv,tri,tri/paper"


def text_path(name: str):
    where = TEXTS[name]
    if where is None:
        return None
    p = Path(where)
    if not p.is_absolute():
        import idlelib
        p = Path(idlelib.__file__).parent / p.relative_to("idlelib")
    return p


def length_for(budget: int) -> int:
    return max(2048, 4 * budget)


def run(out: Path, model: str, text: str, tokens: int, budgets, policies: str, threads: int) -> Path:
    dst = out / f"{model}.{text}.{tokens}.json"
    if dst.exists():
        return dst
    cmd = [sys.executable, "-m", "pytriatt", "eval", model, "--task", "nll", "--tokens", str(tokens),
           "--budgets", ",".join(map(str, budgets)), "--policies", policies, "--json", "-t", str(threads)]
    tp = text_path(text)
    if tp is not None:
        cmd += ["--text", str(tp)]
    print("+ " + " ".join(cmd), file=sys.stderr, flush=True)
    res = subprocess.run(cmd, stdout=subprocess.PIPE, text=True)
    if res.returncode != 0:
        sys.exit(f"failed: {' '.join(cmd)}")
    tmp = dst.with_suffix(".tmp")
    tmp.write_text(res.stdout)
    tmp.replace(dst)
    return dst


def table(out: Path) -> str:
    rows = []
    for f in sorted(out.glob("*.json")):
        model, text, tokens = f.stem.rsplit(".", 2)
        for r in json.loads(f.read_text()):
            if r.get("metric") == "ppl_vs_streaming" and r.get("position") in (None, "gaps"):
                if length_for(r["budget"]) != int(tokens):
                    continue
                rows.append((model, text, r["budget"], r["policy"], r["value"], r["ci_low"], r["ci_high"]))
    policies = sorted({r[3] for r in rows})
    lines = ["| model | text | budget | " + " | ".join(policies) + " |",
             "|---|---|---|" + "---|" * len(policies)]
    keys = sorted({r[:3] for r in rows}, key=lambda k: (MODELS.index(k[0]) if k[0] in MODELS else 9, k[1], k[2]))
    for k in keys:
        cells = []
        for p in policies:
            m = [r for r in rows if r[:3] == k and r[3] == p]
            cells.append(f"{m[0][4]:.3f} [{m[0][5]:.3f}, {m[0][6]:.3f}]" if m else "")
        lines.append(f"| {k[0]} | {k[1]} | {k[2]} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out", type=Path)
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--texts", default=",".join(TEXTS))
    ap.add_argument("--budgets", default="64,256,512,1024")
    ap.add_argument("--policies", default=POLICIES)
    ap.add_argument("-t", "--threads", type=int, default=2)
    ap.add_argument("--table", action="store_true", help="only print the table of OUT's results")
    a = ap.parse_args()
    a.out.mkdir(parents=True, exist_ok=True)
    if not a.table:
        budgets = [int(b) for b in a.budgets.split(",")]
        for model in a.models.split(","):
            for text in a.texts.split(","):
                by_len = {}
                for b in budgets:
                    by_len.setdefault(length_for(b), []).append(b)
                for tokens, bs in sorted(by_len.items()):
                    run(a.out, model, text, tokens, bs, a.policies, a.threads)
    print(table(a.out))


if __name__ == "__main__":
    main()
