// llama-triatt-score.cpp: the scorer registry (see llama-triatt-score.h): one line per policy that ranks by scores.

#include "llama-triatt-score.h"
#include "triatt-policy.h"

#include <cstring>

using triatt_scorer_factory = llama_kv_scorer_ptr (*)(llama_context & ctx, const llama_kv_policy_params & p,
                                                      const triatt_score_shape & shape, std::string & err);

// the factories, each in its scorer's file
llama_kv_scorer_ptr triatt_scorer_tri_init(llama_context & ctx, const llama_kv_policy_params & p,
                                           const triatt_score_shape & shape, std::string & err);
llama_kv_scorer_ptr triatt_scorer_snapkv_init(llama_context & ctx, const llama_kv_policy_params & p,
                                              const triatt_score_shape & shape, std::string & err);

namespace {

// streaming and random rank without scores (by recency, or by a seeded hash of the position)
struct llama_kv_scorer_none : llama_kv_scorer {
    triatt_rank by;

    explicit llama_kv_scorer_none(triatt_rank by) : by(by) {}

    triatt_rank rank() const override {
        return by;
    }

    bool score(const triatt_round_cands &, std::vector<float> &, std::string &) override {
        return true;
    }
};

// the policies that rank by scores, and their scorers
const struct {
    const char *          name; // the policy's name in the contract (triatt-policy.cpp)
    triatt_scorer_factory init;
} k_scorers[] = {
    { "tri",    triatt_scorer_tri_init    },
    { "snapkv", triatt_scorer_snapkv_init },
};

} // namespace

llama_kv_scorer_ptr llama_kv_scorer_init(const char * name, llama_context & ctx, const llama_kv_policy_params & p,
                                         const triatt_score_shape & shape, std::string & err) {
    const triatt_policy_info * info = triatt_policy_get(triatt_policy_from_name(name));
    if (info && info->rank != TRIATT_RANK_SCORES) {
        return std::make_unique<llama_kv_scorer_none>(info->rank);
    }
    for (const auto & s : k_scorers) {
        if (strcmp(s.name, name) == 0) {
            return s.init(ctx, p, shape, err);
        }
    }
    err = std::string("KV policy ") + name + ": no scorer is registered for it (llama-triatt-score.cpp)";
    return nullptr;
}
