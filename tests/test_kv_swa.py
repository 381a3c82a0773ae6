"""Specification of eviction on sliding-window models (llama.cpp's iSWA cache: a window-bounded cache for
the local layers, a base cache for the global ones).

The policy ranks tokens with the global layers and evicts from their cache only; the local layers keep
their window exactly as llama.cpp keeps it without a policy, in a cache sized for the window
(llama_context_params.n_ctx_swa), not for the budget. Checked on tiny gemma3 and gpt-oss models: the two caches'
contents, attention against NumPy over those token sets, state save/load, several sequences, and the
refusal of shift.
"""

from __future__ import annotations

import ctypes

import numpy as np
import pytest

from _attention import Capture, reference_attention  # noqa: E402
from pytriatt.context import Context, Model

BUDGET, INTERVAL, N_BATCH, SWA = 32, 16, 32, 64   # the budget is below the window


@pytest.fixture(scope="module", params=["gemma3", "gpt-oss"])
def swa_model(request, tmp_path_factory):
    """A tiny gemma3 or gpt-oss (layer 0 local with a 64-token window, layer 1 global; gpt-oss with attention
    sinks, YaRN and experts) carrying its own statistics."""
    from pytriatt import gguf_io
    from pytriatt.calibrate import calibrate
    from pytriatt.testing.tiny import write_tiny_gguf

    d = tmp_path_factory.mktemp("swa")
    src = write_tiny_gguf(d / "g.gguf", arch=request.param, n_layer=2, sliding_window=SWA, init_scale=2.0)
    cal, _ = calibrate(src, max_tokens=1024, n_ctx=512, progress=False)
    dst = d / "g.tri.gguf"
    gguf_io.write_with_metadata(src, dst, cal.gguf_fields())
    return dst


def _tensor(path, name):
    """A tensor's values from the GGUF file, or None (gemma3 has no attention sinks)."""
    import gguf
    for t in gguf.GGUFReader(str(path)).tensors:
        if t.name == name:
            return np.asarray(t.data, dtype=np.float64)
    return None


def _tokens(n, seed):
    return np.random.default_rng(seed).integers(3, 1500, size=n).tolist()


def _context(m, policy=None, n_seq_max=1, **kw):
    ctx = Context(m, n_ctx=256 if policy else 1024, n_batch=N_BATCH, n_seq_max=n_seq_max, n_threads=1,
                  n_ctx_swa=SWA + N_BATCH, **kw)
    if policy:
        ctx.set_kv_policy(policy, BUDGET, interval=INTERVAL, sink=2)
    return ctx


LOCAL, GLOBAL = 0, 1


@pytest.mark.parametrize("policy", ["tri", "streaming"])
def test_local_layers_keep_exactly_the_window_llama_cpp_keeps_without_a_policy(swa_model, policy):
    m = Model(swa_model)
    with _context(m, policy) as ctx, _context(m) as ref:
        for step in range(40):
            toks = _tokens(1 if step % 4 else 9, step)
            ctx.decode(toks, logits="none")
            ref.decode(toks, logits="none")
            t = ctx.pos_max(0)
            local = ctx.head_positions(0, LOCAL, 0)
            assert local.tolist() == ref.head_positions(0, LOCAL, 0).tolist()
            assert set(range(max(0, t - SWA + 1), t + 1)) <= set(local.tolist())   # the whole window
            held = ctx.positions(0)                                                 # the global cache
            assert ctx.head_positions(0, GLOBAL, 0).tolist() == held.tolist()
            assert held.size <= BUDGET + INTERVAL
        st = ctx.kv_policy_stats()
        assert st["n_rounds"] >= 3 and st["n_evicted"] == t + 1 - held.size
        # both caches at their own size: the global one from the budget, the local one from the window
        assert st["n_cells"] == 256 and st["n_cells_swa"] == 256 and st["n_cells_used_swa"] == local.size
        if policy == "streaming":
            assert held.tolist() == [0, 1] + list(range(t - held.size + 3, t + 1))


def test_attention_reads_the_window_in_local_layers_and_the_kept_tokens_in_global_ones(swa_model):
    from pytriatt.core import Calibration

    cal = Calibration.from_gguf(swa_model)
    m = Model(swa_model)
    cap = Capture()
    sinks = {il: _tensor(swa_model, f"blk.{il}.attn_sinks.weight") for il in (LOCAL, GLOBAL)}
    with _context(m, "tri", cb_eval=cap.cb, type_k="f32", type_v="f32", flash_attn=False) as ctx:
        for step in range(40):
            p0 = ctx.pos_max(0) + 1
            toks = _tokens(1 if step % 4 else 9, step)
            ctx.decode(toks, logits="none")
            cap.decoded(p0, len(toks))
        assert ctx.kv_policy_stats()["n_rounds"] >= 3
        t = ctx.pos_max(0)
        for il in (LOCAL, GLOBAL):
            pos = ctx.head_positions(0, il, 0)
            if il == LOCAL:
                pos = pos[pos > t - SWA]                   # cells past the window are masked
            kept = [pos.tolist()] * cal.n_head_kv
            want = reference_attention(cap, il, kept, cal.n_head, cal.n_head_kv, cal.head_dim, sinks=sinks[il])
            got = cap.out[il]
            assert np.abs(got - want).max() <= 1e-4 * np.abs(want).max(), il
        # the check can fail: the local layer attending to the global layer's tokens is far off
        wrong = reference_attention(cap, LOCAL, [ctx.positions(0).tolist()] * cal.n_head_kv, cal.n_head,
                                    cal.n_head_kv, cal.head_dim, sinks=sinks[LOCAL])
        assert np.abs(cap.out[LOCAL] - wrong).max() > 1e-2 * np.abs(wrong).max()


def test_a_saved_state_restores_both_caches(swa_model):
    m = Model(swa_model)
    with _context(m, "tri") as ctx:
        for step in range(30):
            ctx.decode(_tokens(3, step), logits="none")
        assert ctx.kv_policy_stats()["n_rounds"] >= 2
        lc = ctx.lc
        size = lc.llama_state_seq_get_size(ctx.ctx_ptr, 0)
        buf = (ctypes.c_uint8 * size)()
        assert lc.llama_state_seq_get_data(ctx.ctx_ptr, buf, size, 0) == size
        t = ctx.pos_max(0)

        def visible(c):
            # what attention can read: the window of the local layer (llama.cpp saves only that part of
            # the SWA cache; older cells there are masked anyway) and every cell of the global layer
            local = c.head_positions(0, LOCAL, 0)
            return local[local > t - SWA].tolist(), c.head_positions(0, GLOBAL, 0).tolist()

        want = visible(ctx)
        after = ctx.decode([5])
    with _context(m, "tri") as fresh:
        assert lc.llama_state_seq_set_data(fresh.ctx_ptr, buf, size, 0) == size
        assert visible(fresh) == want
        again = fresh.decode([5])
    # the same tokens in other cells: only the order of float sums differs (measured up to 1.3e-4 of the
    # logits' scale on tiny gpt-oss, depending on which cells the rounds left; a wrong cache is off by O(1))
    assert np.abs(after - again).max() <= 1e-3 * np.abs(after).max()


def test_sequences_keep_their_own_windows(swa_model):
    m = Model(swa_model)
    with _context(m, "tri", n_seq_max=2) as ctx, _context(m, n_seq_max=2) as ref:
        for step in range(50):
            for seq in (0, 1):
                toks = _tokens(2 + seq, 10 * step + seq)
                ctx.decode(toks, seq_id=seq, logits="none")
                ref.decode(toks, seq_id=seq, logits="none")
        for seq in (0, 1):
            t = ctx.pos_max(seq)
            local = ctx.head_positions(seq, LOCAL, 0).tolist()
            assert set(range(t - SWA + 1, t + 1)) <= set(local)
            assert local == ref.head_positions(seq, LOCAL, 0).tolist()
            assert ctx.positions(seq).size <= BUDGET + INTERVAL
            assert ctx.kv_policy_stats(seq)["n_rounds"] >= 2


def test_shift_is_refused_on_a_sliding_window_model(swa_model):
    m = Model(swa_model)
    with _context(m) as ctx:
        with pytest.raises(ValueError, match="shift cannot be used on a sliding-window model"):
            ctx.set_kv_policy("streaming", BUDGET, shift=True)
