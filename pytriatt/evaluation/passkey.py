"""The passkey task of `pytriatt eval`: retrieve a random key hidden at some depth of a long filler prompt,
generating greedily while the policy evicts."""

from __future__ import annotations

import re
from typing import List, Optional, Sequence, Tuple

import numpy as np

from .common import (EvalError, greedy, load_model, model_detokenize, position_mode, result_name, row, wilson)


PASSKEY_INTRO = ("There is an important pass key hidden inside a lot of irrelevant text. Find it and "
                 "memorize it. I will quiz you about the pass key.\n")
PASSKEY_FILLER = " The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
PASSKEY_NEEDLE = " The pass key is {key}. Remember it. {key} is the pass key."
PASSKEY_QUESTION = "\nWhat is the pass key? The pass key is"


def parse_passkey(text: str) -> Optional[str]:
    """The key a model answered: the first run of digits in its output (digits separated by single
    spaces count as one run: "7 1 4" -> "714"), or None."""
    m = re.search(r"\d(?: ?\d)*", text)
    return m.group(0).replace(" ", "") if m else None


def passkey_prompt(model, n_tokens: int, depth: float, key: str) -> Tuple[List[int], int]:
    """Tokens of a passkey prompt of about n_tokens tokens with the key at relative `depth`
    (0 = right after the instructions, 1 = just before the question); also returns the
    position of the needle's first token."""
    if not 0.0 <= depth <= 1.0:
        raise EvalError(f"passkey depths must be within 0..1, got {depth}")
    intro = model.tokenize(PASSKEY_INTRO, add_bos=True)
    filler = model.tokenize(PASSKEY_FILLER, add_bos=False)
    needle = model.tokenize(PASSKEY_NEEDLE.format(key=key), add_bos=False)
    question = model.tokenize(PASSKEY_QUESTION, add_bos=False)
    n_fill = (n_tokens - len(intro) - len(needle) - len(question)) // len(filler)
    if n_fill < 1:
        raise EvalError(f"a passkey prompt needs more than {n_tokens} tokens")
    before = int(round(depth * n_fill))
    toks = intro + filler * before
    where = len(toks)
    toks += needle + filler * (n_fill - before) + question
    return toks, where


def run_passkey(model_path, policy: str, budget: Optional[int], *, tokens: int = 1024,
                depths: Sequence[float] = (0.1, 0.5, 0.9), samples: int = 5, digits: int = 5,
                interval: int = 128, seed: int = 0, progress: bool = False, **kw) -> List[dict]:
    """Exact-match accuracy of retrieving a random `digits`-digit key hidden at each depth of a
    prompt of `tokens` tokens, over `samples` keys per depth (Wilson 95% intervals)."""
    model = load_model(model_path)
    name, position = result_name(model, kw), position_mode(policy, kw)
    eog = [t for t in (model.lc.llama_vocab_eos(model.vocab), model.lc.llama_vocab_eot(model.vocab)) if t >= 0]
    nl = model.tokenize("\n", add_bos=False)
    stop = eog + nl[-1:]
    rows, hits_all = [], 0
    for d in depths:
        hits = 0
        for s in range(samples):
            rng = np.random.default_rng([seed, s, int(round(d * 1000))])
            key = "".join(str(x) for x in rng.integers(0, 10, size=digits))
            if key[0] == "0":
                key = str(1 + int(rng.integers(0, 9))) + key[1:]
            prompt, _ = passkey_prompt(model, tokens, d, key)
            _, out = greedy(model, prompt, digits + 4, policy, budget, interval=interval, stop=stop,
                            seed=seed, **{k: v for k, v in kw.items() if k != "seed"})
            text = model_detokenize(model, out)
            hits += parse_passkey(text) == key
        hits_all += hits
        rows.append(row(name, policy, position, budget, "passkey", samples, f"acc@depth{d:g}", hits / samples,
                        wilson(hits, samples)))
    n = samples * len(depths)
    rows.insert(0, row(name, policy, position, budget, "passkey", n, "acc", hits_all / n, wilson(hits_all, n)))
    return rows
