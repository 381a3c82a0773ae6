"""The agree task of `pytriatt eval`: how long and how often greedy generation under the policy agrees with
full attention's."""

from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from .common import (EvalError, clip01, greedy, load_model, mean_ci, position_mode, read_text, result_name, row)


_reference_cache: Dict[tuple, List[int]] = {}


def agree_prompts(model, text: str, n_prompts: int, n_tokens: int) -> List[List[int]]:
    """n_prompts prompts of n_tokens tokens each: consecutive, non-overlapping pieces of the text."""
    need = n_prompts * n_tokens
    chars = 8 * need + 64
    while True:   # tokenize a prefix only, growing it while too short
        toks = model.tokenize(text[:chars], add_bos=False)
        if len(toks) > need or chars >= len(text):
            break
        chars *= 2
    if len(toks) < need:
        raise EvalError(f"the text has {len(toks)} tokens; {n_prompts} prompts of {n_tokens} need {need}")
    bos = model.lc.llama_vocab_bos(model.vocab)
    add_bos = bool(model.lc.llama_vocab_get_add_bos(model.vocab)) and bos >= 0
    out = []
    for i in range(n_prompts):
        piece = toks[i * n_tokens:(i + 1) * n_tokens]
        out.append(([bos] + piece[:-1]) if add_bos else piece)
    return out


def agreement(reference: Sequence[int], preds: Sequence[int]) -> Tuple[float, float]:
    """(share of steps before the first divergence, share of steps that agree)."""
    n = len(reference)
    if n == 0:
        return 1.0, 1.0
    same = np.asarray(preds[:n]) == np.asarray(reference)
    first = int(np.argmin(same)) if not same.all() else n
    return first / n, float(same.mean())


def run_agree(model_path, policy: str, budget: Optional[int], *, tokens: int = 512, gen: int = 128,
              samples: int = 4, text: Optional[str] = None, text_file=None, interval: int = 128,
              progress: bool = False, **kw) -> List[dict]:
    """Greedy generation of `gen` tokens after each of `samples` prompts of `tokens` tokens, full
    attention against the policy. prefix: share of the tokens generated identically before the
    first divergence; overall: share of steps at which the policy's greedy token equals full's
    with full's tokens fed back (teacher forcing), so every step is judged in the same context."""
    model = load_model(model_path)
    name, position = result_name(model, kw), position_mode(policy, kw)
    prompts = agree_prompts(model, text if text is not None else read_text(text_file), samples, tokens)
    pre, tot = [], []
    for p in prompts:
        key = (str(model.path), tuple(p), gen, interval)
        ref = _reference_cache.get(key)
        if ref is None:
            ref, _ = greedy(model, p, gen, "full", None, interval=interval)
            _reference_cache[key] = ref
        preds, _ = greedy(model, p, gen, policy, budget, interval=interval, force=ref, **kw)
        a, b = agreement(ref, preds)
        pre.append(a)
        tot.append(b)
    m1, c1 = mean_ci(pre)
    m2, c2 = mean_ci(tot)
    n = len(prompts)
    return [row(name, policy, position, budget, "agree", n, "prefix", m1, clip01(c1)),
            row(name, policy, position, budget, "agree", n, "overall", m2, clip01(c2))]
