// triatt-policy.h: the KV eviction policy contract, the one owner of every policy fact the front ends share.
//
// libllama (llama_kv_policy_*), llama.cpp's --kv-* flags, llama-cpp-python's Llama(kv_*=) and pytriatt's
// commands (through pytriatt._core) read the policy table, the default parameters and the rules from here;
// none of them spells a policy name, a default or a rule again. Like triatt-core.h: no llama.cpp dependency,
// compiled into libllama and into pytriatt._core.
//
// A new policy is one row of the table (triatt-policy.cpp) plus, when it ranks by scores, one scorer file
// (llama-triatt-score-NAME.cpp) and its line in the scorer registry (llama-triatt-score.h).

#pragma once

#include "triatt-core.h"

#include <cstdint>
#include <string>

// The values of enum llama_kv_policy_type (llama.h), which static_asserts that they agree.
enum triatt_policy_type {
    TRIATT_POLICY_FULL      = 0,
    TRIATT_POLICY_TRI       = 1,
    TRIATT_POLICY_STREAMING = 2,
    TRIATT_POLICY_RANDOM    = 3,
    TRIATT_POLICY_SNAPKV    = 4,
    TRIATT_POLICY_COUNT
};

// The values of enum llama_kv_policy_granularity: which heads share one set of kept tokens.
enum triatt_granularity {
    TRIATT_GRANULARITY_SHARED = 0, // "shared": one set for the whole model
    TRIATT_GRANULARITY_HEAD   = 1, // "head":   one set per KV head, the same in every layer
    TRIATT_GRANULARITY_LAYER  = 2, // "layer":  one set per KV head of each layer
    TRIATT_GRANULARITY_COUNT
};

struct triatt_policy_info {
    const char * name;        // how every front end spells it ("tri")
    bool         evicts;      // false only for full attention
    triatt_rank  rank;        // how a round ranks the cached tokens (TRIATT_RANK_SCORES: by the scores its scorer
                              // gives, which reads K: per-head keys and a readable K type; recent; random)
    bool         per_head;    // can keep a different token set per KV head (granularity head / layer)
    bool         needs_calib; // reads calibration statistics (triattention.* GGUF metadata)
    const char * summary;     // one line for --help texts
};

// The policy of a type (nullptr outside [0, TRIATT_POLICY_COUNT)), and the type of a name (-1: none).
const triatt_policy_info * triatt_policy_get(int32_t type);
int32_t                    triatt_policy_from_name(const char * name);

// The name of a granularity (nullptr outside the enum), and the granularity of a name (-1: none).
const char * triatt_granularity_name(int32_t granularity);
int32_t      triatt_granularity_from_name(const char * name);

// The numeric parameters of a policy, with their defaults (the defaults of every front end).
struct triatt_policy_settings {
    int32_t type        = TRIATT_POLICY_FULL;
    int32_t budget      = 2048; // cached tokens a sequence keeps after a round (protected ones included)
    int32_t interval    = 128;  // a round runs when cached + incoming tokens would exceed budget + interval
    int32_t n_sink      = 4;    // the oldest tokens a round never evicts (attention sinks)
    int32_t n_window    = -1;   // the newest tokens a round never evicts; -1: the rule (triatt_policy_resolve)
    int32_t horizon     = -1;   // tri: the largest future distance its scores average over; -1: the rule
    int32_t snap_window = 32;   // snapkv: the recent queries whose attention ranks the keys
    int32_t granularity = TRIATT_GRANULARITY_SHARED;
    bool    shift       = false; // shift kept tokens down after a round (positions stay contiguous)
};

// The default protections of a tri round (docs/method.md, "The default"). A round keeps a key until the next
// round re-scores it, `interval` tokens later; the queries of that interval read the newest tokens most (local
// attention), which the long-horizon score undervalues, so the newest min(interval, (budget - sink) / 2) tokens
// are kept outright (at least 1), leaving at least half of the budget to the score. The horizon stays the
// paper's 65536: shorter ones measured no better (docs/QUALITY.md).
int64_t triatt_default_window(int64_t budget, int64_t n_sink, int64_t interval);
int64_t triatt_default_horizon(void);

// The settings a policy runs with: n_window and horizon of -1 replaced by the rules (the window rule is tri's;
// the baselines keep their published form, the newest token only).
triatt_policy_settings triatt_policy_resolve(const triatt_policy_settings & s);

// "" when the settings can run with sequences of up to n_ctx tokens (n_ctx <= 0: not checked); otherwise one
// sentence that says what is wrong and what to do. Options are spelled the way the caller's front end spells
// them: prefix "--kv-" (llama.cpp's flags: --kv-budget), "--" (pytriatt's commands: --budget, --per-head),
// "kv_" (Llama's keyword arguments: kv_budget) or "" (budget).
std::string triatt_policy_check(const triatt_policy_settings & s, int64_t n_ctx, const char * prefix);

// KV cells one sequence needs when a batch brings up to n_batch of its tokens: the budget plus what arrives
// before the next round (an interval, or a longer batch).
int64_t triatt_policy_n_cells(int64_t budget, int64_t interval, int64_t n_batch);
