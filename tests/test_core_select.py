"""Ranking and selection, on cases small enough to check by hand.

select() returns the positions to KEEP, ascending. Ranking (tri policy):
z-score each query head over the unprotected candidates (population std, floor 1e-6),
max within each GQA group, mean over layers, max (default) or mean over KV heads,
keep the top `budget`; protected tokens count against the budget; ties keep the
newer position.
"""

import numpy as np
import pytest

from pytriatt.core import select

Z4 = np.array([-3, -1, 1, 3]) / np.sqrt(5)  # z-scores of 4 equally spaced values


def col(*heads):
    """[n, n_head] float32 from per-head columns"""
    return np.stack([np.asarray(h, dtype=np.float32) for h in heads], axis=1)


# --------------------------------------------------------------------------- ranking


def test_z_scoring_makes_heads_comparable():
    # head 0 has a huge scale and prefers new tokens, head 1 a tiny scale and prefers old ones.
    # Raw max would follow head 0; after z-scoring both heads count equally: the ends win.
    pos = np.arange(4)
    scores = col([0, 100, 200, 300], [0.04, 0.03, 0.02, 0.01])
    keep, tok = select("tri", [scores], pos, t=4, budget=2, n_head_kv=2, return_scores=True)
    np.testing.assert_allclose(tok, np.maximum(Z4, Z4[::-1]), rtol=1e-6)
    assert keep.tolist() == [0, 3]


def test_population_std_and_floor():
    pos = np.arange(3)
    # population std (divide by n): [0, 1, 2] -> z = [-sqrt(1.5), 0, sqrt(1.5)]
    _, tok = select("tri", [col([0, 1, 2])], pos, 3, 1, return_scores=True)
    np.testing.assert_allclose(tok, [-np.sqrt(1.5), 0, np.sqrt(1.5)], rtol=1e-6)
    # a constant head: std 0 is floored at 1e-6, its z-scores are 0 (and the tie keeps the newest)
    keep, tok = select("tri", [col([5, 5, 5])], pos, 3, 1, return_scores=True)
    np.testing.assert_array_equal(tok, [0, 0, 0])
    assert keep.tolist() == [2]


def test_gqa_group_takes_max_over_its_query_heads():
    # 4 query heads, 2 KV heads: groups {0, 1} and {2, 3} (consecutive heads, as llama.cpp)
    pos = np.arange(4)
    h0 = [0, 1, 2, 3]      # z = Z4
    h1 = [3, 2, 1, 0]      # z = -Z4
    h2 = [0, 0, 0, 1]      # z = [-1, -1, -1, 3] / sqrt(3)
    h3 = [0, 0, 0, 0]      # z = 0
    g0 = np.maximum(Z4, -Z4)
    g1 = np.maximum(np.array([-1, -1, -1, 3]) / np.sqrt(3), 0)
    _, tok = select("tri", [col(h0, h1, h2, h3)], pos, 4, 1, n_head_kv=2, kv_agg="mean",
                    return_scores=True)
    np.testing.assert_allclose(tok, (g0 + g1) / 2, rtol=1e-6)
    # default token score: max over KV heads
    _, tok = select("tri", [col(h0, h1, h2, h3)], pos, 4, 1, n_head_kv=2, return_scores=True)
    np.testing.assert_allclose(tok, np.maximum(g0, g1), rtol=1e-6)
    # without n_head_kv every query head is its own group
    _, tok = select("tri", [col(h0, h1, h2, h3)], pos, 4, 1, kv_agg="mean", return_scores=True)
    np.testing.assert_allclose(tok, (Z4 - Z4 + np.array([-1, -1, -1, 3]) / np.sqrt(3)) / 4, rtol=1e-6, atol=1e-7)


def test_mean_over_layers():
    pos = np.arange(4)
    a = col([0, 1, 2, 3])        # layer A: z = [-3, -1, 1, 3] / sqrt(5), prefers token 3
    b = col([9, 9, 0, 0])        # layer B: z = [1, 1, -1, -1], prefers tokens 0 and 1
    keep, tok = select("tri", [a, b], pos, 4, 1, return_scores=True)
    np.testing.assert_allclose(tok, (Z4 + np.array([1, 1, -1, -1])) / 2, rtol=1e-6)
    assert keep.tolist() == [1]  # (1 - 1/sqrt5)/2 = 0.276 > (3/sqrt5 - 1)/2 = 0.171
    # a [n_layer, n, n_head] array works too, and None entries (layers without KV) are skipped
    assert select("tri", np.stack([a, b]), pos, 4, 1).tolist() == [1]
    assert select("tri", [a, None, b], pos, 4, 1).tolist() == [1]


def test_keep_holds_positions_ascending():
    pos = np.array([40, 10, 30, 20])
    keep = select("tri", [col([4, 3, 2, 1])], pos, t=50, budget=2)
    assert keep.dtype == np.int32
    assert keep.tolist() == [10, 40]   # the best two are the candidates at 40 (score 4) and 10 (3)
    evict = np.setdiff1d(pos, keep)
    assert evict.tolist() == [20, 30]


def test_ties_keep_the_newer_position():
    pos = np.array([5, 1, 9, 3, 7])    # not sorted
    keep = select("tri", [col([1, 1, 1, 1, 1])], pos, 9, 2)
    assert keep.tolist() == [7, 9]
    # partial tie at the cut: scores 2, 1, 1, 1 -> the best, then the newest of the tied
    keep = select("tri", [col([2, 1, 1, 1])], np.array([0, 1, 2, 3]), 3, 2)
    assert keep.tolist() == [0, 3]


def test_budget_at_or_above_the_candidates_keeps_everything():
    pos = np.array([3, 1, 2])
    for b in (3, 4, 1000):
        assert select("tri", [col([1, 2, 3])], pos, 3, b).tolist() == [1, 2, 3]
        assert select("streaming", None, pos, 3, b, sink=10, window=10).tolist() == [1, 2, 3]


def test_budget_zero_and_no_candidates():
    assert select("tri", [col([1, 2, 3])], np.arange(3), 3, 0).tolist() == []
    empty = np.zeros((0, 2), np.float32)
    assert select("tri", [empty], np.zeros(0, int), 0, 5).tolist() == []
    assert select("random", None, [], 0, 5).tolist() == []


def test_non_finite_scores_rank_last_and_do_not_poison_the_head():
    # token 1's raw score is NaN in layer A: it ranks last; the head's mean and std are
    # taken over the finite scores, so the other tokens keep their order
    a = col([1, np.nan, 3, 2])
    keep, tok = select("tri", [a], np.arange(4), 4, 3, return_scores=True)
    assert keep.tolist() == [0, 2, 3]
    assert tok[1] == -np.inf
    np.testing.assert_allclose(tok[[0, 2, 3]], [-np.sqrt(1.5), np.sqrt(1.5), 0], rtol=1e-6)
    assert select("tri", [a, col([1, 9, 3, 2])], np.arange(4), 4, 3).tolist() == [0, 2, 3]


# --------------------------------------------------------------------------- protections


def test_protected_tokens_are_kept_and_count_against_the_budget():
    pos = np.arange(10)
    scores = col([9, 8, 7, 6, 5, 4, 3, 2, 1, 0])   # prefers old tokens
    # sink 1 (pos 0), window 2 (pos 8, 9): 3 protected, 2 slots left -> best unprotected 1, 2
    keep = select("tri", [scores], pos, 9, 5, sink=1, window=2)
    assert keep.tolist() == [0, 1, 2, 8, 9]
    # prompt protection: positions < prompt_len
    keep = select("tri", [col([0, 0, 0, 0, 0, 0, 0, 0, 0, 9])], pos, 9, 5, prompt_len=4)
    assert keep.tolist() == [0, 1, 2, 3, 9]
    # overlapping protections count once: sink 3 and prompt 2 protect {0, 1, 2}
    keep = select("tri", [scores], pos, 9, 4, sink=3, prompt_len=2)
    assert keep.tolist() == [0, 1, 2, 3]


def test_sink_and_window_follow_position_order_not_array_order():
    pos = np.array([9, 0, 5, 2, 7])
    keep = select("tri", [col([0, 0, 9, 0, 0])], pos, 9, 3, sink=1, window=1)
    assert keep.tolist() == [0, 5, 9]


def test_protected_scores_do_not_enter_the_z_scores():
    # a huge score on a protected token must not squash the others' z-scores
    pos = np.arange(5)
    _, tok = select("tri", [col([1e9, 0, 1, 2, 3])], pos, 4, 4, sink=1, return_scores=True)
    assert tok[0] == np.inf
    np.testing.assert_allclose(tok[1:], Z4, rtol=1e-6)


def test_protections_over_budget_is_an_error_that_says_so():
    with pytest.raises(ValueError, match=r"protected tokens alone exceed the budget: 6 protected .*> budget 5"):
        select("tri", [col(np.arange(10))], np.arange(10), 9, 5, sink=4, window=2)
    with pytest.raises(ValueError, match="prompt 7"):
        select("streaming", None, np.arange(10), 9, 5, prompt_len=7)


# --------------------------------------------------------------------------- baselines


def test_streaming_keeps_sink_and_most_recent():
    pos = np.arange(100)
    keep = select("streaming", None, pos, 99, 10, sink=4)
    assert keep.tolist() == [0, 1, 2, 3, 94, 95, 96, 97, 98, 99]
    # with holes from earlier evictions: still the sink plus the newest cached ones
    pos = np.array([0, 1, 2, 3, 50, 60, 61, 70, 80, 81])
    keep = select("streaming", None, pos[::-1], 90, 6, sink=2)
    assert keep.tolist() == [0, 1, 61, 70, 80, 81]


def test_random_is_seeded_deterministic_and_order_independent():
    rng = np.random.default_rng(0)
    pos = np.sort(rng.choice(10000, size=500, replace=False))
    a = select("random", None, pos, 10000, 100, sink=4, seed=7)
    b = select("random", None, rng.permutation(pos), 10000, 100, sink=4, seed=7)
    c = select("random", None, pos, 10000, 100, sink=4, seed=8)
    assert a.tolist() == b.tolist()
    assert a.tolist() != c.tolist()
    assert len(a) == 100 and set(pos[:4]) <= set(a.tolist())
    # roughly uniform: the kept unprotected positions spread over the range
    rest = np.setdiff1d(a, pos[:4])
    assert rest.min() < 2500 and rest.max() > 7500


# --------------------------------------------------------------------------- argument errors


def test_argument_errors():
    pos = np.arange(4)
    with pytest.raises(ValueError, match="policy"):
        select("h2o", None, pos, 4, 2)
    with pytest.raises(ValueError, match="raw scores"):
        select("tri", None, pos, 4, 2)
    with pytest.raises(ValueError, match="after t"):
        select("streaming", None, pos, 2, 2)
    with pytest.raises(ValueError, match="multiple of n_head_kv"):
        select("tri", [col(pos, pos, pos)], pos, 4, 2, n_head_kv=2)
    with pytest.raises(ValueError, match=r"\[n=4, n_head\]"):
        select("tri", [col([1, 2, 3])], pos, 4, 2)
    with pytest.raises(ValueError, match="budget"):
        select("streaming", None, pos, 4, -1)
    with pytest.raises(ValueError, match="kv_agg"):
        select("tri", [col(pos)], pos, 4, 2, kv_agg="min")
