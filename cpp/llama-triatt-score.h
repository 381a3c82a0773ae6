// llama-triatt-score.h: the scorers of the KV policies, one per policy.
//
// A round (llama-triatt-policy.cpp) lists a sequence's cached tokens, asks the policy's scorer for their
// raw scores per layer and query head, and lets the core (triatt_select) rank and keep them: by the scores
// (tri: TriAttention from the K cache; snapkv: attention of the recent queries), or with no scores at all
// by recency (streaming) or at random (random). A scorer only scores; protections, budget, eviction and
// the per-head moves are the round's, shared by every policy.

#pragma once

#include "llama.h"
#include "triatt-core.h"

#include "ggml-backend.h"

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

struct llama_context;
class llama_kv_cache;

// the cached tokens a round scores
struct triatt_round_cands {
    llama_context  & ctx;
    llama_kv_cache & kv;
    llama_seq_id     seq_id;
    llama_pos        pos_max;  // the sequence's newest position (tri scores at t = pos_max)
    uint32_t         n_cells;  // cells in use in the sequence's stream (cells.used_max_p1())
    const std::vector<uint32_t> & cells; // the candidates' cells, in position order
};

struct llama_kv_scorer {
    virtual ~llama_kv_scorer() = default;

    // how triatt_select ranks the candidates: by the scores this scorer gives, or without scores
    virtual triatt_rank rank() const = 0;

    // raw scores of the candidates into out, [n_layers][n_cand][n_head] (scored layers in the policy's
    // order); nothing for a scorer that ranks without scores. On failure returns false and sets err
    virtual bool score(const triatt_round_cands & cand, std::vector<float> & out, std::string & err) = 0;

    // a sequence starts again from empty
    virtual void reset() {}
};

using llama_kv_scorer_ptr = std::unique_ptr<llama_kv_scorer>;

// the shape every scorer shares: the layers with their own K cache, in the order of the scores
struct triatt_score_shape {
    std::vector<int32_t> layers;
    int32_t n_head    = 0;
    int32_t n_head_kv = 0;
    int32_t head_dim  = 0;
};

// The scorer a policy's rounds use, made by the registry (llama-triatt-score.cpp) from the policy's name in
// the contract (triatt-policy.h): one that gives no scores for a policy that ranks without them, else the
// registered one; null with err set when it cannot run here (e.g. tri's statistics belong to another
// model). A new policy is a row of the contract's table and, if it ranks by scores, a scorer file
// (llama-triatt-score-NAME.cpp) with its line in the registry.
llama_kv_scorer_ptr llama_kv_scorer_init(const char * name, llama_context & ctx, const llama_kv_policy_params & p,
                                       const triatt_score_shape & shape, std::string & err);

// snapkv's queries are captured by triatt_snapkv_cb_eval, which the context must run as its eval callback with
// the scorer as user data (llama-triatt-score-snapkv.cpp)
bool triatt_snapkv_cb_eval(struct ggml_tensor * t, bool ask, void * user_data);

// the user's eval callback the snapkv scorer chains to: set it, or read it back from the user data of an
// installed triatt_snapkv_cb_eval (to chain the same one when the policy is replaced)
void triatt_snapkv_set_user_cb(llama_kv_scorer & scorer, ggml_backend_sched_eval_callback cb, void * cb_data);
void triatt_snapkv_get_user_cb(void * user_data, ggml_backend_sched_eval_callback & cb, void * & cb_data);
