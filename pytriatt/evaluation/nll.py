"""The nll task of `pytriatt eval`: teacher-forced negative log-likelihood of a text read with the policy
evicting inside llama_decode, its perplexity ratio to full attention's, and by position."""

from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import numpy as np

from .common import (EvalError, load_model, log_softmax_at, mean_ci, open_context, policy_kw, position_mode,
                     read_text, result_name, row, text_tokens)


def nll_per_token(model, tokens: Sequence[int], policy: str, budget: Optional[int], *, interval: int = 128,
                  **kw) -> np.ndarray:
    """-log p(tokens[i+1] | what the cache holds of tokens[:i+1]) for every i: float64 [len(tokens) - 1].

    The text is decoded in chunks of `interval` tokens with every token's logits; the
    policy evicts (inside llama_decode) before a chunk that would overflow budget + interval."""
    model = load_model(model)
    n = len(tokens) - 1
    if n < 1:
        raise EvalError("nll needs at least two tokens")
    out = np.empty(n, dtype=np.float64)
    with open_context(model, policy, budget, n, interval=interval, **policy_kw(kw)) as ctx:
        for s in range(0, n, interval):
            chunk = list(tokens[s:min(s + interval, n)])
            logits = ctx.decode(chunk, logits="all")
            out[s:s + len(chunk)] = log_softmax_at(logits, tokens[s + 1:s + 1 + len(chunk)])
    return out


def nll_rows(name: str, policy: str, position: Optional[str], budget: Optional[int], nll: np.ndarray,
             reference: Optional[np.ndarray] = None, *, interval: int = 128, buckets: int = 4) -> List[dict]:
    """Rows of one nll run: mean NLL, perplexity ratio to `reference` (full attention's per-token
    NLL of the same tokens) and mean NLL by position bucket.

    Intervals come from the per-chunk means (chunks of `interval` tokens; neighbouring tokens
    are not independent, chunks nearly are); the ratio's interval is paired chunk by chunk."""
    n = nll.size
    chunks = [nll[s:s + interval] for s in range(0, n, interval)]
    m, ci = mean_ci(c.mean() for c in chunks)
    rows = [row(name, policy, position, budget, "nll", n, "nll", float(nll.mean()), ci)]
    if reference is not None:
        rows.append(paired_ratio_row(name, policy, position, budget, nll, reference, "ppl_ratio", interval=interval))
    edges = np.linspace(0, n, buckets + 1).round().astype(int)
    for a, b in zip(edges[:-1], edges[1:]):
        if b <= a:
            continue
        seg = nll[a:b]
        m, ci = mean_ci(seg[s:s + interval].mean() for s in range(0, seg.size, interval))
        # positions of the predicted tokens: a+1 .. b
        rows.append(row(name, policy, position, budget, "nll", seg.size, f"nll@{a + 1}-{b}", float(seg.mean()), ci))
    return rows


def paired_ratio_row(name: str, policy: str, position: Optional[str], budget: Optional[int], nll: np.ndarray,
                     other: np.ndarray, metric: str, *, interval: int = 128) -> dict:
    """exp(mean(nll - other)): the perplexity ratio of two runs over the same tokens, its
    interval paired chunk by chunk (what both runs share cancels, so the interval says whether
    the two differ, not how hard the text is)."""
    if other.size != nll.size:
        raise ValueError("the two NLLs are of different texts")
    d = nll - other
    _, dci = mean_ci(d[s:s + interval].mean() for s in range(0, d.size, interval))
    return row(name, policy, position, budget, "nll", d.size, metric, float(np.exp(d.mean())),
               (float(np.exp(dci[0])), float(np.exp(dci[1]))))


def run_nll(model_path, policy: str, budget: Optional[int], *, tokens: int = 2048, text: Optional[str] = None,
            text_file=None, interval: int = 128, buckets: int = 4, reference: Optional[np.ndarray] = None,
            **kw) -> Tuple[List[dict], np.ndarray]:
    """Teacher-forced NLL of `tokens` tokens of text (default: corpus.eval_text).

    Returns (rows, per-token NLL); pass full attention's per-token NLL as `reference` to get
    the perplexity ratio."""
    model = load_model(model_path)
    toks = text_tokens(model, text if text is not None else read_text(text_file), tokens)
    nll = nll_per_token(model, toks, policy, budget, interval=interval, **kw)
    return nll_rows(result_name(model, kw), policy, position_mode(policy, kw), budget, nll, reference,
                    interval=interval, buckets=buckets), nll
