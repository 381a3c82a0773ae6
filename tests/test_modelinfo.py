"""Specification of the concentration profile (pytriatt.modelinfo) and of `pytriatt info` / `pytriatt plot`.

R of a head is sum_f |E q_f| / sum_f E|q_f| (the E|q_f|-weighted mean of the per-band mean
resultant lengths); layers without KV are left out. `pytriatt info` shows the
architecture and either the calibration with its profile or how to add one (exit 0
both ways, 2 for unreadable files); `pytriatt plot` draws the calibration into an image.
"""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

gguf = pytest.importorskip("gguf")

from pytriatt import cli, modelinfo  # noqa: E402
from pytriatt.core import Calibration, RopeSpec, model_fingerprint  # noqa: E402
from pytriatt.gguf_io import read_header, write_with_metadata  # noqa: E402


def cal_from(model_path, R_heads=None, *, seed=0, n_head=4, n_head_kv=2, tokens=1234, source="unit test",
             fingerprint=None, zero_layers=()):
    """A Calibration for the model; R_heads[l][h] sets each head's R exactly (equal magnitudes per band)."""
    rope = RopeSpec.from_gguf(model_path)
    L, F = rope.n_layer, rope.n_freq
    rng = np.random.default_rng(seed)
    a = rng.uniform(0.5, 2.0, (L, n_head, F))
    if R_heads is None:
        R_heads = rng.uniform(0.6, 1.0, (L, n_head))
    R = np.asarray(R_heads, dtype=np.float64)[:, :, None] * np.ones(F)
    q_mean = a * R * np.exp(1j * rng.uniform(-np.pi, np.pi, (L, n_head, F)))
    for l in zero_layers:
        q_mean[l] = 0
        a[l] = 0
    return Calibration(q_mean, a, rope, n_head_kv=n_head_kv, calib_tokens=tokens, calib_source=source,
                       model_fingerprint=model_fingerprint(model_path) if fingerprint is None else fingerprint)


def calibrated(src, out, **kw):
    cal = cal_from(src, **kw)
    write_with_metadata(src, out, cal.gguf_fields())
    return cal


def run_main(capsys, *argv):
    rc = cli.main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


# --------------------------------------------------------------------------- R per head


def test_head_R_is_the_magnitude_weighted_mean_of_the_band_R():
    q_abs = np.array([[[1.0, 3.0]], [[2.0, 2.0]], [[0.0, 0.0]]])  # 3 layers, 1 head, 2 bands
    q_mean = np.array([[[1.0, 0.0]], [[2.0j, -1.0]], [[0.0, 0.0]]])
    R = modelinfo.head_concentration(q_mean, q_abs)
    # layer 0: band R = (1, 0), weights (1, 3) -> 1/4 (not the plain mean 1/2)
    assert R[0, 0] == pytest.approx(0.25)
    assert R[1, 0] == pytest.approx(3 / 4)
    assert np.isnan(R[2, 0])  # no statistics: undefined, not 0
    R = modelinfo.head_concentration(q_mean, q_abs, kv_layers=[True, False, True])
    assert np.isnan(R[1, 0])


def test_profile_per_layer_and_shares(tiny_gguf):
    src = tiny_gguf("llama", n_layer=3)
    R = [[0.99, 0.97, 0.90, 0.70], [0.96, 0.96, 0.96, 0.85], [0.5, 0.5, 0.5, 0.5]]
    prof = modelinfo.concentration_profile(cal_from(src, R, zero_layers=(2,)))
    assert prof["excluded_layers"] == [2]  # all-zero layer: no KV of its own
    assert [e["layer"] for e in prof["layers"]] == [0, 1]
    l0 = prof["layers"][0]
    assert l0["mean"] == pytest.approx(np.mean(R[0])) and l0["min"] == pytest.approx(0.70)
    assert l0["min_head"] == 3 and l0["count_above_095"] == 2 and l0["n_heads"] == 4
    assert prof["n_heads"] == 8
    assert prof["share_above_095"] == pytest.approx(5 / 8) and prof["count_above_095"] == 5
    assert prof["share_above_080"] == pytest.approx(7 / 8)
    assert prof["mean"] == pytest.approx(np.mean(R[0] + R[1]))
    assert prof["heads"][2] == [None] * 4 and prof["heads"][0][0] == pytest.approx(0.99)
    json.dumps(prof)  # JSON-ready
    text = modelinfo.format_profile(prof)
    assert "R > 0.95: 62% (5 of 8)" in text and "R > 0.8: 88%" in text
    assert "not counted): 2" in text
    assert "90% of Qwen3-8B" in text


def test_layers_without_kv_in_the_rope_spec_are_excluded(tiny_gguf):
    src = tiny_gguf("llama", n_layer=3)
    cal = cal_from(src)
    cal.rope.kv_layers = [True, False, True]
    prof = modelinfo.concentration_profile(cal)
    assert prof["excluded_layers"] == [1] and prof["n_heads"] == 8


def test_distance_curve_is_the_aligned_key_trigonometric_series(tiny_gguf):
    cal = cal_from(tiny_gguf("llama"))
    d = np.array([0, 1, 7, 100, 4096])
    y = modelinfo.distance_curve(cal, 1, 2, d)
    w = np.abs(cal.q_mean[1, 2].astype(np.complex128)) ** 2
    expected = np.array([np.sum(w * np.cos(cal.omega(1) * x)) for x in d]) / w.sum()
    np.testing.assert_allclose(y, expected, rtol=1e-12)
    assert y[0] == pytest.approx(1.0)


def test_pick_heads_takes_the_most_and_least_concentrated():
    R = np.array([[0.9, 0.99, 0.5], [np.nan, np.nan, np.nan], [0.7, 0.98, 0.6]])
    assert modelinfo.pick_heads(R, 4) == [(0, 1), (2, 1), (2, 2), (0, 2)]
    assert modelinfo.pick_heads(R, 1) == [(0, 1)]
    assert len(modelinfo.pick_heads(R, 100)) == 6


# --------------------------------------------------------------------------- pytriatt info


def test_info_on_an_uncalibrated_model_says_how_to_calibrate(tiny_gguf, capsys):
    src = tiny_gguf("qwen3")
    rc, out, err = run_main(capsys, "info", str(src))
    assert rc == 0, err
    assert "architecture  qwen3" in out and "4 query, 2 KV" in out and "NEOX" in out
    assert "no TriAttention statistics" in out
    assert f"pytriatt calibrate {src} -o {src.with_name('tiny-qwen3.tri.gguf')}" in out
    rc, out, _ = run_main(capsys, "info", str(src), "--json")
    rep = json.loads(out)
    assert rc == 0 and rep["calibration"] is None and rep["profile"] is None
    assert rep["calibrate_command"].startswith("pytriatt calibrate ")
    m = rep["model"]
    assert (m["architecture"], m["n_layer"], m["n_head"], m["n_head_kv"], m["head_dim"], m["rope_type"]) == \
           ("qwen3", 2, 4, 2, 16, "neox")
    assert m["fingerprint"] == model_fingerprint(src)


def test_info_on_a_calibrated_model_shows_metadata_and_profile(tiny_gguf, tmp_path, capsys):
    src = tiny_gguf("llama")
    out_path = tmp_path / "m.tri.gguf"
    cal = calibrated(src, out_path, R_heads=[[0.99, 0.97, 0.9, 0.7], [0.96, 0.5, 0.99, 0.85]], tokens=4321,
                     source="pydoc_data.topics")
    rc, out, err = run_main(capsys, "info", str(out_path))
    assert rc == 0, err
    assert "architecture  llama" in out and "NORM over 16 dims (8 bands)" in out
    assert "format version 1" in out and "tokens        4321" in out and "pydoc_data.topics" in out
    assert f"{cal.model_fingerprint}  (matches this model)" in out
    assert "R > 0.95: 50% (4 of 8)" in out
    assert len([ln for ln in out.splitlines() if ln.lstrip().startswith(("0 ", "1 "))]) == 2  # a row per layer
    rc, out, _ = run_main(capsys, "info", str(out_path), "--json")
    rep = json.loads(out)
    c = rep["calibration"]
    assert (c["version"], c["tokens"], c["source"], c["fingerprint_matches"]) == (1, 4321, "pydoc_data.topics", True)
    assert (c["n_layer"], c["n_head"], c["n_freq"]) == (2, 4, 8)
    assert rep["profile"]["share_above_095"] == pytest.approx(4 / 8)
    assert len(rep["profile"]["layers"]) == 2


def test_info_flags_statistics_of_another_model(tiny_gguf, tmp_path, capsys):
    src = tiny_gguf("llama")
    out_path = tmp_path / "m.tri.gguf"
    calibrated(src, out_path, fingerprint="llama:other-model:0123456789abcdef01234567")
    rc, out, _ = run_main(capsys, "info", str(out_path))
    assert rc == 0
    assert "DOES NOT match this model" in out and "re-calibrate" in out
    rc, out, _ = run_main(capsys, "info", str(out_path), "--json")
    assert json.loads(out)["calibration"]["fingerprint_matches"] is False


def test_info_reports_a_broken_calibration(tiny_gguf, tmp_path, capsys):
    src = tiny_gguf("llama")
    broken = tmp_path / "broken.gguf"
    fields = cal_from(src).gguf_fields()
    fields["triattention.q_abs_mean"] = fields["triattention.q_abs_mean"][:-1]
    write_with_metadata(src, broken, fields)
    rc, out, err = run_main(capsys, "info", str(broken))
    assert rc == 1
    assert "calibration   unreadable" in out and "q_abs_mean" in out
    assert err.count("\n") == 1 and "cannot be read" in err


def test_info_on_gemma3_and_on_a_model_without_rope(tiny_gguf, tmp_path, capsys):
    rc, out, _ = run_main(capsys, "info", str(tiny_gguf("gemma3")))
    assert rc == 0 and "sliding window 64" in out
    from pytriatt.testing.tiny import write_tiny_mamba_gguf

    mamba = write_tiny_mamba_gguf(tmp_path / "mamba.gguf")
    rc, out, _ = run_main(capsys, "info", str(mamba))
    assert rc == 0
    assert "architecture  mamba" in out and "not applicable" in out
    assert "add them with" not in out  # no advice to calibrate what cannot be calibrated


def test_info_on_unreadable_files_is_a_one_line_error(tiny_gguf, tmp_path, capsys):
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"not a model")
    truncated = tmp_path / "cut.gguf"
    raw = tiny_gguf("llama").read_bytes()
    truncated.write_bytes(raw[: read_header(tiny_gguf("llama")).data_offset + 100])
    for path, msg in ((junk, "not a GGUF file"), (truncated, "truncated"), (tmp_path / "nope.gguf", "no such file"),
                      (tmp_path, "is a directory")):
        rc, out, err = run_main(capsys, "info", str(path))
        assert rc == 2 and out == ""
        assert msg in err and err.count("\n") == 1 and "Traceback" not in err


def test_info_runs_as_a_command(tiny_gguf):
    r = subprocess.run([sys.executable, "-m", "pytriatt", "info", str(tiny_gguf("qwen2")), "--json"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["model"]["architecture"] == "qwen2"


# --------------------------------------------------------------------------- pytriatt plot


def test_plot_writes_a_png(tiny_gguf, tmp_path, capsys):
    pytest.importorskip("matplotlib")
    src = tiny_gguf("qwen3", n_layer=4)
    model = tmp_path / "m.tri.gguf"
    calibrated(src, model, seed=3)
    png = tmp_path / "heads.png"
    rc, out, err = run_main(capsys, "plot", str(model), "-o", str(png), "--heads", "6", "--json")
    assert rc == 0, err
    rep = json.loads(out)
    assert len(rep["heads"]) == 6
    Rs = [h["R"] for h in rep["heads"]]
    assert Rs[:3] == sorted(Rs[:3], reverse=True) and min(Rs[:3]) >= max(Rs[3:])
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 20_000
    assert sorted(p.name for p in tmp_path.iterdir()) == ["heads.png", "m.tri.gguf"]  # no temp left
    rc, out, _ = run_main(capsys, "plot", str(model), "-o", str(tmp_path / "heads.svg"))
    assert rc == 0 and "wrote" in out and (tmp_path / "heads.svg").read_text().lstrip().startswith("<?xml")


def test_plot_refusals(tiny_gguf, tmp_path, capsys):
    pytest.importorskip("matplotlib")
    src = tiny_gguf("llama")
    rc, _, err = run_main(capsys, "plot", str(src), "-o", str(tmp_path / "x.png"))
    assert rc == 2 and "carries no TriAttention calibration" in err and "pytriatt calibrate" in err
    model = tmp_path / "m.tri.gguf"
    calibrated(src, model)
    before = model.read_bytes()
    rc, _, err = run_main(capsys, "plot", str(model), "-o", str(model))
    assert rc == 2 and "refusing to overwrite the model" in err
    assert model.read_bytes() == before
    rc, _, err = run_main(capsys, "plot", str(model), "-o", str(tmp_path / "x.weird"))
    assert rc == 2 and "cannot write a 'weird' image" in err
    rc, _, err = run_main(capsys, "plot", str(model), "-o", str(tmp_path / "missing" / "x.png"))
    assert rc == 2 and "does not exist" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.tri.gguf"]


def test_plot_without_matplotlib_names_the_install_command(tiny_gguf, tmp_path, capsys, monkeypatch):
    model = tmp_path / "m.tri.gguf"
    calibrated(tiny_gguf("llama"), model)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    rc, _, err = run_main(capsys, "plot", str(model), "-o", str(tmp_path / "x.png"))
    assert rc == 2
    assert err.strip() == "pytriatt: error: plotting needs matplotlib: pip install 'pytriatt[plot]'"
