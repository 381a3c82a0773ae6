"""Specification of the ruler task of `pytriatt eval` (pytriatt/evaluation/ruler.py): RULER's categories
generated on prose, sized to a length, the same for the same seed, scored by string match; then one small
run through evaluate() on the tiny random-weight llama (its answers are noise: only the rows are checked).

Most tests size prompts in words (ruler.word_count), which needs no model."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from collections import Counter

import numpy as np
import pytest

from pytriatt.corpus import eval_text
from pytriatt.evaluation import ruler
from pytriatt.evaluation.common import ROW_KEYS, EvalError, wilson

TEXT = eval_text()
N = 600
NIAH = ("niah_single", "niah_multikey", "niah_multivalue", "niah_multiquery")
NEEDLE = re.compile(r"One of the special magic numbers for (\S+) is: (\d{7})\.")
STATEMENT = re.compile(r"VAR ([A-Z]{5}) = (?:VAR ([A-Z]{5})|(\d+))\.")


def prompt(category, sample=0, seed=0, n=N, **kw):
    return ruler.ruler_prompt(category, TEXT, n, seed, sample, **kw)


def resolve(statements):
    """variable -> the number it holds, following VAR B = VAR A back to a number."""
    direct = {}
    for name, ref, number in statements:
        direct[name] = number or ref
    out = {}
    for name in direct:
        v, seen = direct[name], {name}
        while v in direct and v not in seen:
            seen.add(v)
            v = direct[v]
        out[name] = v
    return out


# -- what each category hides, and where --------------------------------------------------

@pytest.mark.parametrize("category", ruler.CATEGORIES)
def test_every_inserted_sentence_is_where_the_generator_says(category):
    for s in range(3):
        p = prompt(category, s)
        assert p.category == category and p.answers
        for offset, sentence in p.inserts:
            assert p.text[offset:offset + len(sentence)] == sentence
        # needles start sentences: what comes before them is the intro's end or whitespace
        for offset, _ in p.inserts:
            assert p.text[offset - 1] in " \n"


@pytest.mark.parametrize("category", NIAH)
def test_each_niah_answer_is_a_needle_value_of_an_asked_key_and_appears_once(category):
    for s in range(3):
        p = prompt(category, s)
        needles = [NEEDLE.fullmatch(sentence).groups() for _, sentence in p.inserts]
        assert needles == [tuple(kv) for kv in p.facts["needles"]]
        asked = set(p.facts["query"])
        assert sorted(p.answers) == sorted(v for k, v in needles if k in asked)
        for value in p.answers:
            assert p.text.count(value) == 1          # in its needle and nowhere else
        question = p.text[p.text.rindex("\nWhat are all"):]
        assert all(k in question for k in asked)
        assert p.text.endswith("mentioned in the provided text are")
        assert all(0.25 <= d <= 0.75 for d in p.facts["depths"])


def test_niah_single_hides_one_needle():
    p = prompt("niah_single")
    assert len(p.inserts) == 1 and len(p.answers) == 1
    assert p.inserts[0][1] == f"One of the special magic numbers for {p.facts['query'][0]} is: {p.answers[0]}."


def test_niah_multikey_distractors_have_other_keys_and_values_than_the_answer():
    for s in range(4):
        p = prompt("niah_multikey", s)
        (key,), (answer,) = p.facts["query"], p.answers
        distractors = p.facts["distractors"]
        assert len(distractors) == ruler.NEEDLES - 1 and len(p.inserts) == ruler.NEEDLES
        assert all(k != key and v != answer for k, v in distractors)
        assert len({k for k, _ in distractors} | {key}) == ruler.NEEDLES       # every key its own
        assert (key, answer) in p.facts["needles"]


def test_niah_multivalue_asks_for_every_value_of_its_one_key():
    p = prompt("niah_multivalue")
    (key,) = p.facts["query"]
    assert len(p.answers) == ruler.NEEDLES == len(set(p.answers))
    assert sorted(p.answers) == sorted(p.facts["values"][key])
    assert all(k == key for k, _ in p.facts["needles"]) and not p.facts["distractors"]


def test_niah_multiquery_asks_every_key_at_once():
    p = prompt("niah_multiquery")
    assert len(p.facts["query"]) == ruler.NEEDLES == len(p.answers) == len(set(p.answers))
    assert [v for k in p.facts["query"] for v in p.facts["values"][k]] == list(p.answers)
    keys = p.facts["query"]
    assert ", ".join(keys[:-1]) + ", and " + keys[-1] in p.text


def test_depths_place_needles_right_after_the_intro_or_right_before_the_question():
    first = prompt("niah_single", depths=(0.0,))
    assert first.inserts[0][0] == len(ruler.NIAH_INTRO)
    last = prompt("niah_single", depths=(1.0,))
    offset, needle = last.inserts[0]
    assert last.text[offset + len(needle):].startswith("\nWhat are all the special magic numbers")
    with pytest.raises(EvalError, match="within 0..1"):
        prompt("niah_single", depths=(1.5,))


def test_keys_can_be_uuids():
    p = ruler.niah_prompt("niah_multikey", TEXT, N, np.random.default_rng(0), keys="uuids")
    assert all(re.fullmatch(r"[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}", k)
               for k in p.facts["keys"])


@pytest.mark.parametrize("chains", [1, 2])
def test_the_variable_chain_resolves_to_exactly_the_answered_variables(chains):
    p = ruler.vt_prompt(TEXT, N, np.random.default_rng(chains), chains=chains)
    body = p.text[p.facts["context_start"]:]
    statements = STATEMENT.findall(body)
    assert len(statements) == chains * (ruler.VT_HOPS + 1)
    values = resolve(statements)
    assert sorted(v for v, n in values.items() if n == p.facts["value"]) == sorted(p.answers)
    assert len(p.answers) == ruler.VT_HOPS + 1
    # each chain reads in order: a variable is assigned before it is used
    order = [m.group(1) for m in STATEMENT.finditer(body)]
    for c in p.facts["chains"]:
        assert [v for v in order if v in c["variables"]] == c["variables"]
        assert all(values[v] == c["value"] for v in c["variables"])
    assert body.endswith(f"{ruler.VT_HOPS + 1} variables are assigned the value {p.facts['value']}, they are:")
    # the worked example before it answers its own chain
    example = p.text[:p.facts["context_start"]]
    ex = p.facts["example"]
    assert example.rstrip().endswith("they are: " + " ".join(ex["variables"]))
    assert sorted(v for v, n in resolve(STATEMENT.findall(example)).items() if n == ex["value"]) \
        == sorted(ex["variables"])


@pytest.mark.parametrize("n", [N, 5000])
def test_the_common_words_are_the_most_frequent_of_the_list(n):
    p = prompt("cwe", n=n)
    listed = p.text[p.facts["list_start"]:p.facts["list_end"]]
    entries = re.findall(r"(\d+)\. (\w+)", listed)
    assert [int(i) for i, _ in entries] == list(range(1, len(entries) + 1))
    counts = Counter(w for _, w in entries)
    assert counts == p.facts["counts"]
    fc, fr = p.facts["freq"]
    assert fc == (30 if n >= 4096 else 6) and fr == (3 if n >= 4096 else 1)     # RULER's settings
    assert len(p.answers) == ruler.CWE_COMMON
    assert all(counts[w] == fc for w in p.answers)
    assert all(c == fr for w, c in counts.items() if w not in p.answers)
    assert {w for w, _ in counts.most_common(ruler.CWE_COMMON)} == set(p.answers)
    assert min(counts[w] for w in p.answers) > max(c for w, c in counts.items() if w not in p.answers)
    assert len(counts) > 2 * ruler.CWE_COMMON
    assert p.text.endswith("The top 10 words that appear most often in the list are:")


def test_short_prompts_drop_the_worked_example_before_refusing():
    """cwe: RULER's frequencies (6, 1 below 4096 tokens) while they fit, then fewer repeats of the common
    words (3 at least), then no example; vt: no example where it would take over half the prompt."""
    assert prompt("cwe", n=N).facts["freq"] == (6, 1) and prompt("cwe", n=N).facts["example"]
    assert prompt("cwe", n=300).facts["freq"] == (4, 1) and prompt("cwe", n=300).facts["example"]
    small = prompt("cwe", n=200)
    assert small.facts["freq"] == (3, 1) and not small.facts["example"] and ruler.word_count(small.text) <= 200
    assert small.text.count(ruler.CWE_INTRO) == 1
    assert prompt("vt", n=N).facts["example"] and prompt("vt", n=150).facts["example"] is None
    with pytest.raises(EvalError, match="needs more than 100 tokens"):
        prompt("cwe", n=100)
    with pytest.raises(EvalError, match="needs more than 30 tokens"):
        prompt("niah_multiquery", n=30)


# -- length and determinism -------------------------------------------------------------

@pytest.mark.parametrize("n", [300, N, 3000])
@pytest.mark.parametrize("category", ruler.CATEGORIES)
def test_prompts_have_about_the_requested_length(category, n):
    for s in range(2):
        got = ruler.word_count(prompt(category, s, n=n).text)
        assert 0.85 * n <= got <= n


def test_a_text_too_short_is_refused():
    with pytest.raises(EvalError, match="too few sentences"):
        ruler.ruler_prompt("niah_single", TEXT[:3000], 2000, 0, 0)


def test_the_same_seed_asks_the_same_prompts_and_others_differ():
    for category in ruler.CATEGORIES:
        a, b = prompt(category, 1, seed=7), prompt(category, 1, seed=7)
        assert (a.text, a.answers, a.inserts) == (b.text, b.answers, b.inserts)
        assert prompt(category, 1, seed=8).text != a.text
        assert prompt(category, 2, seed=7).text != a.text


def test_the_haystack_is_the_text_itself():
    p = prompt("niah_single")
    offset, needle = p.inserts[0]
    body = p.text[len(ruler.NIAH_INTRO):p.text.rindex("\nWhat are all")]
    without = body.replace(needle + " ", "")
    at = TEXT.find(without)                    # consecutive sentences of the text, nothing repeated
    assert at >= 0 and (at == 0 or TEXT[at - 2:at] == "\n\n" or TEXT[at - 1] == " ")   # from a paragraph on


# -- scoring ----------------------------------------------------------------------------

@pytest.mark.parametrize("output, answers, found", [
    (" 1234567.", ["1234567"], 1),
    (" 1234568 and 7654321", ["1234567"], 0),
    (" 1234567, 2345678 and 9999999", ["1234567", "2345678", "3456789", "4567890"], 2),
    (" APKJY, lwmfu and KPLBU", ["LWMFU", "KPLBU", "EFQRV"], 2),        # case does not matter
    ("", ["word"], 0),
])
def test_an_answer_counts_when_it_appears_in_the_output(output, answers, found):
    assert ruler.score(output, answers) == found


def test_rows_score_answers_found_per_category_with_wilson_intervals(tiny, monkeypatch):
    """Outputs that contain the first half (rounded up) of each prompt's answers score that share; the
    category's n counts answers, acc averages the categories."""
    from pytriatt.evaluation import common

    model = common.load_model(tiny)
    answered = {}
    real = ruler.ruler_prompts

    def prompts(*a, **k):
        out = real(*a, **k)
        answered.update({tuple(model.tokenize(p.text, add_bos=True)): p for p in out})
        return out

    def fake_greedy(model, prompt_tokens, n, policy, budget, **kw):
        p = answered[tuple(prompt_tokens)]
        return [], p.answers[:(len(p.answers) + 1) // 2]

    monkeypatch.setattr(ruler, "ruler_prompts", prompts)
    monkeypatch.setattr(ruler, "greedy", fake_greedy)
    monkeypatch.setattr(ruler, "model_detokenize", lambda m, out: " ".join(out))
    cats = ["niah_single", "niah_multivalue", "vt", "cwe"]
    rows = ruler.run_ruler(model, "full", None, tokens=1000, samples=2, categories=cats, name="tiny")
    by = {r["metric"]: r for r in rows}
    assert [r["metric"] for r in rows] == ["acc"] + [f"acc_{c}" for c in cats]
    expect = {"niah_single": (2, 2), "niah_multivalue": (4, 8), "vt": (6, 10), "cwe": (10, 20)}
    for c, (k, n) in expect.items():
        r = by[f"acc_{c}"]
        assert (r["n"], r["value"]) == (n, k / n) and (r["ci_low"], r["ci_high"]) == pytest.approx(wilson(k, n))
    assert by["acc"]["value"] == pytest.approx(np.mean([k / n for k, n in expect.values()]))
    assert by["acc"]["n"] == 2 * len(cats) and by["acc"]["ci_low"] is None


# -- the tokenizer, evaluate() and the command line ----------------------------------------

def test_prompts_sized_with_the_model_tokenizer_fit_its_token_count(tiny):
    from pytriatt.evaluation import common

    model = common.load_model(tiny)
    for category in ruler.CATEGORIES:
        p = ruler.ruler_prompts(model, category, TEXT, 1000, 1, 0)[0]
        n = len(model.tokenize(p.text, add_bos=True))
        assert 0.85 * 1000 <= n <= 1000, category


def test_ruler_runs_end_to_end_through_evaluate(tiny):
    from pytriatt.evaluation import evaluate

    rows = evaluate(tiny, "ruler", ["full", "streaming"], [64], progress=False, tokens=800, samples=1, gen=4,
                    interval=32)
    assert {(r["policy"], r["budget"]) for r in rows} == {("full", None), ("streaming", 64)}
    for r in rows:
        assert tuple(r) == ROW_KEYS and r["task"] == "ruler" and 0.0 <= r["value"] <= 1.0
        assert r["position"] == (None if r["policy"] == "full" else "gaps")
    metrics = [r["metric"] for r in rows if r["policy"] == "full"]
    assert metrics == ["acc"] + [f"acc_{c}" for c in ruler.CATEGORIES]
    json.dumps(rows)


@pytest.mark.parametrize("args, message", [
    (["--task", "ruler", "--categories", "niah_single,qa"], "--categories takes some of niah_single"),
    (["--task", "passkey", "--categories", "vt"], "--categories applies to ruler"),
    (["--task", "ruler", "--depths", "0.5,2"], "--depths are shares of the haystack"),
])
def test_bad_ruler_options_get_one_line(tiny, args, message):
    p = subprocess.run([sys.executable, "-m", "pytriatt", "eval", str(tiny), *args, "-q"], capture_output=True,
                       text=True)
    assert p.returncode == 2
    assert message in p.stderr and "Traceback" not in p.stderr and len(p.stderr.strip().splitlines()) == 1
