"""Specification of per-head eviction (llama_kv_policy_params.granularity, cpp/llama-triatt-heads.cpp).

A KV cell holds one token for every head of every layer. Per head, every KV head (per_head="head",
the paper's mode: one token set per KV head shared by the layers) or every KV head of every layer
(per_head="layer") keeps its own top-budget tokens; a round keeps budget cells and moves each head's
kept K/V rows into them. Specified here:
- every head keeps exactly the tokens a per-head reference selection (pytriatt.select_heads, and a
  NumPy re-derivation of the paper's per-head rule) picks from the keys captured from the graph,
  round after round;
- attention then reads, per head, exactly those tokens: the layer's attention output equals a NumPy
  attention over each head's kept K/V (f32 cache: 1e-4 relative), with V stored transposed or not,
  f16 and q8_0 caches, and rows moved in place or staged through a copy (the path of device buffers);
- the cache stays at budget + interval cells, other sequences are untouched, a saved state restores
  the same logits, and configurations that cannot work are refused with a message.
"""

from __future__ import annotations

import ctypes

import numpy as np
import pytest

from pytriatt.context import Context, Model
from _attention import Capture, hadamard, reference_attention  # noqa: E402

BUDGET, INTERVAL, SINK, WINDOW = 32, 16, 2, 4


@pytest.fixture(scope="module")
def calibrated(tiny_calibrated):
    """calibrated(**tiny_kw) -> a tiny llama (peaky attention unless init_scale says otherwise) carrying its own
    TriAttention statistics."""
    return lambda **kw: tiny_calibrated("llama", max_tokens=1024, n_ctx=512, **{"init_scale": 3.0, **kw})


def _tokens(n, seed):
    return np.random.default_rng(seed).integers(3, 1500, size=n).tolist()


def _run_per_head(path, granularity, *, type_kv="f32", flash_attn=True, steps=None, n_layer=2):
    """Decode random tokens through per-head rounds while a Python reference keeps, per group of
    heads, the tokens pytriatt.select_heads' rule picks from the captured keys. Returns the context
    state for the checks."""
    from pytriatt.core import Calibration, select

    cal = Calibration.from_gguf(path)
    n_head, n_head_kv = cal.n_head, cal.n_head_kv
    n_gqa = n_head // n_head_kv
    cap = Capture()
    m = Model(path)
    ctx = Context(m, n_ctx=BUDGET + 64, n_batch=64, n_threads=1, cb_eval=cap.cb, type_k=type_kv, type_v=type_kv,
                  flash_attn=flash_attn)
    ctx.set_kv_policy("tri", BUDGET, interval=INTERVAL, sink=SINK, window=WINDOW, n_threads=1,
                      per_head=granularity)
    layers = list(range(n_layer))
    groups = [(None, g) for g in range(n_head_kv)] if granularity == "head" else \
        [(l, g) for l in layers for g in range(n_head_kv)]
    held = {G: [] for G in groups}
    rounds = 0
    for step, n_in in enumerate(steps or [40, 3, 9, 1, 1, 1, 12, 2, 5] * 4):
        n_cached = len(held[groups[0]])
        if n_cached + n_in > BUDGET + INTERVAL and n_cached > BUDGET:
            t = max(max(h) for h in held.values())
            for (lg, g) in groups:
                pos = np.array(sorted(held[(lg, g)]))
                use = layers if lg is None else [lg]
                raw = [cal.score(l, np.stack([cap.K[l][p] for p in pos]), pos, t)[:, g * n_gqa:(g + 1) * n_gqa]
                       for l in use]
                held[(lg, g)] = select("tri", raw, pos, t, BUDGET, sink=SINK, window=WINDOW, n_head_kv=1).tolist()
            rounds += 1
        p0 = ctx.pos_max(0) + 1
        toks = _tokens(n_in, 100 + step)
        ctx.decode(toks, logits="none")
        cap.decoded(p0, n_in)
        for G in groups:
            held[G] = held[G] + list(range(p0, p0 + n_in))
    return ctx, cap, held, groups, rounds, cal


@pytest.mark.parametrize("granularity", ["head", "layer"])
def test_every_head_keeps_what_the_per_head_selection_picks_round_after_round(calibrated, granularity):
    path = calibrated()
    ctx, cap, held, groups, rounds, cal = _run_per_head(path, granularity)
    with ctx:
        assert rounds >= 3 and ctx.kv_policy_stats()["n_rounds"] == rounds
        for (lg, g) in groups:
            for l in ([0, 1] if lg is None else [lg]):
                assert ctx.head_positions(0, l, g).tolist() == sorted(held[(lg, g)]), (l, g)
        # the heads really differ (otherwise per-head would be shared eviction under another name)
        sets = {tuple(sorted(h)) for h in held.values()}
        assert len(sets) > 1
        st = ctx.kv_policy_stats()
        assert st["n_moved"] > 0
        assert ctx.positions(0).size == len(held[groups[0]]) <= BUDGET + INTERVAL


def test_select_heads_is_the_papers_per_kv_head_rule(calibrated):
    """Per KV head: z-score each (layer, query head) over the unprotected candidates, max over the GQA
    group, mean over layers, keep the protected + the top rest: re-derived here in NumPy."""
    from pytriatt.core import Calibration, select_heads

    path = calibrated()
    cal = Calibration.from_gguf(path)
    rng = np.random.default_rng(3)
    n, t = 90, 200
    pos = np.sort(rng.choice(t, size=n, replace=False))
    pos[-1] = t
    raw = [rng.normal(size=(n, cal.n_head)).astype(np.float32) for _ in range(cal.n_layer)]
    got = select_heads(raw, pos, t, BUDGET, sink=SINK, window=WINDOW, n_head_kv=cal.n_head_kv)
    prot = np.zeros(n, bool)
    prot[:SINK] = prot[-WINDOW:] = True
    n_gqa = cal.n_head // cal.n_head_kv
    for g in range(cal.n_head_kv):
        agg = np.zeros(n)
        for r in raw:
            x = r[:, g * n_gqa:(g + 1) * n_gqa].astype(np.float64)
            mu, sd = x[~prot].mean(0), np.maximum(x[~prot].std(0), 1e-6)
            agg += ((x - mu) / sd).max(1)
        agg /= len(raw)
        agg[prot] = np.inf
        want = np.sort(pos[np.argsort(-agg, kind="stable")[:BUDGET]])
        assert got[g].tolist() == want.tolist()
    by_layer = select_heads(raw, pos, t, BUDGET, sink=SINK, window=WINDOW, n_head_kv=cal.n_head_kv,
                            granularity="layer")
    assert by_layer.shape == (cal.n_layer, cal.n_head_kv, BUDGET)


# llama.cpp's CPU flash attention rounds Q and the softmax weights to f16, hence the looser tolerances
@pytest.mark.parametrize("granularity,type_kv,flash_attn,staged,tol", [
    ("head", "f32", False, False, 1e-4),   # V transposed
    ("layer", "f32", False, "staged", 1e-4),   # V transposed: rows staged through a host copy
    ("layer", "f32", True, "graph", 1e-2),     # rows moved by a ggml graph on the cache's backend
    ("head", "f32", True, False, 1e-2),
    ("layer", "f16", True, False, 1e-2),
    ("head", "q8_0", True, False, 3e-2),   # head_dim 64: K and V are Hadamard-rotated per head
])
def test_attention_reads_exactly_each_heads_kept_tokens(calibrated, monkeypatch, granularity, type_kv, flash_attn,
                                                        staged, tol):
    if staged == "staged":
        monkeypatch.setenv("PYTRIATT_MOVE_STAGED", "1")
    elif staged == "graph":
        monkeypatch.setenv("PYTRIATT_MOVE_BACKEND", "1")
    # head_dim 64, and flatter attention so that the tokens a head moved carry weight next to q8_0's rounding
    kw = dict(n_embd=256, n_head=4, n_head_kv=2, init_scale=1.0) if type_kv == "q8_0" else {}
    path = calibrated(**kw)
    ctx, cap, held, groups, rounds, cal = _run_per_head(path, granularity, type_kv=type_kv, flash_attn=flash_attn)
    with ctx:
        assert rounds >= 3 and ctx.kv_policy_stats()["n_moved"] > 0
        p0 = ctx.pos_max(0) + 1
        ctx.decode([7], logits="none")                     # one token: its queries see every head's cache
        cap.decoded(p0, 1)
        hd = cal.head_dim
        for il in range(cal.n_layer):
            kept = [ctx.head_positions(0, il, g).tolist() for g in range(cal.n_head_kv)]
            got = cap.out[il]
            want = reference_attention(cap, il, kept, cal.n_head, cal.n_head_kv, hd)
            if type_kv == "q8_0":
                # kqv_out is taken before llama.cpp rotates the output back out of V's Hadamard basis
                want = (want.reshape(-1, 64) @ hadamard(64).T).ravel()
            err = np.abs(got - want).max() / np.abs(want).max()
            assert err <= tol, (il, err)
            # the check can fail: attending to the cells' own tokens (shared eviction's view) is far off
            cells = [ctx.positions(0).tolist()] * cal.n_head_kv
            wrong = reference_attention(cap, il, cells, cal.n_head, cal.n_head_kv, hd)
            if type_kv == "q8_0":
                wrong = (wrong.reshape(-1, 64) @ hadamard(64).T).ravel()
            wrong_err = np.abs(got - wrong).max() / np.abs(want).max()
            assert wrong_err > 3 * err


def test_other_sequences_are_untouched_and_a_saved_state_restores_the_logits(calibrated):
    path = calibrated()
    m = Model(path)
    toks1 = _tokens(60, 9)
    with Context(m, n_ctx=256, n_batch=64, n_seq_max=2, n_threads=1) as ref:
        ref_logits = ref.decode(toks1, seq_id=1)
    with Context(m, n_ctx=256, n_batch=64, n_seq_max=2, n_threads=1) as ctx:
        ctx.set_kv_policy("tri", BUDGET, interval=INTERVAL, sink=SINK, window=WINDOW, per_head="layer")
        ctx.decode(toks1[:30], seq_id=1, logits="none")
        for step in range(30):
            ctx.decode(_tokens(5, step), seq_id=0, logits="none")
        st = ctx.kv_policy_stats(0)
        assert st["n_rounds"] >= 3 and st["n_moved"] > 0
        got = ctx.decode(toks1[30:], seq_id=1)
        assert np.abs(got - ref_logits).max() <= 1e-4 * np.abs(ref_logits).max()
        assert ctx.positions(1).tolist() == list(range(60))
        # a saved state, restored into a fresh context, gives the same next-token logits
        lc = ctx.lc
        size = lc.llama_state_get_size(ctx.ctx_ptr)
        buf = (ctypes.c_uint8 * size)()
        assert lc.llama_state_get_data(ctx.ctx_ptr, buf, size) == size
        after = ctx.decode([11], seq_id=0)
    with Context(m, n_ctx=256, n_batch=64, n_seq_max=2, n_threads=1) as fresh:
        fresh.set_kv_policy("tri", BUDGET, interval=INTERVAL, sink=SINK, window=WINDOW, per_head="layer")
        assert lc.llama_state_set_data(fresh.ctx_ptr, buf, size) == size
        again = fresh.decode([11], seq_id=0)
    assert np.abs(after - again).max() <= 1e-5 * np.abs(after).max()


def test_configurations_per_head_cannot_serve_are_refused(calibrated):
    m = Model(calibrated())
    with Context(m, n_ctx=256, n_batch=64) as ctx:
        with pytest.raises(ValueError, match="only tri and snapkv"):
            ctx.set_kv_policy("streaming", BUDGET, per_head=True)
        with pytest.raises(ValueError, match="per_head cannot be combined with shift"):
            ctx.set_kv_policy("tri", BUDGET, per_head=True, shift=True)
        with pytest.raises(ValueError, match="per_head must be"):
            ctx.set_kv_policy("tri", BUDGET, per_head="heads")


def test_cells_shared_with_another_sequence_keep_their_rows(calibrated):
    """A prompt copied to a second sequence (llama_memory_seq_cp) shares its cells: per-head rounds of the
    first sequence must not write into them, so the second sequence continues exactly as if alone."""
    path = calibrated()
    m = Model(path)
    prompt, tail = _tokens(40, 21), _tokens(5, 22)          # 45 tokens: no round for sequence 1
    with Context(m, n_ctx=256, n_batch=64, n_seq_max=2, n_threads=1) as ref:
        want = ref.decode(prompt + tail, seq_id=1)
    with Context(m, n_ctx=256, n_batch=64, n_seq_max=2, n_threads=1) as ctx:
        ctx.set_kv_policy("tri", BUDGET, interval=INTERVAL, sink=SINK, window=WINDOW, per_head="head")
        ctx.decode(prompt, seq_id=0, logits="none")
        ctx.lc.llama_memory_seq_cp(ctx.memory, 0, 1, -1, -1)
        for step in range(25):
            ctx.decode(_tokens(5, 300 + step), seq_id=0, logits="none")
        assert ctx.kv_policy_stats(0)["n_rounds"] >= 3
        got = ctx.decode(tail, seq_id=1)
        assert ctx.kv_policy_stats(1)["n_rounds"] == 0 and ctx.kv_policy_stats(0)["n_moved"] > 0
    assert np.abs(got - want).max() <= 1e-4 * np.abs(want).max()


@pytest.mark.parametrize("type_kv", ["f16", "q8_0", "q4_0"])
def test_the_three_ways_of_moving_rows_leave_the_same_bytes(calibrated, monkeypatch, type_kv):
    """In place (host memory), staged through a host copy, and by a ggml graph on the cache's backend (device
    memory; forced here on the CPU backend): after the same rounds the saved states are byte for byte equal,
    so the graph's gather to f32 and scatter back re-quantizes q8_0/q4_0 blocks to themselves."""
    path = calibrated(n_embd=256, n_head=4, n_head_kv=2, init_scale=1.0)
    m = Model(path)
    states = {}
    for way in ("in place", "staged", "graph"):
        monkeypatch.delenv("PYTRIATT_MOVE_STAGED", raising=False)
        monkeypatch.delenv("PYTRIATT_MOVE_BACKEND", raising=False)
        if way != "in place":
            monkeypatch.setenv("PYTRIATT_MOVE_STAGED" if way == "staged" else "PYTRIATT_MOVE_BACKEND", "1")
        with Context(m, n_ctx=BUDGET + 64, n_batch=64, n_threads=1, type_k=type_kv, type_v=type_kv,
                     flash_attn=True) as ctx:
            ctx.set_kv_policy("tri", BUDGET, interval=INTERVAL, sink=SINK, window=WINDOW, per_head="layer")
            for step in range(30):
                ctx.decode(_tokens(5, 700 + step), logits="none")
            assert ctx.kv_policy_stats()["n_moved"] > 0
            lc = ctx.lc
            size = lc.llama_state_seq_get_size(ctx.ctx_ptr, 0)
            buf = (ctypes.c_uint8 * size)()
            assert lc.llama_state_seq_get_data(ctx.ctx_ptr, buf, size, 0) == size
            states[way] = bytes(buf)
    assert states["staged"] == states["in place"]
    assert states["graph"] == states["in place"]
