"""Specification of the two memory primitives the llama.cpp patch adds:

    llama_memory_seq_positions(mem, seq_id, out, n_max)     what is cached, ascending
    llama_memory_seq_rm_positions(mem, seq_id, pos, n)      remove exactly those positions, in one pass

exercised through pytriatt.context (llama-cpp-python's ctypes layer) on tiny
random-weight models of every supported architecture and on a real model.
"""

from __future__ import annotations

import ctypes

import numpy as np
import pytest

from conftest import TINY_ARCHS
from pytriatt.context import Context, Model

N_TOKENS = 300
N_REMOVE = 100


def _model_cases():
    cases = [pytest.param(arch, id=f"tiny-{arch}") for arch in TINY_ARCHS]
    cases.append(pytest.param("smollm2", id="smollm2-135m", marks=pytest.mark.real))
    return cases


@pytest.fixture(params=_model_cases())
def model(request, tiny_gguf):
    if request.param == "smollm2":
        path = request.getfixturevalue("smollm2_path")
    else:
        path = tiny_gguf(request.param)
    m = Model(path)
    yield m
    m.close()


def _tokens(model: Model, n: int, seed: int = 0) -> list[int]:
    rng = np.random.default_rng(seed)
    return rng.integers(1, model.n_vocab, size=n).tolist()


def _scattered(n_tokens: int, k: int, seed: int = 1) -> np.ndarray:
    """k distinct positions spread over [0, n_tokens - 1), never the newest."""
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(n_tokens - 1, size=k, replace=False)).astype(np.int32)


def test_removing_scattered_positions_leaves_exactly_the_others(model):
    with Context(model, n_ctx=512) as ctx:
        ctx.decode(_tokens(model, N_TOKENS))
        assert ctx.positions(0).tolist() == list(range(N_TOKENS))

        removed = _scattered(N_TOKENS, N_REMOVE)
        assert ctx.remove_positions(0, removed) == N_REMOVE

        expected = sorted(set(range(N_TOKENS)) - set(removed.tolist()))
        assert ctx.positions(0).tolist() == expected
        assert len(expected) == N_TOKENS - N_REMOVE

        # the sequence continues right after its newest token; kept tokens keep their positions
        logits = ctx.decode(_tokens(model, 5, seed=7))
        assert np.isfinite(logits).all()
        assert ctx.pos_max(0) == N_TOKENS + 4
        assert ctx.positions(0).tolist() == expected + list(range(N_TOKENS, N_TOKENS + 5))


def test_removing_the_newest_position_is_refused_and_changes_nothing(model):
    lc = model.lc
    with Context(model, n_ctx=512) as ctx:
        ctx.decode(_tokens(model, N_TOKENS))
        before = ctx.positions(0).tolist()

        pos = (ctypes.c_int32 * 3)(3, 50, N_TOKENS - 1)
        assert lc.llama_memory_seq_rm_positions(ctx.memory, 0, pos, 3) == -1
        with pytest.raises(ValueError, match="newest"):
            ctx.remove_positions(0, [3, 50, N_TOKENS - 1])

        assert ctx.positions(0).tolist() == before
        # absent positions and duplicates are ignored, not errors
        assert ctx.remove_positions(0, [3, 3, 10_000]) == 1
        assert ctx.remove_positions(0, [3]) == 0
        assert ctx.remove_positions(0, []) == 0


def test_count_only_and_truncated_output(model):
    lc = model.lc
    with Context(model, n_ctx=512) as ctx:
        ctx.decode(_tokens(model, 40))
        assert lc.llama_memory_seq_positions(ctx.memory, 0, None, 0) == 40
        out = (ctypes.c_int32 * 10)()
        # returns the full count, writes only n_max entries
        assert lc.llama_memory_seq_positions(ctx.memory, 0, out, 10) == 40
        assert list(out) == list(range(10))
        # an empty sequence, an out-of-range sequence
        assert lc.llama_memory_seq_positions(ctx.memory, 0, None, 0) == 40
        ctx.clear()
        assert lc.llama_memory_seq_positions(ctx.memory, 0, None, 0) == 0
        for bad_seq in (-1, lc.LLAMA_MAX_SEQ if hasattr(lc, "LLAMA_MAX_SEQ") else 256):
            assert lc.llama_memory_seq_positions(ctx.memory, bad_seq, None, 0) == -1
            assert lc.llama_memory_seq_rm_positions(ctx.memory, bad_seq, out, 1) == -1


def test_freed_cells_are_reused_by_later_tokens(model):
    """A context of 256 cells decodes 1000 tokens when 200 scattered ones are removed each time it fills."""
    n_ctx, n_total, n_rm, step = 256, 1000, 200, 8
    rng = np.random.default_rng(3)
    toks = _tokens(model, n_total, seed=4)
    with Context(model, n_ctx=n_ctx, n_batch=64) as ctx:
        assert ctx.n_ctx == n_ctx
        cached: set[int] = set()
        n_removals = 0
        for p in range(0, n_total, step):
            if len(cached) + step > n_ctx:
                candidates = sorted(cached - {max(cached)})
                rm = rng.choice(candidates, size=n_rm, replace=False)
                assert ctx.remove_positions(0, rm) == n_rm
                cached -= set(rm.tolist())
                n_removals += 1
                assert ctx.positions(0).tolist() == sorted(cached)
            ctx.decode(toks[p:p + step], logits="none")
            cached.update(range(p, p + step))
        assert n_removals == 4
        assert ctx.pos_max(0) == n_total - 1
        assert ctx.positions(0).tolist() == sorted(cached)


def test_without_removal_the_same_context_runs_out_of_cells(model):
    # the control for the test above: 256 cells really are the limit
    with Context(model, n_ctx=256, n_batch=64) as ctx:
        ctx.decode(_tokens(model, 256), logits="none")
        with pytest.raises(RuntimeError, match="no free KV cell"):
            ctx.decode([1], logits="none")


def test_sequences_are_independent(tiny_gguf):
    m = Model(tiny_gguf("llama"))
    with Context(m, n_ctx=512, n_seq_max=2) as ctx:
        ctx.decode(_tokens(m, 100, seed=1), seq_id=0)
        ctx.decode(_tokens(m, 100, seed=2), seq_id=1)
        assert ctx.remove_positions(1, range(0, 99, 2)) == 50
        assert ctx.positions(0).tolist() == list(range(100))
        assert ctx.positions(1).tolist() == list(range(1, 99, 2)) + [99]


def test_eviction_is_exact_on_a_one_layer_model(tiny_gguf):
    """With one layer, a cached token's K/V depend only on that token and its position. Two
    sequences that differ only at the evicted positions must then predict identically, and
    differently from the sequence that kept everything."""
    m = Model(tiny_gguf("llama", n_layer=1))
    a = _tokens(m, N_TOKENS, seed=11)
    evict = _scattered(N_TOKENS, N_REMOVE, seed=12)
    b = list(a)
    rng = np.random.default_rng(13)
    for p in evict:
        b[p] = int((a[p] + rng.integers(1, m.n_vocab - 1)) % m.n_vocab) or 1
    assert sum(x != y for x, y in zip(a, b)) == N_REMOVE

    nxt = [42]
    results = {}
    for name, toks, do_evict in (("a", a, True), ("b", b, True), ("full", a, False)):
        with Context(m, n_ctx=512, n_threads=1) as ctx:
            ctx.decode(toks, logits="none")
            if do_evict:
                assert ctx.remove_positions(0, evict) == N_REMOVE
            results[name] = ctx.decode(nxt)

    scale = np.abs(results["a"]).max()
    assert np.abs(results["a"] - results["b"]).max() <= 1e-5 * scale
    assert np.abs(results["a"] - results["full"]).max() > 1e-3 * scale


def test_a_recurrent_memory_refuses_and_python_says_why(tmp_path):
    from pytriatt.testing.tiny import write_tiny_mamba_gguf

    m = Model(write_tiny_mamba_gguf(tmp_path / "tiny-mamba.gguf"))
    lc = m.lc
    with Context(m, n_ctx=256) as ctx:
        ctx.decode(_tokens(m, 20))
        assert lc.llama_memory_seq_positions(ctx.memory, 0, None, 0) == -1
        pos = (ctypes.c_int32 * 1)(3)
        assert lc.llama_memory_seq_rm_positions(ctx.memory, 0, pos, 1) == -1
        with pytest.raises(RuntimeError, match="recurrent"):
            ctx.positions(0)
        with pytest.raises(RuntimeError, match="recurrent"):
            ctx.remove_positions(0, [3])
        # the sequence is intact and continues
        assert ctx.pos_max(0) == 19
        assert np.isfinite(ctx.decode([5])).all()
