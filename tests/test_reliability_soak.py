"""Soak, shortened for CI: smollm2-135m generates PYTRIATT_SOAK_TOKENS (default 2000) tokens with the
TriAttention policy at budget 256 + interval 128. After every token the cache holds at most
budget + interval tokens; the counters add up (evicted = decoded - cached); resident memory after
the warm-up stays flat. The full soak (20,000 tokens) is `python tools/soak.py` (docs/RELIABILITY.md)."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest

pytest.importorskip("llama_cpp")

ROOT = Path(__file__).resolve().parent.parent


def load_tool():
    spec = importlib.util.spec_from_file_location("soak_tool", ROOT / "tools" / "soak.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.real
def test_long_generation_in_a_fixed_budget(smollm2_path, tmp_path):
    soak = load_tool()
    from pytriatt import gguf_io
    from pytriatt.calibrate import calibrate
    cal, _ = calibrate(smollm2_path, max_tokens=512, n_ctx=512, progress=False)
    calib = tmp_path / "smollm2.tri.gguf"
    gguf_io.write_with_metadata(smollm2_path, calib, cal.gguf_fields())
    tokens = int(os.environ.get("PYTRIATT_SOAK_TOKENS", "2000"))
    res = soak.soak(smollm2_path, tokens=tokens, budget=256, interval=128, policy="tri", calib=calib,
                    progress_every=0)
    print({k: v for k, v in res.items() if k != "model"})
    assert res["tokens_generated"] == tokens
    assert res["steps_over_limit"] == [] and res["max_cached_cells"] <= 256 + 128
    assert res["rounds"] >= (tokens - 384) // 128
    assert res["counters_add_up"], res
    assert res["newest_position"] == res["tokens_decoded"] - 1
    assert res["rss_growth_pct"] < 2.0, res
