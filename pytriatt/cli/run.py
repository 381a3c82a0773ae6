"""`pytriatt run`: generate text through the patched llama.cpp, optionally under a KV budget."""

from __future__ import annotations

import codecs
import os
import sys
import time
from pathlib import Path

from .. import _llama
from ..models import DEFAULT_MODEL
from ..policy import resolved_horizon, resolved_window
from ..report import mib
from .common import (CliError, add_cache_types, add_calib_options, add_ctx_size, add_gpu_layers, add_model_argument,
                     add_policy_options, add_threads, flash_attn, gpu_layers, kv_policy_args, print_json,
                     load_checked, threads)


def add_parser(sub) -> None:
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
    p.add_argument("-n", "--n-predict", type=int, default=64,
                   help="tokens to generate (default 64; -1: until an end-of-generation token or a full context, "
                        "as llama-cli)")
    add_ctx_size(p, "longest sequence in tokens (default 2048; with --budget the model's trained context)")
    add_policy_options(p)
    add_calib_options(p, calibrate=True)
    add_gpu_layers(p)
    add_cache_types(p)
    add_threads(p)
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
    path = load_checked(args.model or DEFAULT_MODEL)   # a truncated or corrupt file: the exact reason, in one line
    lc = _llama.require_patched()
    n_gpu_layers = gpu_layers(args)
    if args.n_predict == 0 or args.n_predict < -1:
        raise CliError(f"-n/--n-predict {args.n_predict}: give a positive number of tokens, or -1 to generate "
                       f"until an end-of-generation token or a full context")
    until_full = args.n_predict == -1
    if args.file:
        try:
            args.prompt = Path(args.file).expanduser().read_text(encoding="utf-8", errors="replace")
        except (FileNotFoundError, IsADirectoryError, PermissionError) as e:
            raise CliError(f"-f {args.file}: cannot read it ({e.strerror})") from None
    kv = kv_policy_args(args, path, args.model or DEFAULT_MODEL)
    if kv:
        _llama.require_patched("kv policy")
    # with a KV budget the sequence may grow to the model's trained context by default
    n_ctx = args.ctx_size if args.ctx_size is not None else (0 if kv else 2048)
    extra = {flag: getattr(lc, f"GGML_TYPE_{name.upper()}")
             for flag, name in (("type_k", args.cache_type_k), ("type_v", args.cache_type_v))}
    extra["flash_attn"] = flash_attn(args)
    extra["n_threads"] = extra["n_threads_batch"] = threads(args)
    try:
        # with a budget, batches of one interval keep the cache at budget + interval cells
        if kv:
            extra["n_batch"] = max(32, min(512, args.interval))
        llm = lc.Llama(model_path=str(path), n_ctx=n_ctx, n_gpu_layers=n_gpu_layers,
                       seed=args.seed, verbose=bool(os.environ.get("PYTRIATT_VERBOSE")), **extra, **kv)
    except lc.KVPolicyError as e:   # the policy could not attach (e.g. statistics of another model)
        raise CliError(str(e)) from None
    except ValueError as e:
        quantized = [t for t in (args.cache_type_k, args.cache_type_v) if t not in ("f32", "f16", "bf16")]
        if quantized:
            raise CliError(f"llama.cpp could not create a context with a {quantized[0]} KV cache for {path.name}: "
                           f"a quantized cache needs the model's head size to be a multiple of the type's block "
                           f"(32 values for q8_0/q4_*); use -ctk/-ctv f16 (PYTRIATT_VERBOSE=1 shows llama.cpp's "
                           f"reason)") from None
        raise CliError(f"llama.cpp could not load {path} ({e}): the file is truncated or corrupt, or its "
                       f"architecture is not supported here; PYTRIATT_VERBOSE=1 shows llama.cpp's reason") from None
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
    # libllama's rule for what --protect-prompt keeps, before anything is printed (generate declares it again)
    if kv and lc.llama_kv_policy_set_prompt(llm.ctx, 0, n_prompt) != 0:
        raise CliError(f"--protect-prompt with --budget {args.budget}: "
                       f"{lc.llama_kv_policy_last_error().decode('utf-8', 'replace')}")
    if until_full and n_prompt >= llm.n_ctx():
        raise CliError(f"the prompt ({n_prompt} tokens) fills the context of {llm.n_ctx()}; raise -c/--ctx-size")
    if not until_full and n_prompt + args.n_predict > llm.n_ctx():
        raise CliError(f"prompt ({n_prompt} tokens) + {args.n_predict} new tokens exceed the context of "
                       f"{llm.n_ctx()}; raise -c/--ctx-size")
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
            status.update(f"[{n_gen}{'' if until_full else '/' + str(args.n_predict)} tokens, {n_gen / dt:.1f} "
                          f"tok/s, KV {st['n_cells_used']}/{st['n_cells']} cells, {st['n_rounds']} evictions]")
            if n_gen >= args.n_predict > 0:
                stop = "n_predict"
                break
            if n_prompt + n_gen >= llm.n_ctx():     # -n -1: the sequence fills the context
                stop = "ctx_full"
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
                   "n_predict": f"-n {args.n_predict} tokens generated",
                   "ctx_full": f"the context is full ({llm.n_ctx()} tokens, -c)"}[stop]
    result = {"model": str(path), "prompt": args.prompt, "text": "".join(text), "n_prompt": n_prompt,
              "stop": stop, "chat_template": chat,
              "n_generated": n_gen, "seconds": round(dt, 3), "tokens_per_s": round(n_gen / dt, 2) if dt else None,
              "kv_cells_used": st["n_cells_used"], "kv_cells": llm.kv_cells, "n_ctx": llm.n_ctx(),
              "policy": llm.kv_policy, "kv_bytes": st.get("kv_bytes"),
              "kv_cells_swa": st.get("n_cells_swa", 0), "kv_cells_used_swa": st.get("n_cells_used_swa", 0),
              "kv_bytes_full_attention": round(full_bytes) if full_bytes else None}
    if kv:
        result.update(budget=args.budget, interval=args.interval, sink=args.sink,
                      window=resolved_window(llm.kv_policy, args.budget, args.sink, args.interval, args.window),
                      horizon=resolved_horizon(args.budget, args.interval, args.horizon) if llm.kv_policy == "tri" else None,
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
        print_json(result)
        return 0
    sys.stdout.write("\n")
    lines = [f"{n_gen} tokens in {dt:.1f} s ({result['tokens_per_s']} tok/s), stopped because {stop_reason}; "
             f"sequence {n_seq} tokens "
             f"(prompt {n_prompt}); KV cache holds {st['n_cells_used']} of {llm.kv_cells} cells"
             + (f" (global layers), the sliding-window cache {result['kv_cells_used_swa']} of "
                f"{result['kv_cells_swa']}" if result["kv_cells_swa"] else "")]
    if result["kv_bytes"] and not kv:
        # full attention: the cache is allocated for the whole context; say how much of it this sequence used
        used = result["kv_bytes"] / st["n_cells"] * st["n_cells_used"]
        lines.append(f"full attention: KV memory allocated {mib(result['kv_bytes'])} ({llm.kv_cells} cells, the "
                     f"context); this sequence uses {mib(used)} of it ({st['n_cells_used']} cells)")
    elif result["kv_bytes"]:
        mem = f"KV memory allocated {mib(result['kv_bytes'])}"
        if full_bytes:
            mem += f"; full attention would need {mib(full_bytes)} for this sequence"
            if full_bytes > result["kv_bytes"]:
                mem += f" ({full_bytes / result['kv_bytes']:.1f}x the allocation)"
            else:
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


