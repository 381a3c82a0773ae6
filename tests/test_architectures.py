"""docs/architectures.md is true: each row tested on a tiny model calibrates, and 300 decode steps at budget 64
under tri (shared and per KV head) keep the cache bounded with the newest and the sink tokens kept; the RoPE
column agrees with the architectures whose RoPE reading is verified; refusals say what they refuse; layers
without RoPE (SmolLM3's NoPE layers) are scored by the distance-free term of docs/method.md."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from pytriatt.context import Context, Model

DOC = Path(__file__).resolve().parent.parent / "docs" / "architectures.md"
BUDGET, INTERVAL = 64, 32


def table():
    rows = {}
    for line in DOC.read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("|") and len(cells) == 7 and cells[0] not in ("architecture", "---"):
            rows[cells[0]] = dict(zip(("rope", "calibrate", "evict", "per_head", "shift", "tested"), cells[1:]))
    return rows


TINY = sorted(a for a, row in table().items() if "tiny" in row["tested"] and row["calibrate"] == "yes")


def tiny_args(row: str):
    """the tiny model of a table row: an architecture of pytriatt.testing.tiny, or one of its named variants"""
    from pytriatt.testing import tiny

    arch, kw = tiny.VARIANTS.get(row, (row, {}))
    return arch, kw


def test_the_table_covers_the_tiny_generator_and_agrees_with_the_verified_rope_list():
    from pytriatt.testing import tiny
    from pytriatt.core import VERIFIED_ARCHS

    rows = table()
    # every tiny architecture and variant has its row, and only those
    assert set(TINY) == set(tiny.ARCHS) | set(tiny.VARIANTS)
    for row_name, row in rows.items():
        if row_name in TINY:
            assert ("exact" in row["rope"]) == (tiny_args(row_name)[0] in VERIFIED_ARCHS), row_name


@pytest.mark.parametrize("row", TINY)
@pytest.mark.parametrize("per_head", [False, True])
def test_a_tiny_model_of_each_row_calibrates_and_decodes_300_steps_in_a_bounded_cache(tiny_calibrated, row,
                                                                                       per_head):
    arch, kw = tiny_args(row)
    m = Model(tiny_calibrated(arch, **kw))
    with Context(m, n_ctx=BUDGET + 64, n_batch=64, n_ctx_swa=64 + 64) as ctx:
        ctx.set_kv_policy("tri", BUDGET, interval=INTERVAL, sink=2, per_head=per_head)
        rng = np.random.default_rng(0)
        for step in range(300):
            logits = ctx.decode([int(rng.integers(3, 1500))])
            held = ctx.positions(0)
            assert held.size <= BUDGET + INTERVAL and held[-1] == step and held[:2].tolist() == [0, 1][: step + 1]
        assert np.isfinite(logits).all()
        st = ctx.kv_policy_stats()
        assert st["n_rounds"] >= 5 and st["n_evicted"] == 300 - held.size
        assert (st["n_moved"] > 0) == per_head


def test_a_recurrent_model_is_refused_with_the_reason(tmp_path):
    from pytriatt.testing.tiny import write_tiny_mamba_gguf

    assert table()["mamba"]["evict"].startswith("refused")
    mm = Model(write_tiny_mamba_gguf(tmp_path / "mamba.gguf"))
    with Context(mm, n_ctx=256) as ctx:
        for policy in ("tri", "streaming"):
            with pytest.raises(ValueError, match=r"mamba.*recurrent state.*token eviction does not apply"):
                ctx.set_kv_policy(policy, BUDGET)


def test_an_mla_model_refuses_key_scoring_policies_and_takes_streaming(tmp_path):
    # DeepSeek-V2's cache holds one compressed latent row per token, shared by all heads: no per-head key
    # to score; the positional policies do not read keys and apply
    from pytriatt.testing.tiny import write_tiny_deepseek2_gguf

    row = table()["MLA (deepseek2, deepseek32, kimi...)"]
    assert "tiny" in row["tested"] and "refused" in row["evict"]
    m = Model(write_tiny_deepseek2_gguf(tmp_path / "ds2.gguf"))
    with Context(m, n_ctx=BUDGET + 64, n_batch=64) as ctx:
        for policy in ("tri", "snapkv"):
            with pytest.raises(ValueError, match=rf"KV policy {policy}: this model \(deepseek2\) uses multi-head "
                                                 r"latent attention: its cache holds a compressed latent"):
                ctx.set_kv_policy(policy, BUDGET)
        ctx.set_kv_policy("streaming", BUDGET, interval=INTERVAL, sink=2)
        rng = np.random.default_rng(0)
        for step in range(300):
            logits = ctx.decode([int(rng.integers(3, 1500))])
        held = ctx.positions(0)
        # streaming keeps the sink and the newest tokens, nothing else
        assert held.tolist() == [0, 1] + list(range(300 - (held.size - 2), 300))
        assert held.size <= BUDGET + INTERVAL and np.isfinite(logits).all()


def _nope_reference(cal, layer, keys):
    """docs/method.md's NoPE score of keys [n, n_head_kv, head_dim] for every query head, in float64:
    Re(sum_f qbar_f conj(k_f)) + sum_f (A_f - |qbar_f|) |k_f|, bands paired as the model's RoPE pairs"""
    F = cal.n_freq
    k = np.asarray(keys, np.float64)
    if cal.pairing == "neox":
        kc = k[..., :F] + 1j * k[..., F:2 * F]
    else:
        kc = k[..., 0:2 * F:2] + 1j * k[..., 1:2 * F:2]
    qbar = cal.q_mean[layer].astype(np.complex128)              # [n_head, F]
    A = cal.q_abs_mean[layer].astype(np.float64)
    g = np.arange(cal.n_head) // (cal.n_head // cal.n_head_kv)  # the KV head each query head reads
    kh = kc[:, g, :]                                             # [n, n_head, F]
    trig = np.real(qbar[None] * np.conj(kh)).sum(-1)
    norm = ((A - np.abs(qbar))[None] * np.abs(kh)).sum(-1)
    return trig + norm


def test_a_nope_layer_is_scored_by_the_distance_free_term(tiny_calibrated):
    from pytriatt.core import Calibration

    cal = Calibration.from_gguf(tiny_calibrated("smollm3"))
    assert [cal.rope.layer(il).rope for il in range(4)] == [True, True, True, False]
    assert np.abs(cal.q_mean[3]).max() > 0          # the calibration measured the NoPE layer's queries too
    keys = np.random.default_rng(1).standard_normal((50, cal.n_head_kv, cal.head_dim)).astype(np.float32)
    pos = np.arange(50)
    want = _nope_reference(cal, 3, keys)
    for t in (49, 5000):                             # no dependence on the distance
        got = cal.score(3, keys, pos, t).astype(np.float64)
        err = np.abs(got - want).max() / np.abs(want).max()
        assert err < 1e-5, (t, err)
    # a RoPE layer of the same model does depend on the distance
    assert not np.allclose(cal.score(2, keys, pos, 49), cal.score(2, keys, pos, 5000))


def test_tri_on_a_model_with_nope_layers_evicts_what_the_core_selects(tiny_calibrated):
    # the policy in llama.cpp scores the NoPE layer distance-free too: its choices are the core's on the
    # keys llama.cpp wrote into the cache (captured where they are written)
    import re

    from pytriatt import _llama
    from pytriatt.core import Calibration, select
    from pytriatt.ggml_tensors import GgmlTensor, ggml_lib, read_tensor

    path = tiny_calibrated("smollm3")
    cal = Calibration.from_gguf(path)
    lc, lib = _llama.require_patched(), ggml_lib()
    rows: dict = {}

    @lc.ggml_backend_sched_eval_callback
    def cb(ptr, ask, user_data):
        t = GgmlTensor.from_address(ptr)
        m = None
        if lib.ggml_op_desc(ptr) == b"SET_ROWS":   # a view of the cache; its src[0] holds the rows written
            m = re.fullmatch(r"cache_k_l(\d+) \(view\)", t.name.decode())
        if ask or not m:
            return bool(m) if ask else True
        rows[int(m.group(1))] = read_tensor(lib, t.src[0]).reshape(-1, cal.n_head_kv, cal.head_dim)
        return True

    keys: dict = {}
    budget, interval = 48, 16
    with Context(Model(path), n_ctx=budget + 64, n_batch=64, n_threads=1, cb_eval=cb, type_k="f32") as ctx:
        ctx.set_kv_policy("tri", budget, interval=interval, sink=2, window=4, n_threads=1)
        held = np.zeros(0, np.int64)
        rounds = 0
        rng = np.random.default_rng(3)
        for step, n_in in enumerate([40, 3, 9, 1, 1, 12, 2, 5] * 4):
            if held.size + n_in > budget + interval and held.size > budget:
                t = int(held.max())
                raw = [cal.score(l, np.stack([keys[l][p] for p in held]), held, t) for l in sorted(keys)]
                held = select("tri", raw, held, t, budget, sink=2, window=4, n_head_kv=cal.n_head_kv).astype(np.int64)
                rounds += 1
            p0 = ctx.pos_max(0) + 1
            ctx.decode(rng.integers(3, 1500, size=n_in).tolist(), logits="none")
            for l, r in rows.items():
                keys.setdefault(l, {}).update({p0 + i: r[i] for i in range(n_in)})
            held = np.concatenate([held, np.arange(p0, p0 + n_in)])
            assert ctx.positions(0).tolist() == held.tolist(), f"after round {rounds}"
        assert rounds >= 3 and ctx.kv_policy_stats()["n_rounds"] == rounds


def test_llama_cpps_k_shift_leaves_nope_layers_keys_alone(tiny_gguf):
    """A uniform shift keeps every distance, so after llama.cpp shifts a sequence from positions 100.. down to
    0.. the next token's logits equal a context's that decoded it at 0.. from the start. That holds on SmolLM3
    only if the K-shift re-rotates the RoPE layers and leaves layer 3's unrotated (NoPE) keys alone, which
    patch llama.cpp/0006 makes it do (it rotated them by the shift before)."""
    from pytriatt import _llama
    lc = _llama.require_patched()
    m = Model(tiny_gguf("smollm3"))
    toks = np.random.default_rng(4).integers(3, 1500, size=41).tolist()
    with Context(m, n_ctx=256, n_batch=64, n_threads=1, type_k="f32", flash_attn=False) as shifted, \
            Context(m, n_ctx=256, n_batch=64, n_threads=1, type_k="f32", flash_attn=False) as plain:
        shifted.decode(toks[:40], pos0=100, logits="none")
        lc.llama_memory_seq_add(shifted.memory, 0, 100, 140, -100)
        assert shifted.positions(0).tolist() == list(range(40))
        plain.decode(toks[:40], pos0=0, logits="none")
        a, b = shifted.decode(toks[40:], pos0=40), plain.decode(toks[40:], pos0=40)
    assert np.abs(a - b).max() <= 1e-4 * np.abs(b).max()


def test_shift_runs_on_a_model_with_nope_layers(tiny_calibrated):
    with Context(Model(tiny_calibrated("smollm3")), n_ctx=BUDGET + 64, n_batch=64) as ctx:
        ctx.set_kv_policy("tri", BUDGET, interval=INTERVAL, shift=True)
        for step in range(200):
            ctx.decode(np.random.default_rng(step).integers(3, 1500, size=1).tolist(), logits="none")
            held = ctx.positions(0)
            assert held.tolist() == list(range(held.size)) and held.size <= BUDGET + INTERVAL
        assert ctx.kv_policy_stats()["n_rounds"] >= 3


@pytest.fixture(scope="module")
def support_of(tmp_path_factory):
    """support_of(row) -> pytriatt.modelinfo.support_report of that row's tiny model (what doctor MODEL says)"""
    from pytriatt import modelinfo
    from pytriatt.testing import tiny

    d = tmp_path_factory.mktemp("support")

    def make(row, **kw):
        if row == "mamba":
            path = tiny.write_tiny_mamba_gguf(d / "mamba.gguf")
        elif row == "deepseek2":
            path = tiny.write_tiny_deepseek2_gguf(d / "ds2.gguf")
        else:
            arch, base = tiny_args(row)
            path = tiny.write_tiny_gguf(d / f"{len(list(d.iterdir()))}.gguf", arch, **{**base, **kw})
        return modelinfo.support_report(path)

    return make


def test_info_and_doctor_say_whether_tri_applies_and_why_not(support_of):
    mla = support_of("deepseek2")
    assert not mla["supported"] and "multi-head latent attention" in mla["reason"]
    assert mla["policies"]["streaming"] == "yes" and "compressed latent" in mla["policies"]["tri"]
    assert mla["policies"]["snapkv"] == mla["policies"]["tri"]
    rec = support_of("mamba")
    assert not rec["supported"] and "recurrent state" in rec["policies"]["streaming"]
    nope = support_of("smollm3", n_layer=8)
    assert nope["supported"] and any("layers 3, 7 have no RoPE (NoPE)" in n and "distance-free" in n
                                     for n in nope["notes"])
    phi = support_of("phi3")
    assert phi["supported"] and any("LongRoPE" in n and "exceeds 1024" in n for n in phi["notes"])
    assert any("rope_freqs" in n for n in support_of("llama (llama3 rope_freqs)")["notes"])
    assert any("partial rotary (8 of 16 dims)" in n for n in support_of("glm4")["notes"])
    for row in ("olmo2", "exaone", "qwen3"):   # nothing to say: verified, full rotary, no factors
        rep = support_of(row)
        assert rep["supported"] and rep["notes"] == [], row
        # every policy attaches; tri once the file has its statistics (the tiny models have none)
        assert rep["policies"]["tri"].startswith("needs a calibration first: pytriatt calibrate "), row
        assert {v for p, v in rep["policies"].items() if p != "tri"} == {"yes"}, row


def test_doctor_says_what_tri_needs_first_and_what_a_sliding_window_model_refuses(support_of, tiny_cal):
    from pytriatt import modelinfo

    assert set(modelinfo.support_report(tiny_cal)["policies"].values()) == {"yes"}   # calibrated: all attach
    g = support_of("gemma3")
    assert any("sliding-window layers keep their own" in n and "--shift is refused" in n for n in g["notes"])
    text = modelinfo.format_support(g)
    assert "  tri           needs a calibration first: pytriatt calibrate " in text
    assert "refused: " not in text     # no policy is refused: tri only needs its statistics


def test_doctor_model_prints_the_answer_and_fails_for_a_refused_model(tmp_path):
    import json
    import subprocess
    import sys

    from pytriatt.testing import tiny

    ok = tiny.write_tiny_gguf(tmp_path / "smollm3.gguf", "smollm3")
    mla = tiny.write_tiny_deepseek2_gguf(tmp_path / "ds2.gguf")
    run = lambda *a: subprocess.run([sys.executable, "-m", "pytriatt", "doctor", *a],  # noqa: E731
                                    capture_output=True, text=True, timeout=120)
    r = run(str(mla))
    assert r.returncode == 1 and "multi-head latent attention" in r.stdout and "streaming     yes" in r.stdout
    r = run(str(ok), "--json")
    rep = json.loads(r.stdout)
    assert rep["model"]["supported"] and "NoPE" in rep["model"]["notes"][0]
    assert r.returncode == (0 if rep.get("patched") and "problem" not in rep else 1)
