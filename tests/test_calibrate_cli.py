"""Specification of `pytriatt calibrate`: what users run, what it writes, what it refuses."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys

import numpy as np
import pytest

from pytriatt import gguf_io
from pytriatt.core import Calibration


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "pytriatt", *args], capture_output=True, text=True, timeout=900)


def sha(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def tensor_bytes(path) -> dict:
    """name -> sha256 of each tensor's data, read through the validated header."""
    hdr = gguf_io.read_header(path)
    data = path.read_bytes()
    return {t.name: hashlib.sha256(data[hdr.data_offset + t.offset: hdr.data_offset + t.offset + t.nbytes]).hexdigest()
            for t in hdr.tensors}


@pytest.fixture
def tiny(tiny_gguf, tmp_path):
    src = tmp_path / "tiny-qwen3.gguf"
    src.write_bytes(tiny_gguf("qwen3").read_bytes())
    return src


def test_calibrate_writes_a_loadable_copy_with_the_statistics(tiny, tmp_path):
    before = sha(tiny)
    out = tmp_path / "tiny.tri.gguf"
    r = run_cli("calibrate", str(tiny), "-o", str(out), "--tokens", "700", "--ctx", "256", "--json")
    assert r.returncode == 0, r.stderr
    summary = json.loads(r.stdout)
    assert summary["tokens"] >= 700 and summary["replaced_existing"] is False
    assert 0 < summary["profile"]["mean"] <= 1

    assert sha(tiny) == before                       # the input is untouched
    assert tensor_bytes(out) == tensor_bytes(tiny)   # tensors copied byte for byte
    src_keys = gguf_io.read_header(tiny).keys()
    assert gguf_io.read_header(out).keys()[: len(src_keys)] == src_keys   # original metadata kept, in order
    cal = Calibration.from_gguf(out)
    assert cal.calib_tokens == summary["tokens"] and cal.calib_source == "pydoc_data.topics"
    assert cal.q_mean.shape == (2, 4, 8)

    from pytriatt.context import Model
    Model(out).close()                               # llama.cpp loads it


def test_recalibrating_replaces_the_statistics_and_says_so(tiny, tmp_path):
    first, second = tmp_path / "a.gguf", tmp_path / "b.gguf"
    assert run_cli("calibrate", str(tiny), "-o", str(first), "--tokens", "300", "--ctx", "128", "-q").returncode == 0
    text = tmp_path / "other.txt"
    text.write_text("A completely different text about rivers, mountains and the weather. " * 40)
    r = run_cli("calibrate", str(first), "-o", str(second), "--text", str(text), "--tokens", "300", "--ctx", "128", "-q")
    assert r.returncode == 0, r.stderr
    assert "already carried TriAttention statistics" in r.stdout
    a, b = Calibration.from_gguf(first), Calibration.from_gguf(second)
    assert b.calib_source == "other.txt"
    assert not np.allclose(a.q_mean, b.q_mean)
    assert sum(k.startswith("triattention.") for k in gguf_io.read_header(second).keys()) == 10


def test_merge_weights_runs_by_their_token_counts(tiny, tmp_path):
    t1, t2 = tmp_path / "t1.txt", tmp_path / "t2.txt"
    t1.write_text("The quick brown fox jumps over the lazy dog. " * 30)
    t2.write_text("Numbers and letters: 1 2 3 4 5, a b c d e, and so on. " * 50)
    a, b, m = (tmp_path / f"{n}.gguf" for n in "abm")
    for out, t in ((a, t1), (b, t2)):
        assert run_cli("calibrate", str(tiny), "-o", str(out), "--text", str(t), "--ctx", "128", "-q").returncode == 0
    r = run_cli("calibrate", str(tiny), "-o", str(m), "--merge", str(a), str(b), "--json")
    assert r.returncode == 0, r.stderr
    ca, cb, cm = (Calibration.from_gguf(p) for p in (a, b, m))
    assert cm.calib_tokens == ca.calib_tokens + cb.calib_tokens
    want = (ca.calib_tokens * ca.q_mean.astype(complex) + cb.calib_tokens * cb.q_mean) / cm.calib_tokens
    assert np.allclose(cm.q_mean, want, rtol=1e-5, atol=1e-6)


def test_bad_input_is_refused_with_one_line_and_no_output(tiny, tiny_gguf, tmp_path):
    out = tmp_path / "out.gguf"

    def refused(*args, match):
        r = run_cli("calibrate", *args)
        assert r.returncode != 0, r.stdout
        assert match in r.stderr, r.stderr
        assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
        return r

    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"this is not a model")
    refused(str(junk), "-o", str(out), match="not a GGUF")
    truncated = tmp_path / "truncated.gguf"
    truncated.write_bytes(tiny.read_bytes()[:40_000])
    refused(str(truncated), "-o", str(out), match="truncated")
    refused(str(tiny), "-o", str(tmp_path / "missing-dir" / "out.gguf"), match="does not exist")
    refused(str(tiny), "-o", str(tiny), match="same file")
    empty = tmp_path / "empty.txt"
    empty.write_text("   \n")
    refused(str(tiny), "-o", str(out), "--text", str(empty), match="empty")
    from pytriatt.testing.tiny import write_tiny_mamba_gguf
    mamba = write_tiny_mamba_gguf(tmp_path / "mamba.gguf")
    refused(str(mamba), "-o", str(out), match="mamba")
    assert not out.exists()

    # statistics of another model cannot be merged into this one
    other = tmp_path / "other.tri.gguf"
    assert run_cli("calibrate", str(tiny_gguf("llama")), "-o", str(other), "--tokens", "200", "--ctx", "128",
                   "-q").returncode == 0
    refused(str(tiny), "-o", str(out), "--merge", str(other), match="another model")
    assert not out.exists()

    # an existing output needs --force
    out.write_bytes(b"precious")
    refused(str(tiny), "-o", str(out), match="already exists")
    assert out.read_bytes() == b"precious"
    assert run_cli("calibrate", str(tiny), "-o", str(out), "--tokens", "200", "--ctx", "128", "-q",
                   "--force").returncode == 0
    assert Calibration.from_gguf(out).calib_tokens >= 200


@pytest.mark.real
def test_smollm2_calibration_loads_everywhere_and_leaves_the_model_as_it_was(smollm2_path, tmp_path):
    before = sha(smollm2_path)
    out = tmp_path / "smollm2.tri.gguf"
    r = run_cli("calibrate", "smollm2-135m", "-o", str(out), "--tokens", "2048", "--ctx", "1024", "--json")
    assert r.returncode == 0, r.stderr
    summary = json.loads(r.stdout)
    assert summary["tokens"] == 2048 and summary["profile"]["n_heads"] == 30 * 9
    assert sha(smollm2_path) == before
    assert tensor_bytes(out) == tensor_bytes(smollm2_path)
    cal = Calibration.from_gguf(out)
    assert cal.q_mean.shape == (30, 9, 32) and cal.n_head_kv == 3
    from pytriatt.context import Context, Model
    m = Model(out)
    with Context(m, n_ctx=256) as ctx:
        assert np.isfinite(ctx.decode(m.tokenize("Hello"))).all()
    m.close()
