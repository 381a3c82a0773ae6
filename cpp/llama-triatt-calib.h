// llama-triatt-calib.h: the TriAttention statistics of a model, on the llama.cpp side.
//
// A tri policy scores cached keys with per-head statistics of the model's pre-RoPE queries, written
// into a GGUF by pytriatt calibrate (llama-triatt-capture.cpp measures them). Loading them checks
// every value (the file may come from anywhere) and that they belong to this model, and pairs them
// with the RoPE each layer's graph applies.

#pragma once

#include "triatt-core.h"

#include <cstdint>
#include <string>
#include <vector>

struct llama_context;
struct llama_model;

// Fills cal for ctx's model: the triattention.* statistics of the GGUF at path and, per layer, the
// RoPE exactly as the graph applies it (frequency base and scale, YaRN, rope factors, NoPE); only the
// layers listed in `layers` (those with their own K cache) are scored. Returns false and sets err
// when the file is unreadable, damaged, or holds statistics of another model.
bool triatt_calib_load(llama_context & ctx, const char * path, const std::vector<int32_t> & layers, triatt_calib & cal,
                       std::string & err);
