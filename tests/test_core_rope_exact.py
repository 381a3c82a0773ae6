"""RopeSpec.from_gguf reproduces llama.cpp's RoPE exactly, checked on llama.cpp's own graph.

A model is run through the patched llama.cpp with an eval callback that captures,
for every layer, the input and the output of the GGML_OP_ROPE node named "Kcur-<il>"
(pre- and post-RoPE keys) and the node's parameters. Then:

- the parameters RopeSpec derived from the GGUF file (n_rot, pairing, freq_base,
  freq_scale, ext_factor, attn_factor, beta_fast/slow, n_ctx_orig, rope_freqs) equal
  the ones llama.cpp passed to ggml_rope_ext for that layer, and
- rotating the captured pre-RoPE keys with the spec's omega_f and s reproduces the
  captured post-RoPE keys (1e-4 relative), layer by layer (Gemma 3: local and global).

Besides, the rows each layer writes into its K cache (the SET_ROWS into "cache_k_l<il>") are
exactly the post-RoPE keys checked; for a layer without RoPE (SmolLM3's NoPE layers), the
spec says so and the cached keys are the projected keys, unrotated.

Tiny random-weight models cover every architecture of pytriatt.testing.tiny (llama, qwen2, qwen3,
qwen3moe, granite, gemma3, gpt-oss, phi3 with LongRoPE factors, olmo2, glm4 with partial
rotary, exaone, smollm3 with NoPE layers), plus variants whose metadata turn on linear
scaling, YaRN and per-band rope_freqs (llama 3's); context overrides are checked too. The
real models (marked `real`) are smollm2-135m, qwen2.5-0.5b and gemma3-270m.
"""

from __future__ import annotations

import re
import struct

import numpy as np
import pytest

from pytriatt.core import RopeSpec
# the package's reader of tensors out of llama.cpp's graph
from pytriatt.ggml_tensors import GgmlTensor as _GgmlTensor, ggml_lib as _ggml, read_tensor

gguf = pytest.importorskip("gguf")


# --------------------------------------------------------------------------- capture


_GGML_ROPE_TYPE_NORM, _GGML_ROPE_TYPE_NEOX = 0, 2


def _read(lib, ptr) -> np.ndarray:
    """a tensor's values (read_tensor: numpy order [ne3, ne2, ne1, ne0], honouring strides) widened to
    float64, or int64 for integer tensors: the precision the checks compare in"""
    arr = read_tensor(lib, ptr)
    return arr.astype(np.int64 if arr.dtype.kind == "i" else np.float64)


def capture_k_rope(model_path, chunks, **cparams):
    """Decode `chunks` ([(pos0, n_tokens), ...], each a fresh sequence) and capture every layer's K RoPE.

    Returns {layer: dict(pre [n, n_head_kv, head_dim], post, pos [n], params)}, the
    tokens of all chunks concatenated.
    """
    from pytriatt import _llama
    from pytriatt.context import Model

    lc = _llama.require_patched()
    lib = _ggml()
    got: dict = {}

    # ggml-alloc may compute a ROPE node in place, over its input: so the inputs are
    # copied when they are computed (every "Kcur*" tensor, keyed by data address) and
    # looked up when the ROPE node runs
    seen: dict = {}

    # what each layer writes into its K cache (the rows of the SET_ROWS into "cache_k_l<il>"), and the
    # last "Kcur-<il>" node of each layer: the key of a layer without RoPE (NoPE)
    cached: dict = {}
    last_k: dict = {}

    @lc.ggml_backend_sched_eval_callback
    def cb(ptr, ask, user_data):
        t = _GgmlTensor.from_address(ptr)
        name = t.name.decode()
        op = lib.ggml_op_desc(ptr)
        if op == b"SET_ROWS":
            # ggml_set_rows(cache, rows, idxs) is a view of the cache whose src[0] holds the rows
            m = re.fullmatch(r"cache_(?:\w+_)?k_l(\d+) \(view\)", name)
            if m:
                if not ask:
                    rows = _read(lib, t.src[0])
                    cached.setdefault(int(m.group(1)), []).append(rows.reshape(-1, rows.shape[-1]))
                return True
        if not name.startswith("Kcur"):
            return not ask  # ask: not interested; after compute: keep going
        if ask:
            return True
        is_rope = op == b"ROPE" and name.startswith("Kcur-")
        if not is_rope:
            seen[t.data] = _read(lib, ptr)
            m = re.fullmatch(r"Kcur-(\d+)", name)
            if m and t.ne[2] > 0:
                last_k[int(m.group(1))] = seen[t.data].reshape(int(t.ne[2]), int(t.ne[1]), int(t.ne[0]))
            return True
        il = int(name.split("-")[1])
        op = list(t.op_params)
        floats = struct.unpack("6f", struct.pack("6i", *op[5:11]))
        params = dict(
            n_dims=op[1], mode=op[2], n_ctx_orig=op[4], freq_base=floats[0], freq_scale=floats[1],
            ext_factor=floats[2], attn_factor=floats[3], beta_fast=floats[4], beta_slow=floats[5],
            freq_factors=None if not t.src[2] else _read(lib, t.src[2]).ravel(),
        )
        src = _GgmlTensor.from_address(t.src[0])
        shape = tuple(int(src.ne[i]) for i in range(3, -1, -1))
        pre = seen.get(src.data)
        if pre is None or pre.size != int(np.prod(shape)):
            got.setdefault("errors", []).append(f"layer {il}: the input of K's RoPE ({src.name!r}) was not captured")
            return True
        pre = pre.reshape(shape)[0]        # [n_tokens, n_head_kv, head_dim]
        post = _read(lib, ptr)[0]
        pos = _read(lib, t.src[1]).ravel()[: pre.shape[0]]
        d = got.setdefault(il, dict(pre=[], post=[], pos=[], params=params))
        d["pre"].append(pre)
        d["post"].append(post)
        d["pos"].append(pos)
        return True

    model = Model(model_path)
    params = lc.llama_context_default_params()
    n_max = max(n for _, n in chunks)
    params.n_ctx = 512
    params.n_batch = params.n_ubatch = max(32, n_max)
    params.n_threads = params.n_threads_batch = _llama.default_threads()
    for k, v in cparams.items():
        setattr(params, k, v)
    params.cb_eval = cb
    params.cb_eval_user_data = None
    ctx = lc.llama_init_from_model(model.ptr, params)
    assert ctx, "llama.cpp could not create the context"
    batch = lc.llama_batch_init(n_max, 0, 1)
    rng = np.random.default_rng(0)
    try:
        for pos0, n in chunks:
            lc.llama_memory_clear(lc.llama_get_memory(ctx), True)  # each chunk starts a fresh sequence at pos0
            toks = rng.integers(3, min(model.n_vocab, 2000), size=n)
            for i, tok in enumerate(toks):
                batch.token[i] = int(tok)
                batch.pos[i] = pos0 + i
                batch.n_seq_id[i] = 1
                batch.seq_id[i][0] = 0
                batch.logits[i] = i == n - 1
            batch.n_tokens = n
            last_k.clear()
            assert lc.llama_decode(ctx, batch) == 0
            for il, k in last_k.items():
                if il in got and got[il]["params"] is not None:
                    continue  # a RoPE layer: its K was captured at the ROPE node
                d = got.setdefault(il, dict(pre=[], post=[], pos=[], params=None))
                d["pre"].append(k)
                d["post"].append(k)          # no rotation: the key goes to the cache as it is
                d["pos"].append(np.arange(pos0, pos0 + n))
    finally:
        lc.llama_batch_free(batch)
        lc.llama_free(ctx)
        model.close()
    assert "errors" not in got, got.get("errors")
    return {il: dict(pre=np.concatenate(d["pre"]), post=np.concatenate(d["post"]),
                     pos=np.concatenate(d["pos"]), params=d["params"],
                     cached=np.concatenate(cached[il]) if il in cached else None)
            for il, d in sorted(got.items())}


# --------------------------------------------------------------------------- checks


def check_exact(spec: RopeSpec, captured, n_layer):
    """the spec's parameters are llama.cpp's, and its rotation reproduces the graph's"""
    assert sorted(captured) == list(range(n_layer)), "every layer's K RoPE must be captured"
    for il, c in captured.items():
        rl, p = spec.layer(il), c["params"]
        # the rows the layer writes into its K cache are the keys checked below (no step between)
        assert c["cached"] is not None, f"layer {il}: its K cache write was not captured"
        np.testing.assert_array_equal(c["cached"], c["post"].reshape(len(c["post"]), -1), err_msg=f"layer {il}")
        if p is None:
            # a layer without RoPE in the graph: the spec must say so, and its rotation is the identity
            assert not rl.rope, f"layer {il}: llama.cpp applies no RoPE here, the spec rotates"
            np.testing.assert_array_equal(spec.rotate(c["pre"], c["pos"], il), c["pre"])
            continue
        assert rl.rope, f"layer {il}: llama.cpp applies RoPE here, the spec says NoPE"
        want_mode = _GGML_ROPE_TYPE_NEOX if spec.pairing == "neox" else _GGML_ROPE_TYPE_NORM
        assert (p["n_dims"], p["mode"]) == (rl.n_rot, want_mode), f"layer {il}"
        assert p["freq_base"] == rl.freq_base, f"layer {il}"
        assert p["freq_scale"] == rl.freq_scale, f"layer {il}"
        assert p["ext_factor"] == rl.ext_factor, f"layer {il}"
        assert p["attn_factor"] == rl.attn_factor, f"layer {il}"
        if rl.ext_factor != 0.0:
            assert (p["beta_fast"], p["beta_slow"], p["n_ctx_orig"]) == (rl.beta_fast, rl.beta_slow, rl.n_ctx_orig)
        if p["freq_factors"] is None:
            assert len(rl.freq_factors) == 0, f"layer {il}"
        else:
            np.testing.assert_array_equal(np.float32(rl.freq_factors), p["freq_factors"][: rl.n_rot // 2])
        # numerics: rotate the graph's pre-RoPE keys with the spec's omega_f and s
        want = spec.rotate(c["pre"], c["pos"], il)
        scale = np.abs(c["post"]).max()
        np.testing.assert_allclose(c["post"], want, rtol=1e-4, atol=1e-4 * scale, err_msg=f"layer {il}")
        # and undoing it recovers the pre-RoPE keys (what the reference scorer does)
        back = spec.rotate(c["post"], c["pos"], il, inverse=True)
        np.testing.assert_allclose(back, c["pre"], rtol=1e-4, atol=1e-4 * np.abs(c["pre"]).max(), err_msg=f"layer {il}")


# two chunks: the prompt at 0.., and tokens far away (large angles, gaps are fine)
CHUNKS = [(0, 24), (3000, 8)]


def copy_gguf(src, dst, extra_kv=None, extra_tensors=None):
    """a copy of a (tiny, f32/f16) GGUF with added or replaced metadata and tensors"""
    r = gguf.GGUFReader(str(src))
    arch = r.fields["general.architecture"].contents()
    w = gguf.GGUFWriter(str(dst), arch)
    extra_kv = {k.replace("{arch}", arch): v for k, v in (extra_kv or {}).items()}
    for f in r.fields.values():
        if f.name.startswith("GGUF.") or f.name == "general.architecture" or f.name in extra_kv:
            continue
        if f.types[0] == gguf.GGUFValueType.ARRAY:
            w.add_key_value(f.name, f.contents(), f.types[0], sub_type=f.types[-1])
        else:
            w.add_key_value(f.name, f.contents(), f.types[0])
    for k, (vtype, v) in extra_kv.items():
        w.add_key_value(k, v, vtype, sub_type=gguf.GGUFValueType.INT32 if vtype == gguf.GGUFValueType.ARRAY else None)
    for t in r.tensors:
        w.add_tensor(t.name, np.array(t.data), raw_dtype=t.tensor_type)
    for name, arr in (extra_tensors or {}).items():
        w.add_tensor(name, np.asarray(arr, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return dst


def tiny(tmp_path, arch, **kw):
    from pytriatt.testing.tiny import write_tiny_gguf

    return write_tiny_gguf(tmp_path / f"tiny-{arch}.gguf", arch=arch, **kw)


# --------------------------------------------------------------------------- tiny models


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3", "qwen3moe", "granite", "olmo2", "exaone"])
def test_tiny_models(tmp_path, arch):
    path = tiny(tmp_path, arch, n_layer=2, rope_freq_base=50000.0)
    spec = RopeSpec.from_gguf(path)
    check_exact(spec, capture_k_rope(path, CHUNKS), 2)


def test_tiny_gemma3_local_and_global_layers(tmp_path):
    # layers 0, 2 local (base 10000), 1, 3 global (base 1e6)
    path = tiny(tmp_path, "gemma3", n_layer=4, n_embd=64, n_head=4, n_head_kv=1, head_dim=32,
                rope_freq_base=1e6, rope_freq_base_swa=10000.0, sliding_window=16)
    spec = RopeSpec.from_gguf(path)
    assert [spec.layer(il).freq_base for il in range(4)] == [10000.0, 1e6, 10000.0, 1e6]
    check_exact(spec, capture_k_rope(path, CHUNKS), 4)


def test_tiny_gemma3_with_linear_scaling_on_global_layers(tmp_path):
    base = tiny(tmp_path, "gemma3", n_layer=2, rope_freq_base=1e6)
    path = copy_gguf(base, tmp_path / "scaled.gguf", {
        "{arch}.rope.scaling.type": (gguf.GGUFValueType.STRING, "linear"),
        "{arch}.rope.scaling.factor": (gguf.GGUFValueType.FLOAT32, 8.0),
    })
    spec = RopeSpec.from_gguf(path)
    assert (spec.layer(0).freq_scale, spec.layer(1).freq_scale) == (1.0, 0.125)
    check_exact(spec, capture_k_rope(path, CHUNKS), 2)


def test_tiny_qwen3_yarn_from_metadata(tmp_path):
    base = tiny(tmp_path, "qwen3", n_layer=2, rope_freq_base=1e6, head_dim=32, n_embd=64, n_head=4)
    path = copy_gguf(base, tmp_path / "yarn.gguf", {
        "{arch}.rope.scaling.type": (gguf.GGUFValueType.STRING, "yarn"),
        "{arch}.rope.scaling.factor": (gguf.GGUFValueType.FLOAT32, 4.0),
        "{arch}.rope.scaling.original_context_length": (gguf.GGUFValueType.UINT32, 1024),
    })
    spec = RopeSpec.from_gguf(path)
    assert spec.layer(0).ext_factor == 1.0 and spec.mscale(0) > 1.1
    check_exact(spec, capture_k_rope(path, CHUNKS), 2)


def test_tiny_gpt_oss_alternating_windows_with_yarn(tmp_path):
    # layer 0 local, layer 1 global (pattern 2); YaRN factor 4 on both, as llama_model_openai_moe builds them
    path = tiny(tmp_path, "gpt-oss", n_layer=2, rope_freq_base=150000.0, yarn_factor=4.0)
    spec = RopeSpec.from_gguf(path)
    assert spec.layer(0).ext_factor == 1.0 and spec.mscale(0) > 1.1 and spec.scaling_type == "yarn"
    check_exact(spec, capture_k_rope(path, CHUNKS), 2)


def test_tiny_llama_rope_freqs_and_linear_scaling(tmp_path):
    base = tiny(tmp_path, "llama", n_layer=2, rope_freq_base=500000.0)
    ff = np.linspace(1.0, 8.0, 8).astype(np.float32)   # head_dim 16 -> 8 bands
    path = copy_gguf(base, tmp_path / "ff.gguf", {
        "{arch}.rope.scaling.type": (gguf.GGUFValueType.STRING, "linear"),
        "{arch}.rope.scaling.factor": (gguf.GGUFValueType.FLOAT32, 2.0),
    }, {"rope_freqs.weight": ff})
    spec = RopeSpec.from_gguf(path)
    np.testing.assert_array_equal(np.float32(spec.layer(1).freq_factors), ff)
    check_exact(spec, capture_k_rope(path, CHUNKS), 2)


def test_tiny_llama3_rope_freqs(tmp_path):
    # llama 3's rope_freqs as its conversion computes them: kept, blended and slowed-down bands
    path = tiny(tmp_path, "llama", rope_freq_base=500000.0, rope_freqs="llama3")
    spec = RopeSpec.from_gguf(path)
    ff = np.float32(spec.layer(0).freq_factors)
    assert ff[0] == 1.0 and ff[-1] == 8.0 and ((ff > 1.0) & (ff < 8.0)).any()
    check_exact(spec, capture_k_rope(path, CHUNKS), 2)


def test_tiny_exaone_rope_freqs_with_neox_pairing(tmp_path):
    path = tiny(tmp_path, "exaone", rope_freq_base=500000.0, rope_freqs="llama3")
    spec = RopeSpec.from_gguf(path)
    assert spec.pairing == "neox" and len(spec.layer(1).freq_factors) == 8
    check_exact(spec, capture_k_rope(path, CHUNKS), 2)


@pytest.mark.parametrize("n_ctx,factors", [(512, "short"), (2048, "long")])
def test_tiny_phi3_longrope_factors_follow_the_context(tmp_path, n_ctx, factors):
    # original context 1024 (n_ctx_train 4096 / 4): llama.cpp takes the long factors past it, the short ones
    # below, whatever the (absent) scaling type says; the LongRoPE magnitude comes from rope.scaling.attn_factor
    path = tiny(tmp_path, "phi3", n_ctx_train=4096)
    spec = RopeSpec.from_gguf(path, n_ctx=n_ctx)
    r = gguf.GGUFReader(str(path))
    want = [t for t in r.tensors if t.name == f"rope_factors_{factors}.weight"][0]
    np.testing.assert_array_equal(np.float32(spec.layer(0).freq_factors), np.asarray(want.data))
    assert spec.layer(0).attn_factor > 1.0
    check_exact(spec, capture_k_rope(path, CHUNKS, n_ctx=n_ctx), 2)


def test_tiny_glm4_partial_rotary_norm_pairing(tmp_path):
    # GLM-4 rotates the first half of each head (NORM pairing) and leaves the rest as it is
    path = tiny(tmp_path, "glm4", head_dim=32, n_embd=64, n_head=4, n_head_kv=2)
    spec = RopeSpec.from_gguf(path)
    assert (spec.pairing, spec.head_dim, spec.layer(0).n_rot) == ("norm", 32, 16)
    check_exact(spec, capture_k_rope(path, CHUNKS), 2)


def test_tiny_glm4_with_rope_sections_is_refused_as_mrope(tmp_path):
    base = tiny(tmp_path, "glm4")
    path = copy_gguf(base, tmp_path / "mrope.gguf", {
        "{arch}.rope.dimension_sections": (gguf.GGUFValueType.ARRAY, [4, 4, 0, 0])})
    with pytest.raises(NotImplementedError, match="glm4.*M-RoPE"):
        RopeSpec.from_gguf(path)


def test_tiny_smollm3_nope_layers_cache_their_keys_unrotated(tmp_path):
    # every 4th layer (3, 7) has no RoPE: the spec marks it, and the cached key is the pre-RoPE key
    path = tiny(tmp_path, "smollm3", n_layer=8)
    spec = RopeSpec.from_gguf(path)
    assert [spec.layer(il).rope for il in range(8)] == [True, True, True, False] * 2
    check_exact(spec, capture_k_rope(path, CHUNKS), 8)


def test_tiny_context_overrides(tmp_path):
    # YaRN switched on by the context (as Llama(rope_scaling_type=..., rope_freq_scale=...) does)
    import llama_cpp

    path = tiny(tmp_path, "qwen2", n_layer=2)
    over = dict(rope_scaling_type=llama_cpp.LLAMA_ROPE_SCALING_TYPE_YARN, rope_freq_scale=0.5,
                rope_freq_base=20000.0, yarn_orig_ctx=256)
    spec = RopeSpec.from_gguf(path, rope_scaling_type="yarn", rope_freq_scale=0.5, rope_freq_base=20000.0,
                              yarn_orig_ctx=256)
    check_exact(spec, capture_k_rope(path, CHUNKS, **over), 2)


# --------------------------------------------------------------------------- real models


@pytest.mark.real
@pytest.mark.parametrize("name,arch,n_layer", [
    ("smollm2-135m", "llama", 30),
    ("qwen2.5-0.5b", "qwen2", 24),
    ("gemma3-270m", "gemma3", 18),
])
def test_real_models(name, arch, n_layer):
    from pytriatt import models

    path = models.get(name)
    spec = RopeSpec.from_gguf(path)
    assert (spec.arch, spec.n_layer) == (arch, n_layer)
    if arch == "gemma3":
        # local layers (base 10000) and global ones (every 6th)
        assert len({spec.layer(il).freq_base for il in range(n_layer)}) == 2
    check_exact(spec, capture_k_rope(path, [(0, 16), (2000, 4)]), n_layer)
