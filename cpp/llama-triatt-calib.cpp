// llama-triatt-calib.cpp: the TriAttention statistics a tri policy scores with, read from a GGUF
// (triattention.* metadata, docs/calibration-format.md) and checked against the model they are used with.
// See llama-triatt-calib.h.

#include "llama-triatt-calib.h"

#include "llama-context.h"
#include "llama-model.h"

#include "ggml-backend.h"
#include "gguf.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <string>
#include <utility>

// whether a value can be quoted in a one-line message: valid UTF-8 without control characters (C0, DEL,
// C1); a corrupt file's bytes would break the line or the terminal. pytriatt.gguf_io.printable is the
// same test on the decoded text (an undecodable byte reads as U+FFFD there).
static bool triatt_printable(const std::string & s) {
    for (size_t i = 0; i < s.size(); ) {
        const unsigned char c = (unsigned char) s[i];
        const size_t n = c < 0x80 ? 1 : (c >> 5) == 0x6 ? 2 : (c >> 4) == 0xE ? 3 : (c >> 3) == 0x1E ? 4 : 0;
        if (n == 0 || i + n > s.size()) {
            return false;
        }
        uint32_t cp = n == 1 ? c : c & (0x7F >> n);
        for (size_t j = 1; j < n; ++j) {
            const unsigned char cc = (unsigned char) s[i + j];
            if ((cc & 0xC0) != 0x80) {
                return false;
            }
            cp = (cp << 6) | (cc & 0x3F);
        }
        if (cp < 0x20 || (cp >= 0x7F && cp <= 0x9F) || cp == 0xFFFD) {
            return false;
        }
        i += n;
    }
    return true;
}

static std::string triatt_shown(const std::string & s) {
    return triatt_printable(s) ? "'" + s.substr(0, 64) + "'" : std::string("(unprintable bytes)");
}

// the calibration must belong to this model: a copy of it (pytriatt calibrate writes the model with the
// statistics added) carries the same architecture hyper-parameters ({arch}.*, general.architecture/name)
// and vocabulary size; quantizations of one model share them, so their statistics transfer
static bool triatt_check_same_model(gguf_context * g, const char * path, const llama_model & model, std::string & err) {
    char key[256];
    char val[1024];
    const int32_t n_meta = llama_model_meta_count(&model);
    std::string arch;
    if (llama_model_meta_val_str(&model, "general.architecture", val, sizeof(val)) >= 0) {
        arch = val;
    }
    const bool full_copy = gguf_find_key(g, (arch + ".block_count").c_str()) >= 0;
    for (int32_t i = 0; i < n_meta; ++i) {
        if (llama_model_meta_key_by_index(&model, i, key, sizeof(key)) < 0 ||
            llama_model_meta_val_str_by_index(&model, i, val, sizeof(val)) < 0) {
            continue;
        }
        const std::string k = key;
        const bool identity = k == "general.architecture" || k == "general.name";
        const bool hparam   = k.rfind(arch + ".", 0) == 0;
        if (!identity && !(hparam && full_copy)) {
            continue;
        }
        const int64_t id = gguf_find_key(g, key);
        const std::string theirs = id >= 0 ? gguf_kv_to_str(g, (int) id) : std::string("(absent)");
        if (theirs.substr(0, sizeof(val) - 1) != val) {
            err = std::string(path) + " holds statistics of another model (" + k + " " + triatt_shown(theirs) +
                  ", this model: " + triatt_shown(val) + "): calibrate this model";
            return false;
        }
    }
    const int64_t id_tok = gguf_find_key(g, "tokenizer.ggml.tokens");
    const int32_t n_vocab = llama_vocab_n_tokens(llama_model_get_vocab(&model));
    if (full_copy && id_tok >= 0 && (gguf_get_kv_type(g, id_tok) != GGUF_TYPE_ARRAY || (int64_t) gguf_get_arr_n(g, id_tok) != n_vocab)) {
        err = std::string(path) + " holds statistics of a model with another vocabulary: calibrate this model";
        return false;
    }
    return true;
}

// read the triattention.* statistics of a GGUF file into cal (shape fields must already be set); every
// value is checked before use: the file may come from anywhere
static bool triatt_read_calib(const char * path, const llama_model & model, triatt_calib & cal, std::string & err) {
    gguf_init_params gp = { /*.no_alloc =*/ true, /*.ctx =*/ nullptr };
    gguf_context * g = gguf_init_from_file(path, gp);
    if (!g) {
        err = std::string("cannot read ") + path + " as GGUF";
        return false;
    }
    bool ok = true;
    // 0: read, 1: absent, 2: wrong type
    auto u32 = [&](const char * key, uint32_t & out) {
        const int64_t id = gguf_find_key(g, key);
        if (id < 0) {
            return 1;
        }
        if (gguf_get_kv_type(g, id) != GGUF_TYPE_UINT32) {
            err = std::string(path) + ": " + key + " is not a uint32: the file is damaged; calibrate the model again";
            return 2;
        }
        out = gguf_get_val_u32(g, id);
        return 0;
    };
    uint32_t version = 0, n_layer = 0, n_head = 0, n_freq = 0;
    int rc = 0;
    for (auto [key, out] : { std::pair<const char *, uint32_t *>{ "triattention.version", &version },
                             { "triattention.n_layer", &n_layer }, { "triattention.n_head", &n_head },
                             { "triattention.n_freq", &n_freq } }) {
        rc = std::max(rc, u32(key, *out));
        if (rc == 2) {
            break;
        }
    }
    if (rc == 1) {
        err = std::string(path) + " carries no TriAttention statistics (triattention.* metadata); "
              "add them with: pytriatt calibrate MODEL -o OUT.gguf, and use OUT.gguf (Python: kv_calib=, "
              "llama.cpp: --kv-calib); or use the streaming policy, which needs no statistics";
        ok = false;
    } else if (rc == 2) {
        ok = false;
    } else if (version != TRIATT_CALIB_VERSION) {
        err = std::string(path) + ": unsupported triattention.version " + std::to_string(version);
        ok = false;
    } else if (n_layer != (uint32_t) cal.n_layer || n_head != (uint32_t) cal.n_head || n_freq < 1 ||
               n_freq > (uint32_t) cal.head_dim / 2) {
        err = std::string(path) + " holds statistics for another model shape (" + std::to_string(n_layer) + " layers, " +
              std::to_string(n_head) + " heads, " + std::to_string(n_freq) + " bands; this model has " +
              std::to_string(cal.n_layer) + ", " + std::to_string(cal.n_head) + ", at most " +
              std::to_string(cal.head_dim / 2) + "): calibrate this model";
        ok = false;
    }
    ok = ok && triatt_check_same_model(g, path, model, err);
    const size_t n = (size_t) n_layer * n_head * n_freq;
    auto arr = [&](const char * key, std::vector<float> & out) {
        const int64_t id = gguf_find_key(g, key);
        if (id < 0 || gguf_get_kv_type(g, id) != GGUF_TYPE_ARRAY || gguf_get_arr_type(g, id) != GGUF_TYPE_FLOAT32 ||
            gguf_get_arr_n(g, id) != n) {
            err = std::string(path) + ": " + key + " is missing or not " + std::to_string(n) + " float32 values";
            return false;
        }
        const float * d = (const float *) gguf_get_arr_data(g, id);
        out.assign(d, d + n);
        for (float v : out) {
            if (!std::isfinite(v)) {
                err = std::string(path) + ": " + key + " holds non-finite values";
                return false;
            }
        }
        return true;
    };
    if (ok) {
        cal.n_freq = (int32_t) n_freq;
        ok = arr("triattention.q_mean_real", cal.q_mean_re) && arr("triattention.q_mean_imag", cal.q_mean_im) &&
             arr("triattention.q_abs_mean", cal.q_abs_mean);
    }
    // statistics, not just numbers: E|q| >= 0 and |E q| <= E|q| (up to rounding)
    for (size_t i = 0; ok && i < n; ++i) {
        const float a = cal.q_abs_mean[i];
        const float m = std::hypot(cal.q_mean_re[i], cal.q_mean_im[i]);
        if (a < 0.0f || m > a * (1.0f + 1e-4f) + 1e-12f) {
            err = std::string(path) + ": the statistics are inconsistent (|E q| > E|q| or E|q| < 0 at index " +
                  std::to_string(i) + "): the file is damaged; calibrate the model again";
            ok = false;
        }
    }
    gguf_free(g);
    return ok;
}

bool triatt_calib_load(llama_context & ctx, const char * path, const std::vector<int32_t> & layers, triatt_calib & cal,
                       std::string & err) {
    const llama_model & model = ctx.get_model();
    const auto & hp = model.hparams;
    const llama_cparams & cparams = ctx.get_cparams();
    const int rope_type = llama_model_rope_type(&model);
    if (rope_type != LLAMA_ROPE_TYPE_NORM && rope_type != LLAMA_ROPE_TYPE_NEOX) {
        err = "KV policy tri: the model's RoPE type is not supported (TriAttention needs NORM or NEOX RoPE)";
        return false;
    }
    cal.n_layer   = (int32_t) hp.n_layer();
    cal.n_head    = (int32_t) hp.n_head(0);
    cal.n_head_kv = (int32_t) hp.n_head_kv(0);
    cal.head_dim  = (int32_t) hp.n_embd_head_k(0);
    cal.pairing   = rope_type == LLAMA_ROPE_TYPE_NEOX ? TRIATT_PAIRING_NEOX : TRIATT_PAIRING_NORM;
    if (!path || !*path) {
        err = "KV policy tri needs calib_path: a GGUF carrying triattention.* statistics (pytriatt calibrate)";
        return false;
    }
    if (!triatt_read_calib(path, model, cal, err)) {
        return false;
    }
    cal.rope.resize(cal.n_layer);
    cal.has_kv.assign(cal.n_layer, 0);
    for (int32_t il : layers) {
        cal.has_kv[il] = 1;
    }
    for (int32_t il = 0; il < cal.n_layer; ++il) {
        triatt_rope_layer & rl = cal.rope[il];
        rl.rope        = hp.has_rope((uint32_t) il); // NoPE: omega = 0, the distance-free score
        rl.n_rot       = (int32_t) hp.n_rot(il);
        rl.freq_base   = model.get_rope_freq_base(cparams, il);
        rl.freq_scale  = model.get_rope_freq_scale(cparams, il);
        rl.ext_factor  = cparams.yarn_ext_factor;
        rl.attn_factor = cparams.yarn_attn_factor;
        rl.beta_fast   = cparams.yarn_beta_fast;
        rl.beta_slow   = cparams.yarn_beta_slow;
        rl.n_ctx_orig  = (int32_t) cparams.n_ctx_orig_yarn;
        if (ggml_tensor * ff = model.get_rope_factors(cparams, il)) {
            rl.freq_factors.resize(ggml_nelements(ff));
            ggml_backend_tensor_get(ff, rl.freq_factors.data(), 0, ggml_nbytes(ff));
        }
    }
    if (!triatt_calib_check(cal, err)) {
        err = "KV policy tri: " + err;
        return false;
    }
    return true;
}
