// llama-triatt-policy.h: KV-cache eviction policies inside llama_decode (pytriatt).
//
// A policy is attached to a llama_context with llama_set_kv_policy(). Before each batch,
// for every sequence of the batch whose cached tokens plus incoming tokens would exceed
// budget + interval, it runs a round: the policy's scorer (llama-triatt-score.h: TriAttention
// scores from the K cache, SnapKV scores from recent queries, or none for the streaming /
// random baselines) scores the sequence's cached tokens, the core ranks them, and the
// lowest are removed back to the budget with the memory's batched removal
// (llama_memory_seq_rm_positions). Kept tokens keep their positions, unless the policy
// shifts them down to contiguous positions (shift); the newest token is never removed.

#pragma once

#include "llama.h"
#include "llama-triatt-score.h"
#include "triatt-core.h"

#include "ggml-alloc.h"
#include "ggml-backend.h"

#include <map>
#include <string>
#include <vector>

struct llama_context;
struct llama_model;
class llama_batch_allocr;
class llama_kv_cache;
class llama_kv_cells;

struct llama_kv_policy {
    llama_kv_policy_params params;
    llama_kv_policy_stats  total = {}; // all sequences since the policy was attached

    // per sequence: counters since it last started empty, and its prompt length
    // (llama_kv_policy_set_prompt, else its first batch)
    struct seq_state {
        llama_kv_policy_stats stats = {};
        llama_pos prompt_len      = 0;
        bool      prompt_declared = false; // set_prompt was called for the sequence's next fresh start
    };
    std::map<llama_seq_id, seq_state> seqs;

    // the policy's scorer (tri, snapkv, or none for streaming and random) and the selection workspace
    llama_kv_scorer_ptr scorer;
    triatt_selector *   selector = nullptr;

    // the layers scored (those with their own K storage in the full-attention cache)
    std::vector<int32_t> layers;
    int32_t n_head    = 0;
    int32_t n_head_kv = 0;
    int32_t head_dim  = 0;
    int32_t head_dim_v = 0;

    // per-head (llama-triatt-heads.cpp): for each stream, the token position each group of heads holds in each
    // cell, valid while the cell still has the position it had when written (cell_pos)
    struct head_map {
        std::vector<llama_pos> cell_pos; // [kv_size]
        std::vector<llama_pos> pos;      // [n_groups][kv_size]
    };
    struct head_move {
        int32_t  g;   // group (in a layer's move list: the KV head)
        uint32_t src; // cell whose rows move
        uint32_t dst; // surviving cell they move into
    };
    std::vector<head_map>  head_maps; // by stream
    std::vector<uint8_t>   grp_keep;  // [n_groups][n_cand]
    std::vector<float>     grp_scores;
    std::vector<const float *> grp_ptrs;
    std::vector<int32_t>   grp_count;
    std::vector<int64_t>   grp_order;
    std::vector<uint8_t>   surviving;
    std::vector<head_move> moves;
    std::vector<head_move> layer_moves;
    std::vector<uint8_t>   move_stage;
    ggml_gallocr_t         move_galloc         = nullptr; // graph allocator of move_galloc_backend, reused
    ggml_backend_t         move_galloc_backend = nullptr;
    bool window_rule = false;       // n_window came from the default rule (-1): a protected prompt may shrink it
    bool force_move_staged = false; // PYTRIATT_MOVE_STAGED=1: move device-like rows through a host copy
    bool force_move_graph  = false; // PYTRIATT_MOVE_BACKEND=1: move host rows by a graph on the CPU backend
    uint64_t n_moved = 0; // head rows moved by the latest round

    // round workspaces, reused
    std::vector<float>       cand_scores;  // [n_layers][n_cand][n_head]
    std::vector<const float *> layer_ptrs;
    std::vector<llama_pos>   cand_pos;
    std::vector<uint32_t>    cand_cell;
    std::vector<int64_t>     keep;
    std::vector<llama_pos>   evict;

    std::string error;

    ~llama_kv_policy();

    // configure for ctx; on failure returns false and sets error
    bool init(llama_context & ctx, const llama_kv_policy_params & p);

    // called by llama_context::decode once the batch is validated, before it is placed in the cache;
    // with shift, the batch's positions move down with the sequence's
    bool before_batch(llama_context & ctx, llama_batch_allocr & balloc);

    // a saved state was read into seq_id's cells (seq_id < 0: every sequence): forget their history
    void state_read(llama_context & ctx, llama_seq_id seq_id);

    // protect_prompt: check that a prompt of n_prompt tokens fits the budget with the window; false with error set if not
    bool check_prompt(llama_pos n_prompt);

    // per-head: the positions KV head head_kv of scored layer il holds for seq_id (llama_kv_policy_head_positions);
    // -1 if il is not a scored layer
    int32_t head_positions(llama_kv_cache & kv, llama_seq_id seq_id, int32_t il, int32_t head_kv, llama_pos * out, int32_t n_max);

private:
    bool round(llama_context & ctx, llama_batch_allocr & balloc, llama_seq_id seq_id, llama_pos pos_max);
    // per-head: rank per group, choose the surviving cells, move rows; fills evict. Returns false with
    // error set on failure, or with error empty when shared cells leave too few candidates (evict whole cells)
    bool round_per_head(llama_context & ctx, llama_kv_cache & kv, llama_seq_id seq_id, const triatt_select_params & sel,
                        int64_t & n_keep);
    bool init_per_head(llama_kv_cache & kv, const llama_model & model);
    int32_t n_head_groups() const;
    int32_t head_group(size_t li, int32_t g) const;
    head_map & head_map_of(const llama_kv_cache & kv, uint32_t stream);
    llama_pos head_pos(const head_map & hm, const llama_kv_cells & cells, int32_t grp, uint32_t cell) const;
    // per-head: forget the head maps of the free cells of seq_id's stream, and with held also of the cells seq_id holds
    void forget_cells(llama_kv_cache & kv, llama_seq_id seq_id, bool held);

    bool shift_down(llama_context & ctx, llama_batch_allocr & balloc, llama_seq_id seq_id, int64_t n_keep);

};
