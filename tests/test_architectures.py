"""docs/architectures.md is true: each row tested on a tiny model calibrates, and 300 decode steps at budget 64
under tri (shared and per KV head) keep the cache bounded with the newest and the sink tokens kept; the RoPE
column agrees with the architectures whose RoPE reading is verified; refusals say what they refuse."""

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


def test_the_table_covers_the_tiny_generator_and_agrees_with_the_verified_rope_list():
    from pytriatt import tiny
    from pytriatt.core import VERIFIED_ARCHS

    rows = table()
    assert set(TINY) == set(tiny.ARCHS)                  # every tiny architecture has its row, and only those
    for arch, row in rows.items():
        if arch in tiny.ARCHS:
            assert ("exact" in row["rope"]) == (arch in VERIFIED_ARCHS), arch


@pytest.mark.parametrize("arch", TINY)
@pytest.mark.parametrize("per_head", [False, True])
def test_a_tiny_model_of_each_row_calibrates_and_decodes_300_steps_in_a_bounded_cache(tiny_calibrated, arch,
                                                                                       per_head):
    m = Model(tiny_calibrated(arch))
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
    from pytriatt.tiny import write_tiny_mamba_gguf

    assert table()["mamba"]["evict"].startswith("refused")
    mm = Model(write_tiny_mamba_gguf(tmp_path / "mamba.gguf"))
    with Context(mm, n_ctx=256) as ctx:
        for policy in ("tri", "streaming"):
            with pytest.raises(ValueError, match=r"mamba.*recurrent state.*token eviction does not apply"):
                ctx.set_kv_policy(policy, BUDGET)
