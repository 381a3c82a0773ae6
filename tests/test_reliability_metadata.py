"""Untrusted calibration metadata: every malformed or hostile `triattention.*` variant of a calibrated
model is refused with a clear one-line error by the Python loader (Calibration.from_gguf) and by
libllama's loader (llama_set_kv_policy(tri, calib_path=...), also through Llama(kv_calib=...)),
never loaded as silent garbage. Where libllama still accepts what it should not, the case is an
expected failure naming the hole (reported to the lead; see docs/RELIABILITY.md).

The fuzzer (tools/fuzz_calib.py, tests/test_reliability_fuzz.py) searches the same readers at random;
this table pins down each rule."""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
import pytest

from pytriatt import core, gguf_io
from pytriatt.gguf_model import model_shape, open_model
from pytriatt import gguf_io as g

from _fuzz import fz

K = "triattention."




@pytest.fixture(scope="module")
def lc():
    from pytriatt import _llama
    try:
        return _llama.require_patched("kv policy")
    except Exception as e:
        pytest.skip(str(e))


def calibrated(src: Path, dst: Path, seed=0) -> Path:
    """src with statistics that are valid for its shape (random, consistent: |E q| <= E|q|)."""
    rope = core.RopeSpec.from_gguf(src)
    shape = model_shape(open_model(src))
    L, H, F = rope.n_layer, shape["heads"][0], rope.n_freq
    fields = fz.calib_fields(L, H, F, np.random.default_rng(seed), fingerprint=core.model_fingerprint(src))
    gguf_io.write_with_metadata(src, dst, fields)
    return dst


@pytest.fixture(scope="module")
def tiny(tiny_gguf, tmp_path_factory):
    src = tiny_gguf("llama")
    return calibrated(src, tmp_path_factory.mktemp("meta") / "tiny.tri.gguf")


@pytest.fixture(scope="module")
def ctx(tiny, lc):
    from pytriatt.context import Context, Model
    m = Model(tiny)
    c = Context(m, n_ctx=64, n_batch=16, n_threads=1)
    yield c
    c.close()
    m.close()


def items_of(path):
    hdr = gguf_io.read_header(path)
    return hdr, [(kv.key, kv.type, kv.item_type, kv.value) for kv in hdr.kv]


def setv(items, key, t, it, v):
    assert any(k == key for k, *_ in items), key
    return [(k, t, it, v) if k == key else (k, a, b, c) for k, a, b, c in items]


def arr(items, key):
    return next(v for k, _, _, v in items if k == key).copy()


def f32s(items, key, fn):
    a = arr(items, K + key)
    fn(a)
    return setv(items, K + key, g.T_ARRAY, g.T_FLOAT32, a)


def poke(a, i, v):
    a[i] = v


# name, items -> items, Python error (regex), libllama error (regex, or None: a known hole)
VARIANTS = [
    ("missing version", lambda it: [x for x in it if x[0] != K + "version"],
     "no TriAttention calibration.*pytriatt calibrate", "carries no TriAttention statistics"),
    ("version 2", lambda it: setv(it, K + "version", g.T_UINT32, None, 2),
     "format version 2", "unsupported triattention.version 2"),
    ("version as float32", lambda it: setv(it, K + "version", g.T_FLOAT32, None, 1.0),
     "version has type float32, expected uint32", "is not a uint32"),
    ("n_layer as int32", lambda it: setv(it, K + "n_layer", g.T_INT32, None, 2),
     "n_layer has type int32, expected uint32", "is not a uint32"),
    ("n_layer as string", lambda it: setv(it, K + "n_layer", g.T_STRING, None, "2"),
     "n_layer has type string", "is not a uint32"),
    ("n_layer of another model", lambda it: setv(it, K + "n_layer", g.T_UINT32, None, 3),
     "holds 3?\\d* values|do not fit", "another model shape"),
    ("n_head of another model", lambda it: setv(it, K + "n_head", g.T_UINT32, None, 8),
     "holds \\d+ values|do not fit", "another model shape"),
    ("n_freq 0, empty arrays", lambda it: [
        (k, t, i, v[:0] if k.startswith(K + "q_") else (0 if k == K + "n_freq" else v)) for k, t, i, v in it],
     "do not fit the model", "another model shape .*0 bands"),
    ("n_freq 2^31 + 8", lambda it: setv(it, K + "n_freq", g.T_UINT32, None, (1 << 31) + 8),
     "holds \\d+ values, expected", "missing or not \\d+ float32 values|another model shape"),
    ("q_mean_real one short", lambda it: setv(it, K + "q_mean_real", g.T_ARRAY, g.T_FLOAT32, arr(it, K + "q_mean_real")[:-1]),
     "q_mean_real holds \\d+ values", "q_mean_real is missing or not"),
    ("q_mean_imag one long", lambda it: setv(it, K + "q_mean_imag", g.T_ARRAY, g.T_FLOAT32,
                                             np.append(arr(it, K + "q_mean_imag"), np.float32(0))),
     "q_mean_imag holds \\d+ values", "q_mean_imag is missing or not"),
    ("q_abs_mean as float64", lambda it: setv(it, K + "q_abs_mean", g.T_ARRAY, g.T_FLOAT64,
                                              arr(it, K + "q_abs_mean").astype(np.float64)),
     "q_abs_mean has type array of float64, expected an array of float32", "q_abs_mean is missing or not"),
    ("q_abs_mean a scalar", lambda it: setv(it, K + "q_abs_mean", g.T_FLOAT32, None, 1.0),
     "q_abs_mean has type float32, expected an array", "q_abs_mean is missing or not"),
    ("NaN in q_mean_imag", lambda it: f32s(it, "q_mean_imag", lambda a: poke(a, 5, np.nan)),
     "q_mean_imag holds non-finite values", "q_mean_imag holds non-finite values"),
    ("inf in q_abs_mean", lambda it: f32s(it, "q_abs_mean", lambda a: poke(a, 0, np.inf)),
     "q_abs_mean holds non-finite values", "q_abs_mean holds non-finite values"),
    ("negative E|q|", lambda it: f32s(it, "q_abs_mean", lambda a: poke(a, 3, -1.0)),
     "negative values", "statistics are inconsistent"),
    ("|E q| above E|q|", lambda it: f32s(it, "q_abs_mean", lambda a: a.__imul__(np.float32(0.1))),
     "exceeds E\\|q_f\\|", "statistics are inconsistent"),
    ("duplicate calibration key", lambda it: it[:1] + [(K + "version", g.T_UINT32, None, 1)] + it[1:],
     "duplicate metadata key", "cannot read .* as GGUF"),
    ("statistics of another model name", lambda it: setv(it, "general.name", g.T_STRING, None, "another-model"),
     None, "statistics of another model .general.name"),
]


def variant(tiny, tmp_path, mutate) -> Path:
    data = tiny.read_bytes()
    hdr, items = items_of(tiny)
    out = tmp_path / "variant.gguf"
    out.write_bytes(fz.rebuild(data, hdr, mutate(items)))
    return out


def one_line(msg: str) -> bool:
    return bool(msg.strip()) and "\n" not in msg.strip()


@pytest.mark.parametrize("name,mutate,py_err,cpp_err", VARIANTS, ids=[v[0] for v in VARIANTS])
def test_python_loader_refuses(tiny, tmp_path, name, mutate, py_err, cpp_err):
    path = variant(tiny, tmp_path, mutate)
    if py_err is None:
        # a file's own name does not matter to the loader itself; as statistics for the model it was, they fail
        with pytest.raises(core.FingerprintMismatchError, match="holds statistics of another model .general.name"):
            core.Calibration.from_gguf(tiny, model=path)
        return
    with pytest.raises((core.CalibrationError, ValueError), match=py_err) as e:
        core.Calibration.from_gguf(path)
    assert one_line(str(e.value))
    # the same verdict with the model given separately
    with pytest.raises((core.CalibrationError, ValueError)):
        core.Calibration.from_gguf(path, model=tiny, check_fingerprint=False)


@pytest.mark.parametrize("name,mutate,py_err,cpp_err", VARIANTS, ids=[v[0] for v in VARIANTS])
def test_libllama_loader_refuses(ctx, tiny, tmp_path, name, mutate, py_err, cpp_err):
    path = variant(tiny, tmp_path, mutate)
    with pytest.raises(ValueError, match=cpp_err) as e:
        ctx.set_kv_policy("tri", budget=8, interval=8, calib=path)
    assert one_line(str(e.value))
    ctx.set_kv_policy("tri", budget=8, interval=8, calib=tiny)   # a failed attach leaves the context usable


def test_llama_refuses_bad_statistics_in_one_line(tiny, tmp_path, lc):
    import llama_cpp
    path = variant(tiny, tmp_path, lambda it: f32s(it, "q_mean_imag", lambda a: poke(a, 1, np.nan)))
    with pytest.raises(ValueError, match="kv_policy='tri': .*non-finite") as e:
        llama_cpp.Llama(str(tiny), kv_policy="tri", kv_calib=str(path), kv_budget=16, kv_interval=8, verbose=False)
    assert one_line(str(e.value))


@pytest.mark.parametrize("what", ["missing", "directory", "not gguf", "truncated", "empty"])
def test_unreadable_calibration_files(tiny, tmp_path, ctx, what):
    p = tmp_path / "calib.gguf"
    if what == "directory":
        p.mkdir()
    elif what == "not gguf":
        p.write_bytes(b"\x7fELF" + bytes(200))
    elif what == "truncated":
        p.write_bytes(tiny.read_bytes()[:3000])
    elif what == "empty":
        p.write_bytes(b"")
    err = {"missing": FileNotFoundError}.get(what, (core.CalibrationError, ValueError))
    with pytest.raises(err) as e:
        core.Calibration.from_gguf(p)
    assert one_line(str(e.value)) and str(p) in str(e.value)
    with pytest.raises(ValueError, match="cannot read") as e:
        ctx.set_kv_policy("tri", budget=8, interval=8, calib=p)
    assert one_line(str(e.value))


def test_calibration_of_another_model_with_the_same_name_and_shape(tiny_gguf, tiny, tmp_path, ctx):
    """Same architecture, name and shape, another RoPE base: the statistics belong to another model, and
    Python and libllama say so in the same words (one rule: docs/calibration-format.md)."""
    other_src = tiny_gguf("llama", rope_freq_base=500000.0)
    other = calibrated(other_src, tmp_path / "other.tri.gguf", seed=1)
    assert core.model_fingerprint(other) != core.model_fingerprint(tiny)
    with pytest.raises(core.FingerprintMismatchError, match="another model .llama.rope.freq_base") as py:
        core.Calibration.from_gguf(other, model=tiny)
    assert one_line(str(py.value))
    with pytest.raises(ValueError, match="another model .llama.rope.freq_base") as cpp:
        ctx.set_kv_policy("tri", budget=8, interval=8, calib=other)
    assert one_line(str(cpp.value))
    assert str(cpp.value).split("KV policy: ")[-1] in str(py.value)


def test_huge_header_counts_fail_fast(tmp_path):
    """Counts that claim more than the file holds fail at once (no allocation, no loop over them)."""
    for name, body in [
        ("kv count", struct.pack("<IQQ", 3, 0, 1 << 60)),
        ("array count", struct.pack("<IQQ", 3, 0, 1) + g._enc_string("a") + struct.pack("<IIQ", 9, 6, 1 << 60)),
        ("string length", struct.pack("<IQQ", 3, 0, 1) + struct.pack("<Q", 1 << 62)),
    ]:
        p = tmp_path / f"{name}.gguf"
        p.write_bytes(b"GGUF" + body)
        with pytest.raises(ValueError, match="truncated or corrupt"):
            gguf_io.read_header(p)
        with pytest.raises(core.CalibrationError, match="truncated or corrupt"):
            core.Calibration.from_gguf(p)
