"""Bad input at every entry point gets one line that names the problem and the fix.

Command line (`pytriatt run / calibrate / info / plot`): exit status 2, exactly one line on stderr
("pytriatt: error: ..."), never a traceback (those need --debug). Python API (Llama(...), Context,
Calibration, calibrate, select): an exception of a documented type (ValueError and its subclasses,
FileNotFoundError, NotImplementedError) whose message is one line.

Table-driven: each row is an input, the entry point and what the message must say."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from pytriatt import gguf_io

llama_cpp = pytest.importorskip("llama_cpp")

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def files(tiny_gguf, tmp_path_factory):
    """The inputs: a good tiny model, its calibrated copy, another model's calibration, broken files."""
    from pytriatt.calibrate import calibrate
    d = tmp_path_factory.mktemp("bad")
    tiny = tiny_gguf("llama")
    cal, _ = calibrate(tiny, max_tokens=256, n_ctx=128, progress=False)
    tri = d / "tiny.tri.gguf"
    gguf_io.write_with_metadata(tiny, tri, cal.gguf_fields())
    other_src = tiny_gguf("qwen2")
    ocal, _ = calibrate(other_src, max_tokens=256, n_ctx=128, progress=False)
    other = d / "other.tri.gguf"
    gguf_io.write_with_metadata(other_src, other, ocal.gguf_fields())
    (d / "notgguf.gguf").write_bytes(b"PK\x03\x04" + bytes(100))
    (d / "trunc.gguf").write_bytes(tri.read_bytes()[: tri.stat().st_size // 2])
    (d / "trunc-header.gguf").write_bytes(tri.read_bytes()[:5000])
    (d / "adir").mkdir()
    (d / "words.txt").write_text("hello world " * 50)
    from pytriatt.testing.tiny import write_tiny_mamba_gguf
    mamba = write_tiny_mamba_gguf(d / "mamba.gguf")
    return {"tiny": tiny, "tri": tri, "other": other, "notgguf": d / "notgguf.gguf", "trunc": d / "trunc.gguf",
            "trunc_header": d / "trunc-header.gguf", "dir": d / "adir", "missing": d / "missing.gguf",
            "out": d / "out.gguf", "nodir_out": d / "nope" / "out.gguf", "png": d / "x.png",
            "words": d / "words.txt", "mamba": mamba, "d": d}


LONG_PROMPT = "the quick brown fox jumps over the lazy dog " * 20

# (id, argv with {placeholders}, regex the error line must match)
CLI = [
    ("run: missing file", "run {missing} -n 4", r"no such file"),
    ("run: directory", "run {dir} -n 4", r"is a directory"),
    ("run: not GGUF", "run {notgguf} -n 4", r"not a GGUF file"),
    # the exact reason (what info and doctor say), with or without a budget, not llama.cpp's generic failure
    ("run: truncated GGUF", "run {trunc} -n 4", r"is truncated: its tensor data ends \d+ bytes past the end"),
    ("run --budget: truncated GGUF", "run {trunc} -n 4 --budget 64 --policy streaming",
     r"is truncated: its tensor data ends \d+ bytes past the end"),
    ("run: budget 0", "run {tri} -n 4 --budget 0", r"budget"),
    ("run: negative budget", "run {tri} -n 4 --budget -8", r"budget"),
    ("run: interval 0", "run {tri} -n 4 --budget 32 --interval 0", r"interval"),
    ("run: budget below protected tokens", "run {tri} -n 4 --budget 4 --sink 4 --window 2", r"protected.*budget"),
    ("run: prompt protected beyond the budget",
     "run {tri} -n 4 --budget 16 --protect-prompt -p '" + LONG_PROMPT + "'", r"prompt.*budget|budget.*prompt"),
    # the file is a calibration, of another model: the command to calibrate this one, not that one
    ("run: calibration of another model", "run {tiny} -n 4 --budget 32 --calib {other}",
     r"holds statistics of another model .*: calibrate this model \(pytriatt calibrate \S*tiny\S*\.gguf -o "
     r"\S*\.tri\.gguf\), and pass its output as --calib"),
    ("run: calibration file missing", "run {tiny} -n 4 --budget 32 --calib {missing}", r"no such file"),
    ("run: model without calibration", "run {tiny} -n 4 --budget 32", r"no TriAttention calibration.*calibrate"),
    ("run: n_ctx smaller than the prompt", "run {tiny} -n 4 -c 16 -p '" + LONG_PROMPT + "'", r"exceed the context.*ctx-size"),
    ("run: zero tokens", "run {tiny} -n 0", r"n-predict"),
    ("run: recurrent model with a budget", "run {mamba} -n 4 --budget 16 --policy streaming", r"recurrent|not a KV cache"),
    ("calibrate: missing file", "calibrate {missing} -o {out}", r"no such file"),
    ("calibrate: directory", "calibrate {dir} -o {out}", r"is a directory"),
    ("calibrate: not GGUF", "calibrate {notgguf} -o {out}", r"not a GGUF file"),
    ("calibrate: truncated GGUF", "calibrate {trunc} -o {out}", r"truncated"),
    ("calibrate: output is the input", "calibrate {tiny} -o {tiny}", r"over the input"),
    ("calibrate: output directory missing", "calibrate {tiny} -o {nodir_out}", r"does not exist"),
    ("calibrate: zero tokens", "calibrate {tiny} -o {out} --tokens 0", r"--tokens"),
    ("calibrate: negative tokens", "calibrate {tiny} -o {out} --tokens -5", r"--tokens"),
    ("calibrate: tiny window", "calibrate {tiny} -o {out} --ctx 4", r"--ctx"),
    ("calibrate: text file missing", "calibrate {tiny} -o {out} --text {missing}", r"not found"),
    ("calibrate: merge another model", "calibrate {tiny} -o {out} --merge {other}", r"another model|do not fit"),
    ("calibrate: recurrent model", "calibrate {mamba} -o {out}", r"RoPE|rotary|architecture"),
    ("info: missing file", "info {missing}", r"no such file"),
    ("info: directory", "info {dir}", r"is a directory"),
    ("info: not GGUF", "info {notgguf}", r"not a GGUF file"),
    ("info: truncated GGUF", "info {trunc_header}", r"truncated"),
    ("plot: missing file", "plot {missing} -o {png}", r"no such file"),
    ("plot: not GGUF", "plot {notgguf} -o {png}", r"not a GGUF file"),
    ("plot: no calibration", "plot {tiny} -o {png}", r"no TriAttention calibration"),
    ("plot: output directory missing", "plot {tri} -o {nodir_out}", r"does not exist"),
    ("plot: zero heads", "plot {tri} -o {png} --heads 0", r"--heads"),
]


def run_cli(argv: str, files) -> subprocess.CompletedProcess:
    import shlex
    args = [a.format(**{k: str(v) for k, v in files.items()}) for a in shlex.split(argv)]
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    return subprocess.run([sys.executable, "-m", "pytriatt", *args], capture_output=True, text=True, timeout=300,
                          env=env, cwd=files["d"])


@pytest.mark.parametrize("name,argv,pattern", CLI, ids=[c.values[0] if hasattr(c, "values") else c[0] for c in CLI])
def test_cli(files, name, argv, pattern):
    res = run_cli(argv, files)
    err = res.stderr.strip()
    assert "Traceback" not in err, err
    assert res.returncode == 2, f"exit status {res.returncode}\n{err}"
    lines = err.splitlines()
    assert len(lines) == 1, f"expected one line, got:\n{err}"
    assert lines[0].startswith("pytriatt: error: ")
    import re
    assert re.search(pattern, lines[0]), lines[0]
    assert not files["out"].exists()


def test_cli_debug_shows_the_traceback(files):
    res = run_cli("--debug info {missing}", files)
    assert res.returncode != 0 and "Traceback" in res.stderr


# -- Python API ---------------------------------------------------------------------------------

def _llama(path, **kw):
    args = dict(n_ctx=256, n_batch=32, verbose=False)
    if "kv_policy" in kw:
        args["kv_budget"] = 64      # below n_ctx: libllama's default (2048) would be refused for it
    args.update(kw)
    return llama_cpp.Llama(str(path), **args)


def _context(path, **kw):
    from pytriatt.context import Context, Model
    return Context(Model(path), n_ctx=64, n_batch=16, **kw)


def _select(**kw):
    from pytriatt.core import select
    args = dict(policy="streaming", scores=None, positions=np.arange(10), t=9, budget=4)
    args.update(kw)
    return select(**args)


API = [
    ("Llama: missing file", lambda f: _llama(f["missing"]), ValueError, r"does not exist|no such file|not found"),
    ("Llama: unknown policy", lambda f: _llama(f["tri"], kv_policy="lru"), ValueError, r"kv_policy must be"),
    ("Llama: budget 0", lambda f: _llama(f["tri"], kv_policy="tri", kv_budget=0), ValueError, r"budget"),
    ("Llama: negative interval", lambda f: _llama(f["tri"], kv_policy="streaming", kv_interval=-1), ValueError,
     r"interval"),
    ("Llama: budget below protected", lambda f: _llama(f["tri"], kv_policy="streaming", kv_budget=4, kv_sink=4,
                                                       kv_window=4), ValueError, r"protected.*budget"),
    ("Llama: no calibration", lambda f: _llama(f["tiny"], kv_policy="tri"), ValueError,
     r"no TriAttention statistics.*pytriatt calibrate"),
    ("Llama: calibration of another model", lambda f: _llama(f["tiny"], kv_policy="tri", kv_calib=str(f["other"])),
     ValueError, r"another model"),
    ("Llama: calibration is a directory", lambda f: _llama(f["tiny"], kv_policy="tri", kv_calib=str(f["dir"])),
     ValueError, r"cannot read"),
    ("Llama: calibration not GGUF", lambda f: _llama(f["tiny"], kv_policy="tri", kv_calib=str(f["notgguf"])),
     ValueError, r"cannot read"),
    ("Llama: recurrent model", lambda f: _llama(f["mamba"], kv_policy="streaming"), ValueError,
     r"recurrent|not a KV cache"),
    ("Context: budget 0", lambda f: _context(f["tri"]).set_kv_policy("tri", budget=0), ValueError, r"budget"),
    ("Context: unknown policy", lambda f: _context(f["tri"]).set_kv_policy("lru"), ValueError, r"unknown KV policy .lru. \(known: full, tri"),
    ("Context: unsupported K cache type", lambda f: _context(f["tri"], type_k="q5_7"), ValueError, r"type_k|q5_7"),
    ("Llama: protected prompt beyond the budget",
     lambda f: list(_llama(f["tri"], n_ctx=2048, kv_policy="streaming", kv_budget=16, kv_interval=8,
                           kv_protect_prompt=True).create_completion(LONG_PROMPT, max_tokens=2)),
     ValueError, r"kv_protect_prompt.*kv_budget"),
    ("Context: directory as model", lambda f: _context(f["dir"]), (FileNotFoundError, ValueError), r"adir"),
    ("Calibration: missing file", lambda f: __import__("pytriatt.core").core.Calibration.from_gguf(f["missing"]),
     FileNotFoundError, r"no such GGUF file"),
    ("Calibration: directory", lambda f: __import__("pytriatt.core").core.Calibration.from_gguf(f["dir"]), ValueError,
     r"directory"),
    ("Calibration: not GGUF", lambda f: __import__("pytriatt.core").core.Calibration.from_gguf(f["notgguf"]),
     ValueError, r"not a GGUF file"),
    ("Calibration: another model", lambda f: __import__("pytriatt.core").core.Calibration.from_gguf(
        f["other"], model=f["tiny"]), ValueError, r"holds statistics of another model|do not fit"),
    ("calibrate(): missing file", lambda f: __import__("pytriatt.calibrate").calibrate.calibrate(f["missing"]),
     FileNotFoundError, r"no such"),
    ("calibrate(): not GGUF", lambda f: __import__("pytriatt.calibrate").calibrate.calibrate(f["notgguf"]),
     ValueError, r"not a GGUF file"),
    ("calibrate(): zero tokens", lambda f: __import__("pytriatt.calibrate").calibrate.calibrate(f["tiny"], max_tokens=0),
     ValueError, r"--tokens must be positive"),
    ("select: negative budget", lambda f: _select(budget=-1), ValueError, r"budget must be >= 0"),
    ("select: budget below protected", lambda f: _select(budget=2, sink=2, window=2), ValueError,
     r"protected.*budget"),
]


@pytest.mark.parametrize("name,call,exc,pattern", API, ids=[a.values[0] if hasattr(a, "values") else a[0] for a in API])
def test_python_api(files, name, call, exc, pattern):
    with pytest.raises(exc, match=pattern) as e:
        call(files)
    msg = str(e.value).strip()
    assert msg and "\n" not in msg, msg
