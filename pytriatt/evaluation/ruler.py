"""The ruler task of `pytriatt eval`: RULER's synthetic retrieval and aggregation categories (Hsieh et al.
2024, "RULER: What's the real context size of your long-context language models?"), on natural prose,
sized to the model's tokenizer, answered by greedy generation while the policy evicts inside llama_decode.

Categories, with RULER's templates (needle, question, answer prefix) and defaults:

    niah_single      one needle "One of the special magic numbers for {key} is: {value}." in the haystack
    niah_multikey    the needle and 3 distractor needles with other keys (and other values)
    niah_multivalue  4 needles with the same key, each its own value: all 4 values are the answer
    niah_multiquery  4 needles with 4 keys, all asked at once: all 4 values are the answer
    vt               variable tracking: a chain "VAR AAAAA = 12345.", "VAR BBBBB = VAR AAAAA.", ... (4 hops)
                     scattered in the haystack, after one worked example; answer: every variable of the chain
    cwe              common-words extraction: a numbered list of words, 10 of them 30 times each and the others
                     3 times (6 and 1 below 4096 tokens, as RULER), after one worked example; answer: the 10
                     most common words

The haystack is consecutive paragraphs of the evaluation text (pytriatt.corpus.eval_text, Python's docs, or
--text), from a random paragraph on; needles go in at sentence boundaries, each at a depth (share of the
haystack's sentences before it, as RULER places them) drawn without replacement from `depths` (default
0.25, 0.30, ..., 0.75). Keys are two words of the corpus joined by "-" (or uuids), values random 7-digit
numbers (5-digit in vt, as RULER), words of cwe the corpus's; all drawn from numpy Generators seeded with
(seed, category, sample), so every run asks the same prompts. A prompt is as many whole sentences (cwe: list
entries) as keep it within `tokens` tokens of the model's tokenizer, BOS included.

Scoring is RULER's string_match_all: an answer counts as found when it appears (case-insensitive) anywhere
in the greedy output; a prompt scores the fraction of its answers found.
"""

from __future__ import annotations

import functools
import re
import uuid
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

from .common import (EvalError, greedy, load_model, model_detokenize, position_mode, read_text, result_name, row,
                     say, wilson)

CATEGORIES = ("niah_single", "niah_multikey", "niah_multivalue", "niah_multiquery", "vt", "cwe")
DEFAULT_DEPTHS = tuple(round(0.25 + 0.05 * i, 2) for i in range(11))
# tokens generated per category (RULER: 128 for niah, 30 for vt, 120 for cwe; one answer needs fewer)
GEN = {"niah_single": 32, "niah_multikey": 32, "niah_multivalue": 64, "niah_multiquery": 64, "vt": 32, "cwe": 120}
NEEDLES = 4          # RULER's num_needle_k (multikey), num_needle_v (multivalue), num_needle_q (multiquery)
VT_HOPS = 4          # RULER's num_hops: the chain has 5 variables
CWE_COMMON = 10      # RULER's num_cw

NIAH_INTRO = ("Some special magic numbers are hidden within the following text. Make sure to memorize it. "
              "I will quiz you about the numbers afterwards.\n")
NIAH_NEEDLE = "One of the special magic numbers for {key} is: {value}."
NIAH_QUESTION = ("\nWhat are all the special magic numbers for {query} mentioned in the provided text?"
                 " The special magic numbers for {query} mentioned in the provided text are")
VT_INTRO = "Memorize and track the chain(s) of variable assignment hidden in the following text.\n\n"
VT_QUESTION = ("\nQuestion: Find all variables that are assigned the value {value} in the text above."
               " Answer: According to the chain(s) of variable assignment in the text above, {n} variables are "
               "assigned the value {value}, they are:")
# (RULER's answer prefixes end in ": " here and there; a trailing space tokenizes badly, so none does here)
CWE_INTRO = ("Below is a numbered list of words. In these words, some appear more often than others. "
             "Memorize the ones that appear most often.\n")
CWE_QUESTION = ("\nQuestion: What are the {n} most common words in the above list?"
                " Answer: The top {n} words that appear most often in the list are:")

Count = Callable[[str], int]


def word_count(text: str) -> int:
    """The tokenizer-free length of a text: its whitespace-separated words."""
    return len(text.split())


def token_count(model) -> Count:
    """The length of a text in the model's tokens, BOS included (what a prompt is sized with)."""
    return lambda text: len(model.tokenize(text, add_bos=True))


@dataclass
class RulerPrompt:
    """One prompt: its text (instructions, context, question, answer prefix), the answers to find in the
    output, where each needle / chain statement was inserted (character offset in `text` and the sentence),
    and what the category generated (`facts`: keys and values, distractors, chains, word counts...)."""
    category: str
    text: str
    answers: Tuple[str, ...]
    inserts: Tuple[Tuple[int, str], ...] = ()
    facts: dict = field(default_factory=dict)


def score(output: str, answers: Sequence[str]) -> int:
    """How many of the answers appear in the output (case-insensitive substring: RULER's string_match_all
    before it divides by the number of answers)."""
    out = output.lower()
    return sum(a.lower() in out for a in answers)


# -- the corpus: sentences and words ------------------------------------------------------

# a sentence ends at . ! ? (and closing quotes or brackets) before whitespace and no lowercase letter
# ("e.g. the" goes on) and not after a digit ("2. "), or at a blank line; a piece is a sentence with the
# whitespace after it
_BOUNDARY = re.compile(r"(?<![0-9])[.!?][\"')\]]*\s+(?![a-z])|\n[ \t]*\n\s*")
LONG_PIECE = 400
_PARAGRAPH = re.compile(r"\n[ \t]*\n\s*")
_WORD = re.compile(r"(?<![A-Za-z_.\-])[a-z]{4,12}(?![A-Za-z_\-(])")


def pieces(text: str, start: int, n_chars: int) -> List[str]:
    """The whole sentences of text[start:start + n_chars], each with the whitespace after it; joined they
    are that text up to its last sentence boundary."""
    region = text[start:start + n_chars]
    out, prev = [], 0
    for m in _BOUNDARY.finditer(region):
        if m.end() >= len(region):
            break
        if m.end() > prev:
            piece = region[prev:m.end()]
            # a long piece (a code block, a table) is cut at its line ends, so that a prompt can end near
            # the length asked for
            out.extend(re.findall(r"[^\n]*\n|[^\n]+$", piece) if len(piece) > LONG_PIECE else [piece])
            prev = m.end()
    return out


@functools.lru_cache(maxsize=4)
def word_pool(text: str) -> Tuple[str, ...]:
    """The words keys and cwe lists are made of: the lowercase words of 4-12 letters of the text and of
    Python's docs (pytriatt.corpus.default_text), sorted."""
    from ..corpus import default_text
    return tuple(sorted(set(_WORD.findall(text)) | set(_WORD.findall(default_text()))))


def _paragraph_start(text: str, rng: np.random.Generator, n_chars: int) -> int:
    """A random paragraph start with n_chars of text after it (0 when none has)."""
    starts = [0] + [m.end() for m in _PARAGRAPH.finditer(text)]
    ok = [s for s in starts if s + n_chars <= len(text)]
    return int(ok[int(rng.integers(len(ok)))]) if ok else 0


def _draw_depths(rng: np.random.Generator, depths: Sequence[float], n: int) -> np.ndarray:
    """n depths out of the grid, without replacement while it has enough (RULER's random.sample)."""
    grid = np.asarray(depths, dtype=np.float64)
    if grid.size == 0 or grid.min() < 0 or grid.max() > 1:
        raise EvalError(f"ruler depths must be within 0..1, got {list(depths)}")
    return rng.choice(grid, size=n, replace=n > grid.size)


def _assemble(head: str, hay: Sequence[str], placed: Sequence[Tuple[float, int, str]], tail: str):
    """head + the haystack with each (depth, order, sentence) inserted before sentence int(len(hay) * depth)
    (ties in `order`) + tail; also the character offset of each inserted sentence, by its order."""
    k = len(hay)
    at = sorted((min(k, int(k * d)), order, s) for d, order, s in placed)
    parts, pos, offsets, j = [head], len(head), {}, 0
    for i in range(k + 1):
        while j < len(at) and at[j][0] == i:
            offsets[at[j][1]] = pos
            parts.append(at[j][2] + " ")
            pos += len(at[j][2]) + 1
            j += 1
        if i < k:
            parts.append(hay[i])
            pos += len(hay[i])
    return "".join(parts).rstrip() + tail, offsets


def haystack_prompt(text: str, n_tokens: int, rng: np.random.Generator, head: str, tail: str,
                    groups: Sequence[Sequence[str]], *, count: Count = word_count,
                    depths: Sequence[float] = DEFAULT_DEPTHS, what: str = "ruler"):
    """A prompt of at most n_tokens (by `count`): head, consecutive sentences of the text from a random
    paragraph on with the sentences of `groups` inserted at sentence boundaries, then tail. Each group's
    sentences keep their order (a variable is assigned before it is used); every inserted sentence gets a
    depth drawn from `depths`. Returns (prompt, [(offset, sentence) per inserted sentence, in group order],
    the depths)."""
    flat = [s for g in groups for s in g]
    drawn = _draw_depths(rng, depths, len(flat))
    placed, i = [], 0
    for g in groups:                       # each group's depths ascending, in its own order
        for d, s in zip(sorted(drawn[i:i + len(g)]), g):
            placed.append((float(d), i, s))
            i += 1
    fixed = head + tail + " ".join(flat)
    if count(fixed) >= n_tokens:
        raise EvalError(f"a {what} prompt needs more than {n_tokens} tokens: give more --tokens")
    sample = text[:20000]
    per_char = max(count(sample), 1) / max(len(sample), 1)
    n_chars = int(1.3 * n_tokens / per_char) + 2000
    start = _paragraph_start(text, rng, n_chars)

    def build(k):
        return _assemble(head, hay[:k], placed, tail)

    while True:
        hay = pieces(text, start, n_chars)
        if count(build(len(hay))[0]) > n_tokens:
            break
        if start + n_chars < len(text):
            n_chars *= 2
        elif start > 0:
            start = 0
        else:
            raise EvalError(f"the text has too few sentences for a {what} prompt of {n_tokens} tokens: give a "
                            "longer --text or fewer --tokens")
    prompt, offsets = build(_largest_fitting(build, count, 0, len(hay), n_tokens))
    return prompt, [(offsets[j], s) for j, (_, _, s) in enumerate(placed)], [d for d, _, _ in placed]


def _largest_fitting(build, count, lo: int, hi: int, n_tokens: int) -> int:
    """The largest k in [lo, hi) whose prompt build(k)[0] is at most n_tokens long, by bisection
    (build(lo) fits; build(hi) does not, or hi is past the last k)."""
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if count(build(mid)[0]) <= n_tokens:
            lo = mid
        else:
            hi = mid
    return lo


# -- the categories ----------------------------------------------------------------------

def _values(rng: np.random.Generator, n: int, digits: int) -> List[str]:
    out: List[str] = []
    while len(out) < n:
        v = str(int(rng.integers(10 ** (digits - 1), 10 ** digits)))
        if v not in out:
            out.append(v)
    return out


def _keys(rng: np.random.Generator, n: int, words: Sequence[str], kind: str) -> List[str]:
    out: List[str] = []
    while len(out) < n:
        if kind == "uuids":
            k = str(uuid.UUID(bytes=rng.bytes(16), version=4))
        else:
            a, b = rng.choice(len(words), size=2, replace=False)
            k = f"{words[a]}-{words[b]}"
        if k not in out:
            out.append(k)
    return out


def _unique(prompt: str, strings: Sequence[str], times: int = 1) -> bool:
    return all(prompt.count(s) == times for s in strings)


def niah_prompt(category: str, text: str, n_tokens: int, rng: np.random.Generator, *, count: Count = word_count,
                depths: Sequence[float] = DEFAULT_DEPTHS, keys: str = "words", needles: int = NEEDLES) -> RulerPrompt:
    """A needle-in-a-haystack prompt of RULER: niah_single (one needle), niah_multikey (the needle and
    needles - 1 distractors with other keys), niah_multivalue (needles values for one key),
    niah_multiquery (needles keys, all asked)."""
    shape = {"niah_single": (1, 1, 1), "niah_multikey": (needles, 1, 1),
             "niah_multivalue": (1, needles, 1), "niah_multiquery": (needles, 1, needles)}
    if category not in shape:
        raise EvalError(f"unknown niah category {category!r}")
    n_keys, n_values, n_query = shape[category]
    words = word_pool(text)
    for _ in range(20):          # drawn again in the rare case a value is already in the text
        ks = _keys(rng, n_keys, words, keys)
        vals = _values(rng, n_keys * n_values, 7)
        values = {k: vals[i * n_values:(i + 1) * n_values] for i, k in enumerate(ks)}
        query = [ks[int(i)] for i in sorted(rng.choice(n_keys, size=n_query, replace=False))]
        order = rng.permutation(n_keys * n_values)
        pairs = [(k, v) for k in ks for v in values[k]]
        pairs = [pairs[int(i)] for i in order]
        q = query[0] if len(query) == 1 else ", ".join(query[:-1]) + ", and " + query[-1]
        prompt, inserts, ds = haystack_prompt(
            text, n_tokens, rng, NIAH_INTRO, NIAH_QUESTION.format(query=q),
            [[NIAH_NEEDLE.format(key=k, value=v)] for k, v in pairs], count=count, depths=depths, what=category)
        if _unique(prompt, vals):
            break
    answers = tuple(v for k in query for v in values[k])
    return RulerPrompt(category, prompt, answers, tuple(inserts), dict(
        keys=ks, values=values, query=query, needles=pairs, depths=ds,
        distractors=[(k, v) for k, v in pairs if k not in query]))


def vt_prompt(text: str, n_tokens: int, rng: np.random.Generator, *, count: Count = word_count,
              depths: Sequence[float] = DEFAULT_DEPTHS, hops: int = VT_HOPS, chains: int = 1) -> RulerPrompt:
    """RULER's variable tracking: `chains` chains of hops + 1 variables ("VAR A = 12345.", "VAR B = VAR A.",
    ...) in the haystack; the first chain's value is asked. A worked example (its own chain in a few
    sentences of the text) comes first, as RULER's one-shot prompt, where it takes at most half the length."""
    n_vars = hops + 1
    for _ in range(20):
        names: List[str] = []
        while len(names) < n_vars * (chains + 1):
            v = "".join(chr(65 + int(c)) for c in rng.integers(0, 26, size=5))
            if v not in names:
                names.append(v)
        vals = _values(rng, chains + 1, 5)
        chain_vars = [names[i * n_vars:(i + 1) * n_vars] for i in range(chains + 1)]

        def statements(vs, value):
            return [f"VAR {vs[0]} = {value}."] + [f"VAR {vs[j + 1]} = VAR {vs[j]}." for j in range(hops)]

        # the example: its chain evenly through a few sentences (about 500 characters) of another passage
        ex_vars, ex_value = chain_vars[-1], vals[-1]
        ex_hay = []
        for piece in pieces(text, _paragraph_start(text, rng, 4000), 4000):
            if ex_hay and sum(map(len, ex_hay)) + len(piece) > 500:
                break
            ex_hay.append(piece)
        ex_placed = [(j / n_vars, j, s) for j, s in enumerate(statements(ex_vars, ex_value))]
        ex_context, _ = _assemble("", ex_hay, ex_placed, "")
        example = (VT_INTRO + ex_context + VT_QUESTION.format(value=ex_value, n=n_vars) + " "
                   + " ".join(ex_vars) + "\n\n")
        groups = [statements(chain_vars[c], vals[c]) for c in range(chains)]
        if count(example) > n_tokens // 2:      # a short prompt goes without the example
            example = ""
        prompt, inserts, ds = haystack_prompt(
            text, n_tokens, rng, example + VT_INTRO, VT_QUESTION.format(value=vals[0], n=n_vars), groups,
            count=count, depths=depths, what="vt")
        # every variable defined once (and used once by the next), the asked value only in its statement
        # and the question, no variable or value of the chains elsewhere in the text
        body = prompt[len(example):]
        if all(body.count(v) == 1 + (j < hops) for vs in chain_vars[:chains] for j, v in enumerate(vs)) \
                and body.count(vals[0]) == 3 and _unique(body, vals[1:chains]):
            break
    return RulerPrompt("vt", prompt, tuple(chain_vars[0]), tuple(inserts), dict(
        value=vals[0], chains=[dict(value=vals[c], variables=chain_vars[c]) for c in range(chains)],
        example=dict(value=ex_value, variables=ex_vars) if example else None, context_start=len(example),
        depths=ds))


def _word_list(words: Sequence[str], n_common: int, freq_common: int, freq_rare: int, seed: int) -> List[str]:
    out = list(words[:n_common]) * freq_common + list(words[n_common:]) * freq_rare
    return [out[int(i)] for i in np.random.default_rng(seed).permutation(len(out))]


def _numbered(words: Sequence[str]) -> str:
    return " ".join(f"{i + 1}. {w}" for i, w in enumerate(words))


def cwe_prompt(text: str, n_tokens: int, rng: np.random.Generator, *, count: Count = word_count,
               n_common: int = CWE_COMMON) -> RulerPrompt:
    """RULER's common-words extraction: a numbered list in which n_common words appear freq_common times
    and as many other words as fit the length freq_rare times, shuffled, after a worked example with a
    short list. (freq_common, freq_rare) is RULER's (30, 3), (6, 1) below 4096 tokens; where even that
    does not fit, freq_common drops (to freq_rare + 2 at least), then the example goes."""
    words = word_pool(text)
    if n_tokens < 4096:
        ex_shape, freq = (20, 3, 1), (6, 1)
    else:
        ex_shape, freq = (40, 10, 3), (30, 3)
    perm = [words[int(i)] for i in rng.permutation(len(words))]
    ex_words, pool = perm[:ex_shape[0]], perm[ex_shape[0]:]
    ex_seed, seed = (int(x) for x in rng.integers(0, 2 ** 62, size=2))
    ex_list = _word_list(ex_words, n_common, ex_shape[1], ex_shape[2], ex_seed)
    example = (CWE_INTRO + _numbered(ex_list) + CWE_QUESTION.format(n=n_common) + " "
               + _numbered(ex_words[:n_common]) + "\n\n")
    question = CWE_QUESTION.format(n=n_common)
    tries = [(example, fc, freq[1]) for fc in range(freq[0], freq[1] + 1, -1)] + [("", freq[1] + 2, freq[1])]
    for ex, fc, fr in tries:
        def build(n_words):
            lst = _word_list(pool[:n_words], n_common, fc, fr, seed)
            return ex + CWE_INTRO + _numbered(lst) + question, lst

        lo = 2 * n_common
        if count(build(lo)[0]) > n_tokens:
            continue
        hi = len(pool) + 1
        if count(build(len(pool))[0]) <= n_tokens:
            prompt, lst = build(len(pool))
            if count(prompt) < 0.9 * n_tokens:
                raise EvalError(f"cwe: {len(pool)} words are not enough for a list of {n_tokens} tokens: give "
                                "fewer --tokens or leave cwe out of --categories")
            lo = hi = len(pool)
        prompt, lst = build(_largest_fitting(build, count, lo, hi, n_tokens))
        start = len(ex) + len(CWE_INTRO)
        return RulerPrompt("cwe", prompt, tuple(pool[:n_common]), (), dict(
            counts=dict(Counter(lst)), freq=(fc, fr), list_start=start, list_end=start + len(_numbered(lst)),
            example=bool(ex)))
    raise EvalError(f"a cwe prompt needs more than {n_tokens} tokens: give more --tokens")


def ruler_prompt(category: str, text: str, n_tokens: int, seed: int, sample: int, *, count: Count = word_count,
                 depths: Sequence[float] = DEFAULT_DEPTHS) -> RulerPrompt:
    """Prompt `sample` of a category: the same for the same (seed, category, sample, text, tokens, count)."""
    if category not in CATEGORIES:
        raise EvalError(f"unknown ruler category {category!r} (known: {', '.join(CATEGORIES)})")
    rng = np.random.default_rng([seed, CATEGORIES.index(category), sample])
    if category == "vt":
        return vt_prompt(text, n_tokens, rng, count=count, depths=depths)
    if category == "cwe":
        return cwe_prompt(text, n_tokens, rng, count=count)
    return niah_prompt(category, text, n_tokens, rng, count=count, depths=depths)


# -- running -----------------------------------------------------------------------------

_prompt_cache: Dict[tuple, RulerPrompt] = {}


def ruler_prompts(model, category: str, text: str, n_tokens: int, samples: int, seed: int,
                  depths: Sequence[float] = DEFAULT_DEPTHS) -> List[RulerPrompt]:
    """The category's `samples` prompts sized with the model's tokenizer (made once per process)."""
    out = []
    for s in range(samples):
        key = (str(model.path), category, hash(text), len(text), n_tokens, seed, s, tuple(depths))
        p = _prompt_cache.get(key)
        if p is None:
            p = _prompt_cache[key] = ruler_prompt(category, text, n_tokens, seed, s, count=token_count(model),
                                                  depths=depths)
        out.append(p)
    return out


def run_ruler(model_path, policy: str, budget: Optional[int], *, tokens: int = 4096, samples: int = 4,
              categories: Sequence[str] = CATEGORIES, depths: Sequence[float] = DEFAULT_DEPTHS,
              text: Optional[str] = None, gen: Optional[int] = None, interval: int = 128, seed: int = 0,
              progress: bool = False, **kw) -> List[dict]:
    """RULER's categories on prompts of `tokens` tokens, `samples` prompts each, answered greedily (up to
    `gen` tokens, default GEN's per category) under the policy.

    acc_<category>: the share of the category's answers (needle values, variables, common words) found in
    the outputs; n counts answers, not prompts (samples x answers per prompt: 1 for niah_single and
    niah_multikey, 4 for niah_multivalue and niah_multiquery, 5 for vt, 10 for cwe), with a Wilson 95%
    interval over them (the answers of one prompt are not independent: the interval is optimistic).
    acc: RULER's score, the mean of the categories' shares (each weighs the same); n counts prompts,
    no interval."""
    if not categories:
        raise EvalError("ruler needs at least one category")
    bad = [c for c in categories if c not in CATEGORIES]
    if bad:
        raise EvalError(f"unknown ruler category {bad[0]!r} (known: {', '.join(CATEGORIES)})")
    if tokens < 1 or samples < 1:
        raise EvalError("ruler needs positive --tokens and --samples")
    model = load_model(model_path)
    name, position = result_name(model, kw), position_mode(policy, kw)
    text = text if text is not None else read_text(None)
    eog = [t for t in (model.lc.llama_vocab_eos(model.vocab), model.lc.llama_vocab_eot(model.vocab)) if t >= 0]
    rows, shares = [], []
    for cat in categories:
        hits = total = 0
        for p in ruler_prompts(model, cat, text, tokens, samples, seed, depths):
            prompt = model.tokenize(p.text, add_bos=True)
            _, out = greedy(model, prompt, gen or GEN[cat], policy, budget, interval=interval, stop=eog, seed=seed,
                            **{k: v for k, v in kw.items() if k != "seed"})
            hits += score(model_detokenize(model, out), p.answers)
            total += len(p.answers)
        shares.append(hits / total)
        say(progress, f"ruler {cat}: {hits}/{total} answers found")
        rows.append(row(name, policy, position, budget, "ruler", total, f"acc_{cat}", hits / total,
                        wilson(hits, total)))
    rows.insert(0, row(name, policy, position, budget, "ruler", samples * len(categories), "acc",
                       float(np.mean(shares))))
    return rows
