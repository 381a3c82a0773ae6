"""`pytriatt info MODEL` and `pytriatt plot MODEL`: a model's architecture and its calibration."""

from __future__ import annotations

import sys

from .. import core, modelinfo
from ..gguf_model import open_model
from .common import CliError, add_model_argument, load_checked, plot_output, print_json, writing


def add_parser(sub) -> None:
    p = sub.add_parser("info", help="show a model's architecture and its TriAttention calibration",
                       description="Print the model's architecture and either its TriAttention calibration "
                                   "(format version, tokens, source, fingerprint and whether it matches this "
                                   "model, concentration profile) or how to add one. Exit status 0 either way; "
                                   "1 if the calibration is unreadable, 2 if the file is.")
    add_model_argument(p, help="GGUF path or model name")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("plot", help="draw a calibration: R per layer, attention vs distance (needs matplotlib)",
                       description="Draw the calibration of a model into an image: the mean resultant length R "
                                   "of every query head by layer, and for the most and least concentrated heads "
                                   "the predicted attention-versus-distance curve. Needs matplotlib: "
                                   "pip install 'pytriatt[plot]'.")
    add_model_argument(p, help="calibrated GGUF path or model name")
    p.add_argument("-o", "--output", required=True, help="image to write (.png, .svg, .pdf, ...)")
    p.add_argument("--heads", type=int, default=4, help="heads to draw curves for (default 4: half most, half "
                                                        "least concentrated)")
    p.add_argument("--json", action="store_true", help="print what was drawn as JSON")
    p.set_defaults(func=cmd_plot)



def cmd_info(args) -> int:
    path = load_checked(args.model)
    rep = modelinfo.info_report(path, model_arg=args.model)
    if args.json:
        print_json(rep)
    else:
        print(modelinfo.format_info(rep))
    cal = rep["calibration"]
    if cal is not None and "error" in cal:
        if not args.json:
            print(f"pytriatt: error: {path}: the calibration cannot be read: {cal['error']}", file=sys.stderr)
        return 1
    return 0


def cmd_plot(args) -> int:
    if args.heads < 1:
        raise CliError("--heads must be at least 1")
    out = plot_output(args.output)
    path = load_checked(args.model)
    if out.exists() and out.resolve() == path.resolve():
        raise CliError(f"refusing to overwrite the model {path} with a picture; choose another -o path")
    r = open_model(path)
    if r.field("triattention.version") is None:
        raise CliError(f"{path} carries no TriAttention calibration; add it with: "
                       f"{modelinfo.calibrate_command(args.model)}")
    try:
        cal = core.Calibration.from_gguf(r, strict=False)
    except NotImplementedError as e:
        raise CliError(str(e)) from None
    name = r.scalar("general.name", "") or path.name
    title = (f"TriAttention calibration of {name}  ({cal.calib_tokens} tokens"
             + (f" of {cal.calib_source}" if cal.calib_source else "") + ")")
    with writing(out):
        res = modelinfo.plot_calibration(cal, out, n_heads=args.heads, title=title)
    if args.json:
        print_json({k: v for k, v in res.items() if k != "profile"})
    else:
        heads = ", ".join(f"L{h['layer']}H{h['head']} (R {h['R']:.3f})" for h in res["heads"])
        print(f"wrote {out}: R of {res['profile']['n_heads']} heads by layer; attention vs distance for {heads}")
    return 0


