// llama-triatt-kv.h: what the KV policy reads from llama.cpp's KV cache.
//
// The cache that holds the layers a policy scores, the backend that can compute on a cache tensor where it
// lives, and K rows brought to the host in a form the core's scorer reads (f32 or f16; other types
// converted to f32, with the Walsh-Hadamard rotation llama.cpp applies to quantized K undone).

#pragma once

#include "triatt-core.h"

#include "ggml-backend.h"

#include <cstdint>
#include <string>
#include <vector>

struct llama_context;
struct llama_memory_i;
class llama_kv_cache;

// the cache holding the full-attention layers: the plain cache, or the base of the SWA pair; null for any other
// memory (see triatt_memory_name)
llama_kv_cache * triatt_full_cache(llama_context & ctx);

// what kind of memory mem is, in words that say why a KV policy cannot use it (recurrent state, hybrid, ...)
std::string triatt_memory_name(const llama_memory_i * mem);

// the context's backend that can compute on t's buffer (where t lives), or null
ggml_backend_t triatt_backend_of(llama_context & ctx, const ggml_tensor * t);

// K rows of one layer readable on the host; the buffers are reused from call to call
struct triatt_key_rows {
    std::vector<uint8_t> host; // rows copied from a buffer in device memory
    std::vector<float>   f32;  // rows converted from a type other than f32/f16

    // the first n_cells K rows of layer il in stream: f32/f16 rows in place (copied first when K lives in
    // device memory), other types converted to f32 and, for quantized K, un-rotated; type and stride
    // (elements between rows) say how to read them
    const void * get(llama_kv_cache & kv, int32_t il, uint32_t stream, uint32_t n_cells, triatt_key_type & type,
                     int64_t & stride);
};
