"""Which cached tokens to keep: TriAttention's ranking of raw scores, streaming and random, shared or per KV
head (the C++ selection the patched llama.cpp runs, through pytriatt._core)."""

from __future__ import annotations

from typing import List, Optional

import numpy as np

from . import _core

__all__ = ["select", "select_heads", "POLICIES"]

# how each evicting policy of the contract ranks (pytriatt._core's table): by the scores given, newest first,
# or at random
_POLICY_CODE = {row["name"]: int(row["rank"]) for row in _core.policy_table() if row["evicts"]}
POLICIES = tuple(_POLICY_CODE)


def select(
    policy: str,
    scores,
    positions,
    t: int,
    budget: int,
    sink: int = 0,
    window: int = 0,
    prompt_len: int = 0,
    seed: int = 0,
    *,
    n_head_kv: Optional[int] = None,
    kv_agg: str = "max",
    return_scores: bool = False,
):
    """Choose the cached tokens to KEEP; returns their positions, ascending (int32).

    Args:
        policy: ``"tri"`` or ``"snapkv"`` (rank by ``scores``), ``"streaming"`` (newest first)
            or ``"random"`` (seeded; depends only on ``seed`` and the positions).
        scores: for ``"tri"``, the raw per-layer scores: a sequence of float32
            ``[n, n_head]`` arrays (``None`` entries, e.g. layers without KV, are skipped)
            or one ``[n_layer, n, n_head]`` array. Ignored (may be None) otherwise.
        positions: the candidates' positions ``[n]`` (all cached tokens of the sequence).
        t: the current position; every candidate position must be ``<= t``.
        budget: how many tokens to keep, protected ones included. ``budget >= n``
            keeps everything.
        sink: protect the ``sink`` oldest candidates (smallest positions).
        window: protect the ``window`` newest candidates.
        prompt_len: protect every candidate with position ``< prompt_len``.
        seed: for ``"random"``.
        n_head_kv: KV heads of the model (GQA groups of consecutive query heads);
            default: n_head (no grouping).
        kv_agg: token score = ``"max"`` (default) or ``"mean"`` over KV heads.
        return_scores: also return the token-level scores ``[n]`` (float32, aligned
            with ``positions``; protected = +inf).

    Raises ValueError if the protected tokens alone exceed the budget. Ties keep the
    newer position. The evicted positions are ``np.setdiff1d(positions, keep)``.
    """
    code = _POLICY_CODE.get(policy)
    if code is None:
        raise ValueError(f"policy must be one of {POLICIES}, got {policy!r}")
    pos = np.asarray(positions)
    if pos.ndim != 1:
        raise ValueError("positions must be 1-d")
    if pos.size and (pos.min() < np.iinfo(np.int32).min or pos.max() > np.iinfo(np.int32).max):
        raise ValueError("positions must fit in int32 (llama_pos)")
    pos = pos.astype(np.int32, copy=False)
    if pos.size and int(pos.max()) > int(t):
        raise ValueError(f"a candidate position ({int(pos.max())}) is after t ({int(t)})")
    if kv_agg not in ("max", "mean"):
        raise ValueError(f"kv_agg must be 'max' or 'mean', got {kv_agg!r}")
    for name, v in (("budget", budget), ("sink", sink), ("window", window), ("prompt_len", prompt_len)):
        if int(v) < 0:
            raise ValueError(f"{name} must be >= 0")
    layers: List[np.ndarray] = []
    if code == int(_core.RANK_SCORES):
        if scores is None:
            raise ValueError(f"the {policy} policy needs the per-layer raw scores")
        it = list(scores) if not isinstance(scores, np.ndarray) or scores.ndim == 3 else [scores]
        layers = [np.ascontiguousarray(s, dtype=np.float32) for s in it if s is not None]
        if pos.size and not layers:
            raise ValueError(f"the {policy} policy needs the raw scores of at least one layer")
        for l, s in enumerate(layers):
            if s.ndim != 2 or s.shape[0] != pos.size:
                raise ValueError(f"scores of layer {l} must be [n={pos.size}, n_head], got {s.shape}")
        if layers and n_head_kv is not None:
            if layers[0].shape[1] % int(n_head_kv) != 0:
                raise ValueError(f"n_head ({layers[0].shape[1]}) must be a multiple of n_head_kv ({n_head_kv})")
    keep_idx, token, _n_prot = _core.select(
        code, layers, pos, int(budget), int(sink), int(window), int(prompt_len),
        int(seed) & 0xFFFFFFFFFFFFFFFF, int(n_head_kv or 0),
        int(_core.KV_AGG_MAX if kv_agg == "max" else _core.KV_AGG_MEAN),
    )
    keep = np.sort(pos[keep_idx])
    if return_scores:
        return keep, token
    return keep


def select_heads(
    scores,
    positions,
    t: int,
    budget: int,
    sink: int = 0,
    window: int = 0,
    prompt_len: int = 0,
    *,
    n_head_kv: int,
    granularity: str = "head",
) -> np.ndarray:
    """Per-head TriAttention selection: every KV head chooses its own tokens to keep.

    ``scores`` are the raw per-layer scores of ``select`` (``[n_layer][n, n_head]``). With
    ``granularity="head"`` (the paper's per-head pruning) KV head g ranks the candidates by its own
    query heads' z-scores, max over its GQA group, mean over the layers, and the result is
    ``[n_head_kv, k]``; with ``"layer"`` every layer's KV heads choose separately: ``[n_layer,
    n_head_kv, k]``. Each row holds kept positions, ascending; protections are those of ``select``.
    """
    if granularity not in ("head", "layer"):
        raise ValueError(f"granularity must be 'head' or 'layer', got {granularity!r}")
    it = list(scores) if not isinstance(scores, np.ndarray) or scores.ndim == 3 else [scores]
    layers = [np.asarray(s, dtype=np.float32) for s in it if s is not None]
    if not layers:
        raise ValueError("select_heads needs the raw scores of at least one layer")
    n_head = layers[0].shape[1]
    if n_head % int(n_head_kv) != 0:
        raise ValueError(f"n_head ({n_head}) must be a multiple of n_head_kv ({n_head_kv})")
    n_gqa = n_head // int(n_head_kv)

    def one(ls, g):
        group = [s[:, g * n_gqa:(g + 1) * n_gqa] for s in ls]
        return select("tri", group, positions, t, budget, sink, window, prompt_len, n_head_kv=1)

    if granularity == "head":
        return np.stack([one(layers, g) for g in range(int(n_head_kv))])
    return np.stack([np.stack([one([s], g) for g in range(int(n_head_kv))]) for s in layers])

