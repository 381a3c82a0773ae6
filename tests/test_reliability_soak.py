"""Soak, shortened for CI: smollm2-135m generates PYTRIATT_SOAK_TOKENS (default 2000) tokens with the
TriAttention policy at budget 256 + interval 128. After every token the cache holds at most
budget + interval tokens; the counters add up (evicted = decoded - cached); resident memory after
the warm-up stays flat. The full soak (20,000 tokens) is `python tools/soak.py` (docs/RELIABILITY.md)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("llama_cpp")

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.real
def test_long_generation_in_a_fixed_budget(smollm2_path, tmp_path):
    from pytriatt import gguf_io
    from pytriatt.calibrate import calibrate
    cal, _ = calibrate(smollm2_path, max_tokens=512, n_ctx=512, progress=False)
    calib = tmp_path / "smollm2.tri.gguf"
    gguf_io.write_with_metadata(smollm2_path, calib, cal.gguf_fields())
    tokens = int(os.environ.get("PYTRIATT_SOAK_TOKENS", "2000"))
    # tools/soak.py in a process of its own: the resident memory it measures is the soak's alone, not
    # that of a test process which other tests' models and contexts come and go in
    r = subprocess.run([sys.executable, str(ROOT / "tools" / "soak.py"), str(smollm2_path), "--tokens", str(tokens),
                        "--budget", "256", "--interval", "128", "--policy", "tri", "--calib", str(calib), "--json"],
                       capture_output=True, text=True, timeout=3600)
    assert r.stdout.strip(), f"tools/soak.py printed no figures ({r.returncode}):\n{r.stderr[-3000:]}"
    res = json.loads(r.stdout)
    print({k: v for k, v in res.items() if k != "model"})
    assert res["tokens_generated"] == tokens
    assert res["steps_over_limit"] == [] and res["max_cached_cells"] <= 256 + 128
    assert res["rounds"] >= (tokens - 384) // 128
    assert res["counters_add_up"], res
    assert res["newest_position"] == res["tokens_decoded"] - 1
    assert res["rss_growth_pct"] < 2.0, res
    assert r.returncode == 0 and res["ok"], r.stderr[-3000:]
