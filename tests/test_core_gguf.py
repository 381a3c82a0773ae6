"""Reading RoPE hyperparameters and TriAttention statistics from GGUF files.

RopeSpec.from_gguf resolves the model's keys the way llama.cpp does (llama-model.cpp
load_hparams, the per-arch loaders, llama-context.cpp); the expected values below are
worked out by hand from those rules. Calibration.from_gguf reads the triattention.*
keys documented in docs/calibration-format.md.
"""

import numpy as np
import pytest

gguf = pytest.importorskip("gguf")

from pytriatt.core import (  # noqa: E402
    Calibration,
    CalibrationError,
    FingerprintMismatchError,
    RopeSpec,
    model_fingerprint,
)


def write_meta(path, arch, *, n_layer=4, n_head=8, n_head_kv=2, head_dim=64, n_embd=None,
               ctx=4096, tensors=None, extra=None, name="test-model"):
    """A metadata-only GGUF (plus optional small tensors): what RopeSpec reads."""
    w = gguf.GGUFWriter(str(path), arch)
    w.add_name(name)
    w.add_block_count(n_layer)
    w.add_context_length(ctx)
    w.add_embedding_length(n_embd or n_head * head_dim)
    w.add_head_count(n_head)
    w.add_head_count_kv(n_head_kv)
    if head_dim is not None:
        w.add_key_length(head_dim)
    w.add_array("tokenizer.ggml.tokens", ["<unk>", "a", "b"])
    for k, v in (extra or {}).items():
        key = k.replace("{arch}", arch)
        if isinstance(v, bool):
            w.add_bool(key, v)
        elif isinstance(v, str):
            w.add_string(key, v)
        elif isinstance(v, float):
            w.add_float32(key, v)
        elif isinstance(v, int):
            w.add_uint32(key, v)
        else:
            w.add_array(key, list(v))
    for tname, arr in (tensors or {}).items():
        w.add_tensor(tname, np.asarray(arr, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


# --------------------------------------------------------------------------- RoPE


def test_qwen3_plain(tmp_path):
    p = write_meta(tmp_path / "m.gguf", "qwen3", head_dim=128, extra={"{arch}.rope.freq_base": 1e6})
    r = RopeSpec.from_gguf(p)
    assert (r.arch, r.pairing, r.n_layer, r.head_dim, r.n_rot) == ("qwen3", "neox", 4, 128, 128)
    l0 = r.layer(0)
    assert (l0.freq_base, l0.freq_scale, l0.ext_factor, l0.attn_factor) == (1e6, 1.0, 0.0, 1.0)
    np.testing.assert_allclose(r.omega(0)[:3], [1.0, 1e6 ** (-2 / 128), 1e6 ** (-4 / 128)], rtol=1e-6)
    assert r.mscale(0) == 1.0


def test_defaults_when_keys_are_missing(tmp_path):
    # no key_length: head_dim = n_embd / n_head; no rope.* keys: base 1e4, n_rot = head_dim
    p = write_meta(tmp_path / "m.gguf", "qwen2", n_head=4, head_dim=None, n_embd=256)
    r = RopeSpec.from_gguf(p)
    assert (r.head_dim, r.n_rot, r.layer(0).freq_base, r.layer(0).freq_scale) == (64, 64, 10000.0, 1.0)


def test_llama_is_norm_with_rope_freqs(tmp_path):
    ff = np.linspace(1.0, 8.0, 32)
    p = write_meta(tmp_path / "m.gguf", "llama", extra={"{arch}.rope.freq_base": 500000.0,
                                                        "{arch}.rope.dimension_count": 64},
                   tensors={"rope_freqs.weight": ff})
    r = RopeSpec.from_gguf(p)
    assert r.pairing == "norm"
    np.testing.assert_allclose(r.layer(3).freq_factors, ff.astype(np.float32))
    np.testing.assert_allclose(r.omega(0), 500000.0 ** (-np.arange(32) / 32) / ff, rtol=1e-6)


def test_llama_requires_full_rotary(tmp_path):
    p = write_meta(tmp_path / "m.gguf", "llama", extra={"{arch}.rope.dimension_count": 32})
    with pytest.raises(CalibrationError, match="invalid n_rot: 32, expected 64"):
        RopeSpec.from_gguf(p)


def test_partial_rotary_dimension_count(tmp_path):
    p = write_meta(tmp_path / "m.gguf", "qwen3", extra={"{arch}.rope.dimension_count": 32})
    r = RopeSpec.from_gguf(p)
    assert (r.head_dim, r.n_rot, len(r.omega(0))) == (64, 32, 16)


def test_linear_scaling_and_the_old_key(tmp_path):
    p = write_meta(tmp_path / "a.gguf", "qwen2", extra={"{arch}.rope.scaling.type": "linear",
                                                        "{arch}.rope.scaling.factor": 4.0})
    assert RopeSpec.from_gguf(p).layer(0).freq_scale == 0.25
    p = write_meta(tmp_path / "b.gguf", "qwen2", extra={"{arch}.rope.scale_linear": 2.0})
    assert RopeSpec.from_gguf(p).layer(0).freq_scale == 0.5
    # scaling type none: never scale, whatever the factor says
    p = write_meta(tmp_path / "c.gguf", "qwen2", extra={"{arch}.rope.scaling.type": "none",
                                                        "{arch}.rope.scaling.factor": 4.0})
    assert RopeSpec.from_gguf(p).layer(0).freq_scale == 1.0


def test_yarn(tmp_path):
    p = write_meta(tmp_path / "m.gguf", "qwen3", head_dim=128, ctx=131072, extra={
        "{arch}.rope.freq_base": 1e6,
        "{arch}.rope.scaling.type": "yarn",
        "{arch}.rope.scaling.factor": 4.0,
        "{arch}.rope.scaling.original_context_length": 32768,
    })
    r = RopeSpec.from_gguf(p)
    l0 = r.layer(0)
    assert (l0.ext_factor, l0.freq_scale, l0.n_ctx_orig, l0.beta_fast, l0.beta_slow) == (1.0, 0.25, 32768, 32.0, 1.0)
    # llama_context: attn_factor = mscale(4) / (1 + 0.1 ln 4) = 1; ggml then applies (1 + 0.1 ln 4)
    assert l0.attn_factor == pytest.approx(1.0, abs=1e-6)
    assert r.mscale(0) == pytest.approx(1 + 0.1 * np.log(4.0), rel=1e-6)
    # context overrides, as llama-cpp-python's Llama(yarn_orig_ctx=..., yarn_ext_factor=...) pass them
    r2 = RopeSpec.from_gguf(p, yarn_orig_ctx=8192, yarn_ext_factor=0.5)
    assert (r2.layer(0).n_ctx_orig, r2.layer(0).ext_factor) == (8192, 0.5)
    r3 = RopeSpec.from_gguf(p, rope_scaling_type="none")
    assert (r3.layer(0).freq_scale, r3.layer(0).ext_factor, r3.mscale(0)) == (1.0, 0.0, 1.0)
    # rope.scaling.attn_factor multiplies in
    p2 = write_meta(tmp_path / "m2.gguf", "qwen3", head_dim=128, extra={
        "{arch}.rope.scaling.type": "yarn", "{arch}.rope.scaling.factor": 4.0,
        "{arch}.rope.scaling.attn_factor": 0.5})
    assert RopeSpec.from_gguf(p2).mscale(0) == pytest.approx(0.5 * (1 + 0.1 * np.log(4.0)), rel=1e-6)


def test_gemma3_local_and_global_layers(tmp_path):
    # sliding window with the default pattern 6: layers il % 6 < 5 are local (base_swa, scale 1),
    # every 6th is global (model base and scaling)
    p = write_meta(tmp_path / "m.gguf", "gemma3", n_layer=12, head_dim=256, extra={
        "{arch}.attention.sliding_window": 512,
        "{arch}.rope.freq_base": 1e6,
        "{arch}.rope.freq_base_swa": 10000.0,
        "{arch}.rope.scaling.type": "linear",
        "{arch}.rope.scaling.factor": 8.0,
    })
    r = RopeSpec.from_gguf(p)
    assert r.pairing == "neox"
    glob = [il for il in range(12) if r.layer(il).freq_base == 1e6]
    assert glob == [5, 11]
    for il in range(12):
        want = (1e6, 0.125) if il in glob else (10000.0, 1.0)
        assert (r.layer(il).freq_base, r.layer(il).freq_scale) == want
    # an explicit per-layer pattern (array of bools: true = sliding window)
    pat = [True, False] * 6
    p = write_meta(tmp_path / "m2.gguf", "gemma3", n_layer=12, extra={
        "{arch}.attention.sliding_window": 64, "{arch}.attention.sliding_window_pattern": pat,
        "{arch}.rope.freq_base": 1e6})
    r = RopeSpec.from_gguf(p)
    assert [r.layer(il).freq_base for il in range(12)] == [10000.0, 1e6] * 6
    # pattern as a number
    p = write_meta(tmp_path / "m3.gguf", "gemma3", n_layer=4, extra={
        "{arch}.attention.sliding_window": 64, "{arch}.attention.sliding_window_pattern": 2,
        "{arch}.rope.freq_base": 1e6, "{arch}.rope.freq_base_swa": 20000.0})
    assert [RopeSpec.from_gguf(p).layer(il).freq_base for il in range(4)] == [20000.0, 1e6] * 2
    # no sliding window: every layer global
    p = write_meta(tmp_path / "m4.gguf", "gemma3", n_layer=4, extra={"{arch}.rope.freq_base": 1e6})
    assert {RopeSpec.from_gguf(p).layer(il).freq_base for il in range(4)} == {1e6}


def test_unsupported_architectures_are_refused_clearly(tmp_path):
    with pytest.raises(NotImplementedError, match="does not use RoPE"):
        RopeSpec.from_gguf(write_meta(tmp_path / "a.gguf", "gpt2"))
    with pytest.raises(NotImplementedError, match="M-RoPE"):
        RopeSpec.from_gguf(write_meta(tmp_path / "b.gguf", "qwen2vl"))
    p = write_meta(tmp_path / "c.gguf", "starcoder2")
    with pytest.raises(NotImplementedError, match="not verified.*strict=False"):
        RopeSpec.from_gguf(p)
    assert RopeSpec.from_gguf(p, strict=False).pairing == "neox"


def test_not_a_gguf(tmp_path):
    p = tmp_path / "x.gguf"
    p.write_bytes(b"not a gguf file at all")
    with pytest.raises(CalibrationError, match="not a readable GGUF"):
        RopeSpec.from_gguf(p)
    with pytest.raises(FileNotFoundError):
        RopeSpec.from_gguf(tmp_path / "missing.gguf")


# --------------------------------------------------------------------------- calibration


def make_cal(rope, n_head=8, n_head_kv=2, seed=0, fp=""):
    rng = np.random.default_rng(seed)
    shape = (rope.n_layer, n_head, rope.n_freq)
    qm = (rng.standard_normal(shape) + 1j * rng.standard_normal(shape)).astype(np.complex64)
    qa = (np.abs(qm) * 1.3).astype(np.float32)
    return Calibration(qm, qa, rope, n_head_kv=n_head_kv, calib_tokens=32768,
                       calib_source="pydoc_data.topics", model_fingerprint=fp)


def write_calibrated(path, arch="qwen3", cal_from=None, **kw):
    """a model GGUF carrying triattention.* keys, as the calibration tool writes it"""
    base = write_meta(path.with_suffix(".base.gguf"), arch, **kw)
    rope = RopeSpec.from_gguf(base)
    cal = cal_from or make_cal(rope, n_head=kw.get("n_head", 8), n_head_kv=kw.get("n_head_kv", 2),
                               fp=model_fingerprint(base))
    w = gguf.GGUFWriter(str(path), arch)
    r = gguf.GGUFReader(str(base))
    for f in r.fields.values():
        if f.name.startswith("GGUF.") or f.name == "general.architecture":
            continue
        if f.types[0] == gguf.GGUFValueType.ARRAY:
            w.add_key_value(f.name, f.contents(), f.types[0], sub_type=f.types[-1])
        else:
            w.add_key_value(f.name, f.contents(), f.types[0])
    cal.add_to_gguf(w)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path, cal


def test_calibration_round_trip(tmp_path):
    path, cal = write_calibrated(tmp_path / "m.tri.gguf", head_dim=128, extra={"{arch}.rope.freq_base": 1e6})
    got = Calibration.from_gguf(path)
    assert (got.n_layer, got.n_head, got.n_head_kv, got.head_dim, got.n_rot) == (4, 8, 2, 128, 128)
    np.testing.assert_array_equal(got.q_mean, cal.q_mean)
    np.testing.assert_array_equal(got.q_abs_mean, cal.q_abs_mean)
    assert (got.calib_tokens, got.calib_source) == (32768, "pydoc_data.topics")
    assert got.model_fingerprint == cal.model_fingerprint
    np.testing.assert_array_equal(got.omega(2), cal.omega(2))
    # and it scores like the in-memory calibration
    keys = np.random.default_rng(1).standard_normal((5, 2, 128)).astype(np.float32)
    np.testing.assert_array_equal(got.score(0, keys, np.arange(5), 10), cal.score(0, keys, np.arange(5), 10))


def test_statistics_from_another_model_fail_clearly(tmp_path):
    path, _ = write_calibrated(tmp_path / "m.tri.gguf")
    other = write_meta(tmp_path / "other.gguf", "qwen3", name="another-model")
    with pytest.raises(FingerprintMismatchError, match="holds statistics of another model"):
        Calibration.from_gguf(path, model=other)
    # the same model, separately: accepted
    same = write_meta(tmp_path / "same.gguf", "qwen3")
    assert Calibration.from_gguf(path, model=same).n_layer == 4
    # shape mismatch is caught even without the fingerprint check
    wide = write_meta(tmp_path / "wide.gguf", "qwen3", n_head=16)
    with pytest.raises(FingerprintMismatchError, match="do not fit the model"):
        Calibration.from_gguf(path, model=wide, check_fingerprint=False)


def test_fingerprint_identifies_the_model_not_the_file(tmp_path):
    a = write_meta(tmp_path / "a.gguf", "qwen3")
    b = write_meta(tmp_path / "b.gguf", "qwen3", tensors={"x.weight": np.zeros(4)})  # same model, other data
    c = write_meta(tmp_path / "c.gguf", "qwen3", n_head_kv=4)
    assert model_fingerprint(a) == model_fingerprint(b)
    assert model_fingerprint(a) != model_fingerprint(c)
    assert model_fingerprint(a).startswith("qwen3:test-model:")


def test_model_without_calibration_says_how_to_add_it(tmp_path):
    p = write_meta(tmp_path / "m.gguf", "qwen3")
    with pytest.raises(CalibrationError, match="no TriAttention calibration.*pytriatt calibrate"):
        Calibration.from_gguf(p)


@pytest.mark.parametrize("field,value,msg", [
    ("version", 2, "format version 2"),
    ("q_abs_mean", [1.0, 2.0], "holds 2 values, expected"),
])
def test_malformed_calibration(tmp_path, field, value, msg):
    base = write_meta(tmp_path / "m.gguf", "qwen3", n_layer=1, n_head=2, n_head_kv=1, head_dim=4)
    rope = RopeSpec.from_gguf(base)
    cal = make_cal(rope, n_head=2, n_head_kv=1)
    w = gguf.GGUFWriter(str(tmp_path / "bad.gguf"), "qwen3")
    w.add_block_count(1)
    w.add_head_count(2)
    w.add_head_count_kv(1)
    w.add_key_length(4)
    w.add_embedding_length(8)
    fields = cal.gguf_fields()
    fields["triattention." + field] = value
    for k, v in fields.items():
        if isinstance(v, (np.ndarray, list)):
            w.add_key_value(k, [float(x) for x in v], gguf.GGUFValueType.ARRAY, sub_type=gguf.GGUFValueType.FLOAT32)
        elif isinstance(v, str):
            w.add_string(k, v)
        else:
            w.add_uint32(k, int(v))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(CalibrationError, match=msg):
        Calibration.from_gguf(tmp_path / "bad.gguf")


def test_calibration_constructor_checks_shapes():
    rope = RopeSpec(2, 64)
    qm = np.zeros((2, 4, 32), np.complex64)
    with pytest.raises(ValueError, match="bands"):
        Calibration(qm[..., :16], np.zeros((2, 4, 16)), rope)
    with pytest.raises(ValueError, match="layers"):
        Calibration(qm[:1], np.zeros((1, 4, 32)), rope)
    with pytest.raises(ValueError, match="multiple of n_head_kv"):
        Calibration(qm, np.zeros((2, 4, 32)), rope, n_head_kv=3)
    c = Calibration(qm, np.ones((2, 4, 32)), rope, n_head_kv=2)
    assert c.mean_resultant_length().shape == (2, 4, 32)
