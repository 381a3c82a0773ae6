"""Specification of llama.cpp's own server built from the patched tree (tools/build_llama.py --tools)
with the KV-policy arguments of patch llama.cpp/0005: `llama-server -np 2 --kv-policy ...` serves two
slots whose sequences evict independently, and a slot reused by a new request starts clean.

The tools build is made (or brought up to date, incrementally) once per session by the fixture;
PYTRIATT_TOOLS_BUILD=0 skips these tests, PYTRIATT_LLAMA_TOOLS=DIR takes the programs from DIR. Requests go to 127.0.0.1 only, each with a timeout, and
the server process is always killed."""

from __future__ import annotations

import http.client
import json
import os
import re
import socket
import subprocess
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from _server import ServerProcess, free_port, stop_process

REPO = Path(__file__).resolve().parent.parent
BUDGET, INTERVAL = 32, 16
BIND_ERROR = "couldn't bind HTTP server socket"   # llama-server's message for a port in use
TIMEOUT = 300  # seconds per request: two slots decode at once on a 2-core machine shared with other jobs

pytestmark = pytest.mark.real


def _get(url: str, timeout: float = 10):
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return json.load(r)


def _post(url: str, body: dict, timeout: float = TIMEOUT):
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return json.load(r)


class LlamaServer(ServerProcess):
    """llama-server on a free port of 127.0.0.1, ready once /health says ok."""

    name = "llama-server"

    def __init__(self, binary: Path, args: list[str], start_timeout: float = 120):
        # free_port() only says nothing listened a moment ago: if another process took the port before
        # llama-server bound it, start once more on another
        for attempt in (1, 2):
            self.port = free_port()
            self.url = f"http://127.0.0.1:{self.port}"
            try:
                super().__init__([str(binary), *args, "--host", "127.0.0.1", "--port", str(self.port)],
                                 start_timeout, poll_s=0.5)
                return
            except pytest.fail.Exception:
                if attempt == 2 or BIND_ERROR not in self.log:
                    raise

    def ready(self) -> bool:
        try:
            return _get(self.url + "/health", timeout=2).get("status") == "ok"
        except (urllib.error.URLError, OSError, ValueError):
            return False

    def slots(self) -> dict:
        return {s["id"]: s for s in _get(self.url + "/slots")}


def _complete(url: str, prompt: str, n_predict: int) -> dict:
    return _post(url + "/completion", {"prompt": prompt, "n_predict": n_predict, "ignore_eos": True,
                                       "temperature": 0, "cache_prompt": True})


def test_two_slots_evict_independently_and_a_reused_slot_starts_clean(llama_tools, smollm2_path):
    srv = LlamaServer(llama_tools["llama-server"],
                      ["-m", str(smollm2_path), "-np", "2", "-c", "4096", "-b", "64", "-t", "2",
                       "--kv-policy", "streaming", "--kv-budget", str(BUDGET), "--kv-interval", str(INTERVAL)])
    try:
        prompts = ["Write a long story about a lighthouse keeper.", "Explain how a steam engine works, in detail."]
        # the first prompt's start, decoded alone on a fresh slot: what a clean slot gives (a completion
        # decoded next to another slot's may differ in the last bits of its floats, and so in its text)
        fresh = _complete(srv.url, prompts[0], 16)
        n_gen = 4 * BUDGET
        with ThreadPoolExecutor(2) as pool:
            results = list(pool.map(lambda p: _complete(srv.url, p, n_gen), prompts))
        # both long requests ran to their limit, each on its own slot
        assert [r["tokens_predicted"] for r in results] == [n_gen, n_gen]
        assert sorted(r["id_slot"] for r in results) == [0, 1]
        slots = srv.slots()
        for r in results:
            kv = slots[r["id_slot"]]["kv_policy"]
            # each sequence was pruned and stays within budget + interval, although it grew past n_gen tokens
            assert kv["n_evicted"] > 0 and kv["n_rounds"] > 0
            assert 0 < kv["n_cells_used"] <= BUDGET + INTERVAL
            # a slot's length is -c, not the number of KV cells
            assert slots[r["id_slot"]]["n_ctx"] == 4096 and kv["n_cells"] < 4096

        # the first prompt again: the server picks the slot that holds it, whose cache lost evicted tokens
        # after that prompt (the prompt stops before the latest round); it starts from an empty sequence, so
        # greedy decoding repeats what a fresh slot gave, exactly
        again = _complete(srv.url, prompts[0], 16)
        assert again["id_slot"] == results[0]["id_slot"]
        assert again["content"] == fresh["content"]
        assert "differs from the cached tokens before the latest eviction round" in srv.log
        kv = srv.slots()[again["id_slot"]]["kv_policy"]
        # fresh counters: 16 tokens after a short prompt never reach the budget; the newest token is not decoded yet
        assert (kv["n_rounds"], kv["n_evicted"]) == (0, 0)
        assert kv["n_cells_used"] == again["tokens_evaluated"] + 16 - 1

        # a client that goes away mid-stream: the server stops that generation and goes on serving
        conn = http.client.HTTPConnection("127.0.0.1", srv.port, timeout=TIMEOUT)
        conn.request("POST", "/completion", json.dumps({"prompt": prompts[1], "n_predict": 2000, "ignore_eos": True,
                                                        "stream": True}), {"Content-Type": "application/json"})
        resp = conn.getresponse()
        assert resp.status == 200
        events = 0
        while events < 5:
            line = resp.readline()
            assert line, f"the stream ended after {events} events:\n{srv.log[-3000:]}"
            events += line.startswith(b"data: ")
        busy = [i for i, s in srv.slots().items() if s["is_processing"]]
        assert len(busy) == 1, srv.slots()   # the streaming one, with ~1995 tokens to go
        slot = busy[0]
        conn.close()
        # the abandoned generation (2000 tokens, a minute or more here) stops: its slot is soon idle, and
        # its sequence decoded only part of them (cached + evicted = the tokens it decoded)
        deadline = time.monotonic() + 120
        while srv.slots()[slot]["is_processing"] and time.monotonic() < deadline:
            time.sleep(0.5)
        abandoned = srv.slots()[slot]
        assert not abandoned["is_processing"], "the abandoned generation still runs after 120 s"
        kv = abandoned["kv_policy"]
        assert kv["n_cells_used"] + kv["n_evicted"] < 2000, kv
        # and the server goes on serving
        assert _complete(srv.url, "The capital of France is", 8)["tokens_predicted"] == 8
        assert srv.proc.poll() is None
    finally:
        srv.stop()


def _llama_server_error(llama_tools, args: list[str]) -> str:
    for attempt in (1, 2):    # once more on another port if the free one was taken meanwhile
        r = subprocess.run([str(llama_tools["llama-server"]), *args, "--host", "127.0.0.1", "--port",
                            str(free_port())], capture_output=True, text=True, timeout=120)
        if BIND_ERROR not in r.stdout + r.stderr:
            break
    assert r.returncode != 0
    return r.stdout + r.stderr


def test_a_conversation_continues_on_its_compressed_cache(llama_tools, smollm2_path):
    """A prompt that extends every token the slot has seen (evicted ones included) past the latest round
    continues on the compressed cache: only its new tokens are processed (llama_kv_policy_seq_reuse, the rule
    Llama follows too); one that differs before the round is processed afresh."""
    srv = LlamaServer(llama_tools["llama-server"],
                      ["-m", str(smollm2_path), "-np", "1", "-c", "4096", "-b", "64", "-t", "2",
                       "--kv-policy", "streaming", "--kv-budget", str(BUDGET), "--kv-interval", str(INTERVAL)])
    try:
        def tokens(text: str) -> list:
            return _post(srv.url + "/tokenize", {"content": text})["tokens"]

        def complete(prompt: list, n: int) -> dict:
            return _post(srv.url + "/completion", {"prompt": prompt, "n_predict": n, "ignore_eos": True,
                                                   "temperature": 0, "cache_prompt": True, "return_tokens": True})

        first_prompt = tokens("Write a long story about a lighthouse keeper.")
        first = complete(first_prompt, 4 * BUDGET)
        kv = srv.slots()[0]["kv_policy"]
        assert kv["n_rounds"] > 0 and kv["n_evicted"] > 0
        more = tokens(" The next morning, the keeper")
        history = first_prompt + first["tokens"]
        second = complete(history + more, 8)
        # continued: the shared tokens came from the cache, only the new ones were processed
        assert second["tokens_cached"] >= len(history) - 1, second
        assert second["timings"]["prompt_n"] <= len(more) + 1, second["timings"]
        after = srv.slots()[0]["kv_policy"]
        assert after["n_rounds"] >= kv["n_rounds"] and after["n_evicted"] >= kv["n_evicted"]   # the same sequence
        assert 0 < after["n_cells_used"] <= BUDGET + INTERVAL
        # a prompt that leaves the conversation before the latest round: processed from scratch
        third = complete(first_prompt[:4] + more, 4)
        assert third["timings"]["prompt_n"] == len(first_prompt[:4] + more), third["timings"]
        assert "differs from the cached tokens before the latest eviction round" in srv.log
    finally:
        srv.stop()


def test_context_shift_and_eviction_are_mutually_exclusive(llama_tools, smollm2_path):
    out = _llama_server_error(llama_tools, ["-m", str(smollm2_path), "--kv-policy", "streaming", "--context-shift"])
    assert "--context-shift and --kv-policy are mutually exclusive" in out


def test_bad_kv_flags_are_refused_at_start_up(llama_tools, smollm2_path):
    m = str(smollm2_path)
    assert "--kv-budget 0 is out of range: it must be at least 1" in _llama_server_error(
        llama_tools, ["-m", m, "--kv-policy", "streaming", "--kv-budget", "0"])
    assert "--kv-horizon 0 is out of range: it must be at least 1" in _llama_server_error(
        llama_tools, ["-m", m, "--kv-policy", "tri", "--kv-horizon", "0"])
    assert "--kv-budget 512 is not below the longest sequence (256 tokens" in _llama_server_error(
        llama_tools, ["-m", m, "--kv-policy", "streaming", "--kv-budget", "512", "-c", "256"])
    assert "unknown KV policy: sometimes (full, tri, streaming, random, snapkv)" in _llama_server_error(
        llama_tools, ["-m", m, "--kv-policy", "sometimes"])


def test_tri_on_an_uncalibrated_model_names_pytriatt_calibrate(llama_tools, smollm2_path):
    out = _llama_server_error(llama_tools, ["-m", str(smollm2_path), "--kv-policy", "tri", "--kv-budget", "64"])
    assert "failed to set the KV policy" in out and "pytriatt calibrate" in out


def test_the_help_lists_the_kv_arguments(llama_tools):
    r = subprocess.run([str(llama_tools["llama-server"]), "--help"], capture_output=True, text=True, timeout=60)
    for arg in ("--kv-policy", "--kv-budget", "--kv-interval", "--kv-sink", "--kv-window", "--kv-horizon",
                "--kv-calib", "--kv-per-head"):
        assert arg in r.stdout


@pytest.mark.parametrize("per_head", [None, "layer"])
def test_tri_scores_a_k_cache_that_lives_on_an_rpc_server(llama_tools, tiny_cal, per_head):
    """The K cache on a device (an RPC server): tri scores it there; per head, the head rows move there too
    (the ggml graph of llama-triatt-heads.cpp on the RPC backend)."""
    for attempt in (1, 2):    # once more on another port if it exits at once (the free port was taken)
        port = free_port()
        rpc = subprocess.Popen([str(llama_tools["ggml-rpc-server"]), "--host", "127.0.0.1", "--port", str(port)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 60
        while rpc.poll() is None:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    stop_process(rpc, timeout=10)
                    pytest.fail("ggml-rpc-server did not listen after 60 s")
                time.sleep(0.2)
        if rpc.poll() is None:
            break
    assert rpc.poll() is None, f"ggml-rpc-server exited ({rpc.returncode}) twice before it listened"
    try:
        # every layer, and so the KV cache, on the RPC device: the policy reads K back over the network
        srv = LlamaServer(llama_tools["llama-server"],
                          ["-m", str(tiny_cal), "--rpc", f"127.0.0.1:{port}", "-ngl", "99", "-np", "1", "-c", "2048",
                           "-b", "32", "--kv-policy", "tri", "--kv-budget", "32", "--kv-interval", "16", "-lv", "4"]
                          + (["--kv-per-head", per_head] if per_head else []))
        try:
            assert re.search(r"llama_kv_cache: RPC\d+\[127\.0\.0\.1:\d+\] KV buffer size", srv.log), srv.log[-3000:]
            r = _complete(srv.url, "one two three four", 4 * 32)
            assert r["tokens_predicted"] == 4 * 32
            kv = srv.slots()[r["id_slot"]]["kv_policy"]
            assert kv["n_rounds"] > 0 and kv["n_evicted"] > 0 and kv["t_score_ms"] > 0
            assert kv["n_cells_used"] <= 32 + 16
            assert (kv["n_moved"] > 0) == bool(per_head)
        finally:
            srv.stop()
    finally:
        stop_process(rpc, timeout=10)
