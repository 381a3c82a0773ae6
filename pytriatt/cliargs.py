"""Command-line arguments every subcommand spells the same way (llama.cpp's spelling where it has one)."""

from __future__ import annotations

MODEL_HELP = "GGUF path or model name (see: pytriatt models list)"


def add_model_argument(p, *, required: bool = True, help: str = MODEL_HELP) -> None:
    """MODEL as a positional argument or as llama.cpp's -m/--model."""
    p.add_argument("model", nargs="?", help=f"{help}; or -m MODEL")
    p.add_argument("-m", "--model", dest="model_flag", metavar="MODEL", help="the model, as llama.cpp spells it")
    p.set_defaults(model_required=required)


def resolve_model_argument(args) -> None:
    """Fold -m/--model into args.model; raises ValueError with what to do when it is missing or given twice."""
    flag = getattr(args, "model_flag", None)
    if flag is not None:
        if args.model is not None and args.model != flag:
            raise ValueError(f"two models given ({args.model!r} and -m {flag!r}): pass one")
        args.model = flag
    if getattr(args, "model_required", False) and not args.model:
        raise ValueError("no model given: pass a GGUF path or a model name (pytriatt models list), "
                         "as MODEL or -m MODEL")
