"""Saving and restoring a compressed sequence, reusing a sequence, and two contexts in two threads.

A sequence that went through eviction rounds has holes in its positions. Its state, saved with
llama_state_seq_get_data (or llama-cpp-python's Llama.save_state) and restored into a fresh
context, must give the same next-token logits and keep evicting exactly like the original. A
sequence that is emptied and reused (a server slot given to a new user) starts fresh: its own
prompt length, protections and counters. Two contexts on one model, evicting in two threads at
once, keep exactly the positions each keeps alone.
"""

from __future__ import annotations

import ctypes
import threading

import numpy as np
import pytest

import pytriatt
from pytriatt import gguf_io

llama_cpp = pytest.importorskip("llama_cpp")

BUDGET, INTERVAL = 32, 16


@pytest.fixture(scope="module")
def lc():
    from pytriatt import _llama
    return _llama.require_patched("kv policy")


@pytest.fixture(scope="module")
def tiny(tiny_gguf):
    return tiny_gguf("llama")


@pytest.fixture(scope="module")
def tiny_cal(tiny, tmp_path_factory, lc):
    from pytriatt.calibrate import calibrate
    cal, _ = calibrate(tiny, max_tokens=512, n_ctx=256, progress=False)
    dst = tmp_path_factory.mktemp("cal") / "tiny-llama.tri.gguf"
    gguf_io.write_with_metadata(tiny, dst, cal.gguf_fields())
    return dst


@pytest.fixture(scope="module")
def model(tiny_cal):
    from pytriatt.context import Model
    m = Model(tiny_cal)
    yield m
    m.close()


def stream(model, n, seed=0):
    """n token ids of the tiny vocabulary (deterministic)."""
    rng = np.random.default_rng(seed)
    return [int(t) for t in rng.integers(3, model.n_vocab, size=n)]


def context(model, policy="tri", flash_attn=None, n_seq_max=1, **kw):
    """A context with a KV policy. flash_attn=False turns llama.cpp's flash attention off: its CPU
    kernel's result depends on where the cells sit (about 1e-3 on these logits), so only without
    it may a context with another cell layout give bit-for-bit (1e-6) equal logits."""
    from pytriatt import _llama
    from pytriatt.context import Context
    lc = _llama.require_patched()
    orig = lc.llama_context_default_params

    def params():
        p = orig()
        if flash_attn is not None:
            p.flash_attn_type = 1 if flash_attn else 0
        return p

    lc.llama_context_default_params = params
    try:
        ctx = Context(model, n_ctx=256, n_batch=32, n_threads=1, n_seq_max=n_seq_max)
    finally:
        lc.llama_context_default_params = orig
    args = dict(budget=BUDGET, interval=INTERVAL, calib=model.path, sink=4)
    args.update(kw)
    ctx.set_kv_policy(policy, **args)
    return ctx


def run_steps(ctx, tokens, start_pos):
    """Decode tokens one by one from start_pos; returns [(positions, logits)] after each."""
    out = []
    for i, tok in enumerate(tokens):
        logits = ctx.decode([tok], pos0=start_pos + i)
        out.append((ctx.positions(0).copy(), logits))
    return out


def compressed(model, policy="tri", n=100, **kw):
    """A context whose sequence 0 went through eviction rounds (positions with holes; the streaming
    policy keeps sink 4, so its positions have a hole too)."""
    ctx = context(model, policy, **kw)
    toks = stream(model, n)
    ctx.decode(toks[:20], pos0=0)
    run_steps(ctx, toks[20:], 20)
    pos = ctx.positions(0)
    assert pos[-1] == n - 1 and pos.size < n and np.any(np.diff(pos) > 1), "no holes: nothing to test"
    return ctx, n


# -- llama_state_seq_get_data / set_data ------------------------------------------------

def seq_state(lc, ctx, seq_id=0):
    size = lc.llama_state_seq_get_size(ctx.ctx_ptr, seq_id)
    assert size > 0
    buf = (ctypes.c_uint8 * size)()
    n = lc.llama_state_seq_get_data(ctx.ctx_ptr, buf, size, seq_id)
    assert n == size
    return buf, size


@pytest.mark.parametrize("policy", ["tri", "streaming"])
def test_sequence_state_with_holes_round_trips_and_keeps_evicting(lc, model, policy):
    a, n = compressed(model, policy, flash_attn=False)
    buf, size = seq_state(lc, a)
    b = context(model, policy, flash_attn=False)
    assert lc.llama_state_seq_set_data(b.ctx_ptr, buf, size, 0) == size, "llama.cpp refused the saved sequence"
    np.testing.assert_array_equal(b.positions(0), a.positions(0))        # same positions, same holes
    again, _ = seq_state(lc, b)
    assert bytes(again) == bytes(buf)                                     # lossless: K, V, positions
    c = context(model, policy, flash_attn=False)                          # a second restore
    assert lc.llama_state_seq_set_data(c.ctx_ptr, buf, size, 0) == size
    # the same next-token logits, then the same eviction rounds for 60 more tokens. The restored
    # cells sit contiguously, the original's scattered: the sums run in another order, so the
    # logits agree to float rounding at first (1e-5) and drift slowly as new keys differ in
    # their last bits (bounded here by 2e-3); two restores agree exactly.
    more = stream(model, 60, seed=1)
    ra, rb, rc = run_steps(a, more, n), run_steps(b, more, n), run_steps(c, more, n)
    for i, ((pa, la), (pb, lb), (pc, lc_)) in enumerate(zip(ra, rb, rc)):
        np.testing.assert_array_equal(pb, pa, err_msg=f"kept positions differ after {i + 1} tokens")
        np.testing.assert_allclose(lb, la, rtol=1e-5 if i == 0 else 0, atol=1e-5 if i == 0 else 2e-3,
                                   err_msg=f"logits differ after {i + 1} tokens")
        np.testing.assert_array_equal(pc, pb)
        np.testing.assert_array_equal(lc_, lb)
        assert pa.size <= BUDGET + INTERVAL
    assert b.kv_policy_stats(0)["n_rounds"] >= 2                         # the restored context evicted


def test_sequence_state_with_flash_attention_on(lc, model):
    """With flash attention (llama.cpp's default on CPU) the logits agree to its own layout noise and
    the eviction decisions exactly."""
    a, n = compressed(model, "tri", flash_attn=True)
    buf, size = seq_state(lc, a)
    b = context(model, "tri", flash_attn=True)
    assert lc.llama_state_seq_set_data(b.ctx_ptr, buf, size, 0) == size
    for (pa, la), (pb, lb) in zip(run_steps(a, stream(model, 40, seed=1), n), run_steps(b, stream(model, 40, seed=1), n)):
        np.testing.assert_array_equal(pb, pa)
        np.testing.assert_allclose(lb, la, atol=5e-3)
        assert np.argmax(lb) == np.argmax(la)


def test_sequence_state_restores_into_another_sequence_id(lc, model):
    a, n = compressed(model, "streaming", flash_attn=False)
    buf, size = seq_state(lc, a)
    b = context(model, "streaming", flash_attn=False, n_seq_max=2)  # same policy parameters as a
    assert lc.llama_state_seq_set_data(b.ctx_ptr, buf, size, 1) == size
    np.testing.assert_array_equal(b.positions(1), a.positions(0))
    tok = stream(model, 1, seed=2)
    np.testing.assert_allclose(b.decode(tok, pos0=n, seq_id=1), a.decode(tok, pos0=n), rtol=1e-4, atol=1e-4)


def test_a_restored_sequence_counts_as_compressed_up_to_its_newest_token(lc, model):
    """A saved state carries the cells, not how rounds made them: the restored sequence reports no
    rounds, all its tokens as what rounds left (pos_round_end after the newest), and no prompt,
    unless one was declared before the restore."""
    a, n = compressed(model, "tri", flash_attn=False)
    assert 0 < a.kv_policy_stats(0)["pos_round_end"] <= n - 1
    buf, size = seq_state(lc, a)
    # b had a history of its own (a protected 20-token prompt, rounds) in the sequence it restores into
    b = context(model, "streaming", flash_attn=False, protect_prompt=True, sink=0)
    own = stream(model, 70, seed=8)
    b.decode(own[:20], pos0=0)
    run_steps(b, own[20:], 20)
    assert b.kv_policy_stats(0)["n_rounds"] > 0 and set(range(20)) <= set(b.positions(0).tolist())
    assert lc.llama_state_seq_set_data(b.ctx_ptr, buf, size, 0) == size
    st = b.kv_policy_stats(0)
    assert st["n_rounds"] == 0 and st["pos_round_end"] == n
    # b's old prompt no longer protects anything: streaming keeps only the newest tokens
    run_steps(b, stream(model, 60, seed=9), n)
    assert b.kv_policy_stats(0)["n_rounds"] > 0 and b.positions(0).min() >= n
    # a prompt declared before the restore is the restored sequence's
    c = context(model, "streaming", flash_attn=False, protect_prompt=True, sink=0)
    c.set_prompt(0, 10)
    assert lc.llama_state_seq_set_data(c.ctx_ptr, buf, size, 0) == size
    run_steps(c, stream(model, 60, seed=9), n)
    prompt = [p for p in a.positions(0).tolist() if p < 10]
    assert prompt and [p for p in c.positions(0).tolist() if p < n] == prompt


# -- Llama.save_state / load_state --------------------------------------------------------

def make_llama(path, policy="tri"):
    return llama_cpp.Llama(str(path), n_ctx=1024, n_batch=32, kv_policy=policy, kv_budget=BUDGET,
                           kv_interval=INTERVAL, verbose=False, seed=1, n_threads=1)


@pytest.mark.parametrize("policy", ["tri", "streaming"])
def test_llama_save_and_load_state_of_a_compressed_sequence(tiny_cal, policy):
    a = make_llama(tiny_cal, policy)
    prompt = a.tokenize(b"the quick brown fox jumps over the lazy dog")
    gen = []
    for tok in a.generate(prompt, temp=0.0):
        gen.append(tok)
        if len(gen) == 90:
            break
    pos = pytriatt.seq_positions(a, 0)
    assert np.any(np.diff(pos) > 1)
    state = a.save_state()
    b = make_llama(tiny_cal, policy)       # flash_attn=False (Llama's default): layout-independent sums
    b.load_state(state)
    assert b.n_tokens == a.n_tokens
    np.testing.assert_array_equal(pytriatt.seq_positions(b, 0), pos)
    # continue both with the same tokens: same kept positions at every step, same logits (to the
    # float noise of a different cell layout, see above)
    n_vocab = a.n_vocab()

    def last_logits(llm):
        return np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm._ctx.ctx, -1), shape=(n_vocab,)).copy()

    for i, tok in enumerate(gen[-1:] + [int(t) for t in np.random.default_rng(3).integers(3, 500, 50)]):
        a.eval([tok])
        b.eval([tok])
        # first token: 1e-4 (a default-window cache's layout measured 1.4e-5 apart on a logit of 0.027)
        np.testing.assert_allclose(last_logits(b), last_logits(a), rtol=1e-4 if i == 0 else 0, atol=1e-4 if i == 0 else 2e-3,
                                   err_msg=f"logits differ after {i + 1} tokens")
        np.testing.assert_array_equal(pytriatt.seq_positions(b, 0), pytriatt.seq_positions(a, 0))
    assert b.kv_policy_stats()["n_cells_used"] <= BUDGET + INTERVAL


# -- reuse ----------------------------------------------------------------------------------

@pytest.mark.parametrize("empty", ["clear", "seq_rm"])
def test_a_reused_sequence_starts_fresh(lc, model, empty):
    """User 1 fills sequence 0 with a 24-token prompt and generates past the budget; the sequence
    is emptied; user 2's 8-token prompt must get its own protection (not user 1's 24) and fresh
    counters. Streaming keeps the newest tokens, so only protection keeps old ones."""
    ctx = context(model, "streaming", protect_prompt=True, sink=0, window=1)
    u1 = stream(model, 120, seed=4)
    ctx.decode(u1[:24], pos0=0)
    run_steps(ctx, u1[24:], 24)
    st1 = ctx.kv_policy_stats(0)
    assert st1["n_rounds"] > 0 and set(range(24)) <= set(ctx.positions(0).tolist())
    if empty == "clear":
        ctx.clear()
    else:
        assert lc.llama_memory_seq_rm(ctx.memory, 0, -1, -1)
    assert ctx.positions(0).size == 0
    fresh = ctx.kv_policy_stats(0)
    u2 = stream(model, 120, seed=5)
    ctx.decode(u2[:8], pos0=0)
    run_steps(ctx, u2[8:], 8)
    pos = set(ctx.positions(0).tolist())
    assert set(range(8)) <= pos, "user 2's prompt is not protected"
    assert not set(range(8, 24)) & pos, "user 1's prompt length still protects user 2's tokens"
    st2 = ctx.kv_policy_stats(0)
    assert fresh["n_rounds"] == fresh["n_evicted"] == 0, fresh     # an emptied sequence reports no history
    # user 2's counters count only user 2's rounds: every decoded token is cached or evicted
    assert st2["n_rounds"] > 0 and st2["n_evicted"] == len(u2) - st2["n_cells_used"]


def test_tri_reuse_matches_a_fresh_context(model):
    """After emptying, a tri context behaves exactly like a new one on the new user's tokens."""
    used = context(model, "tri", protect_prompt=True)
    u1 = stream(model, 100, seed=6)
    used.decode(u1[:30], pos0=0)
    run_steps(used, u1[30:], 30)
    used.clear()
    new = context(model, "tri", protect_prompt=True)
    u2 = stream(model, 100, seed=7)
    la, lb = used.decode(u2[:12], pos0=0), new.decode(u2[:12], pos0=0)
    np.testing.assert_array_equal(la, lb)
    for (pa, la), (pb, lb) in zip(run_steps(used, u2[12:], 12), run_steps(new, u2[12:], 12)):
        np.testing.assert_array_equal(pa, pb)
        np.testing.assert_array_equal(la, lb)


# -- concurrency -------------------------------------------------------------------------------

def test_two_contexts_evict_independently_in_two_threads(model):
    """Two contexts on one model, each in its own thread, several times over: every step's kept
    positions and logits equal those of the same context run alone."""
    inputs = [stream(model, 160, seed=10 + k) for k in range(2)]
    policies = ["tri", "tri"]

    def run(k, out):
        ctx = context(model, policies[k])
        ctx.decode(inputs[k][:16], pos0=0)
        out[k] = run_steps(ctx, inputs[k][16:], 16)
        ctx.close()

    alone = {}
    for k in range(2):
        run(k, alone)
    for rep in range(3):
        together, errors = {}, []

        def guarded(k):
            try:
                run(k, together)
            except Exception as e:  # pragma: no cover - reported below
                errors.append(e)

        threads = [threading.Thread(target=guarded, args=(k,)) for k in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
        assert not any(t.is_alive() for t in threads), f"repeat {rep}: a decoding thread still runs after 120 s"
        assert not errors, errors
        for k in range(2):
            assert len(together[k]) == len(alone[k])
            for i, ((pa, la), (pb, lb)) in enumerate(zip(alone[k], together[k])):
                np.testing.assert_array_equal(pb, pa, err_msg=f"thread {k}, repeat {rep}, step {i}")
                np.testing.assert_array_equal(lb, la, err_msg=f"thread {k}, repeat {rep}, step {i}")
    assert max(p.size for p, _ in alone[0]) <= BUDGET + INTERVAL
