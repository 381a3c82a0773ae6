"""One rule says whether a calibration belongs to a model (docs/calibration-format.md, "Which model a
calibration belongs to"): Calibration.from_gguf(calib, model=...) in Python and libllama's check when the
policy attaches accept and refuse the same files, for the same reason, in the same words."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from pytriatt import gguf_io
from pytriatt.calibrate import write_sidecar
from pytriatt.core import Calibration, FingerprintMismatchError
from pytriatt.fingerprint import calibration_mismatch, kv_to_str

from _fuzz import fz





def rewrite(src: Path, dst: Path, change) -> Path:
    """A copy of src whose metadata items (key, type, item_type, value) went through change()."""
    hdr = gguf_io.read_header(src)
    items = [(kv.key, kv.type, kv.item_type, kv.value) for kv in hdr.kv]
    dst.write_bytes(fz.rebuild(src.read_bytes(), hdr, change(items)))
    return dst


def setv(key, value, t=None):
    def change(items):
        assert any(k == key for k, *_ in items), key
        return [(k, t if t is not None else a, b, value) if k == key else (k, a, b, c) for k, a, b, c in items]
    return change


def drop(key):
    return lambda items: [x for x in items if x[0] != key]


def add(key, t, value):
    return lambda items: items + [(key, t, None, value)]


def tokens(fn):
    def change(items):
        return [(k, a, b, fn(list(c))) if k == "tokenizer.ggml.tokens" else (k, a, b, c) for k, a, b, c in items]
    return change


# name, how the calibrated copy is changed, whether it still belongs to the model
CASES = [
    ("the calibrated copy itself", lambda items: items, True),
    ("another general.name", setv("general.name", "another-model"), False),
    ("another RoPE base", setv("llama.rope.freq_base", 500000.0), False),
    ("a hyper-parameter missing", drop("llama.context_length"), False),
    ("a key the model lacks", add("llama.extra_flag", gguf_io.T_UINT32, 7), True),
    ("a vocabulary one token shorter", tokens(lambda t: t[:-1]), False),
    ("one token spelt differently, same size", tokens(lambda t: t[:5] + ["<other>"] + t[6:]), True),
    # printed alike (4096), so equal under the rule, on both sides
    ("an integer stored as another integer type", setv("llama.context_length", 4096, gguf_io.T_UINT64), True),
]


@pytest.fixture(scope="module")
def model(tiny_cal):
    return tiny_cal       # a tiny llama carrying its own statistics (conftest)


@pytest.fixture(scope="module")
def ctx(model):
    from pytriatt.context import Context, Model
    m = Model(model)
    c = Context(m, n_ctx=64, n_batch=16, n_threads=1)
    yield c
    c.close()
    m.close()


def libllama_verdict(ctx, calib):
    try:
        ctx.set_kv_policy("tri", budget=8, interval=8, sink=0, calib=calib)
        return None
    except ValueError as e:
        return str(e)


def python_verdict(calib, model):
    try:
        Calibration.from_gguf(calib, model=model)
        return None
    except FingerprintMismatchError as e:
        return str(e)


@pytest.mark.parametrize("name,change,belongs", CASES, ids=[c[0] for c in CASES])
def test_python_and_libllama_agree(ctx, model, tmp_path, name, change, belongs):
    calib = rewrite(model, tmp_path / "calib.gguf", change)
    cpp, py = libllama_verdict(ctx, calib), python_verdict(calib, model)
    assert (cpp is None) == (py is None), f"libllama: {cpp!r}; Python: {py!r}"
    assert (cpp is None) == belongs, cpp
    if cpp is not None:
        # the same reason, in the same words (Python adds how to skip the check)
        assert py.startswith(cpp.split("KV policy: ")[-1].split(": calibrate this model")[0]), (cpp, py)


@pytest.mark.parametrize("renamed", [False, True])
def test_a_statistics_only_sidecar_belongs_to_the_model_it_names(ctx, model, tmp_path, renamed):
    cal = Calibration.from_gguf(model)
    side = write_sidecar(model, cal, tmp_path / "side.calib.gguf")
    if renamed:
        side = rewrite(side, tmp_path / "renamed.calib.gguf", setv("general.name", "another-model"))
    cpp, py = libllama_verdict(ctx, side), python_verdict(side, model)
    assert (cpp is None) == (py is None) == (not renamed), (cpp, py)


def test_values_compare_as_llama_cpp_prints_them():
    kv = gguf_io.KeyValue
    f32 = lambda v: kv("k", gguf_io.T_FLOAT32, np.float32(v), 0, 0)   # noqa: E731
    assert kv_to_str(f32(10000.0)) == "10000.000000"
    assert kv_to_str(f32(float("nan"))) == "nan" and kv_to_str(f32(-float("inf"))) == "-inf"
    assert kv_to_str(kv("k", gguf_io.T_BOOL, True, 0, 0)) == "true"
    assert kv_to_str(kv("k", gguf_io.T_ARRAY, ['a"b', "c"], 0, 0, gguf_io.T_STRING)) == '["a\\"b", "c"]'


def test_a_calibration_always_belongs_to_its_own_file(model):
    assert calibration_mismatch(model, model) is None
