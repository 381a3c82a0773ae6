"""The eviction policy on a real model (smollm2-135m): generating 4x the budget, the cache stays within
budget + interval after every step, and tri keeps exactly what pytriatt.select chooses from the keys
llama.cpp cached; a q8_0 K cache ranks like an f16 one."""

from __future__ import annotations

import numpy as np
import pytest

from _attention import Capture  # noqa: E402
from pytriatt.context import Context, Model

pytestmark = pytest.mark.real

BUDGET, INTERVAL = 64, 32


@pytest.fixture(scope="module")
def smollm2_tri(smollm2_path, tmp_path_factory):
    from pytriatt import gguf_io
    from pytriatt.calibrate import calibrate
    cal, _ = calibrate(smollm2_path, max_tokens=2048, n_ctx=1024, progress=False)
    dst = tmp_path_factory.mktemp("smollm2") / "smollm2.tri.gguf"
    gguf_io.write_with_metadata(smollm2_path, dst, cal.gguf_fields())
    return dst


def _greedy(ctx, model, prompt, n, check):
    """Greedy decoding one token at a time; check() runs after every step."""
    logits = ctx.decode(prompt)
    check()
    for _ in range(n):
        logits = ctx.decode([int(np.argmax(logits))])
        assert np.isfinite(logits).all()
        check()


@pytest.mark.parametrize("policy", ["tri", "streaming", "random"])
def test_4x_the_budget_in_a_fixed_cache_keeping_what_the_core_selects(smollm2_tri, policy):
    from pytriatt.core import Calibration, select

    cal = Calibration.from_gguf(smollm2_tri)
    cap = Capture()
    cb, keys = cap.cb, cap.K
    m = Model(smollm2_tri)
    prompt = m.tokenize("The history of the printing press begins in the fifteenth century, when")
    with Context(m, n_ctx=BUDGET + 128, n_batch=64, n_threads=2, cb_eval=cb, type_k="f32") as ctx:
        ctx.set_kv_policy(policy, BUDGET, interval=INTERVAL, sink=4, window=1, seed=3)
        state = {"held": np.zeros(0, np.int64), "rounds": 0}

        def check():
            held_now = ctx.positions(0)
            assert held_now.size <= BUDGET + INTERVAL
            if ctx.kv_policy_stats()["n_rounds"] > state["rounds"]:
                # a round ran before the latest batch: recompute it from the same keys
                prev = state["held"]
                t = int(prev.max())
                if policy == "tri":
                    raw = [cal.score(l, np.stack([keys[l][p] for p in prev]), prev, t) for l in sorted(keys)]
                    kept = select("tri", raw, prev, t, BUDGET, sink=4, window=1, n_head_kv=cal.n_head_kv)
                else:
                    kept = select(policy, None, prev, t, BUDGET, sink=4, window=1, seed=3)
                expected = np.concatenate([kept, np.arange(t + 1, ctx.pos_max(0) + 1)])
                assert held_now.tolist() == expected.tolist(), f"round {state['rounds'] + 1}"
                state["rounds"] += 1
            state["held"] = held_now.astype(np.int64)

        _greedy(ctx, m, prompt, 4 * BUDGET, check)
        st = ctx.kv_policy_stats()
        assert st["n_rounds"] == state["rounds"] >= 4
        assert st["n_evicted"] == len(prompt) + 4 * BUDGET - state["held"].size


def test_a_q8_0_k_cache_ranks_like_f16(smollm2_tri):
    from pytriatt.calibrate import default_text
    m = Model(smollm2_tri)
    text = m.tokenize(default_text()[:4000])[:300]
    kept = {}
    for type_k in ("f16", "q8_0"):
        with Context(m, n_ctx=512, n_batch=512, n_threads=2, type_k=type_k) as ctx:
            ctx.set_kv_policy("tri", 200, interval=50, sink=4, window=1)
            ctx.decode(text, logits="none")
            ctx.decode([text[0]], logits="none")          # 300 + 1 > 250: one round back to 200
            assert ctx.kv_policy_stats()["n_rounds"] == 1
            kept[type_k] = set(ctx.positions(0).tolist())
    overlap = len(kept["f16"] & kept["q8_0"]) / len(kept["f16"])
    assert overlap >= 0.95, overlap


@pytest.mark.parametrize("per_head,type_kv,flash_attn", [
    ("head", "f16", True), ("head", "f16", False), ("layer", "q8_0", True),
])
def test_per_head_rounds_keep_the_cache_bounded_and_a_saved_state_restores_the_logits(smollm2_tri, per_head, type_kv,
                                                                                     flash_attn):
    import ctypes

    m = Model(smollm2_tri)
    prompt = m.tokenize("The history of the printing press begins in the fifteenth century, when")
    kw = dict(n_ctx=BUDGET + 128, n_batch=64, n_threads=2, type_k=type_kv, type_v=type_kv, flash_attn=flash_attn)
    with Context(m, **kw) as ctx:
        ctx.set_kv_policy("tri", BUDGET, interval=INTERVAL, sink=4, per_head=per_head)

        def bounded():
            assert ctx.positions(0).size <= BUDGET + INTERVAL

        _greedy(ctx, m, prompt, 4 * BUDGET, bounded)
        st = ctx.kv_policy_stats()
        assert st["n_rounds"] >= 4 and st["n_moved"] > 0
        assert st["n_evicted"] == ctx.pos_max(0) + 1 - ctx.positions(0).size
        lc = ctx.lc
        size = lc.llama_state_get_size(ctx.ctx_ptr)
        buf = (ctypes.c_uint8 * size)()
        assert lc.llama_state_get_data(ctx.ctx_ptr, buf, size) == size
        after = ctx.decode([13])
    restored = []
    for _ in range(2):
        with Context(m, **kw) as fresh:
            fresh.set_kv_policy("tri", BUDGET, interval=INTERVAL, sink=4, per_head=per_head)
            assert lc.llama_state_set_data(fresh.ctx_ptr, buf, size) == size
            again = (ctypes.c_uint8 * size)()
            assert lc.llama_state_get_data(fresh.ctx_ptr, again, size) == size
            assert bytes(again) == bytes(buf)                      # lossless: every head's moved rows
            restored.append(fresh.decode([13]))
    # two restores agree exactly; the original differs by float order only (its cells are scattered,
    # the restored ones contiguous), which q4_1's quantized activations amplify to about 4%
    # (the same with shared eviction, measured: 0.037 at this step)
    assert np.array_equal(restored[0], restored[1])
    assert np.argmax(restored[0]) == np.argmax(after)
    assert np.abs(after - restored[0]).max() <= 0.1 * np.abs(after).max()
