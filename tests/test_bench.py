"""Specification of `pytriatt bench`: rows per policy and position, counters and KV bytes that add up,
ratios against full attention from the same run, JSON and plot output, one-line errors."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from pytriatt import benchmark, gguf_io

pytest.importorskip("llama_cpp")

BUDGET, INTERVAL, N_BATCH, WINDOW = 64, 32, 32, 32   # window = interval: one round per window in steady state
ROW_KEYS = {"policy", "position", "window", "repeat", "decode_tok_s", "decode_ms_per_tok", "score_share",
            "n_rounds", "score_ms", "evict_ms", "decode_ms", "cells_used", "kv_cells", "kv_bytes"}


def specs(text, ctk="f16"):
    return benchmark.parse_policies(text, ctk, ctk)


def run(model, policies="full,tri,streaming", positions=(64, 320), **kw):
    args = dict(budget=BUDGET, positions=list(positions), policies=specs(policies), window=WINDOW,
                interval=INTERVAL, n_batch=N_BATCH, threads=1, progress=False)
    args.update(kw)
    return benchmark.run_bench(model, **args)


def per_cell(model_path, ctk="f16", ctv="f16"):
    from pytriatt.context import Model
    m = Model(model_path)
    try:
        return benchmark.model_shape(m).bytes_per_cell(ctk, ctv)
    finally:
        m.close()


@pytest.fixture(scope="module")
def report(tiny, tiny_cal):
    return run(tiny, calib=tiny_cal)


def test_every_policy_has_a_row_per_position_and_full_is_also_measured_at_the_budget(report):
    got = [(r["policy"], r["position"]) for r in report["rows"]]
    assert sorted(got) == sorted([("full", 64), ("full", 320), ("tri", 64), ("tri", 320),
                                  ("streaming", 64), ("streaming", 320)])
    for r in report["rows"]:
        assert ROW_KEYS <= set(r)
        assert r["decode_tok_s"] > 0 and r["decode_ms"] > 0
        # the two figures agree up to their rounding (tok/s to 3 decimals, ms/tok to 4): a short ms/tok
        # moves 1e3 / ms/tok by up to 1e3 * 5e-5 / ms/tok^2
        ms = r["decode_ms_per_tok"]
        assert r["decode_tok_s"] == pytest.approx(1e3 / ms, abs=5e-4 + 1e3 * 5e-5 / (ms * (ms - 5e-5)) + 1e-9)
    assert set(report["policies"]) == {"full", "tri", "streaming"}


def test_the_policy_counters_add_up(report):
    tri = {r["position"]: r for r in report["rows"] if r["policy"] == "tri"}
    # below the budget nothing is evicted; past it, a window of `interval` steps holds exactly one round
    assert tri[64]["n_rounds"] == 0 and tri[64]["score_ms"] == 0
    assert tri[320]["n_rounds"] == 1 and tri[320]["score_ms"] > 0
    r = tri[320]
    assert r["score_share"] == pytest.approx((r["score_ms"] + r["evict_ms"]) / r["decode_ms"],
                                              abs=1e-5 + 2e-4 / r["decode_ms"])   # figures rounded to 0.1 us
    assert BUDGET < r["cells_used"] <= BUDGET + INTERVAL
    for name in ("tri", "streaming"):
        s = report["policies"][name]
        # every decoded token is either still cached or was evicted
        assert s["tokens_decoded"] == 320 + WINDOW
        assert s["n_evicted_total"] == s["tokens_decoded"] - s["cells_used_final"]
        assert s["n_rounds_total"] >= 320 // (BUDGET + INTERVAL)
    assert report["policies"]["full"]["n_rounds_total"] == 0


def test_kv_bytes_are_what_llama_cpp_allocated(report, tiny):
    cell = per_cell(tiny)
    # cells x layers x (K row + V row): 2 layers, 2 KV heads x 16 dims, f16 -> 2 * (64 + 64) bytes
    assert cell == 2 * (2 * 16 * 2 + 2 * 16 * 2)
    for name in ("tri", "streaming"):
        s = report["policies"][name]
        # budget + max(interval, n_batch) = 96 cells, rounded up to 256 by llama.cpp
        assert s["kv_cells_allocated"] == 256
        assert s["kv_bytes_allocated"] == 256 * cell
        assert s["kv_bytes_check"] is True and abs(s["kv_bytes_log"] - 256 * cell) <= 0.01 * 2**20
    full = report["policies"]["full"]
    assert full["kv_cells_allocated"] == benchmark.pad256(320 + WINDOW)
    assert full["kv_bytes_check"] is True
    # full at position n: the cells a context holding n + window tokens allocates
    for r in report["rows"]:
        if r["policy"] == "full":
            assert r["kv_bytes"] == benchmark.pad256(r["position"] + WINDOW) * cell
        else:
            assert r["kv_bytes"] == 256 * cell


def test_ratios_compare_with_full_attention_from_the_same_run(report):
    full = {r["position"]: r["decode_tok_s"] for r in report["rows"] if r["policy"] == "full"}
    for x in report["ratios"]:
        row = next(r for r in report["rows"] if r["policy"] == x["policy"] and r["position"] == x["position"])
        # the target metric pairs each window with a window of full attention at the budget timed next to it
        assert x["tok_s_vs_full_at_budget"] == row["vs_ref"] > 0
        assert x["tok_s_vs_full"] == pytest.approx(row["decode_tok_s"] / full[x["position"]], rel=1e-3)
    x = next(x for x in report["ratios"] if x["policy"] == "tri" and x["position"] == 320)
    assert x["kv_bytes_full_over_policy"] == pytest.approx(benchmark.pad256(320 + WINDOW) / 256)
    text = benchmark.format_report(report)
    assert "vs full@budget" in text and "tri" in text


def test_full_attention_rewinds_so_that_every_window_runs_at_its_position(tiny, tiny_cal):
    rep = run(tiny, "full,tri", positions=(64, 200), calib=tiny_cal, window=16, repeat=3, interval=16)
    full = rep["policies"]["full"]
    assert full["tokens_decoded"] == 200 and full["cells_used_final"] == 200     # rewound after each window
    assert full["kv_cells_allocated"] == benchmark.pad256(200 + 16)
    tri = next(r for r in rep["rows"] if r["policy"] == "tri" and r["position"] == 200)
    assert tri["repeat"] == 3 and tri["n_rounds"] == 3                          # one round per window of interval steps
    assert rep["policies"]["tri"]["tokens_decoded"] == 200 + 3 * 16


def test_quantized_cache_types_are_counted_by_their_block_size(tiny_gguf, tmp_path):
    m = tiny_gguf("llama", n_embd=128, n_head=2, n_head_kv=1)       # head_dim 64: q8_0 rows of 2 blocks
    rep = run(m, "full,streaming:q8_0", positions=(64, 128), window=16)
    s = rep["policies"]["streaming:q8_0"]
    assert (s["type_k"], s["type_v"]) == ("q8_0", "q8_0")
    assert s["kv_bytes_allocated"] == 256 * 2 * (2 * 34 + 2 * 34) and s["kv_bytes_check"] is True
    assert rep["policies"]["full"]["kv_bytes_allocated"] == benchmark.pad256(128 + 16) * 2 * (2 * 64 * 2)


def test_parallel_sequences_decode_together(tiny, tiny_cal):
    rep = run(tiny, "full,tri", positions=(64, 320), calib=tiny_cal, parallel="auto", parallel_position=200)
    p = rep["parallel"]
    # auto: as many budget-sized sequences as fit in full attention's KV memory at the largest position
    assert p["n_seq"] == benchmark.pad256(320 + WINDOW) // 256 == 2
    assert p["kv_cells"] == 2 * 256 and p["kv_bytes"] == rep["policies"]["full"]["kv_bytes_allocated"]
    assert p["aggregate_tok_s"] == pytest.approx(p["n_seq"] * p["per_seq_tok_s"], rel=1e-3)
    assert all(BUDGET < c <= BUDGET + INTERVAL for c in p["cells_used"])
    assert p["vs_full"]["throughput_ratio"] > 0


def test_an_uncalibrated_model_gets_one_cached_statistics_only_calibration(tiny, tiny_cal, tmp_path, monkeypatch):
    from pytriatt.calibrate import ensure_calibrated

    monkeypatch.setenv("PYTRIATT_CACHE", str(tmp_path))
    a = ensure_calibrated(tiny, tokens=256, progress=False)
    assert a.parent == tmp_path / "calibrated" and gguf_io.has_prefix(a, "triattention.")
    # metadata only (architecture, name, statistics): the model's tensors are not copied
    hdr = gguf_io.read_header(a)
    assert not hdr.tensors and hdr.get("general.name") == gguf_io.read_header(tiny).get("general.name")
    mtime = a.stat().st_mtime_ns
    assert ensure_calibrated(tiny, tokens=256, progress=False) == a and a.stat().st_mtime_ns == mtime
    assert ensure_calibrated(tiny, tokens=300, progress=False) != a                  # another size, another file
    assert ensure_calibrated(tiny_cal, tokens=256, progress=False) == tiny_cal       # calibrated: used as is
    # and the policy takes its statistics from it
    rep = run(tiny, "tri", positions=(200,), window=8, calib=a)
    assert rep["policies"]["tri"]["n_rounds_total"] > 0


def test_a_cached_calibration_of_another_format_version_is_stale(tiny, tmp_path, monkeypatch):
    from pytriatt import calibration
    from pytriatt.calibrate import ensure_calibrated

    monkeypatch.setenv("PYTRIATT_CACHE", str(tmp_path))
    old = ensure_calibrated(tiny, tokens=256, progress=False)
    # a pytriatt that writes (and reads) another version of the statistics calibrates anew
    monkeypatch.setattr(calibration, "CALIB_VERSION", calibration.CALIB_VERSION + 1)
    new = ensure_calibrated(tiny, tokens=256, progress=False)
    assert new != old and gguf_io.read_header(new).get("triattention.version") == calibration.CALIB_VERSION


def cli(*args):
    return subprocess.run([sys.executable, "-m", "pytriatt", "bench", *map(str, args)], capture_output=True,
                          text=True, timeout=300)


def test_cli_json_and_plot(tiny, tmp_path):
    png = tmp_path / "tps.png"
    args = [tiny, "--budget", 64, "--positions", "64,200", "--window", 16, "--interval", 32, "-b", 32,
            "--policies", "full,streaming", "-t", 1, "--json", "-q"]
    try:
        import matplotlib  # noqa: F401
        args += ["--plot", png]
    except ImportError:
        png = None
    r = cli(*args)
    assert r.returncode == 0, r.stderr
    rep = json.loads(r.stdout)
    assert {x["policy"] for x in rep["rows"]} == {"full", "streaming"}
    assert rep["ratios"] and rep["budget"] == 64 and rep["interleaved"] is True
    if png:
        assert png.stat().st_size > 1000 and rep["plot"] == str(png)


@pytest.mark.parametrize("args, message", [
    (["--policies", "full,h2o"], "unknown KV policy 'h2o'"),
    (["--policies", "full+shift"], "full evicts nothing, so @, / and + do not apply to it"),
    (["--policies", "tri+head"], "per-head eviction is written tri@head"),
    (["--positions", "64,abc"], "--positions takes comma-separated whole numbers"),
    (["--positions", "64,80"], "closer than window x repeat"),
    (["--budget", "0"], "--budget must be positive"),
    (["--parallel", "many"], "--parallel takes a number"),
])
def test_bad_input_is_one_line(tiny, args, message):
    r = cli(tiny, "--window", 16, "-q", *args)
    assert r.returncode == 2
    assert message in r.stderr and r.stderr.count("\n") == 1 and "Traceback" not in r.stderr


def test_synth_writes_a_loadable_q8_0_model_of_a_real_shape(tmp_path):
    import numpy as np

    from pytriatt.testing import synth
    from pytriatt.context import Context, Model
    path = synth.write_synth_gguf(tmp_path / "s.gguf", "small", n_layer=3)
    hdr = gguf_io.read_header(path)
    assert hdr.get("qwen3.block_count") == 3 and hdr.get("qwen3.attention.head_count_kv") == 2
    assert hdr.tensor_data_bytes >= synth.shape_bytes(dict(synth.SHAPES["small"], n_layer=3))
    m = Model(path)
    try:
        assert m.n_vocab == synth.SHAPES["small"]["n_vocab"]
        with Context(m, n_ctx=256) as ctx:
            logits = ctx.decode(m.tokenize("the quick brown fox " * 8), logits="all")
        assert np.isfinite(logits).all() and 0.1 < logits.std() < 10     # random, but finite and not degenerate
        assert len({int(t) for t in logits.argmax(axis=1)}) > 5
    finally:
        m.close()
    with pytest.raises(ValueError, match="multiples of 32"):
        synth.write_synth_gguf(tmp_path / "bad.gguf", "small", n_embd=100)


def test_the_shift_mode_is_compared_with_gaps_or_refused_in_one_line(tiny, tiny_cal):
    import inspect

    from pytriatt.context import Context
    if "shift" not in inspect.signature(Context.set_kv_policy).parameters:
        with pytest.raises(ValueError, match="no shift position mode yet"):
            run(tiny, "full,tri+shift", positions=(64, 200), calib=tiny_cal, window=16)
        return
    rep = run(tiny, "full,tri,tri+shift", positions=(64, 200), calib=tiny_cal, window=16, interval=16)
    x = next(x for x in rep["ratios"] if x["policy"] == "tri+shift" and x["position"] == 200)
    row = {r["policy"]: r for r in rep["rows"] if r["position"] == 200}
    assert x["shift_cost_share"] == pytest.approx(1 - row["tri+shift"]["decode_tok_s"] / row["tri"]["decode_tok_s"],
                                                  abs=1e-3)


def test_the_table_says_why_a_score_share_is_zero_and_where_per_policy_rss_is(report, tiny):
    text = benchmark.format_report(report)
    # interleaved (the default): no per-policy peak RSS, and the table says how to get it
    assert "peak RSS per policy needs --sequential" in text
    # a window of one interval holds a round at every position past the budget: nothing to explain
    assert "no eviction round fell in the timed window" not in text
    # 2 steps from position 300: the prefill's last round left room for more than 2 tokens, so none falls there
    short = run(tiny, "full,streaming", positions=(300,), window=2)
    assert [r["n_rounds"] for r in short["rows"] if r["policy"] == "streaming"] == [0]
    assert "no eviction round fell in the timed window (streaming@300)" in benchmark.format_report(short)
