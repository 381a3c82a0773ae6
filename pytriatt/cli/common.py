"""What every subcommand shares: errors, the model argument, llama.cpp's flags spelled and defaulted one way,
the KV policy options of run and serve, and output helpers. Subcommand modules import this, never each other."""

from __future__ import annotations

import json
import os
import struct
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Optional

from .. import _llama
from .. import policy as kv_policy
from ..errors import UserError

CliError = UserError     # an error the user can fix; printed as one line, exit status 2

MODEL_HELP = "GGUF path or model name (see: pytriatt models list)"


def print_json(obj) -> None:
    json.dump(obj, sys.stdout, indent=1)
    sys.stdout.write("\n")


# -- the model ------------------------------------------------------------------------

def add_model_argument(p, *, required: bool = True, help: str = MODEL_HELP) -> None:
    """MODEL as a positional argument or as llama.cpp's -m/--model."""
    p.add_argument("model", nargs="?", help=f"{help}; or -m MODEL")
    p.add_argument("-m", "--model", dest="model_flag", metavar="MODEL", help="the model, as llama.cpp spells it")
    p.set_defaults(model_required=required)


def resolve_model_argument(args) -> None:
    """Fold -m/--model into args.model; raises CliError with what to do when it is missing or given twice."""
    flag = getattr(args, "model_flag", None)
    if flag is not None:
        if args.model is not None and args.model != flag:
            raise CliError(f"two models given ({args.model!r} and -m {flag!r}): pass one")
        args.model = flag
    if getattr(args, "model_required", False) and not args.model:
        raise CliError("no model given: pass a GGUF path or a model name (pytriatt models list), "
                       "as MODEL or -m MODEL")


def resolve_model(name_or_path: str) -> Path:
    from .. import models
    p = Path(name_or_path).expanduser()
    if p.is_dir():
        raise CliError(f"{p} is a directory; give the path of a .gguf file")
    if p.is_file():
        check_gguf(p)
        return p
    if name_or_path in models.MODELS:
        return models.get(name_or_path)
    raise CliError(f"{name_or_path}: no such file, and not a known model name "
                   f"(known: {', '.join(sorted(models.MODELS))})")


def check_gguf(path: Path) -> None:
    """Fail early, in one line, on files llama.cpp would reject with a less helpful message."""
    with open(path, "rb") as f:
        head = f.read(24)
    if head[:4] != b"GGUF":
        raise CliError(f"{path} is not a GGUF file (it does not start with the GGUF magic)")
    if len(head) < 24:
        raise CliError(f"{path} is truncated (only {len(head)} bytes)")
    version = struct.unpack("<I", head[4:8])[0]
    if version not in (2, 3):
        raise CliError(f"{path}: GGUF version {version} is not supported (expected 3)")


def load_checked(model: str) -> Path:
    """resolve_model plus a full header check (truncated or corrupt files fail here, in one line)."""
    from .. import gguf_io
    path = resolve_model(model)
    gguf_io.read_header(path)
    return path


def calib_file(arg: Optional[str]) -> Optional[Path]:
    """--calib FILE, checked to exist and be a GGUF (None: not given)."""
    if not arg:
        return None
    calib = Path(arg).expanduser()
    if not calib.is_file():
        raise CliError(f"--calib {calib}: no such file")
    check_gguf(calib)
    return calib


def number_list(text: str, flag: str, kind=int) -> list:
    """A comma-separated list of positive numbers (--budgets 128,256, --positions 2048,8192, --depths 0.1,0.5)."""
    what = "whole numbers" if kind is int else "numbers"
    try:
        out = [kind(x.replace("_", "")) for x in text.split(",") if x.strip()]
    except ValueError:
        raise CliError(f"{flag} takes comma-separated {what}, got {text!r}") from None
    if not out or any(v <= 0 for v in out):
        raise CliError(f"{flag} takes positive numbers, got {text!r}")
    return out


def output_file(arg: str) -> Path:
    """A file a command will write (-o, --plot), checked before any work: not a directory, in a directory that
    exists and takes new files (tried by creating and removing a file there: write permission and a read-only
    file system, which os.access does not tell for root). CliError in one line otherwise."""
    out = Path(arg).expanduser()
    if out.is_dir():
        raise CliError(f"cannot write {out}: it is a directory; give a file path")
    parent = out.parent
    if not parent.exists():
        raise CliError(f"cannot write {out}: the directory {parent} does not exist; create it first")
    if not parent.is_dir():
        raise CliError(f"cannot write {out}: {parent} is not a directory")
    try:
        fd, probe = tempfile.mkstemp(dir=parent, prefix=".pytriatt-", suffix=".probe")
    except OSError as e:
        raise CliError(f"cannot write {out}: the directory {parent} does not take new files "
                       f"({e.strerror or e})") from None
    os.close(fd)
    os.unlink(probe)
    return out


@contextmanager
def writing(path):
    """Around the write of an output file: an OSError (a file system that turned read-only, a full disk) is one
    line naming the file, not a traceback."""
    try:
        yield
    except OSError as e:
        raise CliError(f"cannot write {path}: {e.strerror or e}") from None


def plot_output(arg: str) -> Path:
    """--plot / -o of a picture: output_file's checks, and matplotlib installed, before any work."""
    from ..report import require_matplotlib
    out = output_file(arg)
    try:
        require_matplotlib()
    except ImportError as e:
        raise CliError(str(e)) from None
    return out


# -- llama.cpp's flags, one spelling and one default everywhere ---------------------------

def add_threads(p) -> None:
    p.add_argument("-t", "--threads", type=int, default=None,
                   help=f"CPU threads (default: every core this process may use, here {_llama.default_threads()})")


def threads(args) -> int:
    if args.threads is None:
        return _llama.default_threads()
    if args.threads < 1:
        raise CliError("-t/--threads must be >= 1")
    return args.threads


def add_gpu_layers(p) -> None:
    p.add_argument("-ngl", "--n-gpu-layers", type=int, default=0, help="layers to offload to the GPU (99: all)")


def gpu_layers(args) -> int:
    """-ngl, with a note when the build cannot offload (llama.cpp would ignore it silently)."""
    n = args.n_gpu_layers
    if n < 0:
        raise CliError("-ngl/--n-gpu-layers must be >= 0")
    if n:
        lc = _llama.require_patched()
        if not lc.llama_supports_gpu_offload():
            print(f"pytriatt: note: this llama-cpp-python was built without GPU support, so -ngl {n} is "
                  f"ignored (rebuild with CMAKE_ARGS=\"-DGGML_CUDA=ON\" tools/setup.sh)", file=sys.stderr)
    return n


def add_ctx_size(p, help: str) -> None:
    p.add_argument("-c", "--ctx-size", type=int, default=None, help=help)


def add_cache_types(p, *, flash: bool = True) -> None:
    """-ctk/-ctv, and -fa (flash=False where llama.cpp's automatic choice is kept: bench)."""
    types = ", ".join(kv_policy.KV_CACHE_TYPES)
    p.add_argument("-ctk", "--cache-type-k", default="f16", choices=list(kv_policy.KV_CACHE_TYPES), metavar="TYPE",
                   help=f"KV cache type for K (default f16; one of {types})")
    p.add_argument("-ctv", "--cache-type-v", default="f16", choices=list(kv_policy.KV_CACHE_TYPES), metavar="TYPE",
                   help="KV cache type for V (default f16; a quantized V needs flash attention, which -fa auto "
                        "turns on)")
    if flash:
        p.add_argument("-fa", "--flash-attn", choices=["on", "off", "auto"], default="auto",
                       help="flash attention (default auto: on for a quantized V cache, else off)")


def flash_attn(args) -> bool:
    """-fa on|off|auto as llama.cpp reads it: auto turns it on where it is needed, for a quantized V cache."""
    quantized_v = args.cache_type_v not in kv_policy.UNQUANTIZED
    flash = {"on": True, "off": False}.get(args.flash_attn, quantized_v)
    if quantized_v and not flash:
        raise CliError(f"-ctv {args.cache_type_v}: a quantized V cache needs flash attention in llama.cpp; "
                       f"use -fa on (or auto), or -ctv f16")
    return flash


# -- calibration ------------------------------------------------------------------------

def add_calib_options(p, *, calibrate: bool) -> None:
    from ..calibrate import QUICK_TOKENS
    p.add_argument("--calib", help="tri: GGUF with this model's triattention.* statistics "
                                   "(default: the model itself)")
    if calibrate:
        p.add_argument("--calibrate", action="store_true",
                       help="tri on an uncalibrated model: calibrate it now (once, cached; smollm2-135m: about 40 s "
                            "for the default size on 2 CPU cores, see the README)")
    p.add_argument("--calib-tokens", type=int, default=QUICK_TOKENS,
                   help=f"tokens of text a calibration made here uses (default {QUICK_TOKENS}; "
                        f"`pytriatt calibrate` uses 32768, as the paper)")


# -- the KV policy options of run and serve ------------------------------------------------

def add_round_options(p, *, window: bool = True) -> None:
    """--interval, --sink and (unless the subcommand uses --window for something else) --window."""
    p.add_argument("--interval", type=int, default=kv_policy.DEFAULT_INTERVAL,
                   help=f"evict once the cache holds budget + interval tokens (default {kv_policy.DEFAULT_INTERVAL})")
    p.add_argument("--sink", type=int, default=kv_policy.DEFAULT_SINK,
                   help=f"never evict the first N tokens (default {kv_policy.DEFAULT_SINK})")
    if window:
        p.add_argument("--window", type=int, default=kv_policy.DEFAULT_WINDOW,
                       help="never evict the last N tokens (default -1: the rule, for tri min(interval, "
                            "(budget - sink) / 2), for the other policies 1; 1 is the paper's)")
    p.add_argument("--horizon", type=int, default=kv_policy.DEFAULT_HORIZON,
                   help=f"tri: rank keys for the queries 1, 2, 4, ..., N tokens ahead (default -1: the rule; "
                        f"{kv_policy.PAPER_HORIZON} is the paper's)")


def add_policy_options(p, *, what: str = "KV tokens to keep") -> None:
    p.add_argument("--budget", type=int, help=f"{what}: evict down to this many (default policy tri)")
    p.add_argument("--policy", choices=list(kv_policy.POLICIES),
                   help="eviction policy (default: tri with --budget, else full); snapkv is a slower baseline")
    add_round_options(p)
    p.add_argument("--protect-prompt", action="store_true",
                   help="never evict the prompt (the first prompt of a conversation)")
    p.add_argument("--per-head", nargs="?", const="head", choices=["head", "layer"], default=None,
                   help="tri, snapkv: every KV head keeps its own tokens (head: one set per KV head, shared by the "
                        "layers, as the paper does; layer: one per KV head of each layer); same memory")
    p.add_argument("--shift", action="store_true",
                   help="after each eviction shift the kept tokens down so positions stay contiguous (and inside "
                        "the model's trained context for generations longer than it); default: keep their "
                        "positions, as the paper does")


def kv_policy_args(args, path: Path, model_arg: str) -> dict:
    """Llama keyword arguments of the KV eviction options (empty: full attention, stock behaviour)."""
    policy = args.policy or ("tri" if args.budget is not None else "full")
    n_ctx = getattr(args, "ctx_size", None) or (_trained_context(path) if args.budget is not None else 0)
    kv_policy.validate(policy, args.budget, interval=args.interval, sink=args.sink, window=args.window,
                       per_head=getattr(args, "per_head", None), shift=args.shift, horizon=args.horizon, n_ctx=n_ctx)
    if policy == "full":
        return {}
    kw = dict(kv_policy=policy, kv_budget=args.budget, kv_interval=args.interval, kv_sink=args.sink,
              kv_window=args.window, kv_horizon=args.horizon, kv_protect_prompt=args.protect_prompt,
              kv_shift=args.shift)
    if getattr(args, "per_head", None):
        kw["kv_per_head"] = args.per_head
    if policy == "tri":
        kw["kv_calib"] = str(_tri_calibration(args, path, model_arg))
    note = sliding_window_note(path, args.budget)
    if note:
        print(note, file=sys.stderr)
    return kw


def _trained_context(path: Path) -> int:
    """The model's trained context (the longest sequence when -c is not given; 0: unknown, not checked)."""
    from .. import gguf_io
    try:
        hdr = gguf_io.read_header(path)
        return int(hdr.get(f"{hdr.get('general.architecture')}.context_length") or 0)
    except Exception:   # the loader reports unreadable files itself
        return 0


def _tri_calibration(args, path: Path, model_arg: str) -> Path:
    from .. import gguf_io, modelinfo
    from ..calibrate import ensure_calibrated
    can_calibrate = hasattr(args, "calibrate")
    calib = calib_file(args.calib)
    if calib is not None and not gguf_io.has_prefix(calib, "triattention."):
        raise CliError(f"--calib {calib} carries no TriAttention statistics: pass a calibrated file, made with "
                       f"{modelinfo.calibrate_command(args.model or model_arg)}"
                       + (", or --calibrate instead of --calib" if can_calibrate else ""))
    if calib is not None:
        from ..fingerprint import calibration_mismatch
        why = calibration_mismatch(calib, path)
        if why:
            # the file is a calibration, of another model: this model needs its own
            raise CliError(f"--calib: {why} ({modelinfo.calibrate_command(args.model or model_arg)}), and pass "
                           f"its output as --calib")
    calib = calib or path
    if gguf_io.has_prefix(calib, "triattention."):
        return calib
    if getattr(args, "calibrate", False):
        return ensure_calibrated(path, tokens=args.calib_tokens, n_gpu_layers=args.n_gpu_layers)
    now = "--calibrate to do it now, " if can_calibrate else ""
    raise CliError(f"{calib} carries no TriAttention calibration; add it with: "
                   f"{modelinfo.calibrate_command(model_arg)} "
                   f"(or pass {now}--calib FILE, or use --policy streaming)")


def sliding_window_note(path: Path, budget: int) -> Optional[str]:
    """What a budget means on a model with sliding-window layers (Gemma 2/3, gpt-oss, Cohere2): the
    policy evicts from the global layers' cache only; the local layers keep their own window in a
    cache of their own, as llama.cpp keeps it without a policy (docs/eviction.md)."""
    from .. import gguf_io
    try:
        hdr = gguf_io.read_header(path)
        n_swa = int(hdr.get(f"{hdr.get('general.architecture')}.attention.sliding_window") or 0)
    except Exception:   # the loader reports unreadable files itself
        return None
    if n_swa <= 0:
        return None
    return (f"note: this model's sliding-window layers keep their own {n_swa}-token window (a cache of their "
            f"own, never evicted); --budget {budget} applies to its global-attention layers")
