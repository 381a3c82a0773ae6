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
import socket
import sys
import threading
import time

from . import _llama
from .errors import UserError

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
            # a cleared sequence restarts its own counters (libllama's totals go on): show it at once
            self.snapshot = self._sample()

        llm.reset = reset_and_sample

    def _resolved(self, what: str):
        """The window / horizon the policy runs with (libllama's rules where the settings left them to it)."""
        if self.policy == "full":
            return None
        from .policy import (DEFAULT_HORIZON, DEFAULT_INTERVAL, DEFAULT_SINK, DEFAULT_WINDOW, resolved_horizon,
                             resolved_window)
        kv = self.kv
        budget, interval = kv.get("kv_budget"), kv.get("kv_interval") or DEFAULT_INTERVAL
        if what == "window":
            w = kv.get("kv_window")
            return resolved_window(self.policy, budget, kv.get("kv_sink", DEFAULT_SINK), interval,
                                   DEFAULT_WINDOW if w is None else w)
        h = kv.get("kv_horizon")
        return resolved_horizon(budget, interval, DEFAULT_HORIZON if h is None else h) if self.policy == "tri" else None

    def _sample(self) -> dict:
        llm = self.llm
        with self._lock:
            snap = {"model": self.alias, "policy": self.policy,
                    "budget": self.kv.get("kv_budget"), "interval": self.kv.get("kv_interval"),
                    "sink": self.kv.get("kv_sink"), "window": self._resolved("window"),
                    "horizon": self._resolved("horizon"),
                    "n_ctx": llm.n_ctx(), "n_cells": llm.kv_cells, "n_tokens": int(llm.n_tokens)}
            if self.policy != "full":
                st = llm.kv_policy_stats(0)   # with libllama's totals since start-up (n_rounds_total, ...)
                for k, v in st.items():
                    if k not in snap and isinstance(v, (int, float)) and not isinstance(v, bool):
                        snap[k] = round(v, 3) if isinstance(v, float) else int(v)
                used = int(st["n_cells_used"])
            else:
                used = len(_llama.seq_positions(llm, 0)) if hasattr(_llama, "seq_positions") else 0
                snap.update(n_rounds=0, n_evicted=0, n_rounds_total=0, n_evicted_total=0)
            snap["n_cells_used"] = used
            self.peak = max(self.peak, used)
            snap.update(n_cells_used_peak=self.peak, requests=self.requests, time=round(time.time(), 3))
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
        status, counted = None, False
        completion = scope.get("path") in COMPLETION_PATHS
        t0 = time.perf_counter()

        def done():
            nonlocal counted
            if completion and not counted:
                counted = True
                self.monitor.request_done(scope.get("method", "?"), scope["path"], status, time.perf_counter() - t0)

        async def send_with_headers(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message.get("status")
                message = dict(message, headers=list(message.get("headers", [])) + self.monitor.headers())
            elif message["type"] == "http.response.body" and not message.get("more_body", False):
                # counted before the last byte leaves: a client that reads /kv/stats as soon as its
                # (streamed) completion ends already sees it
                done()
            await send(message)

        try:
            await self.app(scope, receive, send_with_headers)
        finally:
            done()    # a request that ended without its last body (client gone, error) still counts


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def bind(host: str, port: int) -> socket.socket:
    """Bind and listen before the model loads: a busy port fails at once, and --port 0 gets a free one."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as e:
        raise UserError(f"--host {host}: cannot resolve it ({e.strerror})") from None
    family, _, _, _, addr = infos[0]
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(addr)
    except OSError as e:
        sock.close()
        raise UserError(f"cannot listen on {host}:{port} ({e.strerror}); choose another --port "
                       f"(--port 0 picks a free one)") from None
    sock.listen(128)
    sock.set_inheritable(True)
    return sock


def import_server():
    try:
        import uvicorn  # noqa: F401
        from llama_cpp.server import app as server_app
        from llama_cpp.server.settings import ModelSettings, ServerSettings
    except ImportError as e:
        raise UserError(f"the server needs packages that are not installed ({e}): {INSTALL_HINT}") from None
    if "kv_policy" not in ModelSettings.model_fields:
        raise _llama.PatchMissingError(
            "the installed llama-cpp-python's server does not know kv_policy (patch "
            f"llama-cpp-python/0005-server-kv-policy.patch is missing). Fix: {_llama.FIX_COMMAND}")
    return server_app, ModelSettings, ServerSettings


