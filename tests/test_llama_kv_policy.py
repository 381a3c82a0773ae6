"""Specification of `llama_cpp.Llama(kv_policy=...)` and `pytriatt run --budget`: long generations in a fixed
KV budget through llama-cpp-python's high-level API and the command line."""

from __future__ import annotations

import json
import pickle
import subprocess
import sys

import pytest

import pytriatt
from pytriatt import gguf_io

llama_cpp = pytest.importorskip("llama_cpp")

POLICIES = ["tri", "streaming", "random"]
# small numbers so that tiny models run many eviction rounds in a fraction of a second
BUDGET, INTERVAL, N_BATCH = 64, 32, 32


def make(path, policy="tri", **kw):
    args = dict(n_ctx=2048, n_batch=N_BATCH, kv_policy=policy, kv_budget=BUDGET, kv_interval=INTERVAL,
                verbose=False, seed=1)
    args.update(kw)
    return llama_cpp.Llama(str(path), **args)


def generate(llm, tokens, n, used=None):
    """n greedy tokens; appends the cached token count seen after each step to `used`."""
    out = []
    for tok in llm.generate(tokens, temp=0.0):
        out.append(tok)
        if used is not None:
            used.append(llm.kv_policy_stats()["n_cells_used"])
        if len(out) == n:
            return out
    return out


def prompt_tokens(llm, words=8):
    return llm.tokenize(b" ".join([b"the quick brown fox jumps over the lazy dog"] * words))


# -- long generation in a fixed budget --------------------------------------------------

@pytest.mark.parametrize("policy", POLICIES)
def test_generation_far_beyond_the_budget_stays_within_budget_plus_interval(tiny_cal, policy):
    llm = make(tiny_cal, policy)
    prompt = llm.tokenize(b"hello")
    used = []
    out = generate(llm, prompt, 6 * BUDGET, used)
    assert len(out) == 6 * BUDGET
    assert llm.n_tokens == len(prompt) + len(out) - 1        # the last sampled token is not decoded yet
    assert max(used) <= BUDGET + INTERVAL                       # after every step
    st = llm.kv_policy_stats()
    assert st["n_rounds"] >= 5 and st["n_evicted"] == llm.n_tokens - st["n_cells_used"]
    assert st["policy"] == policy and st["budget"] == BUDGET and st["n_cells"] == llm.kv_cells
    pos = pytriatt.seq_positions(llm, 0)
    assert pos.size == st["n_cells_used"] and pos[-1] == llm.n_tokens - 1   # the newest token stays
    assert list(pos[:4]) == [0, 1, 2, 3]                                    # kv_sink=4 by default
    assert llm.kv_cells < llm.n_ctx()


def test_a_prompt_longer_than_the_cache_is_prefilled_in_batches_with_eviction_between(tiny_cal):
    llm = make(tiny_cal, n_ctx=4096)
    prompt = prompt_tokens(llm, 60)
    assert len(prompt) > 2 * llm.kv_cells                      # longer than the cells allocated
    used = []
    out = generate(llm, prompt, 20, used)
    assert len(out) == 20
    st = llm.kv_policy_stats()
    assert st["n_rounds"] >= len(prompt) // (BUDGET + INTERVAL)  # rounds ran during the prefill
    assert max(used) <= BUDGET + max(INTERVAL, N_BATCH)
    # the high-level API accepts it too: only n_ctx (the longest sequence) limits a prompt
    text = llm.detokenize(prompt[1:]).decode()
    res = llm(text, max_tokens=8, temperature=0.0)
    assert res["usage"]["prompt_tokens"] > 2 * llm.kv_cells
    with pytest.raises(ValueError, match="exceed context window of 4096"):
        llm(text * 4, max_tokens=8)


def test_chat_and_streaming_completions_work_with_a_policy(tiny_cal):
    llm = make(tiny_cal)
    chunks = list(llm.create_chat_completion(messages=[{"role": "user", "content": "hello " * 100}],
                                             max_tokens=2 * BUDGET, temperature=0.0, stream=True))
    assert len(chunks) >= 2
    assert llm.kv_policy_stats()["n_cells_used"] <= BUDGET + max(INTERVAL, N_BATCH)


# -- sizes ------------------------------------------------------------------------------

def test_n_ctx_is_the_longest_sequence_and_the_cache_is_sized_from_the_budget(tiny_cal):
    llm = make(tiny_cal, n_ctx=8192, kv_budget=100, kv_interval=50, n_batch=64)
    assert llm.n_ctx() == 8192 and llm.input_ids.shape == (8192,)
    assert llm.kv_cells == 256                 # 100 + max(50, 64) = 164, rounded up to 256 by llama.cpp
    assert llm.kv_policy_stats()["n_cells"] == 256 and llm.kv_policy_stats()["n_ctx"] == 8192
    llm = make(tiny_cal, n_ctx=8192, kv_budget=1000, kv_interval=128, n_batch=512)
    assert llm.kv_cells == 1536                # 1000 + 512
    # a budget the longest sequence never reaches is refused, as llama.cpp's --kv-budget is
    with pytest.raises(ValueError, match=r"kv_budget 2048 is not below the longest sequence \(512 tokens"):
        make(tiny_cal, n_ctx=512, kv_budget=2048)
    # n_ctx=0: the model's trained context
    llm = make(tiny_cal, n_ctx=0)
    assert llm.n_ctx() == llm._model.n_ctx_train() and llm.kv_cells < llm.n_ctx()


def test_one_rule_sizes_the_cache_everywhere():
    """llama_kv_policy_n_cells is the rule (Llama's cell counts above follow it); pytriatt's cells_needed, which
    eval and bench size their contexts with, is that function."""
    import ctypes

    import llama_cpp

    from pytriatt.policy import cells_needed

    p = llama_cpp.llama_kv_policy_default_params()
    p.budget, p.interval = 100, 50
    assert llama_cpp.llama_kv_policy_n_cells(ctypes.byref(p), 64) == 164     # a batch longer than the interval
    assert llama_cpp.llama_kv_policy_n_cells(ctypes.byref(p), 32) == 150     # an interval longer than the batch
    assert cells_needed(llama_cpp, 100, 50, 64) == 164 and cells_needed(llama_cpp, 100, 50, 32) == 150


@pytest.mark.parametrize("policy_type,budget,sink,interval,window", [
    ("tri", 64, 4, 128, 30),      # (64 - 4) / 2: half the budget past the sink stays the score's
    ("tri", 256, 4, 128, 126),
    ("tri", 1024, 4, 128, 128),   # an interval: what arrives before the next round re-scores the keys
    ("tri", 1024, 4, 32, 32),
    ("tri", 6, 4, 128, 1),        # at least the newest token
    ("streaming", 256, 4, 128, 1), ("random", 256, 4, 128, 1), ("snapkv", 256, 4, 128, 1),
])
def test_the_default_window_rule(policy_type, budget, sink, interval, window):
    """llama_kv_policy_resolve fills n_window = -1 with tri's rule, min(interval, (budget - sink) / 2) but at
    least 1, and with 1 for the baselines (their published form); pytriatt.policy.resolved_window reads the
    same rule from pytriatt._core."""
    import ctypes

    from pytriatt import policy

    p = llama_cpp.llama_kv_policy_default_params()
    p.type = llama_cpp.llama_kv_policy_type_from_name(policy_type.encode())
    p.budget, p.n_sink, p.interval = budget, sink, interval
    r = llama_cpp.llama_kv_policy_resolve(ctypes.byref(p))
    assert r.n_window == window == policy.resolved_window(policy_type, budget, sink, interval)
    assert r.horizon == policy.resolved_horizon(budget, interval) >= 1
    # explicit values pass through unchanged
    p.n_window, p.horizon = 7, 512
    r = llama_cpp.llama_kv_policy_resolve(ctypes.byref(p))
    assert (r.n_window, r.horizon) == (7, 512)


def test_libllama_names_the_policies_llama_accepts(tiny):
    """llama_kv_policy_type_name / _from_name read the contract's table (llama.cpp's --kv-policy and Llama use
    them; test_policy_contract checks that pytriatt._core has the same table)."""
    names = []
    while (name := llama_cpp.llama_kv_policy_type_name(len(names))) is not None:
        names.append(name.decode())
    assert [llama_cpp.llama_kv_policy_type_from_name(n.encode()) for n in names] == list(range(len(names)))
    assert names[llama_cpp.LLAMA_KV_POLICY_SNAPKV] == "snapkv"
    assert llama_cpp.llama_kv_policy_type_from_name(b"lru") == -1 and llama_cpp.llama_kv_policy_type_name(-1) is None
    with pytest.raises(ValueError, match="kv_policy must be one of 'full', 'tri', 'streaming', 'random', 'snapkv', "
                                         "got 'lru'"):
        llama_cpp.Llama(str(tiny), kv_policy="lru", verbose=False)


def test_one_rule_sizes_a_sliding_window_models_local_cache(tiny_gguf, tiny):
    """llama_kv_policy_n_cells_swa: the window (per sequence of a unified cache) plus one ubatch, as llama.cpp
    sizes the local cache without swa_full; 0 for a model without sliding-window layers. Llama and
    pytriatt's cells_needed_swa (eval) use it; llama.cpp pads the cache to 256 cells."""
    import ctypes

    from pytriatt.context import Model
    from pytriatt.policy import cells_needed_swa

    m, plain = Model(tiny_gguf("gemma3")), Model(tiny)
    try:
        n_swa = llama_cpp.llama_model_n_swa(m.ptr)
        assert n_swa > 0 and llama_cpp.llama_model_n_swa(plain.ptr) == 0
        p = llama_cpp.llama_context_default_params()
        p.n_ubatch, p.n_seq_max, p.kv_unified = 32, 3, True
        assert llama_cpp.llama_kv_policy_n_cells_swa(m.ptr, ctypes.byref(p)) == 3 * n_swa + 32
        p.kv_unified = False                                    # one stream per sequence: one window each
        assert llama_cpp.llama_kv_policy_n_cells_swa(m.ptr, ctypes.byref(p)) == n_swa + 32
        assert llama_cpp.llama_kv_policy_n_cells_swa(plain.ptr, ctypes.byref(p)) == 0
        assert cells_needed_swa(llama_cpp, m.ptr, 64) == n_swa + 64 and cells_needed_swa(llama_cpp, plain.ptr, 64) == 0
    finally:
        m.close()
        plain.close()
    llm = make(tiny_gguf("gemma3"), "streaming", n_batch=64)
    want = -(-(n_swa + 64) // 256) * 256
    assert llm.kv_stats()["n_cells_swa"] == want and llm.kv_cells == 256


# -- full attention is stock llama-cpp-python -------------------------------------------

def test_full_policy_is_exactly_stock_behaviour(tiny):
    stock = llama_cpp.Llama(str(tiny), n_ctx=1024, verbose=False, seed=1)
    prompt = prompt_tokens(stock)
    ref = generate(stock, prompt, 200)
    ref_text = stock("Once upon a time", max_tokens=32, temperature=0.0)["choices"][0]["text"]
    for policy in ("full", None):
        llm = llama_cpp.Llama(str(tiny), n_ctx=1024, verbose=False, seed=1, kv_policy=policy)
        assert llm.kv_policy == "full" and llm.n_ctx() == stock.n_ctx() == llm.kv_cells
        assert generate(llm, prompt, 200) == ref
        assert llm("Once upon a time", max_tokens=32, temperature=0.0)["choices"][0]["text"] == ref_text
        assert llm.kv_policy_stats()["n_rounds"] == 0


def test_a_policy_that_never_fires_generates_the_same_tokens_as_full_attention(tiny_cal):
    ref = generate(llama_cpp.Llama(str(tiny_cal), n_ctx=1024, verbose=False), prompt_tokens(make(tiny_cal)), 150)
    llm = make(tiny_cal, n_ctx=1024, kv_budget=512, kv_interval=128)
    assert generate(llm, prompt_tokens(llm), 150) == ref
    assert llm.kv_policy_stats()["n_rounds"] == 0 and llm.kv_cells < 1024


# -- errors -----------------------------------------------------------------------------

def test_bad_policies_are_clear_value_errors(tiny, tiny_cal, tiny_gguf, tmp_path):
    with pytest.raises(ValueError, match="carries no TriAttention statistics.*pytriatt calibrate"):
        make(tiny, "tri")
    with pytest.raises(ValueError, match="kv_budget 0 is out of range: it must be at least 1"):
        make(tiny_cal, "tri", kv_budget=0)
    with pytest.raises(ValueError, match="kv_interval 0 is out of range"):
        make(tiny_cal, "streaming", kv_interval=0)
    with pytest.raises(ValueError, match=r"kv_sink 60 \+ kv_window 8 exceed kv_budget 64"):
        make(tiny_cal, "streaming", kv_sink=60, kv_window=8)
    with pytest.raises(ValueError, match="kv_policy must be"):
        make(tiny_cal, "h2o")
    with pytest.raises(ValueError, match="embedding"):
        make(tiny_cal, "streaming", embedding=True)
    # the statistics of another model, given explicitly
    from pytriatt.calibrate import calibrate
    other = tiny_gguf("qwen3")
    cal, _ = calibrate(other, max_tokens=256, n_ctx=128, progress=False)
    gguf_io.write_with_metadata(other, tmp_path / "other.tri.gguf", cal.gguf_fields())
    with pytest.raises(ValueError, match="another model"):
        make(tiny, "tri", kv_calib=str(tmp_path / "other.tri.gguf"))
    # ... and statistics given explicitly for an uncalibrated model file
    assert make(tiny, "tri", kv_calib=str(tiny_cal)).kv_policy == "tri"


# -- prefix reuse, reset, state ---------------------------------------------------------

def count_evals(llm) -> list:
    seen = []
    orig = llm.eval
    llm.eval = lambda tokens: (seen.append(len(tokens)), orig(tokens))[1]
    return seen


def test_the_same_prompt_twice_gives_the_same_completion_after_evictions(tiny_cal):
    llm = make(tiny_cal)
    fresh = make(tiny_cal)
    text = "the quick brown fox " * 10
    a = llm(text, max_tokens=3 * BUDGET, temperature=0.0)["choices"][0]["text"]
    assert llm.kv_policy_stats()["n_rounds"] > 0
    b = llm(text, max_tokens=3 * BUDGET, temperature=0.0)["choices"][0]["text"]
    assert a == b == fresh(text, max_tokens=3 * BUDGET, temperature=0.0)["choices"][0]["text"]


def test_a_prompt_diverging_before_the_latest_eviction_is_evaluated_afresh(tiny_cal):
    llm = make(tiny_cal)
    prompt = prompt_tokens(llm)
    generate(llm, prompt, 3 * BUDGET)
    other = prompt[:10] + llm.tokenize(b"something else entirely", add_bos=False)
    evals = count_evals(llm)
    got = generate(llm, other, 100)
    assert evals[0] == len(other)                           # no prefix of the compressed cache reused
    assert got == generate(make(tiny_cal), other, 100)


def test_a_continuation_after_the_latest_eviction_reuses_the_compressed_cache(tiny_cal):
    llm = make(tiny_cal)
    prompt = prompt_tokens(llm)
    out = generate(llm, prompt, 3 * BUDGET)
    assert llm.kv_policy_stats()["n_rounds"] > 0
    evals = count_evals(llm)
    more = llm.tokenize(b" and then", add_bos=False)
    generate(llm, prompt + out + more, 10)
    assert evals[0] == 1 + len(more)          # only the unevaluated last token and the new ones


def test_reset_starts_a_clean_sequence(tiny_cal):
    llm = make(tiny_cal)
    generate(llm, prompt_tokens(llm), 3 * BUDGET)
    llm.reset()
    assert llm.n_tokens == 0 and pytriatt.seq_positions(llm, 0).size == 0


def test_save_and_load_state_with_a_compressed_cache(tiny_cal):
    llm = make(tiny_cal)
    prompt = prompt_tokens(llm)
    out = generate(llm, prompt, 3 * BUDGET)
    state = llm.save_state()
    cached = pytriatt.seq_positions(llm, 0)
    nxt = prompt + out + llm.tokenize(b" more", add_bos=False)
    a = generate(llm, nxt, 50)
    llm.load_state(state)
    assert (pytriatt.seq_positions(llm, 0) == cached).all()
    evals = count_evals(llm)
    assert generate(llm, nxt, 50) == a
    assert evals[0] == len(nxt) - state.n_tokens              # the restored cache is reused
    # the restored cache is taken as compressed throughout: a prompt diverging inside it starts afresh
    other = prompt[:10] + llm.tokenize(b" something else", add_bos=False)
    llm.load_state(state)
    evals = count_evals(llm)
    assert generate(llm, other, 20) == generate(make(tiny_cal), other, 20)
    assert evals[0] == len(other)


@pytest.mark.parametrize("shift", [False, True])
def test_prefix_reuse_follows_the_latest_round_with_and_without_shift(tiny_cal, shift):
    """A prompt diverging after the latest round reuses the compressed cache up to the divergence;
    one diverging before it is evaluated afresh (and generates what a new Llama generates)."""
    llm = make(tiny_cal, "streaming", kv_shift=shift)
    seq = prompt_tokens(llm)
    rounds, round_at = 0, None
    for tok in llm.generate(seq, temp=0.0):
        seq.append(tok)
        st = llm.kv_policy_stats()
        if st["n_rounds"] > rounds:
            rounds, round_at = st["n_rounds"], llm.n_tokens - 1   # the round ran before this token's eval
        if rounds >= 3 and llm.n_tokens == round_at + 12:
            break
    if not shift:
        assert st["pos_round_end"] == round_at                       # positions are token indices
    tail = llm.tokenize(b" a different ending", add_bos=False)
    evals = count_evals(llm)
    got = generate(llm, seq[:round_at + 4] + tail, 30)
    assert evals[0] == len(tail)                                     # reused up to the divergence
    pos = pytriatt.seq_positions(llm, 0)
    assert pos.size <= BUDGET + INTERVAL and len(got) == 30
    if shift:
        assert pos.tolist() == list(range(pos.size))
    other = seq[:round_at - 5] + tail
    evals = count_evals(llm)
    assert generate(llm, other, 30) == generate(make(tiny_cal, "streaming", kv_shift=shift), other, 30)
    assert evals[0] == len(other)                                    # afresh


def test_the_policy_survives_pickling(tiny_cal):
    llm = make(tiny_cal, "streaming", n_ctx=4096, kv_budget=300)
    clone = pickle.loads(pickle.dumps(llm))
    assert (clone.kv_policy, clone.n_ctx(), clone.kv_cells) == ("streaming", 4096, llm.kv_cells)
    assert clone.kv_policy_stats()["budget"] == 300


# -- the command line -------------------------------------------------------------------

def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "pytriatt", *args], capture_output=True, text=True, timeout=600)


@pytest.mark.parametrize("policy", ["streaming", "tri"])
def test_cli_run_with_a_budget(tiny_cal, policy):
    r = run_cli("run", str(tiny_cal), "--budget", "64", "--interval", "32", "--policy", policy, "-n", "200",
                "--ignore-eos", "-p", "hello", "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["n_generated"] == 200 and out["policy"] == policy and out["budget"] == 64
    assert out["evictions"] >= 4 and out["tokens_evicted"] >= 4 * 32
    assert out["kv_cells_peak"] <= 64 + 32 and out["kv_cells_used"] <= 64 + 32
    assert out["kv_cells"] < out["n_ctx"] == 4096            # -c defaults to the trained context with --budget
    assert out["score_ms"] >= 0 and out["evict_ms"] >= 0
    # the human-readable summary
    r = run_cli("run", str(tiny_cal), "--budget", "64", "--policy", policy, "-n", "200", "--ignore-eos", "-p", "hi")
    assert r.returncode == 0, r.stderr
    assert f"policy {policy}, budget 64" in r.stderr and "evictions" in r.stderr


def test_cli_tri_is_the_default_policy_with_a_budget_and_needs_a_calibration(tiny, tiny_cal):
    r = run_cli("run", str(tiny), "--budget", "64", "-n", "10")
    assert r.returncode == 2
    assert "carries no TriAttention calibration" in r.stderr and "pytriatt calibrate" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    r = run_cli("run", str(tiny), "--budget", "64", "--calib", str(tiny_cal), "-n", "10", "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["policy"] == "tri"
    r = run_cli("run", str(tiny), "--policy", "streaming", "-n", "10")
    assert r.returncode == 2 and "needs --budget" in r.stderr
    r = run_cli("run", str(tiny), "--policy", "streaming", "--budget", "0", "-n", "10")
    assert r.returncode == 2 and "--budget 0 is out of range: it must be at least 1" in r.stderr
    assert "Traceback" not in r.stderr


# -- a real model ------------------------------------------------------------------------

@pytest.mark.real
def test_smollm2_generates_400_tokens_in_a_budget_of_128(smollm2_path, tmp_path):
    cal = tmp_path / "smollm2.tri.gguf"
    r = run_cli("calibrate", "smollm2-135m", "-o", str(cal), "--tokens", "2048", "--ctx", "1024")
    assert r.returncode == 0, r.stderr
    llm = llama_cpp.Llama(str(cal), n_ctx=2048, kv_policy="tri", kv_budget=128, kv_interval=128, verbose=False)
    prompt = llm.tokenize(b"Here is a long story about a dragon who learned to program computers.")
    used = []
    out = generate(llm, prompt, 400, used)
    assert len(out) == 400 and max(used) <= 128 + 128
    st = llm.kv_policy_stats()
    assert st["n_rounds"] >= 2 and st["t_score_ms"] > 0
    words = llm.detokenize(out).decode(errors="replace").split()
    assert len(set(words)) > 20             # still text, not one token repeated


def test_kv_protect_prompt_keeps_the_whole_prompt_even_when_it_spans_several_batches(tiny_cal):
    llm = make(tiny_cal, "streaming", kv_sink=0, kv_protect_prompt=True)
    prompt = prompt_tokens(llm, words=2)
    assert N_BATCH < len(prompt) < BUDGET             # prefilled in several batches, protectable
    generate(llm, prompt, 3 * (BUDGET + INTERVAL))
    assert llm.kv_policy_stats()["n_rounds"] > 0
    held = pytriatt.seq_positions(llm, 0).tolist()
    assert held[: len(prompt)] == list(range(len(prompt)))


# -- position modes and the snapkv baseline ------------------------------------------------

def test_kv_shift_generates_past_the_trained_context_with_positions_inside_it(tmp_path):
    from pytriatt.testing.tiny import write_tiny_gguf
    short = write_tiny_gguf(tmp_path / "short.gguf", n_ctx_train=256)
    llm = make(short, "streaming", n_ctx=2048, kv_shift=True)
    prompt = prompt_tokens(llm, 4)
    used = []
    out = generate(llm, prompt, 900, used)
    assert len(out) == 900 and max(used) <= BUDGET + INTERVAL
    pos = pytriatt.seq_positions(llm, 0)
    assert pos.tolist() == list(range(pos.size))          # contiguous, far below the 256 trained positions
    assert llm.n_tokens > 3 * 256 and llm.kv_policy_stats()["shift"] is True
    # continuing the same text reuses the cache (the prefix extends past the latest round)
    more = generate(llm, prompt + out[:-1] + llm.tokenize(b" and", add_bos=False), 40)
    pos = pytriatt.seq_positions(llm, 0)
    assert len(more) == 40 and pos.tolist() == list(range(pos.size))


def test_snapkv_runs_through_the_high_level_api(tiny):
    llm = make(tiny, "snapkv")
    used = []
    out = generate(llm, prompt_tokens(llm), 4 * BUDGET, used)
    assert len(out) == 4 * BUDGET and max(used) <= BUDGET + INTERVAL
    assert llm.kv_policy_stats()["n_rounds"] >= 3 and llm.kv_policy == "snapkv"


@pytest.mark.parametrize("per_head", [True, "layer"])
def test_kv_per_head_keeps_a_token_set_per_head_in_the_same_cells(tiny_cal, per_head):
    llm = make(tiny_cal, "tri", kv_per_head=per_head)
    used = []
    out = generate(llm, prompt_tokens(llm), 4 * BUDGET, used)
    assert len(out) == 4 * BUDGET and max(used) <= BUDGET + INTERVAL
    st = llm.kv_policy_stats()
    assert st["n_rounds"] >= 3 and st["n_moved"] > 0
    assert llm.kv_cells == make(tiny_cal, "tri").kv_cells      # per head costs no extra cell
    # the same prompt again after evictions: the same completion (the cache is rebuilt the same way)
    llm.reset()
    assert generate(llm, prompt_tokens(llm), 4 * BUDGET) == out
    with pytest.raises(ValueError, match="kv_per_head must be"):
        make(tiny_cal, "tri", kv_per_head="all")
    with pytest.raises(ValueError, match="only tri and snapkv"):
        make(tiny_cal, "streaming", kv_per_head=True)


def test_cli_run_per_head(tiny_cal):
    r = run_cli("run", str(tiny_cal), "--budget", "64", "--interval", "32", "--per-head", "-n", "200",
                "--ignore-eos", "-p", "hello", "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["per_head"] == "head" and out["head_rows_moved"] > 0 and out["kv_cells_peak"] <= 64 + 32
    r = run_cli("run", str(tiny_cal), "--budget", "64", "--per-head", "layer", "-n", "150", "--ignore-eos", "-p", "hi")
    assert r.returncode == 0, r.stderr
    assert "per layer and KV head" in r.stderr and "head rows moved" in r.stderr
    r = run_cli("run", str(tiny_cal), "--budget", "64", "--policy", "streaming", "--per-head", "-n", "5")
    assert r.returncode == 2 and "only tri and snapkv" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.real
def test_gemma3_keeps_its_window_in_a_cache_of_its_own_size(tmp_path):
    """gemma3-270m (15 local layers with a 512-token window, 3 global; 1 KV head of 256 dims, f16): with
    budget 128 the global cache holds 128 + 128 cells (256 after llama.cpp's padding), the local one
    window + batch = 640 (768), as llama.cpp sizes it without a policy and without swa_full."""
    from pytriatt import models
    llm = llama_cpp.Llama(str(models.get("gemma3-270m")), n_ctx=4096, n_batch=128, kv_policy="streaming",
                          kv_budget=128, kv_interval=128, verbose=False)
    used = []
    out = generate(llm, llm.tokenize(b"Once upon a time"), 4 * 128, used)
    assert len(out) == 4 * 128 and max(used) <= 256
    st = llm.kv_stats()
    assert st["n_cells"] == llm.kv_cells == 256 and st["n_cells_swa"] == 768
    assert 512 <= st["n_cells_used_swa"] <= 768                 # the whole window, never evicted
    per_cell = 2 * 256 * 2                                      # K and V, 256 f16 values each, per layer
    assert st["kv_bytes"] == 3 * per_cell * 256 + 15 * per_cell * 768
    assert st["n_rounds"] >= 3


def test_the_memory_summary_is_what_llama_cpp_allocated(tiny, tiny_cal):
    """kv_bytes is the size of llama.cpp's KV buffers: f16 K and V rows of every layer for every cell
    (tiny llama: 2 layers x (2 KV heads x 16 dims) x 2 bytes x (K + V) = 256 bytes a cell), and the
    CLI's full-attention figure is that per cell times the sequence."""
    llm = make(tiny_cal, "streaming")
    st = llm.kv_stats()
    assert st["kv_bytes"] == 256 * st["n_cells"] == 256 * llm.kv_cells
    full = llama_cpp.Llama(str(tiny), n_ctx=512, verbose=False)
    assert full.kv_stats()["kv_bytes"] == 256 * 512 and full.kv_stats()["n_cells"] == 512
    r = run_cli("run", str(tiny_cal), "--budget", "64", "--interval", "32", "--policy", "streaming",
                "-n", "300", "--ignore-eos", "--json")
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout)
    assert res["kv_cells"] == 256 and res["kv_bytes"] == 256 * 256          # 64 + 32 rounded up to 256
    assert res["kv_bytes_full_attention"] == 256 * (res["n_prompt"] + res["n_generated"])
    assert res["evictions"] >= 5 and res["kv_cells_peak"] <= 64 + 32
