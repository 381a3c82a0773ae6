"""The C++ scorer agrees with the paper's direct formula.

Reference (docs/method.md), written without the synthetic-query identity:
remove RoPE from every cached key, then for every offset delta sum
s^2 |qbar_f| |kpre_f| cos(omega_f (t + delta - p) + phi_f) over the bands, and add
S_norm = sum_f s^2 (A_f - |qbar_f|) |kpre_f|.
"""

import numpy as np
import pytest

from pytriatt import _core
from pytriatt.core import Calibration, RopeSpec

RTOL = 1e-5


@pytest.fixture(params=["native", "generic"])
def kernel(request):
    """Run a test with the kernel this CPU gets (AVX2 on x86-64) and with the portable one."""
    prev = _core.force_generic_kernel(request.param == "generic")
    yield _core.kernel_name()
    _core.force_generic_kernel(prev)


# --------------------------------------------------------------------------- reference


def split_bands(x, n_rot, pairing):
    """[..., head_dim] real -> [..., n_rot/2] complex, as the model's RoPE pairs dims."""
    F = n_rot // 2
    if pairing == "neox":
        return x[..., :F] + 1j * x[..., F:n_rot]
    return x[..., 0:n_rot:2] + 1j * x[..., 1:n_rot:2]


def join_bands(z, head_dim, pairing, rest=None):
    """inverse of split_bands; dims n_rot..head_dim come from `rest` (or are zero)."""
    F = z.shape[-1]
    out = np.zeros(z.shape[:-1] + (head_dim,)) if rest is None else np.array(rest, dtype=np.float64)
    if pairing == "neox":
        out[..., :F], out[..., F:2 * F] = z.real, z.imag
    else:
        out[..., 0:2 * F:2], out[..., 1:2 * F:2] = z.real, z.imag
    return out


def reference_scores(q_mean, q_abs, omega, s, pairing, n_rot, keys_post, positions, t,
                     n_head_kv, offsets, trig=True, norm=True, agg="mean"):
    """Direct formula, float64. q_mean/q_abs: [H, F] of one layer; returns [n, H]."""
    kpost = split_bands(np.asarray(keys_post, dtype=np.float64), n_rot, pairing)  # [n, Hkv, F]
    p = np.asarray(positions, dtype=np.float64)
    kpre = kpost * np.exp(-1j * omega[None, None, :] * p[:, None, None]) / s       # RoPE removed
    H = q_mean.shape[0]
    group = H // n_head_kv
    out = np.zeros((len(p), H))
    for h in range(H):
        k = kpre[:, h // group, :]                                                  # [n, F]
        qb = q_mean[h].astype(np.complex128)
        amp = s * s * np.abs(qb)[None, :] * np.abs(k)
        phi = np.angle(qb[None, :] * np.conj(k))
        per_offset = np.stack([
            (amp * np.cos(omega[None, :] * (t + d - p[:, None]) + phi)).sum(axis=1) for d in offsets
        ])                                                                          # [|D|, n]
        s_norm = (s * s * (q_abs[h].astype(np.float64) - np.abs(qb))[None, :] * np.abs(k)).sum(axis=1)
        s_trig = per_offset.mean(axis=0) if agg == "mean" else per_offset.max(axis=0)
        out[:, h] = (s_trig if trig else 0.0) + (s_norm if norm else 0.0)
    return out


def geometric_offsets(offsets_max):
    d, out = 1, []
    while d <= offsets_max:
        out.append(d)
        d *= 2
    return out


# --------------------------------------------------------------------------- fixtures


def make_case(seed=0, n_layer=2, n_head=8, n_head_kv=2, head_dim=64, n_rot=None, pairing="neox",
              n=100, t=5000, **rope_kw):
    rng = np.random.default_rng(seed)
    rope = RopeSpec(n_layer, head_dim, n_rot, pairing=pairing, **rope_kw)
    F = rope.n_freq
    # concentrated query centres like real heads: a mean with a random phase and |mean| < E|q|
    q_mean = (rng.standard_normal((n_layer, n_head, F)) + 1j * rng.standard_normal((n_layer, n_head, F)))
    q_abs = np.abs(q_mean) * (1.0 + rng.uniform(0.0, 1.0, size=q_mean.shape))
    cal = Calibration(q_mean.astype(np.complex64), q_abs.astype(np.float32), rope, n_head_kv=n_head_kv)
    positions = np.sort(rng.choice(t, size=n, replace=False)) if n else np.zeros(0, dtype=np.int64)
    keys = []
    for il in range(n_layer):
        kpre = rng.standard_normal((n, n_head_kv, head_dim))
        # what llama.cpp caches: RoPE applied (first n_rot dims), the rest as is
        keys.append(rope.rotate(kpre, positions, il).astype(np.float32))
    return cal, keys, positions, t


def check(cal, keys, positions, t, layer=0, offsets_max=65536, **kw):
    got = cal.score(layer, keys[layer], positions, t, offsets_max=offsets_max, **kw)
    kw.pop("threads", None)
    ref = reference_scores(
        cal.q_mean[layer], cal.q_abs_mean[layer], cal.omega(layer), cal.mscale(layer), cal.pairing,
        cal.rope.layers[layer].n_rot, keys[layer], positions, t, cal.n_head_kv,
        geometric_offsets(offsets_max), **{("agg" if k == "offset_agg" else k): v for k, v in kw.items()})
    assert got.dtype == np.float32
    assert got.shape == (len(positions), cal.n_head)
    if len(positions):
        scale = np.abs(ref).max()
        np.testing.assert_allclose(got, ref, rtol=RTOL, atol=RTOL * scale)
    return got


# --------------------------------------------------------------------------- tests


@pytest.mark.parametrize("pairing", ["neox", "norm"])
def test_matches_direct_formula(pairing, kernel):
    cal, keys, pos, t = make_case(pairing=pairing)
    check(cal, keys, pos, t, layer=0)
    check(cal, keys, pos, t, layer=1)


@pytest.mark.parametrize("pairing", ["neox", "norm"])
def test_partial_rotary_scores_only_the_rotary_dims(pairing, kernel):
    cal, keys, pos, t = make_case(pairing=pairing, head_dim=64, n_rot=32)
    got = check(cal, keys, pos, t)
    # the non-rotary dims do not take part
    k2 = keys[0].copy()
    k2[..., 32:] = 1e3
    np.testing.assert_array_equal(cal.score(0, k2, pos, t), got)


@pytest.mark.parametrize("pairing", ["neox", "norm"])
def test_yarn(pairing, kernel):
    # YaRN: per-band mix of interpolated and extrapolated angles, magnitude scale s != 1
    cal, keys, pos, t = make_case(pairing=pairing, freq_base=1e6, freq_scale=0.25, ext_factor=1.0,
                                  attn_factor=1.0, beta_fast=32.0, beta_slow=1.0, n_ctx_orig=4096,
                                  head_dim=128, t=60000)
    assert cal.mscale(0) == pytest.approx(1.0 + 0.1 * np.log(4.0), rel=1e-6)
    check(cal, keys, pos, t)


def test_rope_freq_factors():
    rng = np.random.default_rng(5)
    ff = rng.uniform(1.0, 8.0, size=32).astype(np.float32)
    cal, keys, pos, t = make_case(pairing="norm", freq_base=500000.0, freq_factors=ff)
    check(cal, keys, pos, t)


def test_layers_with_different_rope():
    # e.g. gemma3: local layers base 1e4, global layers base 1e6
    cal, keys, pos, t = make_case(n_layer=3, freq_base=[1e4, 1e6, 1e4], freq_scale=[1.0, 0.125, 1.0])
    for il in range(3):
        check(cal, keys, pos, t, layer=il)


def test_layer_without_rope_scores_with_omega_zero():
    cal, keys, pos, t = make_case(n_layer=2, rope_layers=[True, False])
    assert np.all(cal.omega(1) == 0.0)
    check(cal, keys, pos, t, layer=1)


@pytest.mark.parametrize("n", [0, 1, 2, 7, 15, 17, 33, 257])
def test_odd_sizes(n, kernel):
    # n not a multiple of any SIMD width; head_dim 72 (n_rot not a multiple of 16)
    cal, keys, pos, t = make_case(n=n, head_dim=72, n_head=6, n_head_kv=3, pairing="norm")
    check(cal, keys, pos, t)
    cal, keys, pos, t = make_case(n=n, head_dim=72, n_head=6, n_head_kv=3, pairing="neox")
    check(cal, keys, pos, t)


def test_zero_keys_returns_empty():
    cal, keys, pos, t = make_case(n=0)
    out = cal.score(0, np.zeros((0, cal.n_head_kv, cal.head_dim), np.float32), [], t)
    assert out.shape == (0, cal.n_head) and out.dtype == np.float32


@pytest.mark.parametrize("offsets_max", [1, 2, 100, 65536, 1 << 20])
def test_offsets_max(offsets_max):
    cal, keys, pos, t = make_case()
    check(cal, keys, pos, t, offsets_max=offsets_max)


@pytest.mark.parametrize("trig,norm", [(True, False), (False, True), (False, False)])
def test_terms_switch_off(trig, norm):
    cal, keys, pos, t = make_case()
    got = check(cal, keys, pos, t, trig=trig, norm=norm)
    if not trig and not norm:
        assert np.all(got == 0.0)
    both = cal.score(0, keys[0], pos, t)
    if trig != norm:
        other = cal.score(0, keys[0], pos, t, trig=not trig, norm=not norm)
        np.testing.assert_allclose(got + other, both, rtol=1e-5, atol=1e-5 * np.abs(both).max())


@pytest.mark.parametrize("pairing", ["neox", "norm"])
def test_offset_aggregation_max(pairing, kernel):
    cal, keys, pos, t = make_case(pairing=pairing, n=50)
    mean = cal.score(0, keys[0], pos, t)
    mx = check(cal, keys, pos, t, offset_agg="max")
    assert np.all(mx >= mean - 1e-3 * np.abs(mean).max())


@pytest.mark.parametrize("threads", [2, 3, 8])
def test_threads_give_identical_results(threads, kernel):
    cal, keys, pos, t = make_case(n=1000)
    one = cal.score(0, keys[0], pos, t, threads=1)
    many = cal.score(0, keys[0], pos, t, threads=threads)
    np.testing.assert_array_equal(one, many)
    # and the workspace is reusable across shapes and thread counts
    np.testing.assert_array_equal(cal.score(0, keys[0][:5], pos[:5], t, threads=threads), one[:5])


def test_positions_only_validated():
    # the identity reads the position from the key's phase: positions are only checked
    cal, keys, pos, t = make_case(n=10)
    np.testing.assert_array_equal(cal.score(0, keys[0], pos, t), cal.score(0, keys[0], None, t))
    with pytest.raises(ValueError, match="after t"):
        cal.score(0, keys[0], pos, int(pos.max()) - 1)
    with pytest.raises(ValueError, match="positions"):
        cal.score(0, keys[0], pos[:3], t)


def test_bad_arguments():
    cal, keys, pos, t = make_case(n=4)
    with pytest.raises(ValueError, match="shape"):
        cal.score(0, np.zeros((4, cal.n_head_kv + 1, cal.head_dim), np.float32), None, t)
    with pytest.raises(ValueError, match="out of range"):
        cal.score(cal.n_layer, keys[0], pos, t)
    with pytest.raises(ValueError, match="offsets_max"):
        cal.score(0, keys[0], pos, t, offsets_max=0)
    with pytest.raises(ValueError, match="offset_agg"):
        cal.score(0, keys[0], pos, t, offset_agg="median")


def test_layer_without_kv_cannot_be_scored():
    cal, keys, pos, t = make_case(n_layer=2, kv_layers=[True, False])
    with pytest.raises(ValueError, match="no KV cache"):
        cal.score(1, keys[1], pos, t)


def test_float64_keys_are_converted():
    cal, keys, pos, t = make_case(n=20)
    ref = cal.score(0, keys[0], pos, t)
    np.testing.assert_allclose(cal.score(0, keys[0].astype(np.float64), pos, t), ref)


@pytest.mark.parametrize("n", [1, 2, 9, 64])
def test_float16_keys_are_scored_directly(n, kernel):
    # llama.cpp's K cache is F16 by default: F16 keys are read as they are (converted on
    # the fly), with exactly the scores of their float32 values
    cal, keys, pos, t = make_case(n=n, head_dim=72, n_head=6, n_head_kv=3)
    k16 = keys[0].astype(np.float16)
    k16[0, 0, :4] = np.array([0.0, -0.0, 6e-8, -3e-5], dtype=np.float16)  # zeros and subnormals
    np.testing.assert_array_equal(cal.score(0, k16, pos, t), cal.score(0, k16.astype(np.float32), pos, t))


def test_kernels_agree():
    cal, keys, pos, t = make_case(n=301, pairing="norm", head_dim=72, n_head=9, n_head_kv=3)
    prev = _core.force_generic_kernel(True)
    try:
        generic = cal.score(0, keys[0], pos, t)
    finally:
        _core.force_generic_kernel(prev)
    native = cal.score(0, keys[0], pos, t)
    np.testing.assert_allclose(native, generic, rtol=1e-5, atol=1e-5 * np.abs(generic).max())


def test_large_positions_keep_precision():
    # t and positions near 2^31: the per-round phase exp(i omega t) is formed in double
    cal, keys, pos, t = make_case(n=30, t=2_000_000_000, freq_base=1e6)
    check(cal, keys, pos, t)
