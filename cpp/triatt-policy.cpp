// triatt-policy.cpp: the KV eviction policy contract (see triatt-policy.h).

#include "triatt-policy.h"

#include <algorithm>
#include <cstring>

// indexed by triatt_policy_type
static const triatt_policy_info k_policies[TRIATT_POLICY_COUNT] = {
    //  name        evicts rank                per_head calib  summary
    { "full",      false, TRIATT_RANK_RECENT, false, false, "keep every token (no eviction)" },
    { "tri",       true,  TRIATT_RANK_SCORES, true,  true,  "TriAttention: rank cached keys with calibrated per-head query statistics" },
    { "streaming", true,  TRIATT_RANK_RECENT, false, false, "keep the sink and the most recent tokens (StreamingLLM)" },
    { "random",    true,  TRIATT_RANK_RANDOM, false, false, "keep the sink, the window and a seeded random choice of the others" },
    { "snapkv",    true,  TRIATT_RANK_SCORES, true,  false, "rank cached keys by the attention of the most recent queries (SnapKV)" },
};

static const char * const k_granularities[TRIATT_GRANULARITY_COUNT] = { "shared", "head", "layer" };

const triatt_policy_info * triatt_policy_get(int32_t type) {
    return type >= 0 && type < TRIATT_POLICY_COUNT ? &k_policies[type] : nullptr;
}

int32_t triatt_policy_from_name(const char * name) {
    for (int32_t t = 0; name && t < TRIATT_POLICY_COUNT; ++t) {
        if (strcmp(name, k_policies[t].name) == 0) {
            return t;
        }
    }
    return -1;
}

const char * triatt_granularity_name(int32_t granularity) {
    return granularity >= 0 && granularity < TRIATT_GRANULARITY_COUNT ? k_granularities[granularity] : nullptr;
}

int32_t triatt_granularity_from_name(const char * name) {
    for (int32_t g = 0; name && g < TRIATT_GRANULARITY_COUNT; ++g) {
        if (strcmp(name, k_granularities[g]) == 0) {
            return g;
        }
    }
    return -1;
}

int64_t triatt_default_window(int64_t budget, int64_t n_sink, int64_t interval) {
    return std::max<int64_t>(std::min(interval, (budget - n_sink) / 2), 1);
}

int64_t triatt_default_horizon(void) {
    return TRIATT_DEFAULT_OFFSETS_MAX; // the paper's D = {1, 2, 4, ..., 2^16}
}

triatt_policy_settings triatt_policy_resolve(const triatt_policy_settings & s) {
    triatt_policy_settings r = s;
    if (r.n_window < 0) {
        r.n_window = r.type == TRIATT_POLICY_TRI ? (int32_t) triatt_default_window(r.budget, r.n_sink, r.interval) : 1;
    }
    if (r.horizon < 0) {
        r.horizon = (int32_t) triatt_default_horizon();
    }
    return r;
}

namespace {

// an option as the caller's front end spells it: prefix + name, with '-' for '_' after a "--" prefix
struct option_speller {
    std::string prefix;
    bool        dashes;

    explicit option_speller(const char * p) : prefix(p ? p : ""), dashes(prefix.rfind("--", 0) == 0) {}

    std::string operator()(const char * name) const {
        std::string s = prefix + name;
        if (dashes) {
            std::replace(s.begin() + (std::ptrdiff_t) prefix.size(), s.end(), '_', '-');
        }
        return s;
    }
};

} // namespace

std::string triatt_policy_check(const triatt_policy_settings & s, int64_t n_ctx, const char * prefix) {
    const option_speller opt(prefix);
    const triatt_policy_info * info = triatt_policy_get(s.type);
    if (!info) {
        std::string known;
        for (const auto & p : k_policies) {
            known += std::string(known.empty() ? "" : ", ") + p.name;
        }
        return "unknown " + opt("policy") + " " + std::to_string(s.type) + " (known: " + known + ")";
    }
    if (!info->evicts) {
        return "";
    }
    const auto at_least = [&](const char * name, int64_t value, int64_t min, const char * rule_note) -> std::string {
        return opt(name) + " " + std::to_string(value) + " is out of range: it must be at least " +
               std::to_string(min) + rule_note;
    };
    if (s.budget < 1) {
        return at_least("budget", s.budget, 1, "");
    }
    if (s.interval < 1) {
        return at_least("interval", s.interval, 1, "");
    }
    if (s.n_sink < 0) {
        return at_least("sink", s.n_sink, 0, "");
    }
    if (s.n_window < -1) {
        return at_least("window", s.n_window, 0, " (-1: the default rule)");
    }
    if (s.horizon < -1 || s.horizon == 0) {
        return at_least("horizon", s.horizon, 1, " (-1: the default rule)");
    }
    if (s.snap_window < 1) {
        return at_least("snap_window", s.snap_window, 1, "");
    }
    // the newest token always stays (llama.cpp must never evict a sequence's newest position)
    const int64_t n_window = std::max(triatt_policy_resolve(s).n_window, 1);
    if (s.n_sink + n_window > s.budget) {
        return opt("sink") + " " + std::to_string(s.n_sink) + " + " + opt("window") + " " + std::to_string(n_window) +
               " exceed " + opt("budget") + " " + std::to_string(s.budget) +
               ": the protected tokens must fit in the budget";
    }
    if (!triatt_granularity_name(s.granularity)) {
        return opt("per_head") + " must be shared, head or layer (got " + std::to_string(s.granularity) + ")";
    }
    if (s.granularity != TRIATT_GRANULARITY_SHARED) {
        if (!info->per_head) {
            std::string which;
            for (const auto & p : k_policies) {
                if (p.per_head) {
                    which += std::string(which.empty() ? "" : " and ") + p.name;
                }
            }
            return opt("per_head") + " ranks tokens per head, which only " + which + " do (not " + info->name + ")";
        }
        if (s.shift) {
            return opt("per_head") + " cannot be combined with " + opt("shift") + " (a cell holds a different token in "
                   "each head, so no single position shift is right for it): drop one of them";
        }
    }
    if (n_ctx > 0 && s.budget >= n_ctx) {
        return opt("budget") + " " + std::to_string(s.budget) + " is not below the longest sequence (" +
               std::to_string(n_ctx) + " tokens, the context size): nothing would ever be evicted; lower " +
               opt("budget") + " or raise the context size";
    }
    return "";
}

int64_t triatt_policy_n_cells(int64_t budget, int64_t interval, int64_t n_batch) {
    // a round runs before a batch that would take the sequence past budget + interval, so the cache must hold
    // the budget plus one interval, or plus one whole batch when batches are longer
    return std::max<int64_t>(budget, 1) + std::max<int64_t>({ interval, n_batch, 1 });
}
