"""`pytriatt serve`: an OpenAI-compatible HTTP server whose KV cache keeps a fixed budget.

The server is llama-cpp-python's own (`llama_cpp.server`: /v1/chat/completions,
/v1/completions, streaming or not, /v1/models, ...); pytriatt starts it with the
model's `Llama(kv_policy=..., kv_budget=...)` settings (patch
llama-cpp-python/0005 adds them to its ModelSettings, so
`python -m llama_cpp.server --kv_policy tri --kv_budget 2048` works too) and adds:

- response headers `x-kv-policy`, `x-kv-budget`, `x-kv-interval` on every response;
- GET /kv/stats: the eviction counters and cache occupancy as JSON (see docs/SERVING.md);
- one log line per completion request with the same counters.
"""

from __future__ import annotations

import ipaddress
import os
import socket
import sys
import threading
import time

from . import _llama
from .cli import CliError, resolve_model

SERVER_PACKAGES = "fastapi uvicorn sse-starlette starlette-context pydantic-settings"
INSTALL_HINT = "pip install 'pytriatt[serve]'   (or: pip install " + SERVER_PACKAGES + ")"
# requests whose end is logged with the counters
COMPLETION_PATHS = ("/v1/completions", "/v1/chat/completions", "/v1/engines/copilot-codex/completions")


def log(msg: str) -> None:
    print(f"pytriatt serve: {msg}", file=sys.stderr, flush=True)


class KVMonitor:
    """Eviction counters of the served Llama, sampled after every decoded batch.

    The snapshot is taken by the thread that runs the generation, right after its
    llama_decode, so GET /kv/stats never touches the llama.cpp context while a
    request is decoding (and never waits for that request to end)."""

    def __init__(self, llm, kv: dict, alias: str):
        self.llm = llm
        self.alias = alias
        self.kv = kv
        self.policy = kv.get("kv_policy", "full")
        self.peak = 0
        self.requests = 0
        self.rounds_total = 0
        self.evicted_total = 0
        self._last = (0, 0)
        self._lock = threading.Lock()
        self.snapshot = self._sample()
        eval_batch = llm.eval

        def eval_and_sample(tokens):
            eval_batch(tokens)
            try:
                self.snapshot = self._sample()
            except Exception as e:   # counters must never break a generation
                log(f"could not read the KV counters: {e}")

        # Llama.generate decodes through self.eval: sample after each batch
        llm.eval = eval_and_sample
        reset_sequence = llm.reset

        def reset_and_sample():
            reset_sequence()
            # a cleared sequence may restart llama.cpp's counters: the totals continue from here
            self.snapshot = self._sample()

        llm.reset = reset_and_sample

    def _sample(self) -> dict:
        llm = self.llm
        with self._lock:
            snap = {"model": self.alias, "policy": self.policy,
                    "budget": self.kv.get("kv_budget"), "interval": self.kv.get("kv_interval"),
                    "sink": self.kv.get("kv_sink"), "window": self.kv.get("kv_window"),
                    "n_ctx": llm.n_ctx(), "n_cells": llm.kv_cells, "n_tokens": int(llm.n_tokens)}
            if self.policy != "full":
                st = llm.kv_policy_stats(0)
                # llama.cpp's counters may restart when a sequence is cleared and reused (per-sequence
                # counters): a drop means a restart, so the totals add the new count
                now = (int(st["n_rounds"]), int(st["n_evicted"]))
                for i, name in enumerate(("rounds_total", "evicted_total")):
                    delta = now[i] - self._last[i] if now[i] >= self._last[i] else now[i]
                    setattr(self, name, getattr(self, name) + delta)
                self._last = now
                for k, v in st.items():
                    if k not in snap and isinstance(v, (int, float)) and not isinstance(v, bool):
                        snap[k] = round(v, 3) if isinstance(v, float) else int(v)
                used = int(st["n_cells_used"])
            else:
                used = len(_llama.seq_positions(llm, 0)) if hasattr(_llama, "seq_positions") else 0
                snap.update(n_rounds=0, n_evicted=0)
            snap["n_cells_used"] = used
            self.peak = max(self.peak, used)
            snap.update(n_cells_used_peak=self.peak, rounds_total=self.rounds_total,
                        evicted_total=self.evicted_total, requests=self.requests, time=round(time.time(), 3))
        return snap

    def stats(self) -> dict:
        return dict(self.snapshot, requests=self.requests)

    def headers(self) -> list:
        h = [(b"x-kv-policy", self.policy.encode())]
        if self.policy != "full":
            h += [(b"x-kv-budget", str(self.kv["kv_budget"]).encode()),
                  (b"x-kv-interval", str(self.kv["kv_interval"]).encode())]
        return h

    def request_done(self, method: str, path: str, status, seconds: float) -> None:
        self.requests += 1
        s = self.stats()
        if self.policy == "full":
            kv = f"full attention, cache {s['n_cells_used']}/{s['n_cells']} cells"
        else:
            kv = (f"{self.policy} budget {s['budget']}: cache {s['n_cells_used']}/{s['n_cells']} cells "
                  f"(peak {s['n_cells_used_peak']}), sequence {s['n_tokens']} tokens, "
                  f"{s['n_rounds']} eviction rounds, {s['n_evicted']} tokens evicted, "
                  f"scoring {s.get('t_score_ms', 0):.0f} ms")
        log(f"{method} {path} {status if status is not None else 'aborted'} in {seconds:.1f} s; kv: {kv}")


class KVMiddleware:
    """ASGI middleware: KV headers on every response, counters logged when a completion ends
    (for a streamed one, when its last event is sent or the client goes away)."""

    def __init__(self, app, monitor: KVMonitor):
        self.app = app
        self.monitor = monitor

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        status = None

        async def send_with_headers(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message.get("status")
                message = dict(message, headers=list(message.get("headers", [])) + self.monitor.headers())
            await send(message)

        t0 = time.perf_counter()
        try:
            await self.app(scope, receive, send_with_headers)
        finally:
            if scope.get("path") in COMPLETION_PATHS:
                self.monitor.request_done(scope.get("method", "?"), scope["path"], status,
                                          time.perf_counter() - t0)


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _bind(host: str, port: int) -> socket.socket:
    """Bind and listen before the model loads: a busy port fails at once, and --port 0 gets a free one."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as e:
        raise CliError(f"--host {host}: cannot resolve it ({e.strerror})") from None
    family, _, _, _, addr = infos[0]
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(addr)
    except OSError as e:
        sock.close()
        raise CliError(f"cannot listen on {host}:{port} ({e.strerror}); choose another --port "
                       f"(--port 0 picks a free one)") from None
    sock.listen(128)
    sock.set_inheritable(True)
    return sock


def _kv_settings(args, path, model_arg: str) -> dict:
    """The KV-policy fields of llama_cpp.server's ModelSettings (empty: full attention, stock behaviour):
    the same as `pytriatt run` passes to Llama."""
    from .cli import _kv_policy_args
    return _kv_policy_args(args, path, model_arg)


def _check_flags(args) -> None:
    if not 0 <= args.port <= 65535:
        raise CliError(f"--port {args.port} is out of range (0-65535; 0 picks a free port)")
    if args.ctx_size is not None and args.ctx_size < 0:
        raise CliError("-c/--ctx-size must be >= 0 (0: the model's trained context)")
    if args.policy == "full" or (args.policy is None and args.budget is None):
        return
    if args.budget is None:
        raise CliError(f"--policy {args.policy} needs --budget N (the KV tokens a sequence keeps)")
    if args.budget < 1:
        raise CliError(f"--budget {args.budget} is out of range: it must be at least 1 (tokens kept in the KV cache)")
    if args.interval < 1:
        raise CliError(f"--interval {args.interval} is out of range: it must be at least 1")
    if args.sink < 0 or args.window < 0:
        raise CliError("--sink and --window must be >= 0")
    if args.sink + max(args.window, 1) > args.budget:
        raise CliError(f"--sink {args.sink} + --window {max(args.window, 1)} exceed --budget {args.budget}: "
                       f"the protected tokens must fit in the budget")
    if args.ctx_size and args.budget >= args.ctx_size:
        raise CliError(f"--budget {args.budget} must be below -c/--ctx-size {args.ctx_size} (the longest "
                       f"sequence); with a budget that large nothing is ever evicted: use --policy full")


def _import_server():
    try:
        import uvicorn  # noqa: F401
        from llama_cpp.server import app as server_app
        from llama_cpp.server.settings import ModelSettings, ServerSettings
    except ImportError as e:
        raise CliError(f"the server needs packages that are not installed ({e}): {INSTALL_HINT}") from None
    if "kv_policy" not in ModelSettings.model_fields:
        raise _llama.PatchMissingError(
            "the installed llama-cpp-python's server does not know kv_policy (patch "
            f"llama-cpp-python/0005-server-kv-policy.patch is missing). Fix: {_llama.FIX_COMMAND}")
    return server_app, ModelSettings, ServerSettings


def build_app(args):
    """Check everything, load the model and return (asgi_app, monitor, listening_socket)."""
    from .models import DEFAULT_MODEL
    _check_flags(args)
    model_arg = args.model or DEFAULT_MODEL
    path = resolve_model(model_arg)
    _llama.require_patched("kv policy")
    server_app, ModelSettings, ServerSettings = _import_server()
    kv = _kv_settings(args, path, model_arg)
    missing = [k for k in kv if k not in ModelSettings.model_fields]
    if missing:
        raise _llama.PatchMissingError(
            f"the installed llama-cpp-python's server does not know {', '.join(missing)}: rebuild it. "
            f"Fix: {_llama.FIX_COMMAND}")
    sock = _bind(args.host, args.port)
    alias = args.alias or model_arg
    n_ctx = args.ctx_size if args.ctx_size is not None else (0 if kv else 2048)
    verbose = bool(os.environ.get("PYTRIATT_VERBOSE"))
    try:
        ms = ModelSettings(model=str(path), model_alias=alias, n_ctx=n_ctx, n_gpu_layers=args.n_gpu_layers,
                           n_batch=args.n_batch, n_ubatch=args.n_batch, chat_format=args.chat_format,
                           # per-token logits of the whole sequence would grow without bound in long
                           # generations (n_ctx x n_vocab floats); logprobs need them, so they are off
                           logits_all=False, verbose=verbose, seed=args.seed, **kv)
        if args.threads:
            ms.n_threads = args.threads
        ss = ServerSettings(host=args.host, port=sock.getsockname()[1], api_key=args.api_key)
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
        if str(e).startswith("kv_policy"):
            raise CliError(str(e)) from None
        raise CliError(f"llama.cpp could not load {path} ({e}); PYTRIATT_VERBOSE=1 shows llama.cpp's reason") from None
    llm = server_app._llama_proxy()
    if kv and kv["kv_budget"] >= llm.n_ctx():
        sock.close()
        raise CliError(f"--budget {kv['kv_budget']} must be below the longest sequence, {llm.n_ctx()} tokens "
                       f"(-c/--ctx-size, default the model's trained context): nothing would ever be evicted")
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
    if not _is_loopback(args.host):
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
    from .cliargs import add_model_argument
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
    p.add_argument("--budget", type=int, help="KV tokens a sequence keeps: evict down to this many (default "
                                              "policy tri); without it the server keeps every token")
    p.add_argument("--policy", choices=["tri", "streaming", "random", "snapkv", "full"],
                   help="eviction policy (default: tri with --budget, else full); snapkv is a slower baseline")
    p.add_argument("--interval", type=int, default=128,
                   help="evict once the cache would hold budget + interval tokens (default 128)")
    p.add_argument("--sink", type=int, default=4, help="never evict the first N tokens (default 4)")
    p.add_argument("--window", type=int, default=1, help="never evict the last N tokens (default 1)")
    p.add_argument("--protect-prompt", action="store_true", help="never evict the prompt")
    p.add_argument("--per-head", nargs="?", const="head", choices=["head", "layer"], default=None,
                   help="tri, snapkv: every KV head keeps its own tokens (head: one set per KV head, shared by the "
                        "layers, as the paper does; layer: one per KV head of each layer); same memory")
    p.add_argument("--shift", action="store_true",
                   help="after each eviction shift the kept tokens down so positions stay contiguous")
    p.add_argument("--calib", help="tri: GGUF with this model's triattention.* statistics (default: the model)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000; 0 picks a free one, printed at start)")
    p.add_argument("-c", "--ctx-size", type=int, default=None,
                   help="longest sequence in tokens (default 2048; with --budget the model's trained context)")
    p.add_argument("-ngl", "--n-gpu-layers", type=int, default=0, help="layers to offload to the GPU")
    p.add_argument("-b", "--n-batch", type=int, default=512, help="prompt tokens per decode (default 512)")
    p.add_argument("-t", "--threads", type=int, default=None, help="CPU threads (default: half the cores)")
    p.add_argument("--alias", help="model id in /v1/models and responses (default: MODEL as given)")
    p.add_argument("--chat-format", default=None,
                   help="llama-cpp-python chat format (default: the model's own chat template)")
    p.add_argument("--api-key", default=None, help="require this bearer token on every request")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"],
                   help="uvicorn's log level (default info: one line per request)")
    p.set_defaults(func=cmd_serve)
