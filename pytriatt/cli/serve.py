"""`pytriatt serve`: llama-cpp-python's OpenAI-compatible server with a KV budget (pytriatt.serve does the work)."""

from __future__ import annotations

import os
from pathlib import Path

from .. import _llama, models
from ..models import DEFAULT_MODEL
from ..serve import INSTALL_HINT, KVMiddleware, KVMonitor, bind, import_server, is_loopback, log
from ..policy import KV_CACHE_TYPES
from .common import (CliError, add_cache_types, add_calib_options, add_ctx_size, add_gpu_layers, add_model_argument,
                     add_policy_options, add_threads, flash_attn, gpu_layers, kv_policy_args, load_checked, threads)


def _check_flags(args) -> None:
    if not 0 <= args.port <= 65535:
        raise CliError(f"--port {args.port} is out of range (0-65535; 0 picks a free port)")
    if args.ctx_size is not None and args.ctx_size < 0:
        raise CliError("-c/--ctx-size must be >= 0 (0: the model's trained context)")


def served_model_id(alias, model_arg: str, path) -> str:
    """The model id clients see in /v1/models and responses: --alias, else the model's name (pytriatt models
    list), else the GGUF file's name (not the path as typed, which would leak the directory layout)."""
    return alias or (model_arg if model_arg in models.MODELS else Path(path).name)


def build_app(args):
    """Check everything, load the model and return (asgi_app, monitor, listening_socket)."""
    _check_flags(args)
    model_arg = args.model or DEFAULT_MODEL
    path = load_checked(model_arg)
    _llama.require_patched("kv policy")
    server_app, ModelSettings, ServerSettings = import_server()
    kv = kv_policy_args(args, path, model_arg)   # the same settings `pytriatt run` passes to Llama
    sock = bind(args.host, args.port)
    alias = served_model_id(args.alias, model_arg, path)
    n_ctx = args.ctx_size if args.ctx_size is not None else (0 if kv else 2048)
    verbose = bool(os.environ.get("PYTRIATT_VERBOSE"))
    flash = flash_attn(args)          # before the model loads: a quantized V cache without it is refused
    try:
        ms = ModelSettings(model=str(path), model_alias=alias, n_ctx=n_ctx, n_gpu_layers=gpu_layers(args),
                           n_batch=args.n_batch, n_ubatch=args.n_batch, chat_format=args.chat_format,
                           # per-token logits of the whole sequence would grow without bound in long
                           # generations (n_ctx x n_vocab floats); logprobs need them, so they are off
                           logits_all=False, verbose=verbose, seed=args.seed, flash_attn=flash,
                           type_k=KV_CACHE_TYPES[args.cache_type_k][0], type_v=KV_CACHE_TYPES[args.cache_type_v][0],
                           **kv)
        ms.n_threads = ms.n_threads_batch = threads(args)
        # one Llama serves one request at a time: llama-cpp-python's default ends a running stream early (a
        # plain [DONE], which a client cannot tell from a finished answer) when another request arrives;
        # queue the others instead (llama-server -np N decodes several at once: docs/SERVING.md)
        ss = ServerSettings(host=args.host, port=sock.getsockname()[1], api_key=args.api_key,
                            interrupt_requests=False)
    except ValueError as e:   # pydantic's ValidationError is a ValueError
        sock.close()
        errors = getattr(e, "errors", lambda: [])()
        detail = "; ".join(f"{'.'.join(map(str, err['loc']))}: {err['msg']}" for err in errors) or str(e)
        raise CliError(f"bad server setting: {detail}") from None
    log(f"loading {path}" + (f" (kv policy {kv['kv_policy']}, budget {kv['kv_budget']})" if kv else ""))
    try:
        app = server_app.create_app(server_settings=ss, model_settings=[ms])
    except ValueError as e:
        sock.close()
        if isinstance(e, _llama.import_llama_cpp().KVPolicyError):   # the policy could not attach
            raise CliError(str(e)) from None
        raise CliError(f"llama.cpp could not load {path} ({e}); PYTRIATT_VERBOSE=1 shows llama.cpp's reason") from None
    llm = server_app._llama_proxy()
    monitor = KVMonitor(llm, kv or {"kv_policy": "full"}, alias)

    @app.get("/kv/stats", tags=["pytriatt"], summary="KV-cache eviction counters")
    async def kv_stats():
        return monitor.stats()

    return KVMiddleware(app, monitor), monitor, sock


def cmd_serve(args) -> int:
    import uvicorn
    app, monitor, sock = build_app(args)
    host, port = sock.getsockname()[:2]
    url_host = f"[{host}]" if ":" in host else host
    s = monitor.stats()
    kv = (f"kv policy {s['policy']}, budget {s['budget']}, interval {s['interval']}"
          if s["policy"] != "full" else "full attention")
    log(f"listening on http://{url_host}:{port}/v1  (model {monitor.alias!r}; {kv}; n_ctx {s['n_ctx']}, "
        f"{s['n_cells']} KV cells; counters at GET /kv/stats)")
    if not is_loopback(args.host):
        log(f"warning: --host {args.host} makes the server reachable from other machines"
            + ("" if args.api_key else "; anyone who reaches it can use it (set --api-key)"))
    config = uvicorn.Config(app, log_level=args.log_level, timeout_graceful_shutdown=5)
    server = uvicorn.Server(config)
    try:
        server.run(sockets=[sock])
    finally:
        sock.close()
    return 0


def add_parser(sub) -> None:
    p = sub.add_parser(
        "serve", help="OpenAI-compatible HTTP server with a KV budget (llama_cpp.server)",
        description="Serve a model over HTTP with the OpenAI API (llama-cpp-python's llama_cpp.server: "
                    "/v1/chat/completions, /v1/completions, streaming or not, /v1/models). With --budget N "
                    "the KV cache keeps at most N tokens (+ one interval) per sequence: the policy "
                    "(TriAttention by default, which needs a calibrated model) evicts the rest inside "
                    "llama_decode, so generations longer than the cache work. Every response carries "
                    "x-kv-policy / x-kv-budget headers; GET /kv/stats returns the eviction counters. "
                    "Binds to 127.0.0.1 unless --host says otherwise. Needs: " + INSTALL_HINT,
        epilog="example: pytriatt serve smollm2.tri.gguf --budget 2048 --port 8000, then point an OpenAI "
               "client at http://127.0.0.1:8000/v1 (any api_key unless --api-key is set). See docs/SERVING.md.")
    add_model_argument(p, required=False, help="GGUF path or model name (default: smollm2-135m)")
    add_policy_options(p, what="KV tokens a sequence keeps (without it the server keeps every token)")
    add_calib_options(p, calibrate=True)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000; 0 picks a free one, printed at start)")
    add_ctx_size(p, "longest sequence in tokens (default 2048; with --budget the model's trained context)")
    add_gpu_layers(p)
    add_cache_types(p)
    p.add_argument("-b", "--n-batch", type=int, default=512, help="prompt tokens per decode (default 512)")
    add_threads(p)
    p.add_argument("--alias", help="model id in /v1/models and responses (default: the model name, or the GGUF file's name)")
    p.add_argument("--chat-format", default=None,
                   help="llama-cpp-python chat format (default: the model's own chat template)")
    p.add_argument("--api-key", default=None, help="require this bearer token on every request")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"],
                   help="uvicorn's log level (default info: one line per request)")
    p.set_defaults(func=cmd_serve)
