"""Specification of `pytriatt serve`: an OpenAI-compatible server (llama_cpp.server) whose KV cache
keeps a fixed budget, driven by the real `openai` client over loopback.

One server (smollm2-135m, streaming policy, budget 64, interval 32) serves the module; every
request has a token limit and a timeout, and the server process is always killed at the end."""

from __future__ import annotations

import json
import re
import socket
import subprocess
import sys
import time
import urllib.request

import pytest

pytest.importorskip("fastapi", reason="the server extras are not installed: pip install 'pytriatt[serve]'")
pytest.importorskip("uvicorn", reason="the server extras are not installed: pip install 'pytriatt[serve]'")
pytest.importorskip("sse_starlette", reason="the server extras are not installed: pip install 'pytriatt[serve]'")
openai = pytest.importorskip("openai", reason="the openai client is not installed: pip install openai")

from _server import ServerProcess  # noqa: E402
from pytriatt import _llama  # noqa: E402
from pytriatt.cli import main  # noqa: E402

pytestmark = pytest.mark.real

BUDGET, INTERVAL = 64, 32
REQUEST_TIMEOUT = 120  # seconds, per request (a 2-core machine shared with other jobs decodes slowly)


class Server(ServerProcess):
    """A `pytriatt serve` subprocess, ready once it logs the address it listens on."""

    name = "pytriatt serve"

    def __init__(self, argv: list[str], start_timeout: float = 120):
        self.url = None
        super().__init__([sys.executable, "-m", "pytriatt", "serve", *argv, "--port", "0"], start_timeout)

    def ready(self) -> bool:
        for line in self.lines:
            m = re.search(r"listening on (http://127\.0\.0\.1:\d+)/v1", line)
            if m:
                self.url = m.group(1)
                return True
        return False

    def stats(self) -> dict:
        with urllib.request.urlopen(self.url + "/kv/stats", timeout=10) as r:
            return json.load(r)


@pytest.fixture(scope="module")
def server(smollm2_path):
    srv = Server([str(smollm2_path), "--policy", "streaming", "--budget", str(BUDGET),
                  "--interval", str(INTERVAL), "--alias", "smollm2", "--host", "127.0.0.1"])
    try:
        yield srv
    finally:
        srv.stop()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", timeout=REQUEST_TIMEOUT, max_retries=0)


def no_eog_bias(model) -> dict:
    """logit_bias that forbids every end-of-generation token, so generations run to max_tokens."""
    lc = _llama.require_patched()
    llm = lc.Llama(str(model), vocab_only=True, verbose=False)
    vocab = lc.llama_model_get_vocab(llm.model)
    eog = [t for t in range(llm.n_vocab()) if lc.llama_vocab_is_eog(vocab, t)]
    llm.close()
    assert eog
    return {str(t): -100 for t in eog}


@pytest.fixture(scope="module")
def no_eog(smollm2_path):
    return no_eog_bias(smollm2_path)


def test_models_lists_the_alias_and_every_response_names_the_policy_and_budget(server, client):
    raw = client.models.with_raw_response.list()
    assert raw.headers["x-kv-policy"] == "streaming"
    assert raw.headers["x-kv-budget"] == str(BUDGET)
    assert raw.headers["x-kv-interval"] == str(INTERVAL)
    assert [m.id for m in raw.parse().data] == ["smollm2"]
    st = server.stats()
    assert (st["policy"], st["budget"], st["interval"]) == ("streaming", BUDGET, INTERVAL)
    # n_ctx is the longest sequence (the model's trained context); the cache is much smaller
    assert st["n_ctx"] == 8192 and st["n_cells"] < st["n_ctx"]


def test_a_streamed_chat_of_4x_the_budget_completes_and_evicts_within_budget(server, client, no_eog):
    before = server.stats()
    n_gen = 4 * BUDGET
    stream = client.chat.completions.create(
        model="smollm2", messages=[{"role": "user", "content": "Tell me a long story about a lighthouse."}],
        max_tokens=n_gen, temperature=0, stream=True, logit_bias=no_eog)
    chunks, finish = [], None
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            chunks.append(chunk.choices[0].delta.content)
        if chunk.choices and chunk.choices[0].finish_reason:
            finish = chunk.choices[0].finish_reason
    assert finish == "length"
    assert len("".join(chunks)) > n_gen   # text came out all along, not only at the start
    st = server.stats()
    # read at once after the stream's end, the counters already include this request
    assert st["requests"] == before["requests"] + 1
    # the sequence is prompt + generated tokens (the last sampled token is not decoded)
    assert st["n_tokens"] >= n_gen
    assert st["n_rounds"] > before["n_rounds"] and st["n_evicted"] > before["n_evicted"]
    # every decoded batch left the cache within budget + interval (generation is one token a batch)
    assert st["n_cells_used"] <= BUDGET + INTERVAL
    assert st["n_cells_used_peak"] <= BUDGET + INTERVAL
    # evicted + cached = every token the sequence decoded
    assert st["n_tokens"] - st["n_cells_used"] <= st["n_evicted_total"]
    # and the log says so, one line per request (polled: the log line may come a moment later)
    deadline = time.monotonic() + 120
    while "POST /v1/chat/completions 200" not in server.log and time.monotonic() < deadline:
        time.sleep(0.1)
    line = [ln for ln in server.log.splitlines() if "POST /v1/chat/completions 200" in ln][-1]
    assert f"streaming budget {BUDGET}" in line and "tokens evicted" in line


def test_concurrent_streams_are_queued_and_every_one_completes(server, client, no_eog):
    """One Llama decodes one request at a time: the others wait; none is cut short (llama-cpp-python's own
    default would end a running stream with a bare [DONE] when the next request arrives)."""
    from concurrent.futures import ThreadPoolExecutor

    def stream(i: int):
        chunks, finish = [], None
        for chunk in client.completions.create(model="smollm2", prompt=f"Story number {i}: once upon a time",
                                               max_tokens=24, temperature=0, stream=True, logit_bias=no_eog):
            if chunk.choices and chunk.choices[0].text:
                chunks.append(chunk.choices[0].text)
            if chunk.choices and chunk.choices[0].finish_reason:
                finish = chunk.choices[0].finish_reason
        return len(chunks), finish

    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(stream, range(4)))
    assert all(finish == "length" and n > 0 for n, finish in results), results


def test_a_plain_completion_beyond_the_budget(server, client, no_eog):
    r = client.completions.create(model="smollm2", prompt="The history of the printing press", max_tokens=3 * BUDGET,
                                  temperature=0, logit_bias=no_eog)
    assert r.usage.completion_tokens == 3 * BUDGET
    assert r.choices[0].finish_reason == "length" and r.choices[0].text.strip()
    st = server.stats()
    assert st["n_tokens"] == r.usage.prompt_tokens + r.usage.completion_tokens - 1
    assert st["n_cells_used"] <= BUDGET + INTERVAL


def test_a_client_that_disconnects_mid_stream_leaves_the_server_serving(server, client, no_eog):
    before = server.stats()
    served = before["requests"]
    stream = client.completions.create(model="smollm2", prompt="Once upon a time", max_tokens=1000,
                                       stream=True, logit_bias=no_eog)
    for i, _ in enumerate(stream):
        if i == 5:
            break
    stream.close()   # drop the connection with ~995 tokens to go
    assert server.alive()
    r = client.completions.create(model="smollm2", prompt="The capital of France is", max_tokens=8, temperature=0)
    assert r.usage.completion_tokens >= 1
    assert server.alive()
    # the abandoned generation stopped short of its 1000 tokens: every token it decoded is now evicted or
    # among the <= budget + interval cached ones, so a run to the end would have evicted > 1000 - 96
    evicted = server.stats()["n_evicted_total"] - before["n_evicted_total"]
    assert evicted + BUDGET + INTERVAL < 1000, evicted
    # both requests are counted once their responses have ended (the dropped one's may end a moment later)
    deadline = time.monotonic() + 120
    while server.stats()["requests"] < served + 2 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert server.stats()["requests"] == served + 2


def _serve_error(capsys, argv: list[str]) -> str:
    assert main(["serve", *argv]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.count("\n") == 1, err
    return err


def test_the_served_model_id_is_the_alias_else_the_model_name_else_the_file_name(tmp_path):
    from pytriatt.cli.serve import served_model_id

    path = tmp_path / "sub" / "my-model.Q4_K.gguf"
    assert served_model_id("chat", "./sub/my-model.Q4_K.gguf", path) == "chat"
    assert served_model_id(None, "smollm2-135m", path) == "smollm2-135m"
    assert served_model_id(None, "./sub/my-model.Q4_K.gguf", path) == "my-model.Q4_K.gguf"


def test_budget_flags_out_of_range_are_refused_at_start_up(capsys, smollm2_path):
    m = str(smollm2_path)
    assert "--budget 0 is out of range" in _serve_error(capsys, [m, "--policy", "streaming", "--budget", "0"])
    assert "--interval 0 is out of range" in _serve_error(
        capsys, [m, "--policy", "streaming", "--budget", "64", "--interval", "0"])
    assert "--budget 64 is not below the longest sequence (64 tokens" in _serve_error(
        capsys, [m, "--policy", "streaming", "--budget", "64", "-c", "64"])
    assert "--sink 8 + --window 1 exceed --budget 8" in _serve_error(capsys, [m, "--policy", "streaming", "--budget", "8", "--sink", "8"])
    assert "needs --budget" in _serve_error(capsys, [m, "--policy", "streaming"])
    assert "--port 70000 is out of range" in _serve_error(capsys, [m, "--port", "70000"])


def test_a_busy_port_is_refused_in_one_line(capsys, smollm2_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(1)
        port = s.getsockname()[1]
        err = _serve_error(capsys, [str(smollm2_path), "--policy", "streaming", "--budget", "64",
                                    "--port", str(port)])
    assert f"cannot listen on 127.0.0.1:{port}" in err


def test_tri_on_an_uncalibrated_model_names_pytriatt_calibrate(smollm2_path):
    # as a user runs it: a process, exit status 2, one line, no traceback
    r = subprocess.run([sys.executable, "-m", "pytriatt", "serve", str(smollm2_path), "--budget", "64",
                        "--port", "0"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    assert "carries no TriAttention calibration" in r.stderr and "pytriatt calibrate" in r.stderr
    assert "Traceback" not in r.stderr


def test_tri_scores_the_cache_of_a_calibrated_model(tiny_cal):
    # TriAttention is the default policy with --budget; the tiny model has no chat template: /v1/completions
    srv = Server([str(tiny_cal), "--budget", "32", "--interval", "16", "-c", "2048", "-b", "32"])
    try:
        client = openai.OpenAI(base_url=srv.url + "/v1", api_key="unused", timeout=REQUEST_TIMEOUT, max_retries=0)
        stream = client.completions.create(model="tiny", prompt="one two three four", max_tokens=4 * 32,
                                           stream=True, logit_bias=no_eog_bias(tiny_cal))
        finish = [c.choices[0].finish_reason for c in stream if c.choices and c.choices[0].finish_reason]
        assert finish == ["length"]
        st = srv.stats()
        assert (st["policy"], st["budget"], st["interval"]) == ("tri", 32, 16)
        assert st["n_tokens"] >= 4 * 32
        # TriAttention scored the cache and kept it within budget + interval
        assert st["n_rounds"] > 0 and st["n_evicted"] > 0 and st["t_score_ms"] > 0
        assert st["n_cells_used_peak"] <= 32 + 16
    finally:
        srv.stop()
