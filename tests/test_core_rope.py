"""RopeSpec: omega_f and the magnitude scale s are what ggml's rope computes.

The reference here re-implements ggml's CPU rope loop (ggml/src/ggml-cpu/ops.cpp:
ggml_rope_cache_init / rope_yarn, ggml.c: ggml_rope_yarn_corr_dims) in float32, band
by band, and compares the angle it applies at position p with omega_f * p. The
comparison with llama.cpp's actual graph is tests/test_core_rope_exact.py.
"""

import numpy as np
import pytest

from pytriatt.core import RopeSpec

f32 = np.float32


def ggml_angles(p, n_dims, freq_base, freq_scale=1.0, freq_factors=None, ext_factor=0.0,
                attn_factor=1.0, beta_fast=32.0, beta_slow=1.0, n_ctx_orig=0):
    """(angle of each band at position p, mscale) exactly as ggml's float loop forms them."""
    theta_scale = f32(np.power(f32(freq_base), f32(-2.0) / f32(n_dims)))

    def corr_dim(n_turns):
        return f32(n_dims) * f32(np.log(f32(n_ctx_orig) / (f32(n_turns) * f32(2) * f32(np.pi)))) / (
            f32(2) * f32(np.log(f32(freq_base))))

    lo = max(f32(0), f32(np.floor(corr_dim(beta_fast)))) if ext_factor else f32(0)
    hi = min(f32(n_dims - 1), f32(np.ceil(corr_dim(beta_slow)))) if ext_factor else f32(0)
    theta = f32(p)
    angles = []
    mscale = f32(attn_factor)
    for i0 in range(0, n_dims, 2):
        ff = f32(1.0) if freq_factors is None else f32(freq_factors[i0 // 2])
        extrap = f32(theta / ff)
        interp = f32(f32(freq_scale) * extrap)
        ang = interp
        if ext_factor != 0.0:
            y = f32((f32(i0 // 2) - lo) / max(f32(0.001), f32(hi - lo)))
            mix = f32(f32(1) - min(f32(1), max(f32(0), y))) * f32(ext_factor)
            ang = f32(interp * (f32(1) - mix) + extrap * mix)
        angles.append(float(ang))
        theta = f32(theta * theta_scale)
    if ext_factor != 0.0:
        mscale = f32(mscale * f32(f32(1) + f32(0.1) * f32(np.log(f32(1) / f32(freq_scale)))))
    return np.array(angles), float(mscale)


CASES = [
    dict(n_dims=64, freq_base=10000.0),
    dict(n_dims=128, freq_base=1e6),
    dict(n_dims=64, freq_base=10000.0, freq_scale=0.125),                       # linear scaling
    dict(n_dims=128, freq_base=1e6, freq_scale=0.25, ext_factor=1.0, n_ctx_orig=32768),  # YaRN
    dict(n_dims=128, freq_base=10000.0, freq_scale=0.5, ext_factor=0.7, attn_factor=0.9,
         beta_fast=16.0, beta_slow=2.0, n_ctx_orig=4096),
    dict(n_dims=32, freq_base=500000.0, freq_factors=np.linspace(1.0, 8.0, 16)),  # rope_freqs
    dict(n_dims=256, freq_base=1e6, freq_scale=0.125),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items() if k != "freq_factors"))
@pytest.mark.parametrize("p", [0, 1, 7, 1000, 30000])
def test_omega_times_position_is_ggmls_angle(case, p):
    kw = dict(case)
    n_dims = kw.pop("n_dims")
    spec = RopeSpec(1, n_dims, n_dims, **kw)
    want, want_s = ggml_angles(p, n_dims, **case_args(case))
    got = spec.omega(0) * p
    # ggml accumulates theta by repeated float multiplication: ~n_dims/2 roundings
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    assert spec.mscale(0) == pytest.approx(want_s, rel=1e-7)


def case_args(case):
    return {k: v for k, v in case.items() if k != "n_dims"}


def test_plain_rope_values_by_hand():
    spec = RopeSpec(1, 8, pairing="norm", freq_base=10000.0)
    np.testing.assert_allclose(spec.omega(0), [1.0, 0.1, 0.01, 0.001], rtol=1e-6)
    assert spec.mscale(0) == 1.0


def test_yarn_ramp_by_hand():
    # n_dims 8, base 1e4, n_ctx_orig 2000: corr dims floor(0.998) = 0 and ceil(2.503) = 3, so the
    # extrapolation mix of bands 0..3 is 1, 2/3, 1/3, 0 and omega_f = 1e4^(-f/4) * (0.5 (1 - mix) + mix)
    spec = RopeSpec(1, 8, freq_base=10000.0, freq_scale=0.5, ext_factor=1.0, n_ctx_orig=2000,
                    beta_fast=32.0, beta_slow=1.0)
    mix = np.array([1.0, 2 / 3, 1 / 3, 0.0])
    want = 10000.0 ** (-np.arange(4) / 4) * (0.5 * (1 - mix) + mix)
    np.testing.assert_allclose(spec.omega(0), want, rtol=1e-6)
    assert spec.mscale(0) == pytest.approx(1.0 + 0.1 * np.log(2.0), rel=1e-6)


@pytest.mark.parametrize("pairing", ["neox", "norm"])
def test_rotate_matches_ggml_rotation(pairing):
    # post = s * R(omega p) pre on the first n_rot dims; the others are copied
    rng = np.random.default_rng(1)
    head_dim, n_rot = 12, 8
    spec = RopeSpec(1, head_dim, n_rot, pairing=pairing, freq_base=100.0, freq_scale=0.5,
                    ext_factor=1.0, n_ctx_orig=64)
    x = rng.standard_normal((3, 2, head_dim))
    pos = np.array([0, 5, 40])
    y = spec.rotate(x, pos, 0)
    s = spec.mscale(0)
    for i, p in enumerate(pos):
        ang, _ = ggml_angles(p, n_rot, 100.0, 0.5, None, 1.0, 1.0, 32.0, 1.0, 64)
        for f in range(n_rot // 2):
            a, b = (f, f + n_rot // 2) if pairing == "neox" else (2 * f, 2 * f + 1)
            c, sn = np.cos(ang[f]) * s, np.sin(ang[f]) * s
            np.testing.assert_allclose(y[i, :, a], x[i, :, a] * c - x[i, :, b] * sn, rtol=1e-5, atol=1e-6)
            np.testing.assert_allclose(y[i, :, b], x[i, :, a] * sn + x[i, :, b] * c, rtol=1e-5, atol=1e-6)
        np.testing.assert_array_equal(y[i, :, n_rot:], x[i, :, n_rot:])
    np.testing.assert_allclose(spec.rotate(y, pos, 0, inverse=True), x, rtol=1e-12, atol=1e-12)


def test_per_layer_parameters():
    spec = RopeSpec(3, 64, [64, 32, 64], freq_base=[1e4, 1e6, 1e4], rope_layers=[True, True, False])
    assert spec.n_rot == 64 and spec.n_freq == 32
    assert len(spec.omega(1)) == 16
    assert spec.omega(1)[1] == pytest.approx(1e6 ** (-2 / 32), rel=1e-6)
    assert np.all(spec.omega(2) == 0)


@pytest.mark.parametrize("kw,msg", [
    (dict(n_rot=7), "n_rot"),
    (dict(n_rot=128), "n_rot"),
    (dict(freq_base=0.0), "freq_base"),
    (dict(freq_scale=-1.0), "freq_scale"),
    (dict(ext_factor=1.0, n_ctx_orig=0), "n_ctx_orig"),
    (dict(freq_factors=np.ones(5)), "freq_factors"),
    (dict(pairing="gptj"), "pairing"),
])
def test_invalid_specs_are_refused(kw, msg):
    with pytest.raises(ValueError, match=msg):
        RopeSpec(2, 64, **kw)
