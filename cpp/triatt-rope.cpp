// triatt-rope.cpp: RoPE angular frequencies as ggml computes them, and calibration checks.
//
// ggml's CPU rope (ggml/src/ggml-cpu/ops.cpp, rope_yarn / ggml_rope_cache_init) rotates
// band f (dims i0 = 2f) of a vector at position p by
//
//   theta_extrap = p * theta_scale^f / ff[f]          theta_scale = freq_base^(-2/n_rot)
//   theta_interp = freq_scale * theta_extrap
//   theta        = theta_interp                                        if ext_factor == 0
//                = theta_interp * (1 - mix_f) + theta_extrap * mix_f   otherwise,
//                  mix_f = ext_factor * (1 - clamp((f - lo) / max(0.001, hi - lo), 0, 1))
//
// and multiplies cos/sin by mscale = attn_factor (* (1 + 0.1 ln(1/freq_scale)) if
// ext_factor != 0). lo/hi are ggml_rope_yarn_corr_dims(n_rot, n_ctx_orig, freq_base,
// beta_fast, beta_slow). Every term is linear in p, so theta = omega_f * p with
//
//   omega_f = theta_scale^f / ff[f] * (freq_scale * (1 - mix_f) + mix_f).
//
// ggml evaluates theta_scale with powf and the corrections in single precision; the
// same is done here so that the per-band constants match bit for bit where it
// matters (the YaRN ramp boundaries); the product theta_scale^f is formed in double
// (ggml forms it by repeated float multiplication, which differs by rounding only).

#include "triatt-core.h"

#include <algorithm>
#include <cmath>

#ifndef M_PI
#define M_PI 3.14159265358979323846
#endif

// ggml_rope_yarn_corr_dim: the band index at which n_turns full turns fit into
// n_ctx_orig positions
static float triatt_yarn_corr_dim(int n_dims, int n_ctx_orig, float n_turns, float base) {
    return (float) n_dims * logf((float) n_ctx_orig / (n_turns * 2 * (float) M_PI)) / (2 * logf(base));
}

static void triatt_yarn_corr_dims(int n_dims, int n_ctx_orig, float freq_base, float beta_fast, float beta_slow, float dims[2]) {
    const float start = floorf(triatt_yarn_corr_dim(n_dims, n_ctx_orig, beta_fast, freq_base));
    const float end   =  ceilf(triatt_yarn_corr_dim(n_dims, n_ctx_orig, beta_slow, freq_base));
    dims[0] = std::max(0.0f, start);
    dims[1] = std::min((float) (n_dims - 1), end);
}

static float triatt_yarn_ramp(float low, float high, int i0) {
    const float y = ((float) (i0 / 2) - low) / std::max(0.001f, high - low);
    return 1.0f - std::min(1.0f, std::max(0.0f, y));
}

bool triatt_rope_layer_check(const triatt_rope_layer & rl, int32_t head_dim, std::string & err) {
    if (rl.n_rot <= 0 || rl.n_rot % 2 != 0 || rl.n_rot > head_dim) {
        err = "n_rot must be even, positive and <= head_dim (n_rot=" + std::to_string(rl.n_rot) +
              ", head_dim=" + std::to_string(head_dim) + ")";
        return false;
    }
    if (!rl.rope) {
        return true;
    }
    if (!(rl.freq_base > 0.0f) || !std::isfinite(rl.freq_base)) {
        err = "freq_base must be positive and finite";
        return false;
    }
    if (!(rl.freq_scale > 0.0f) || !std::isfinite(rl.freq_scale)) {
        err = "freq_scale must be positive and finite";
        return false;
    }
    if (!std::isfinite(rl.ext_factor) || !std::isfinite(rl.attn_factor)) {
        err = "ext_factor and attn_factor must be finite";
        return false;
    }
    if (rl.ext_factor != 0.0f && rl.n_ctx_orig <= 0) {
        err = "YaRN (ext_factor != 0) needs n_ctx_orig > 0";
        return false;
    }
    if (!rl.freq_factors.empty()) {
        if ((int32_t) rl.freq_factors.size() != rl.n_rot / 2) {
            err = "freq_factors must hold n_rot/2 = " + std::to_string(rl.n_rot / 2) +
                  " values (got " + std::to_string(rl.freq_factors.size()) + ")";
            return false;
        }
        for (float ff : rl.freq_factors) {
            if (!(ff > 0.0f) || !std::isfinite(ff)) {
                err = "freq_factors must be positive and finite";
                return false;
            }
        }
    }
    return true;
}

void triatt_rope_omega(const triatt_rope_layer & rl, double * omega, float * mscale) {
    const int n_freq = rl.n_rot / 2;
    if (!rl.rope) {
        for (int f = 0; f < n_freq; ++f) {
            omega[f] = 0.0;
        }
        if (mscale) {
            *mscale = 1.0f;
        }
        return;
    }

    const float theta_scale = powf(rl.freq_base, -2.0f / (float) rl.n_rot);

    float corr_dims[2] = { 0.0f, 0.0f };
    if (rl.ext_factor != 0.0f) {
        triatt_yarn_corr_dims(rl.n_rot, rl.n_ctx_orig, rl.freq_base, rl.beta_fast, rl.beta_slow, corr_dims);
    }

    for (int f = 0; f < n_freq; ++f) {
        double w = std::pow((double) theta_scale, (double) f);
        if (!rl.freq_factors.empty()) {
            w /= (double) rl.freq_factors[f];
        }
        double k = rl.freq_scale; // theta = theta_extrap * k
        if (rl.ext_factor != 0.0f) {
            const float mix = triatt_yarn_ramp(corr_dims[0], corr_dims[1], 2 * f) * rl.ext_factor;
            k = (double) rl.freq_scale * (1.0 - (double) mix) + (double) mix;
        }
        omega[f] = w * k;
    }

    if (mscale) {
        float s = rl.attn_factor;
        if (rl.ext_factor != 0.0f) {
            s *= 1.0f + 0.1f * logf(1.0f / rl.freq_scale);
        }
        *mscale = s;
    }
}

bool triatt_calib_check(const triatt_calib & cal, std::string & err) {
    if (cal.n_layer <= 0 || cal.n_head <= 0 || cal.n_head_kv <= 0 || cal.head_dim <= 0 || cal.n_freq <= 0) {
        err = "n_layer, n_head, n_head_kv, head_dim and n_freq must be positive";
        return false;
    }
    if (cal.n_head % cal.n_head_kv != 0) {
        err = "n_head (" + std::to_string(cal.n_head) + ") must be a multiple of n_head_kv (" +
              std::to_string(cal.n_head_kv) + ")";
        return false;
    }
    if (cal.pairing != TRIATT_PAIRING_NEOX && cal.pairing != TRIATT_PAIRING_NORM) {
        err = "unknown pairing";
        return false;
    }
    if ((int32_t) cal.rope.size() != cal.n_layer) {
        err = "rope must hold one entry per layer";
        return false;
    }
    if (!cal.has_kv.empty() && (int32_t) cal.has_kv.size() != cal.n_layer) {
        err = "has_kv must be empty or hold one entry per layer";
        return false;
    }
    int32_t max_freq = 0;
    for (int32_t il = 0; il < cal.n_layer; ++il) {
        std::string e;
        if (!triatt_rope_layer_check(cal.rope[il], cal.head_dim, e)) {
            err = "layer " + std::to_string(il) + ": " + e;
            return false;
        }
        max_freq = std::max(max_freq, cal.rope[il].n_rot / 2);
    }
    if (cal.n_freq != max_freq) {
        err = "n_freq (" + std::to_string(cal.n_freq) + ") must equal max over layers of n_rot/2 (" +
              std::to_string(max_freq) + ")";
        return false;
    }
    const size_t n = (size_t) cal.n_layer * cal.n_head * cal.n_freq;
    if (cal.q_mean_re.size() != n || cal.q_mean_im.size() != n || cal.q_abs_mean.size() != n) {
        err = "q_mean_re, q_mean_im and q_abs_mean must hold n_layer*n_head*n_freq = " + std::to_string(n) + " values";
        return false;
    }
    for (size_t i = 0; i < n; ++i) {
        if (!std::isfinite(cal.q_mean_re[i]) || !std::isfinite(cal.q_mean_im[i]) || !std::isfinite(cal.q_abs_mean[i])) {
            err = "calibration statistics must be finite";
            return false;
        }
    }
    return true;
}
