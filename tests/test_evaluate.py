"""Specification of `pytriatt eval` (pytriatt/evaluation/: runner.py and the task modules): the scoring
logic of each task on tiny random-weight models, the result rows, the command line, and one small run
per task on a real model (marked `real`)."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from pytriatt.evaluation import agree, common, dfs, nll, passkey, recall, runner
from pytriatt.evaluation.common import ROW_KEYS, EvalError, wilson

INTERVAL = 32


def check_rows(rows, task):
    assert rows
    for r in rows:
        assert tuple(r) == ROW_KEYS
        assert r["task"] == task and r["n"] > 0 and np.isfinite(r["value"])
        if r["policy"] == "full":
            assert r["budget"] is None and r["position"] is None
        else:
            assert r["budget"] > 0 and r["position"] in ("gaps", "shift")
        if r["ci_low"] is not None:
            assert r["ci_low"] <= r["value"] + 1e-12 <= r["ci_high"] + 2e-12
    json.dumps(rows)   # plain JSON


# -- statistics -------------------------------------------------------------------------

def test_wilson_interval_matches_known_values():
    lo, hi = wilson(8, 10)
    assert (round(lo, 3), round(hi, 3)) == (0.49, 0.943)
    assert wilson(0, 5)[0] == 0.0 and wilson(5, 5)[1] == 1.0
    assert wilson(0, 0) == (0.0, 1.0)


# -- passkey ----------------------------------------------------------------------------

@pytest.mark.parametrize("text, key", [
    (" 71432. Remember it.", "71432"),
    ("The pass key is 7 1 4 3 2.", "71432"),
    ("\n\n12345\n67890", "12345"),
    (" I don't know.", None),
    ("", None),
])
def test_the_passkey_parser_takes_the_first_run_of_digits(text, key):
    assert passkey.parse_passkey(text) == key


def test_a_passkey_prompt_has_the_requested_length_and_the_key_at_its_depth(tiny):
    m = common.load_model(tiny)
    where = {}
    for depth in (0.0, 0.5, 1.0):
        toks, where[depth] = passkey.passkey_prompt(m, 400, depth, "12345")
        assert 400 - 30 <= len(toks) <= 400
        text = common.model_detokenize(m, toks)
        assert text.count("12345") == 2 and text.rstrip().endswith("The pass key is")
    n_intro = len(m.tokenize(passkey.PASSKEY_INTRO, add_bos=True))
    n_filler = len(m.tokenize(passkey.PASSKEY_FILLER, add_bos=False))
    assert where[0.0] == n_intro                                   # right after the instructions
    assert abs(where[0.5] - (where[0.0] + where[1.0]) / 2) <= n_filler
    assert where[1.0] > 400 - 30 - 2 * n_filler                    # just before the question
    with pytest.raises(EvalError, match="depths"):
        passkey.passkey_prompt(m, 400, 1.5, "1")


# -- dfs --------------------------------------------------------------------------------

def test_the_dfs_generator_makes_trees_and_their_depth_first_walks():
    for seed in range(5):
        prob = dfs.make_dfs_problem(20, np.random.default_rng(seed))
        nodes = set(prob.children)
        assert len(nodes) == 20 and sorted(prob.order) == sorted(nodes)
        assert all(len(c) <= 3 for c in prob.children.values())
        entered = [n for k, n in prob.walk if k == "enter"]
        assert sorted(entered) == sorted(nodes) and entered[0] == prob.root
        # every node but the root is returned from exactly once, to its parent
        returns = [n for k, n in prob.walk if k == "return to"]
        assert len(returns) == 19
        lines = [f"{k} {n}" for k, n in prob.walk]
        assert dfs.check_dfs_walk(prob.children, prob.root, lines + ["done"]) is None


def test_the_dfs_checker_finds_the_first_wrong_line():
    children = {"a": ["b", "c"], "b": ["d"], "c": [], "d": []}
    walk = ["enter a", "enter b", "enter d", "return to b", "return to a", "enter c", "return to a"]
    assert dfs.check_dfs_walk(children, "a", walk) is None
    assert dfs.check_dfs_walk(children, "a", walk[:3] + ["return to a"] + walk[4:]) == 3
    assert dfs.check_dfs_walk(children, "a", ["enter a", "enter c"] + walk[2:]) == 1
    assert dfs.check_dfs_walk(children, "a", walk[:-1]) == 6          # a missing last line
    assert dfs.check_dfs_walk(children, "a", walk + ["enter x"]) == 7


def test_dfs_queries_point_at_the_names_and_are_scored_span_by_span(tiny):
    m = common.load_model(tiny)
    prob = dfs.make_dfs_problem(8, np.random.default_rng(3))
    toks, queries = dfs.dfs_tokens(m, prob)
    assert len(queries) == len(prob.walk)
    for q, (kind, node) in zip(queries, prob.walk):
        assert common.model_detokenize(m, toks[q["start"]:q["end"]]).strip() == node
        assert q["lookback"] > 0 and q["kind"] == ("enter" if kind == "enter" else "return")
    # a perfect predictor gets every span; one wrong token fails exactly its query
    perfect = np.asarray(toks[1:])
    assert all(dfs.score_spans(toks, queries, perfect))
    broken = perfect.copy()
    broken[queries[2]["start"] - 1] = -1
    ok = dfs.score_spans(toks, queries, broken)
    assert not ok[2] and sum(ok) == len(queries) - 1


# -- nll --------------------------------------------------------------------------------

def test_nll_with_a_budget_larger_than_the_text_equals_full_attention(tiny, tiny_cal):
    toks = list(np.random.default_rng(0).integers(3, 1500, size=200))
    full = nll.nll_per_token(tiny, toks, "full", None, interval=INTERVAL)
    for policy in ("streaming", "tri", "random"):
        got = nll.nll_per_token(tiny, toks, policy, 400, interval=INTERVAL, calib=tiny_cal)
        np.testing.assert_array_equal(got, full)
    rows = nll.nll_rows("tiny", "streaming", "gaps", 400, full, full, interval=INTERVAL)
    assert [r["metric"] for r in rows[:2]] == ["nll", "ppl_ratio"] and rows[1]["value"] == 1.0


def test_nll_under_eviction_differs_only_after_the_cache_first_fills(tiny):
    toks = list(np.random.default_rng(1).integers(3, 1500, size=200))
    full = nll.nll_per_token(tiny, toks, "full", None, interval=INTERVAL)
    got = nll.nll_per_token(tiny, toks, "streaming", 48, interval=INTERVAL)
    # chunks of 32: the first round runs before the third chunk (64 cached + 32 > 48 + 32)
    first = 2 * INTERVAL
    np.testing.assert_array_equal(got[:first], full[:first])
    assert not np.array_equal(got[first:], full[first:])


def test_snapkv_and_the_shift_mode_run_through_the_patch(tiny, tiny_cal):
    toks = list(np.random.default_rng(5).integers(3, 1500, size=200))
    full = nll.nll_per_token(tiny, toks, "full", None, interval=INTERVAL)
    got = nll.nll_per_token(tiny, toks, "snapkv", 48, interval=INTERVAL, snap_window=8)
    np.testing.assert_array_equal(got[:2 * INTERVAL], full[:2 * INTERVAL])
    assert not np.array_equal(got, full)
    # without a round, shifting changes nothing; with rounds, positions are compacted
    same = nll.nll_per_token(tiny, toks, "streaming", 400, interval=INTERVAL, shift=True)
    np.testing.assert_array_equal(same, full)
    gaps = nll.nll_per_token(tiny, toks, "streaming", 48, interval=INTERVAL)
    shifted = nll.nll_per_token(tiny, toks, "streaming", 48, interval=INTERVAL, shift=True)
    np.testing.assert_array_equal(shifted[:2 * INTERVAL], gaps[:2 * INTERVAL])
    assert not np.array_equal(shifted, gaps)


def test_run_nll_reports_mean_ratio_and_position_buckets(tiny):
    text = " ".join(["the water was long and the people made it"] * 60)
    rows, full = nll.run_nll(tiny, "full", None, tokens=160, text=text, interval=INTERVAL)
    rows2, _ = nll.run_nll(tiny, "streaming", 48, tokens=160, text=text, interval=INTERVAL, reference=full)
    check_rows(rows + rows2, "nll")
    metrics = [r["metric"] for r in rows2]
    assert metrics == ["nll", "ppl_ratio", "nll@1-40", "nll@41-80", "nll@81-119", "nll@120-159"]
    assert rows2[0]["value"] == pytest.approx(np.mean([r["value"] for r in rows2[2:]]), rel=0.05)
    with pytest.raises(EvalError, match="only"):
        nll.run_nll(tiny, "full", None, tokens=10_000, text=text)


def test_nll_compares_each_policy_with_streaming_token_for_token(tiny, tiny_cal):
    """ppl_vs_streaming = exp(mean NLL difference to streaming at the same budget and mode)"""
    text = " ".join(["the water was long and the people made it"] * 60)
    kw = dict(tokens=160, text=text, interval=INTERVAL)
    rows = runner.evaluate(tiny, "nll", ["full", "tri", "streaming", "random"], [48], progress=False,
                             calib=tiny_cal, **kw)
    check_rows(rows, "nll")
    vs = {r["policy"]: r for r in rows if r["metric"] == "ppl_vs_streaming"}
    assert sorted(vs) == ["random", "tri"]                      # not streaming against itself, not full
    ratio = {r["policy"]: r["value"] for r in rows if r["metric"] == "ppl_ratio" and r["budget"] == 48}
    for p in ("tri", "random"):
        # ratios to full and to streaming share full's NLL: they divide exactly
        assert vs[p]["value"] == pytest.approx(ratio[p] / ratio["streaming"], rel=1e-9)
        assert vs[p]["budget"] == 48 and vs[p]["position"] == "gaps"


def test_per_head_policies_are_rows_of_their_own_paired_with_streaming(tiny, tiny_cal):
    """tri@head / tri@layer run per-head eviction (every KV head keeps its own tokens) through the patch."""
    text = " ".join(["the water was long and the people made it"] * 60)
    rows = runner.evaluate(tiny, "nll", ["tri", "tri@head", "tri@layer", "streaming"], [48], progress=False,
                             calib=tiny_cal, tokens=160, text=text, interval=INTERVAL)
    check_rows(rows, "nll")
    vs = {r["policy"]: r["value"] for r in rows if r["metric"] == "ppl_vs_streaming"}
    assert sorted(vs) == ["tri", "tri@head", "tri@layer"]
    ratio = {r["policy"]: r["value"] for r in rows if r["metric"] == "ppl_ratio" and r["budget"] == 48}
    assert len({ratio["tri"], ratio["tri@head"], ratio["tri@layer"]}) == 3   # three different caches
    vs_shared = {r["policy"]: r["value"] for r in rows if r["metric"] == "ppl_vs_shared"}
    assert sorted(vs_shared) == ["tri@head", "tri@layer"]
    for p in vs_shared:
        assert vs_shared[p] == pytest.approx(ratio[p] / ratio["tri"], rel=1e-9)
    with pytest.raises(EvalError, match="per-head eviction ranks tokens per head, which only tri and snapkv do"):
        runner.evaluate(tiny, "nll", ["streaming@head"], [64], progress=False, tokens=100)


# -- agree ------------------------------------------------------------------------------

def test_agreement_counts_the_prefix_and_all_matching_steps():
    assert agree.agreement([1, 2, 3, 4], [1, 2, 9, 4]) == (0.5, 0.75)
    assert agree.agreement([1, 2], [1, 2]) == (1.0, 1.0)
    assert agree.agreement([1, 2], [5, 2]) == (0.0, 0.5)


def test_agree_is_perfect_for_full_attention_and_bounded_for_a_policy(tiny, tiny_cal):
    text = " ".join(["the water was long and the people made it"] * 60)
    full = agree.run_agree(tiny, "full", None, tokens=80, gen=24, samples=2, text=text, interval=INTERVAL)
    assert [(r["metric"], r["value"]) for r in full] == [("prefix", 1.0), ("overall", 1.0)]
    got = agree.run_agree(tiny, "tri", 48, tokens=80, gen=24, samples=2, text=text, interval=INTERVAL,
                               calib=tiny_cal)
    check_rows(full + got, "agree")
    prefix, overall = got[0]["value"], got[1]["value"]
    assert 0.0 <= prefix <= overall <= 1.0


def test_teacher_forced_greedy_equals_free_greedy_up_to_the_first_divergence(tiny):
    prompt = list(np.random.default_rng(2).integers(3, 1500, size=70))
    free, _ = common.greedy(tiny, prompt, 30, "streaming", 48, interval=INTERVAL)
    ref, _ = common.greedy(tiny, prompt, 30, "full", None, interval=INTERVAL)
    forced, fed = common.greedy(tiny, prompt, 30, "streaming", 48, interval=INTERVAL, force=ref)
    assert fed == ref
    k = agree.agreement(ref, forced)[0] * 30
    assert free[:int(k) + 1] == forced[:int(k) + 1]


# -- recall -----------------------------------------------------------------------------

def test_recall_is_one_when_the_budget_covers_every_token_and_the_oracle_bounds_the_others(tiny, tiny_cal):
    text = " ".join(["the water was long and the people made it"] * 60)
    rows = recall.run_recall(tiny, ["full", "tri", "streaming", "random", "snapkv", "oracle"], [40, 1000],
                                  tokens=200, samples=3, queries=8, interval=INTERVAL, calib=tiny_cal, text=text,
                                  snap_window=8, ablations=True)
    check_rows(rows, "recall")
    by = {(r["policy"], r["budget"]): r["value"] for r in rows}
    assert by[("full", None)] == 1.0
    for p in ("tri", "streaming", "random", "snapkv", "oracle", "tri-notrig", "tri-nonorm", "tri-kvmean"):
        assert by[(p, 1000)] == pytest.approx(1.0, abs=1e-6)
        assert 0.0 < by[(p, 40)] < 1.0
    for p in ("tri", "streaming", "random", "tri-notrig", "tri-nonorm", "tri-kvmean"):
        assert by[("oracle", 40)] >= by[(p, 40)] - 1e-6      # same protections, best token set


def test_per_head_choices_bound_the_shared_ones(tiny, tiny_cal):
    """every KV head keeping its own tokens can only help the oracle, and no per-head choice beats
    the per-head oracle; a budget covering the text keeps everything"""
    text = " ".join(["the water was long and the people made it"] * 60)
    rows = recall.run_recall(tiny, ["tri", "oracle", "tri-perhead", "oracle-perhead"], [40, 1000],
                                  tokens=200, samples=3, queries=8, interval=INTERVAL, calib=tiny_cal, text=text)
    check_rows(rows, "recall")
    by = {(r["policy"], r["budget"]): r["value"] for r in rows}
    assert by[("oracle-perhead", 40)] >= by[("oracle", 40)] - 1e-6
    assert by[("oracle-perhead", 40)] >= by[("tri-perhead", 40)] - 1e-6
    assert by[("tri-perhead", 1000)] == pytest.approx(1.0, abs=1e-6)
    assert 0.0 < by[("tri-perhead", 40)] < 1.0


def test_group_scores_z_score_each_query_head_then_take_the_group_max():
    raw = np.array([[1.0, 10.0, 0.0, 5.0], [2.0, 20.0, 1.0, 5.0], [3.0, 0.0, 2.0, 5.0]])
    z = recall.group_scores(raw, 2)
    assert z.shape == (3, 2)
    col = lambda c: (c - c.mean()) / max(c.std(), 1e-6)
    np.testing.assert_allclose(z[:, 0], np.maximum(col(raw[:, 0]), col(raw[:, 1])))
    np.testing.assert_allclose(z[:, 1], np.maximum(col(raw[:, 2]), 0.0))   # a constant head z-scores to 0


def test_recall_keep_sets_are_the_core_selection(tiny, tiny_cal):
    """the captured keys reproduce the core's choice; snapkv keeps its observation window"""
    from pytriatt.core import Calibration, select
    m = common.load_model(tiny)
    toks = list(np.random.default_rng(4).integers(3, 1500, size=120))
    K, Q, idx = recall.capture_qk(m, toks, range(90, 120))
    info = recall.attention_layers(tiny)
    assert sorted(K) == list(range(info["n_layer"])) and K[0].shape == (120, info["n_head_kv"], info["head_dim"])
    assert Q[0].shape == (30, info["n_head"], info["head_dim"]) and np.abs(Q[0]).sum() > 0
    pos = np.arange(101)
    snap = recall.snapkv_scores(K, Q, idx, info["layers"], 100, info, snap_window=8)
    assert len(snap) == len(info["layers"]) and snap[0].shape == (101, info["n_head"])
    # each query's attention sums to 1 over the candidates: max-pooling can only raise a token's mass
    assert np.all(snap[0].sum(axis=0) >= 8 - 1e-3)
    keep = select("tri", snap, pos, 100, 40, 4, 1, n_head_kv=info["n_head_kv"])
    assert keep.size == 40 and set(range(4)) <= set(keep) and 100 in keep
    cal = Calibration.from_gguf(tiny_cal)
    raw = [cal.score(l, K[l][:101], pos, 100) for l in info["layers"]]
    assert select("tri", raw, pos, 100, 40, 4, 1, n_head_kv=cal.n_head_kv).size == 40


# -- evaluate() and the command line ----------------------------------------------------

def test_evaluate_runs_full_once_and_every_policy_at_every_budget(tiny, tiny_cal):
    rows = runner.evaluate(tiny, "dfs", ["full", "tri", "streaming"], [48, 64], progress=False, calib=tiny_cal,
                             nodes=6, samples=1, interval=INTERVAL)
    check_rows(rows, "dfs")
    acc = [(r["policy"], r["budget"]) for r in rows if r["metric"] == "acc"]
    assert acc == [("full", None), ("tri", 48), ("tri", 64), ("streaming", 48), ("streaming", 64)]


def test_unknown_policies_and_budgets_below_the_protected_tokens_are_refused(tiny):
    with pytest.raises(EvalError, match=r"unknown KV policy 'h2o' \(known: full, tri"):
        runner.evaluate(tiny, "nll", ["h2o"], [64], progress=False)
    with pytest.raises(EvalError, match="which only tri and snapkv do.*e.g. tri@head"):
        runner.evaluate(tiny, "nll", ["streaming@head"], [64], progress=False)
    # libllama's rule (pytriatt.policy.validate): sink + window must fit in the budget
    with pytest.raises(EvalError, match="policy streaming, budget 4: --sink 4 \\+ --window 1 exceed --budget 4"):
        runner.evaluate(tiny, "nll", ["streaming"], [4], progress=False)
    with pytest.raises(EvalError, match=r"/fast is not a preset \(paper\) or w=N / h=N"):
        runner.evaluate(tiny, "nll", ["tri/fast"], [64], progress=False)


def test_policy_settings_name_a_preset_or_window_and_horizon():
    from pytriatt.evaluation.common import policy_settings, split_policy
    assert policy_settings("tri/paper") == {"window": 1, "horizon": 65536}
    assert policy_settings("tri/w=32/h=1024@head") == {"window": 32, "horizon": 1024}
    assert policy_settings("tri") == {} and split_policy("tri/paper@layer") == ("tri", "layer")


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "pytriatt", "eval", *map(str, args)], capture_output=True, text=True)


def test_the_command_prints_rows_as_json_and_draws_the_plot(tiny, tmp_path):
    text = tmp_path / "t.txt"
    text.write_text(" ".join(["the water was long and the people made it"] * 60))
    png = tmp_path / "nll.png"
    p = _cli(tiny, "--task", "nll", "--policies", "full,streaming,random", "--budgets", "48,64", "--tokens", 160,
             "--interval", INTERVAL, "--text", text, "--json", "--plot", png, "-q")
    assert p.returncode == 0, p.stderr
    rows = json.loads(p.stdout)
    check_rows(rows, "nll")
    assert {(r["policy"], r["budget"]) for r in rows if r["metric"] == "ppl_ratio"} == {
        ("full", None), ("streaming", 48), ("streaming", 64), ("random", 48), ("random", 64)}
    assert png.read_bytes()[:4] == b"\x89PNG"
    table = runner.format_table(rows, ["ppl_ratio"])
    assert "| policy | budget 48 | budget 64 | all tokens (no budget) |" in table and "| streaming |" in table


@pytest.mark.parametrize("args, message", [
    (["--task", "nll", "--budgets", "a,b"], "--budgets takes comma-separated whole numbers"),
    (["--task", "nll", "--budgets", "0"], "--budgets takes positive numbers"),
    (["--task", "nll", "--samples", "3"], "nll reads one text"),
    (["--task", "dfs", "--tokens", "100"], "dfs sizes its problems with --nodes"),
    (["--task", "passkey", "--text", "x.txt"], "--text applies to nll, agree and recall"),
    (["--task", "nll", "--text", "/nonexistent.txt"], "no such file"),
    (["--task", "nll", "--plot", "/nonexistent/dir/x.png"], "does not exist"),
])
def test_bad_input_gets_one_line_saying_what_to_do(tiny, args, message):
    p = _cli(tiny, *args, "-q")
    assert p.returncode == 2
    assert message in p.stderr and "Traceback" not in p.stderr and len(p.stderr.strip().splitlines()) == 1


def test_a_text_too_short_for_the_task_is_refused(tiny, tmp_path):
    text = tmp_path / "short.txt"
    text.write_text("only a few words here")
    p = _cli(tiny, "--task", "nll", "--tokens", "500", "--policies", "full", "--text", text, "-q")
    assert p.returncode == 2 and "tokens, 500 needed" in p.stderr


# -- real models: one small run per task ------------------------------------------------

@pytest.fixture(scope="module")
def smollm2_cal(smollm2_path, tmp_path_factory):
    from pytriatt import gguf_io
    from pytriatt.calibrate import calibrate
    cal, _ = calibrate(smollm2_path, max_tokens=2048, n_ctx=1024, progress=False)
    dst = tmp_path_factory.mktemp("cal") / "smollm2.tri.gguf"
    gguf_io.write_with_metadata(smollm2_path, dst, cal.gguf_fields())
    return dst


@pytest.mark.real
def test_real_nll_full_is_fluent_and_a_budget_beyond_the_text_changes_nothing(smollm2_path, smollm2_cal, capsys):
    rows = runner.evaluate(smollm2_path, "nll", ["full", "tri", "streaming"], [64, 1024], progress=False,
                             calib=smollm2_cal, tokens=384, interval=64)
    check_rows(rows, "nll")
    by = {(r["policy"], r["budget"], r["metric"]): r["value"] for r in rows}
    assert by[("full", None, "nll")] < 3.5                       # English prose, not noise
    assert by[("streaming", 64, "ppl_ratio")] > 1.0               # forgetting 300 tokens of context costs
    # 384 tokens never exceed 1024 + 64: no round can happen, so evaluate() skips that budget and says so ...
    assert not any(r["budget"] == 1024 for r in rows) and "budget 1024 skipped" in capsys.readouterr().err
    # ... and run anyway, such a budget changes nothing
    _, full = nll.run_nll(smollm2_path, "full", None, tokens=384, interval=64)
    for p in ("tri", "streaming"):
        r, _ = nll.run_nll(smollm2_path, p, 1024, tokens=384, interval=64, reference=full, calib=smollm2_cal)
        assert next(x["value"] for x in r if x["metric"] == "ppl_ratio") == 1.0


@pytest.mark.real
def test_real_passkey_is_found_with_full_attention_and_lost_once_streaming_evicts_it(smollm2_path):
    full = passkey.run_passkey(smollm2_path, "full", None, tokens=320, depths=[0.1], samples=2, interval=64)
    gone = passkey.run_passkey(smollm2_path, "streaming", 64, tokens=320, depths=[0.1], samples=2, interval=64)
    check_rows(full + gone, "passkey")
    assert full[0]["value"] == 1.0 and gone[0]["value"] == 0.0


@pytest.mark.real
def test_real_agree_full_against_tri(smollm2_path, smollm2_cal):
    rows = agree.run_agree(smollm2_path, "tri", 64, tokens=192, gen=48, samples=1, interval=64,
                                calib=smollm2_cal)
    check_rows(rows, "agree")
    assert 0.0 <= rows[0]["value"] <= rows[1]["value"] <= 1.0 and rows[1]["value"] > 0.3


@pytest.mark.real
def test_real_dfs_runs_with_eviction(smollm2_path):
    rows = runner.evaluate(smollm2_path, "dfs", ["full", "streaming"], [64], progress=False, nodes=8, samples=1,
                             interval=32)
    check_rows(rows, "dfs")
    assert {r["metric"] for r in rows} >= {"acc", "acc_enter", "acc_return"}


@pytest.mark.real
def test_real_recall_orders_the_oracle_first(smollm2_path, smollm2_cal):
    rows = recall.run_recall(smollm2_path, ["full", "tri", "streaming", "random", "oracle"], [64, 2048],
                                  tokens=384, samples=2, queries=8, interval=64, calib=smollm2_cal)
    check_rows(rows, "recall")
    by = {(r["policy"], r["budget"]): r["value"] for r in rows}
    for p in ("tri", "streaming", "random"):
        assert 0.0 < by[(p, 64)] <= by[("oracle", 64)] + 1e-6 and by[(p, 2048)] == pytest.approx(1.0)
