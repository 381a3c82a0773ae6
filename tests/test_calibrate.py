"""Specification of the calibration capture (pytriatt.calibrate, llama_triatt_capture in libllama).

The statistics are the complex mean and mean modulus, per layer, query head and RoPE band,
of the queries *before* RoPE (after q_norm where the model has one), bands paired as the
model's RoPE pairs dimensions.
"""

from __future__ import annotations

import numpy as np
import pytest

from pytriatt.calibrate import capture, merge, token_windows
from pytriatt.context import Model


def _weights(path):
    import gguf

    r = gguf.GGUFReader(str(path))
    return {t.name: np.array(t.data, dtype=np.float64) for t in r.tensors}


def _rms_norm(x, w, eps):
    return x / np.sqrt((x * x).mean(axis=-1, keepdims=True) + eps) * w


def _reference_stats(path, tokens, arch, n_head, head_dim, eps):
    """Pre-RoPE queries of layer 0 computed from the model's own weights, then their band statistics.

    With one layer, a token's layer-0 query depends only on the token: embedding -> RMS norm -> Wq
    (+ bias for qwen2) (-> per-head RMS q_norm for qwen3)."""
    w = _weights(path)
    x = w["token_embd.weight"][np.asarray(tokens)]                       # [n, n_embd]
    xn = _rms_norm(x, w["blk.0.attn_norm.weight"], eps)
    q = xn @ w["blk.0.attn_q.weight"].T                                  # [n, n_head*head_dim]
    if "blk.0.attn_q.bias" in w:
        q = q + w["blk.0.attn_q.bias"]
    q = q.reshape(len(tokens), n_head, head_dim)
    if "blk.0.attn_q_norm.weight" in w:
        q = _rms_norm(q, w["blk.0.attn_q_norm.weight"], eps)
    F = head_dim // 2
    if arch == "llama":                       # NORM pairing: (x[2f], x[2f+1])
        z = q[..., 0::2] + 1j * q[..., 1::2]
    else:                                     # NEOX pairing: (x[f], x[f + n_rot/2])
        z = q[..., :F] + 1j * q[..., F:]
    return z.mean(axis=0), np.abs(z).mean(axis=0)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3"])
def test_statistics_equal_a_numpy_computation_from_the_weights(tiny_gguf, arch):
    path = tiny_gguf(arch, n_layer=1)
    model = Model(path)
    rng = np.random.default_rng(5)
    windows = [rng.integers(3, model.n_vocab, size=n).tolist() for n in (200, 77, 300)]
    res = capture(model, windows, n_ctx=512, n_batch=128, progress=False)
    model.close()

    tokens = [t for w in windows for t in w]
    eps = 1e-5 if arch == "llama" else 1e-6
    want_mean, want_abs = _reference_stats(path, tokens, arch, n_head=4, head_dim=16, eps=eps)
    assert res.n_tokens == len(tokens)
    assert res.q_mean.shape == (1, 4, 8)
    scale = np.abs(want_abs).max()
    assert np.abs(res.q_mean[0] - want_mean).max() <= 1e-4 * scale
    assert np.abs(res.q_abs_mean[0] - want_abs).max() <= 1e-4 * scale
    # a meaningful check: the statistics are not trivially zero or uniform
    assert np.abs(want_mean).max() > 1e-2 * scale


def test_every_layer_and_every_token_is_counted(tiny_gguf):
    for arch in ("llama", "gemma3"):
        model = Model(tiny_gguf(arch, n_layer=3))
        res = capture(model, [list(range(3, 403))], n_ctx=512, n_batch=64, progress=False)
        model.close()
        assert res.tokens_per_layer.tolist() == [400, 400, 400]
        assert np.all(res.q_abs_mean > 0)
        # |E q| <= E|q| band by band (the mean resultant length is at most 1)
        assert np.all(np.abs(res.q_mean) <= res.q_abs_mean * (1 + 1e-9))


def test_windows_start_with_bos_and_cover_the_stream():
    ws = token_windows(list(range(10, 20)), n_ctx=4, bos=1)
    assert ws == [[1, 10, 11, 12], [1, 13, 14, 15], [1, 16, 17, 18], [1, 19]]
    assert token_windows([5, 6, 7], n_ctx=2, bos=None) == [[5, 6], [7]]


def test_merging_two_half_runs_equals_one_full_run(tiny_gguf):
    from pytriatt.core import Calibration, RopeSpec

    path = tiny_gguf("qwen3", n_layer=2)
    rng = np.random.default_rng(8)
    windows = [rng.integers(3, 1800, size=n).tolist() for n in (256, 128, 200, 64)]
    model = Model(path)
    full = capture(model, windows, n_ctx=512, progress=False)
    a = capture(model, windows[:1], n_ctx=512, progress=False)
    b = capture(model, windows[1:], n_ctx=512, progress=False)
    model.close()
    rope = RopeSpec.from_gguf(path)

    def cal(res):
        return Calibration(res.q_mean, res.q_abs_mean, rope, n_head_kv=2, head_dim=16,
                           calib_tokens=res.n_tokens, calib_source="t", model_fingerprint="fp")

    merged = merge([cal(a), cal(b)])
    want = cal(full)
    assert merged.calib_tokens == full.n_tokens == 648
    assert np.abs(merged.q_mean - want.q_mean).max() <= 1e-6 * np.abs(want.q_abs_mean).max()
    assert np.abs(merged.q_abs_mean - want.q_abs_mean).max() <= 1e-6 * np.abs(want.q_abs_mean).max()

    other = Calibration(a.q_mean, a.q_abs_mean, rope, n_head_kv=2, head_dim=16, calib_tokens=1,
                        calib_source="t", model_fingerprint="another model")
    with pytest.raises(ValueError, match="different models"):
        merge([cal(a), other])


def _python_capture(path, windows):
    """An independent capture: a Python eval callback reads every layer's query RoPE input."""
    from pytriatt.ggml_tensors import GgmlTensor as _GgmlTensor, ggml_lib as _ggml, read_tensor as _read

    from pytriatt import _llama
    from pytriatt.context import Context

    lc = _llama.require_patched()
    lib = _ggml()
    staged, sums = {}, {}

    @lc.ggml_backend_sched_eval_callback
    def cb(ptr, ask, user_data):
        t = _GgmlTensor.from_address(ptr)
        name = t.name.decode()
        if not name.startswith("Qcur"):
            return not ask
        if ask:
            return True
        if lib.ggml_op_desc(ptr) != b"ROPE":
            staged[t.data] = _read(lib, ptr).astype(np.float64)   # the ROPE may overwrite its input: copy it now
            return True
        src = _GgmlTensor.from_address(t.src[0])
        q = staged[src.data].reshape(-1, src.ne[1], src.ne[0])   # [tokens, n_head, head_dim]
        n_rot, mode = t.op_params[1], t.op_params[2]
        F = n_rot // 2
        z = (q[..., :F] + 1j * q[..., F:2 * F]) if mode & 2 else (q[..., 0:n_rot:2] + 1j * q[..., 1:n_rot:2])
        il = int(name.split("-")[1])
        s = sums.setdefault(il, [0, 0.0, 0.0])
        s[0] += z.shape[0]
        s[1] = s[1] + z.sum(axis=0)
        s[2] = s[2] + np.abs(z).sum(axis=0)
        return True

    model = Model(path)
    with Context(model, n_ctx=1024, n_batch=256, cb_eval=cb) as ctx:
        for w in windows:
            ctx.clear()
            for s0 in range(0, len(w), 256):
                ctx.decode(w[s0:s0 + 256], pos0=s0, logits="none")
    model.close()
    L = max(sums) + 1
    return (np.stack([sums[l][1] / sums[l][0] for l in range(L)]),
            np.stack([sums[l][2] / sums[l][0] for l in range(L)]), sums[0][0])


@pytest.mark.real
def test_smollm2_statistics_agree_with_an_independent_python_capture(smollm2_path):
    from pytriatt.calibrate import default_text

    model = Model(smollm2_path)
    toks = model.tokenize(default_text(), add_bos=False)[:2046]
    windows = token_windows(toks, 1024, model.lc.llama_vocab_bos(model.vocab))
    res = capture(model, windows, n_ctx=1024, n_batch=256, progress=False)
    model.close()
    want_mean, want_abs, n = _python_capture(smollm2_path, windows)

    assert res.n_tokens == n == 2048
    assert res.q_mean.shape == want_mean.shape == (30, 9, 32)
    scale = np.abs(want_abs).max(axis=-1, keepdims=True)   # per layer and head
    assert (np.abs(res.q_mean - want_mean) / scale).max() <= 1e-3
    assert (np.abs(res.q_abs_mean - want_abs) / scale).max() <= 1e-3
