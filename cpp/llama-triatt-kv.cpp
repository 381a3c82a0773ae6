// llama-triatt-kv.cpp: what the KV policy reads from llama.cpp's KV cache. See llama-triatt-kv.h.

#include "llama-triatt-kv.h"

#include "llama-context.h"
#include "llama-kv-cache-dsa-iswa.h"
#include "llama-kv-cache-dsa.h"
#include "llama-kv-cache-dsv4.h"
#include "llama-kv-cache-iswa.h"
#include "llama-kv-cache-msa.h"
#include "llama-kv-cache.h"
#include "llama-memory-hybrid-iswa.h"
#include "llama-memory-hybrid.h"
#include "llama-memory-recurrent.h"

#include <cmath>

llama_kv_cache * triatt_full_cache(llama_context & ctx) {
    llama_memory_i * mem = ctx.get_memory();
    if (auto * kv = dynamic_cast<llama_kv_cache *>(mem)) {
        return kv;
    }
    if (auto * iswa = dynamic_cast<llama_kv_cache_iswa *>(mem)) {
        return iswa->get_base();
    }
    return nullptr;
}

std::string triatt_memory_name(const llama_memory_i * mem) {
    if (mem == nullptr) {
        return "no memory";
    }
    if (dynamic_cast<const llama_memory_recurrent *>(mem)) {
        return "a recurrent state (llama_memory_recurrent), not a KV cache of tokens";
    }
    if (dynamic_cast<const llama_memory_hybrid *>(mem) || dynamic_cast<const llama_memory_hybrid_iswa *>(mem)) {
        return "a recurrent state beside its attention layers' KV cache (llama_memory_hybrid)";
    }
    if (dynamic_cast<const llama_kv_cache_dsa *>(mem) || dynamic_cast<const llama_kv_cache_dsa_iswa *>(mem)) {
        return "a sparse-attention cache (llama_kv_cache_dsa) the KV policy does not know";
    }
    if (dynamic_cast<const llama_kv_cache_dsv4 *>(mem)) {
        return "a compressed cache (llama_kv_cache_dsv4) the KV policy does not know";
    }
    if (dynamic_cast<const llama_kv_cache_msa *>(mem)) {
        return "a cache of its own kind (llama_kv_cache_msa) the KV policy does not know";
    }
    return "a memory type the KV policy does not know";
}

ggml_backend_t triatt_backend_of(llama_context & ctx, const ggml_tensor * t) {
    ggml_backend_sched_t sched = ctx.get_sched();
    for (int i = 0; t->buffer && i < ggml_backend_sched_get_n_backends(sched); ++i) {
        ggml_backend_t b = ggml_backend_sched_get_backend(sched, i);
        if (ggml_backend_supports_buft(b, ggml_backend_buffer_get_type(t->buffer))) {
            return b;
        }
    }
    return nullptr;
}

// in-place orthonormal Walsh-Hadamard transform of n (a power of two) values, in the same
// (Sylvester) order as the matrix llama.cpp rotates quantized K with
static void triatt_hadamard(float * x, int32_t n) {
    for (int32_t h = 1; h < n; h *= 2) {
        for (int32_t i = 0; i < n; i += 2*h) {
            for (int32_t j = i; j < i + h; ++j) {
                const float a = x[j];
                const float b = x[j + h];
                x[j]     = a + b;
                x[j + h] = a - b;
            }
        }
    }
    const float scale = 1.0f / std::sqrt((float) n);
    for (int32_t i = 0; i < n; ++i) {
        x[i] *= scale;
    }
}

const void * triatt_key_rows::get(llama_kv_cache & kv, int32_t il, uint32_t stream, uint32_t n_cells,
                                  triatt_key_type & type, int64_t & stride) {
    ggml_tensor * k = kv.get_k_storage(il);
    const size_t row_bytes = k->nb[1];
    const uint8_t * base = nullptr;
    if (k->buffer && ggml_backend_buffer_is_host(k->buffer)) {
        base = (const uint8_t *) k->data + stream * k->nb[2];
    } else {
        // K lives in device memory: bring the used rows to the host
        host.resize(row_bytes * n_cells);
        ggml_backend_tensor_get(k, host.data(), stream * k->nb[2], row_bytes * n_cells);
        base = host.data();
    }
    if (k->type == GGML_TYPE_F32 || k->type == GGML_TYPE_F16) {
        type   = k->type == GGML_TYPE_F32 ? TRIATT_KEY_F32 : TRIATT_KEY_F16;
        stride = (int64_t) (row_bytes / ggml_type_size(k->type));
        return base;
    }
    // bf16 or quantized: convert the rows to f32, and undo the Hadamard rotation llama.cpp applies to
    // quantized K (per block of k_rot values; the rotation is its own inverse)
    const int64_t ne0 = k->ne[0];
    const auto * traits = ggml_get_type_traits(k->type);
    const int32_t k_rot = kv.get_k_rot_size();
    f32.resize((size_t) ne0 * n_cells);
    for (uint32_t i = 0; i < n_cells; ++i) {
        float * row = f32.data() + (size_t) i * ne0;
        traits->to_float(base + i * row_bytes, row, ne0);
        for (int64_t b = 0; k_rot > 0 && b + k_rot <= ne0; b += k_rot) {
            triatt_hadamard(row + b, k_rot);
        }
    }
    type   = TRIATT_KEY_F32;
    stride = ne0;
    return f32.data();
}

