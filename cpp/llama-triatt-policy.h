// llama-triatt-policy.h: KV-cache eviction policies inside llama_decode (pytriatt).
//
// A policy is attached to a llama_context with llama_set_kv_policy(). Before each batch,
// for every sequence of the batch whose cached tokens plus incoming tokens would exceed
// budget + interval, it ranks the sequence's cached tokens (TriAttention scores from the
// K cache, or the streaming / random baselines) and removes the lowest back to the budget
// with the memory's batched removal (llama_memory_seq_rm_positions): kept tokens keep
// their positions, the newest token is never removed.

#pragma once

#include "llama.h"
#include "triatt-core.h"

#include <map>
#include <set>
#include <string>
#include <vector>

struct llama_context;
class llama_batch_allocr;
class llama_kv_cache;

struct llama_kv_policy {
    llama_kv_policy_params params;
    llama_kv_policy_stats  stats = {};

    // TRI: the statistics and RoPE of the model, the scorer and selector workspaces
    triatt_calib      calib;
    triatt_scorer   * scorer   = nullptr;
    triatt_selector * selector = nullptr;

    // the layers scored (those with their own K storage in the full-attention cache)
    std::vector<int32_t> layers;

    // per sequence: its prompt length (llama_kv_policy_set_prompt, else its first batch), and the
    // sequences whose next fresh start keeps the declared length
    std::map<llama_seq_id, llama_pos> prompt_len;
    std::set<llama_seq_id>            prompt_declared;

    // round workspaces, reused
    std::vector<float>       scores;       // [n_layers][n_cells][n_head]
    std::vector<float>       cand_scores;  // [n_layers][n_cand][n_head]
    std::vector<const float *> layer_ptrs;
    std::vector<llama_pos>   cand_pos;
    std::vector<uint32_t>    cand_cell;
    std::vector<int64_t>     keep;
    std::vector<llama_pos>   evict;
    std::vector<uint8_t>     k_host;       // K rows copied from a non-host buffer
    std::vector<float>       k_f32;        // K rows converted from another type

    std::string error;

    ~llama_kv_policy();

    // configure for ctx; on failure returns false and sets error
    bool init(llama_context & ctx, const llama_kv_policy_params & p);

    // called by llama_context::decode once the batch is validated, before it is placed in the cache
    bool before_batch(llama_context & ctx, const llama_batch_allocr & balloc);

private:
    bool round(llama_context & ctx, llama_seq_id seq_id, llama_pos pos_max);
    bool score_layers(llama_context & ctx, llama_kv_cache & kv, llama_seq_id seq_id, int64_t t, uint32_t n_cells);
};
