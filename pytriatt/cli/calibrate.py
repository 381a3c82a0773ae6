"""`pytriatt calibrate`: measure a model's query statistics and embed them in a copy of its GGUF."""

from __future__ import annotations

import argparse
from pathlib import Path

from .. import gguf_io, modelinfo
from ..calibrate import RECOMMENDED_TOKENS, calibrate, merge
from ..core import Calibration, model_fingerprint
from ..corpus import DEFAULT_SOURCE, read_texts
from .common import (add_gpu_layers, add_model_argument, add_threads, gpu_layers, output_file, print_json,
                     resolve_model, threads, writing)

CLI_HELP = """\
Run the model over calibration text and write a copy of its GGUF that carries the
TriAttention statistics (triattention.* metadata; the tensors are copied unchanged).
The input is never modified; the output appears only once complete.

examples:
  pytriatt calibrate model.gguf -o model.tri.gguf                 # Python's docs, 32768 tokens
  pytriatt calibrate model.gguf -o model.tri.gguf --text a.txt b.txt --tokens 65536 -ngl 99
  pytriatt calibrate model.gguf -o model.tri.gguf --merge run1.tri.gguf run2.tri.gguf
"""


def add_parser(sub) -> None:
    p = sub.add_parser("calibrate", help="measure the query statistics of a model and embed them in a GGUF copy",
                       description=CLI_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_argument(p)
    p.add_argument("-o", "--output", required=True, help="the GGUF to write (never the input)")
    p.add_argument("--text", nargs="+", metavar="FILE", help="calibration text files (default: Python's "
                   "documentation, pydoc_data.topics)")
    p.add_argument("--tokens", type=int, default=32768, help="tokens of text to use (default 32768, as the paper; "
                                                               "smollm2-135m reads about 230 tokens/s on 2 idle "
                                                               "CPU cores, see the README; below "
                                                               f"{RECOMMENDED_TOKENS} a warning: noisy statistics)")
    p.add_argument("-c", "--ctx-size", "--ctx", dest="ctx", type=int, default=4096, help="window length: the text is decoded in windows of "
                   "this many tokens (default 4096)")
    add_gpu_layers(p)
    add_threads(p)
    p.add_argument("--merge", nargs="+", metavar="GGUF", help="instead of running the model, merge the "
                   "statistics these calibrated files carry (same model), weighted by their token counts")
    p.add_argument("--force", action="store_true", help="overwrite an existing output file")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_calibrate)


def cmd_calibrate(args) -> int:
    summary = calibrate_summary(args)
    if args.json:
        print_json(summary)
    else:
        print(format_summary(summary))
    return 0


def calibrate_summary(args) -> dict:
    """Run `pytriatt calibrate`; returns the summary. Errors raise ValueError & co."""
    src = resolve_model(args.model)
    gguf_io.read_header(src)                    # a corrupt or truncated input fails here, in one line
    dst = output_file(args.output)              # ... and an unusable output before an hour of work
    gguf_io.check_output(src, dst, args.force)
    carried = gguf_io.has_prefix(src, "triattention.")

    if args.merge:
        if args.text:
            raise ValueError("--merge combines existing statistics; it takes no --text")
        fp = model_fingerprint(src)
        cals = []
        for m in args.merge:
            c = Calibration.from_gguf(m, model=src, check_fingerprint=False)
            if c.model_fingerprint != fp:
                raise ValueError(f"{m} holds statistics of another model ({c.model_fingerprint}); "
                                 f"{src} is {fp}: merge only runs of the same model")
            cals.append(c)
        cal, res = merge(cals), None
    else:
        text = read_texts(args.text) if args.text else None
        source = ", ".join(Path(t).name for t in args.text) if args.text else DEFAULT_SOURCE
        cal, res = calibrate(src, text=text, source=source, max_tokens=args.tokens, n_ctx=args.ctx,
                             n_gpu_layers=gpu_layers(args), n_threads=threads(args),
                             progress=not (args.quiet or args.json), warn="--tokens")
    with writing(dst):
        written = gguf_io.write_with_metadata(src, dst, cal.gguf_fields(), force=args.force)
    summary = {
        "input": str(src), "output": str(dst), "tokens": cal.calib_tokens, "source": cal.calib_source,
        "merged": [str(m) for m in args.merge] if args.merge else None,
        "seconds": round(res.seconds, 2) if res else None,
        "tokens_per_s": round(res.n_tokens / res.seconds, 1) if res and res.seconds > 0 else None,
        "replaced_existing": bool(carried or written.get("replaced")),
        "fingerprint": cal.model_fingerprint,
        "profile": modelinfo.concentration_profile(cal),
    }
    return summary


def format_summary(s: dict) -> str:
    lines = []
    if s["replaced_existing"]:
        lines.append(f"note: {s['input']} already carried TriAttention statistics; {s['output']} has the new ones")
    how = (f"merged {len(s['merged'])} files" if s["merged"]
           else f"{s['tokens']} tokens of {s['source']} in {s['seconds']} s ({s['tokens_per_s']} tok/s)")
    lines.append(f"wrote {s['output']}: {how}")
    lines.append(modelinfo.format_profile(s["profile"]))
    return "\n".join(lines)
