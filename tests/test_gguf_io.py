"""Specification of pytriatt.gguf_io: a copy of a GGUF file with triattention.* metadata added.

The copy keeps every original key (in order) and tensor info, its tensor data is
byte-identical, the new keys follow the original ones, and it loads in llama.cpp and in
Calibration.from_gguf. It appears at its destination only when complete, never
overwrites its input, and every bad input is a clear error that leaves nothing behind.
"""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

gguf = pytest.importorskip("gguf")

from pytriatt import gguf_io  # noqa: E402
from pytriatt.core import Calibration, RopeSpec, model_fingerprint  # noqa: E402
from pytriatt.gguf_io import read_header, write_with_metadata  # noqa: E402


def sha256(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def synthetic_calibration(model_path, *, seed=0, tokens=4096, source="synthetic test", fingerprint=None):
    """A Calibration with random statistics shaped for the model at model_path."""
    r = gguf.GGUFReader(str(model_path))
    rope = RopeSpec.from_gguf(r)
    arch = bytes(r.fields["general.architecture"].parts[-1]).decode()
    n_head = int(r.fields[f"{arch}.attention.head_count"].parts[-1][0])
    n_head_kv = int(r.fields[f"{arch}.attention.head_count_kv"].parts[-1][0])
    rng = np.random.default_rng(seed)
    shape = (rope.n_layer, n_head, rope.n_freq)
    a = rng.uniform(0.5, 2.0, shape)
    q_mean = a * rng.uniform(0.3, 1.0, shape) * np.exp(1j * rng.uniform(-np.pi, np.pi, shape))
    return Calibration(q_mean, a, rope, n_head_kv=n_head_kv, calib_tokens=tokens, calib_source=source,
                       model_fingerprint=model_fingerprint(r) if fingerprint is None else fingerprint)


def data_section(path) -> bytes:
    hdr = read_header(path)
    with open(path, "rb") as f:
        f.seek(hdr.data_offset)
        return f.read()


def listing(d):
    return sorted(os.listdir(d))


@pytest.fixture
def model(tiny_gguf):
    return tiny_gguf("llama")


# --------------------------------------------------------------------------- the copy


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3", "gemma3"])
def test_statistics_round_trip_through_calibration_from_gguf(tiny_gguf, tmp_path, arch):
    src = tiny_gguf(arch)
    cal = synthetic_calibration(src, seed=1)
    out = tmp_path / "m.tri.gguf"
    res = write_with_metadata(src, out, cal.gguf_fields())
    assert res["replaced"] is False and res["dst"] == str(out)
    back = Calibration.from_gguf(out)
    np.testing.assert_array_equal(back.q_mean, cal.q_mean)  # float32 stored exactly
    np.testing.assert_array_equal(back.q_abs_mean, cal.q_abs_mean)
    assert (back.calib_tokens, back.calib_source, back.model_fingerprint) == (4096, "synthetic test",
                                                                              model_fingerprint(src))
    # the statistics file is still "the same model": its fingerprint ignores the new keys
    assert model_fingerprint(out) == model_fingerprint(src)
    Calibration.from_gguf(out, model=src)  # fingerprint check passes


def test_original_metadata_and_tensor_infos_are_kept_in_order_and_new_keys_follow(model, tmp_path):
    cal = synthetic_calibration(model)
    out = tmp_path / "m.tri.gguf"
    res = write_with_metadata(model, out, cal.gguf_fields())
    a, b = read_header(model), read_header(out)
    n = len(a.kv)
    assert [kv.key for kv in b.kv[:n]] == [kv.key for kv in a.kv]
    assert [kv.key for kv in b.kv[n:]] == list(cal.gguf_fields())
    for x, y in zip(a.kv, b.kv):
        assert x.type == y.type and x.item_type == y.item_type
        if isinstance(x.value, np.ndarray):
            np.testing.assert_array_equal(x.value, y.value)
        else:
            assert x.value == y.value
    assert [(t.name, t.shape, t.ggml_type, t.offset) for t in a.tensors] == \
           [(t.name, t.shape, t.ggml_type, t.offset) for t in b.tensors]
    assert b.version == a.version and b.alignment == a.alignment == 32
    assert b.data_offset % 32 == 0 and res["data_offset"] == b.data_offset
    assert res["n_kv"] == len(b.kv) and res["n_tensors"] == len(a.tensors)
    assert res["bytes"] == os.path.getsize(out)


def test_tensor_data_is_byte_identical(model, tmp_path):
    out = tmp_path / "m.tri.gguf"
    before = sha256(model)
    write_with_metadata(model, out, synthetic_calibration(model).gguf_fields())
    assert sha256(model) == before  # the input is never modified
    assert data_section(out) == data_section(model)
    ra, rb = gguf.GGUFReader(str(model)), gguf.GGUFReader(str(out))
    assert len(ra.tensors) == len(rb.tensors) > 0
    for ta, tb in zip(ra.tensors, rb.tensors):
        assert ta.name == tb.name and ta.tensor_type == tb.tensor_type
        assert ta.data.tobytes() == tb.data.tobytes()


def test_metadata_types_follow_the_format_document(model, tmp_path):
    out = tmp_path / "m.tri.gguf"
    write_with_metadata(model, out, synthetic_calibration(model).gguf_fields())
    f = gguf.GGUFReader(str(out)).fields
    T = gguf.GGUFValueType
    for k in ("version", "n_layer", "n_head", "n_freq"):
        assert f[f"triattention.{k}"].types == [T.UINT32]
    for k in ("q_mean_real", "q_mean_imag", "q_abs_mean"):
        assert f[f"triattention.{k}"].types == [T.ARRAY, T.FLOAT32]
    assert f["triattention.calib_tokens"].types == [T.UINT64]
    assert f["triattention.calib_source"].types == [T.STRING]
    assert f["triattention.model_fingerprint"].types == [T.STRING]


def test_existing_calibration_is_replaced_not_duplicated(model, tmp_path):
    first, second = tmp_path / "a.gguf", tmp_path / "b.gguf"
    write_with_metadata(model, first, synthetic_calibration(model, seed=1, tokens=10).gguf_fields())
    cal2 = synthetic_calibration(model, seed=2, tokens=20, source="second run")
    res = write_with_metadata(first, second, cal2.gguf_fields())
    assert res["replaced"] is True
    assert sorted(res["replaced_keys"]) == sorted(cal2.gguf_fields())
    keys = read_header(second).keys()
    assert len(keys) == len(set(keys))  # every key once
    assert keys == read_header(first).keys()  # same keys, same order: originals, then the new statistics
    back = Calibration.from_gguf(second)
    np.testing.assert_array_equal(back.q_mean, cal2.q_mean)
    assert (back.calib_tokens, back.calib_source) == (20, "second run")
    assert data_section(second) == data_section(model)


def test_other_keys_can_be_added_and_typed(model, tmp_path):
    out = tmp_path / "m.gguf"
    fields = {"test.u32": 7, "test.neg": -3, "test.big": 1 << 40, "test.f": 0.5, "test.s": "héllo",
              "test.b": True, "test.arr_i": [1, 2, 3], "test.arr_f": np.array([0.25, 1.5], dtype=np.float64),
              "test.arr_s": ["a", "bc"]}
    write_with_metadata(model, out, fields, drop_prefix=None)
    h = read_header(out)
    assert h.get("test.u32") == 7 and h.get("test.neg") == -3 and h.get("test.big") == 1 << 40
    assert h.get("test.f") == 0.5 and h.get("test.s") == "héllo" and h.get("test.b") is True
    assert list(h.get("test.arr_i")) == [1, 2, 3] and h.get("test.arr_f").dtype == np.float64
    assert h.get("test.arr_s") == ["a", "bc"]
    types = {kv.key: kv.type_name for kv in h.kv}
    assert types["test.u32"] == "uint32" and types["test.neg"] == "int32" and types["test.big"] == "int64"
    assert types["test.f"] == "float32" and types["test.arr_s"] == "array[string]"


def test_custom_alignment_is_respected(tmp_path):
    src = tmp_path / "aligned.gguf"
    w = gguf.GGUFWriter(str(src), "llama")
    w.add_custom_alignment(256)
    w.add_name("aligned")
    rng = np.random.default_rng(0)
    w.add_tensor("a", rng.standard_normal((3, 5)).astype(np.float32))
    w.add_tensor("b", rng.standard_normal(7).astype(np.float16))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    out = tmp_path / "out.gguf"
    res = write_with_metadata(src, out, {"triattention.calib_source": "x" * 5})
    h = read_header(out)
    assert h.alignment == res["alignment"] == 256 and h.data_offset % 256 == 0
    assert data_section(out) == data_section(src)
    for ta, tb in zip(gguf.GGUFReader(str(src)).tensors, gguf.GGUFReader(str(out)).tensors):
        np.testing.assert_array_equal(ta.data, tb.data)


def test_small_copy_chunks_give_the_same_bytes(model, tmp_path, monkeypatch):
    monkeypatch.setattr(gguf_io, "COPY_CHUNK", 4096)
    out = tmp_path / "m.gguf"
    write_with_metadata(model, out, synthetic_calibration(model).gguf_fields())
    assert data_section(out) == data_section(model)


def test_the_copy_loads_in_llama_cpp(tiny_gguf, tmp_path):
    pytest.importorskip("llama_cpp")
    from pytriatt.context import Model

    for arch in ("llama", "gemma3"):
        src = tiny_gguf(arch)
        out = tmp_path / f"{arch}.tri.gguf"
        write_with_metadata(src, out, synthetic_calibration(src).gguf_fields())
        m = Model(out)
        assert m.meta("general.architecture") == arch
        assert m.meta("triattention.calib_source") == "synthetic test"
        assert m.tokenize("hello world") == Model(src).tokenize("hello world")
        m.close()


def test_read_header_agrees_with_gguf_reader(tiny_gguf):
    path = tiny_gguf("gemma3")
    h = read_header(path)
    r = gguf.GGUFReader(str(path))
    assert h.keys() == [k for k in r.fields if not k.startswith("GGUF.")]
    assert h.get("general.architecture") == "gemma3"
    assert h.get("gemma3.block_count") == int(r.fields["gemma3.block_count"].parts[-1][0])
    assert h.get("tokenizer.ggml.tokens")[:3] == ["<unk>", "<s>", "</s>"]
    assert [t.name for t in h.tensors] == [t.name for t in r.tensors]
    assert h.data_offset == r.data_offset and h.data_end == h.file_size


# --------------------------------------------------------------------------- refusals


def test_refuses_to_write_over_its_input(model, tmp_path):
    fields = synthetic_calibration(model).gguf_fields()
    before = sha256(model)
    with pytest.raises(ValueError, match="same file"):
        write_with_metadata(model, model, fields, force=True)
    link = tmp_path / "link.gguf"
    link.symlink_to(model)
    with pytest.raises(ValueError, match="same file"):
        write_with_metadata(model, link, fields, force=True)
    hard = tmp_path / "hard.gguf"
    os.link(model, hard)
    with pytest.raises(ValueError, match="same file"):
        write_with_metadata(hard, model, fields, force=True)
    rel = os.path.relpath(model, os.getcwd())
    with pytest.raises(ValueError, match="same file"):
        write_with_metadata(model, rel, fields, force=True)
    assert sha256(model) == before


def test_existing_output_needs_force(model, tmp_path):
    out = tmp_path / "m.gguf"
    out.write_bytes(b"precious")
    fields = synthetic_calibration(model).gguf_fields()
    with pytest.raises(FileExistsError, match="already exists.*--force"):
        write_with_metadata(model, out, fields)
    assert out.read_bytes() == b"precious"
    write_with_metadata(model, out, fields, force=True)
    assert Calibration.from_gguf(out).calib_tokens == 4096
    assert listing(tmp_path) == ["m.gguf"]


@pytest.mark.parametrize("o_tmpfile", [True, False])
def test_force_overwrite_replaces_atomically_without_leftovers(model, tmp_path, monkeypatch, o_tmpfile):
    monkeypatch.setattr(gguf_io, "_USE_O_TMPFILE", o_tmpfile)
    out = tmp_path / "m.gguf"
    write_with_metadata(model, out, synthetic_calibration(model, seed=1).gguf_fields())
    write_with_metadata(model, out, synthetic_calibration(model, seed=2, tokens=7).gguf_fields(), force=True)
    assert Calibration.from_gguf(out).calib_tokens == 7
    assert listing(tmp_path) == ["m.gguf"]


def test_output_directory_must_exist(model, tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist; create it first"):
        write_with_metadata(model, tmp_path / "no" / "such" / "m.gguf", {})
    (tmp_path / "file").write_bytes(b"x")
    with pytest.raises(ValueError, match="not a directory"):
        write_with_metadata(model, tmp_path / "file" / "m.gguf", {})
    (tmp_path / "adir").mkdir()
    with pytest.raises(ValueError, match="is a directory"):
        write_with_metadata(model, tmp_path / "adir", {}, force=True)


def test_bad_inputs_are_clear_errors_and_leave_nothing(model, tmp_path):
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    out = out_dir / "m.gguf"
    raw = model.read_bytes()
    hdr = read_header(model)
    cases = {
        "missing": (None, FileNotFoundError, "no such file"),
        "dir": (None, ValueError, "is a directory"),
        "junk": (b"this is not a model", ValueError, "not a GGUF file"),
        "empty": (b"", ValueError, "not a GGUF file"),
        "short": (raw[:20], ValueError, "truncated"),
        "cut_header": (raw[:hdr.tensor_info_start - 100], ValueError, "truncated"),
        "cut_data": (raw[:hdr.data_offset + 1000], ValueError, "truncated"),
        "v1": (raw[:4] + (1).to_bytes(4, "little") + raw[8:], ValueError, "version 1 is not supported"),
        "v9": (raw[:4] + (9).to_bytes(4, "little") + raw[8:], ValueError, "version 9 is not supported"),
        "big_endian": (raw[:4] + (3).to_bytes(4, "big") + raw[8:], ValueError, "big-endian"),
    }
    for name, (content, exc, msg) in cases.items():
        src = tmp_path / f"{name}.gguf"
        if name == "dir":
            src.mkdir()
        elif content is not None:
            src.write_bytes(content)
        with pytest.raises(exc, match=msg):
            write_with_metadata(src, out, {"triattention.calib_source": "x"})
        with pytest.raises(exc, match=msg):
            read_header(src)
        assert listing(out_dir) == [], name
        if content is not None:
            assert src.read_bytes() == content  # never modified


def test_unstorable_values_fail_before_anything_is_written(model, tmp_path):
    for bad in ({"triattention.n_layer": -1}, {"x.y": object()}, {"x.c": np.zeros(3, complex)},
                {"x.m": np.zeros((2, 2))}, {"": 1}):
        with pytest.raises(ValueError):
            write_with_metadata(model, tmp_path / "m.gguf", bad)
    assert listing(tmp_path) == []


# --------------------------------------------------------------------------- atomicity


@pytest.mark.parametrize("o_tmpfile", [True, False])
def test_a_failure_while_copying_leaves_no_output_and_no_temp(model, tmp_path, monkeypatch, o_tmpfile):
    monkeypatch.setattr(gguf_io, "_USE_O_TMPFILE", o_tmpfile)
    real_copy = gguf_io._copy_data

    def broken_copy(fsrc, fdst, offset, length, chunk=None):
        real_copy(fsrc, fdst, offset, length // 2, chunk)  # half of the data is out, then it fails
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(gguf_io, "_copy_data", broken_copy)
    fields = synthetic_calibration(model).gguf_fields()
    with pytest.raises(OSError, match="No space left"):
        write_with_metadata(model, tmp_path / "m.gguf", fields)
    assert listing(tmp_path) == []
    # with --force over an existing output, the old output survives the failure intact
    old = tmp_path / "old.gguf"
    old.write_bytes(b"previous output")
    with pytest.raises(OSError, match="No space left"):
        write_with_metadata(model, old, fields, force=True)
    assert old.read_bytes() == b"previous output"
    assert listing(tmp_path) == ["old.gguf"]


def test_an_interrupt_while_copying_leaves_nothing(model, tmp_path, monkeypatch):
    monkeypatch.setattr(gguf_io, "_USE_O_TMPFILE", False)  # the named temp file must be removed too

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(gguf_io, "_copy_data", interrupted)
    with pytest.raises(KeyboardInterrupt):
        write_with_metadata(model, tmp_path / "m.gguf", {"triattention.calib_source": "x"})
    assert listing(tmp_path) == []


KILL_SCRIPT = """
import sys, time
from pytriatt import gguf_io
real = gguf_io._copy_data
def slow(fsrc, fdst, offset, length, chunk=None):
    real(fsrc, fdst, offset, length // 2, chunk)
    fdst.flush()
    print("copying", flush=True)
    time.sleep(60)
gguf_io._copy_data = slow
gguf_io.write_with_metadata(sys.argv[1], sys.argv[2], {"triattention.calib_source": "x"})
"""


@pytest.mark.skipif(not gguf_io._o_tmpfile_usable(), reason="needs Linux O_TMPFILE")
def test_sigkill_mid_copy_leaves_nothing(model, tmp_path):
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    p = subprocess.Popen([sys.executable, "-c", textwrap.dedent(KILL_SCRIPT), str(model), str(out_dir / "m.gguf")],
                         stdout=subprocess.PIPE, text=True)
    try:
        assert p.stdout.readline().strip() == "copying"
    finally:
        p.send_signal(signal.SIGKILL)
        p.wait(timeout=30)
    time.sleep(0.05)
    assert listing(out_dir) == []


# --------------------------------------------------------------------------- real model


@pytest.mark.real
def test_smollm2_copy_loads_in_llama_cpp_with_identical_tensor_bytes(smollm2_path, tmp_path):
    pytest.importorskip("llama_cpp")
    from pytriatt.context import Model

    before = sha256(smollm2_path)
    cal = synthetic_calibration(smollm2_path, tokens=2048)
    out = tmp_path / "smollm2.tri.gguf"
    res = write_with_metadata(smollm2_path, out, cal.gguf_fields())
    assert sha256(smollm2_path) == before
    a, b = read_header(smollm2_path), read_header(out)
    assert res["tensor_data_bytes"] == a.tensor_data_bytes == b.tensor_data_bytes > 90_000_000
    assert [(t.name, t.shape, t.ggml_type, t.offset) for t in a.tensors] == \
           [(t.name, t.shape, t.ggml_type, t.offset) for t in b.tensors]
    assert b.keys()[:len(a.kv)] == a.keys()

    def data_hash(h):
        d = hashlib.sha256()
        with open(h.path, "rb") as f:
            f.seek(h.data_offset)
            for block in iter(lambda: f.read(1 << 20), b""):
                d.update(block)
        return d.hexdigest()

    assert data_hash(a) == data_hash(b)
    back = Calibration.from_gguf(out)
    np.testing.assert_array_equal(back.q_abs_mean, cal.q_abs_mean)
    assert back.model_fingerprint == cal.model_fingerprint
    m = Model(out)
    assert m.meta("general.architecture") == "llama"
    assert m.meta("triattention.model_fingerprint") == cal.model_fingerprint
    assert m.tokenize("The capital of France") == Model(smollm2_path).tokenize("The capital of France")
    m.close()
