"""The dfs task of `pytriatt eval`: recursive state queries. The model reads a tree and a depth-first walk of
it, teacher-forced, and must name each node the walk enters or returns to."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from .common import (EvalError, load_model, open_context, policy_kw, position_mode, result_name, row, wilson)


DFS_NAMES = (
    "apple river stone cloud tiger lemon honey piano candle forest garden window bridge rocket "
    "silver pencil jacket butter castle dragon engine falcon guitar hammer island jungle kettle "
    "ladder magnet needle orange parrot pepper rabbit saddle turtle violin walnut yellow zebra "
    "anchor basket cherry donkey feather ginger helmet insect jelly koala lizard mirror napkin "
    "oyster pillow quartz ribbon spider tomato umbrella velvet wizard yogurt acorn barrel cactus "
    "dolphin eagle fossil goblet harbor igloo jigsaw kitten lantern marble nutmeg orchid pebble"
).split()

DFS_HEADER = ("Below is a tree, given as each node followed by its children in order, and a depth-first "
              "walk of it. The walk enters a node, then each of its children in the listed order, and after "
              "the last child returns to the node's parent.\n\nTree:\n")


@dataclass
class DfsProblem:
    """A tree (children lists in order), its root, and the walk's lines."""
    children: Dict[str, List[str]]
    root: str
    order: List[str]                       # the order in which the tree is listed
    walk: List[Tuple[str, str]] = field(default_factory=list)   # ("enter"|"return to", node)

    def parent(self, node: str) -> Optional[str]:
        for p, cs in self.children.items():
            if node in cs:
                return p
        return None


def make_dfs_problem(n_nodes: int, rng, max_children: int = 3, recent: int = 8) -> DfsProblem:
    """A random tree of n_nodes nodes with named nodes, deep rather than bushy: each new node
    hangs under one of the `recent` newest nodes that still has room for a child."""
    if n_nodes < 2 or n_nodes > len(DFS_NAMES):
        raise EvalError(f"dfs trees have 2..{len(DFS_NAMES)} nodes, got {n_nodes}")
    names = [str(x) for x in rng.permutation(DFS_NAMES)[:n_nodes]]
    children: Dict[str, List[str]] = {names[0]: []}
    for i in range(1, n_nodes):
        room = [x for x in names[:i] if len(children[x]) < max_children]
        cand = room[-recent:]
        p = cand[int(rng.integers(0, len(cand)))]
        children[p].append(names[i])
        children[names[i]] = []
    order = [str(x) for x in rng.permutation(names)]
    prob = DfsProblem(children, names[0], order)
    prob.walk = dfs_walk(prob.children, prob.root)
    return prob


def dfs_walk(children: Dict[str, List[str]], root: str) -> List[Tuple[str, str]]:
    """The depth-first walk: ("enter", node) on arrival, ("return to", parent) after a node's last child."""
    out: List[Tuple[str, str]] = []

    def visit(node: str, parent: Optional[str]) -> None:
        out.append(("enter", node))
        for c in children[node]:
            visit(c, node)
        if parent is not None:
            out.append(("return to", parent))

    visit(root, None)
    return out


def check_dfs_walk(children: Dict[str, List[str]], root: str, lines: Sequence[str]) -> Optional[int]:
    """Check a walk written as lines "enter X" / "return to Y" (a trailing "done" is allowed):
    the index of the first wrong line (a missing line counts at the end), or None if it is
    the tree's depth-first walk."""
    want = [f"{a} {b}" for a, b in dfs_walk(children, root)]
    got = [ln.strip() for ln in lines if ln.strip()]
    if got and got[-1] == "done":
        got = got[:-1]
    for i, w in enumerate(want):
        if i >= len(got) or got[i] != w:
            return i
    return len(want) if len(got) > len(want) else None


def dfs_tokens(model, prob: DfsProblem) -> Tuple[List[int], List[dict]]:
    """The problem as tokens, plus its queries: every node name of the walk, with the token span
    to predict (the name and the line break after it), its kind (enter / return) and its
    lookback (tokens since the answer's name last appeared, in the tree or the walk)."""
    tok = lambda s: model.tokenize(s, add_bos=False)  # noqa: E731
    toks = model.tokenize(DFS_HEADER, add_bos=True)
    last_seen: Dict[str, int] = {}
    nl = tok("\n")

    def name(n: str) -> Tuple[int, int]:
        start = len(toks)
        toks.extend(tok(" " + n))
        return start, len(toks)

    for node in prob.order:
        a, _ = name(node)
        last_seen[node] = a
        toks.extend(tok(":"))
        cs = prob.children[node]
        for i, c in enumerate(cs):
            if i:
                toks.extend(tok(","))
            a, _ = name(c)
            last_seen[c] = a
        if not cs:
            toks.extend(tok(" none"))
        toks.extend(nl)
    toks.extend(tok("\nDepth-first walk from"))
    a, _ = name(prob.root)
    last_seen[prob.root] = a
    toks.extend(tok(":\n"))
    queries = []
    depth = 0
    for kind, node in prob.walk:
        # the walk is indented by recursion depth: a node's line and its return line align
        depth = depth + 1 if kind == "enter" else depth - 1
        toks.extend(tok("  " * (depth - 1) + kind))
        a, b = name(node)
        toks.extend(nl)
        queries.append(dict(kind="return" if kind == "return to" else "enter", node=node, start=a,
                            end=b + len(nl), lookback=a - last_seen[node]))
        last_seen[node] = a
    toks.extend(tok("done\n"))
    return toks, queries


def score_spans(toks: Sequence[int], queries: Sequence[dict], argmax: np.ndarray) -> List[bool]:
    """Whether the greedy prediction (argmax[i] predicts toks[i + 1]) gets each query's span right."""
    out = []
    for q in queries:
        want = np.asarray(toks[q["start"]:q["end"]])
        got = argmax[q["start"] - 1:q["end"] - 1]
        out.append(bool(np.array_equal(want, got)))
    return out


def argmax_per_token(model, tokens: Sequence[int], policy: str, budget: Optional[int], *, interval: int = 128,
                     **kw) -> np.ndarray:
    """Teacher-forced greedy predictions: argmax[i] is the model's guess for tokens[i + 1]."""
    model = load_model(model)
    n = len(tokens) - 1
    out = np.empty(n, dtype=np.int64)
    with open_context(model, policy, budget, n, interval=interval, **policy_kw(kw)) as ctx:
        for s in range(0, n, interval):
            chunk = list(tokens[s:min(s + interval, n)])
            out[s:s + len(chunk)] = ctx.decode(chunk, logits="all").argmax(axis=1)
    return out


DFS_LOOKBACK_EDGES = (0, 32, 128, 512, 1 << 30)


def run_dfs(model_path, policy: str, budget: Optional[int], *, nodes: int = 30, samples: int = 4,
            interval: int = 128, seed: int = 0, progress: bool = False, **kw) -> List[dict]:
    """Accuracy on depth-first walks of `samples` random trees of `nodes` nodes, teacher-forced:
    the model must name each node the walk enters (reading the tree, listed far back) and
    each node it returns to (the state of the recursion, written when that node was last
    visited). Rows: overall, by kind, and by lookback (tokens back to the answer's last mention)."""
    model = load_model(model_path)
    name, position = result_name(model, kw), position_mode(policy, kw)
    kinds: Dict[str, List[bool]] = {"enter": [], "return": []}
    by_lb: Dict[Tuple[int, int], List[bool]] = {}
    length = []
    for s in range(samples):
        prob = make_dfs_problem(nodes, np.random.default_rng([seed, 7919, s]))
        toks, queries = dfs_tokens(model, prob)
        length.append(len(toks))
        am = argmax_per_token(model, toks, policy, budget, interval=interval, seed=seed,
                              **{k: v for k, v in kw.items() if k != "seed"})
        for q, ok in zip(queries, score_spans(toks, queries, am)):
            kinds[q["kind"]].append(ok)
            for a, b in zip(DFS_LOOKBACK_EDGES[:-1], DFS_LOOKBACK_EDGES[1:]):
                if a <= q["lookback"] < b:
                    by_lb.setdefault((a, b), []).append(ok)
    allq = kinds["enter"] + kinds["return"]
    rows = [row(name, policy, position, budget, "dfs", len(allq), "acc", np.mean(allq), wilson(sum(allq), len(allq)))]
    for k in ("enter", "return"):
        v = kinds[k]
        rows.append(row(name, policy, position, budget, "dfs", len(v), f"acc_{k}", np.mean(v) if v else 0.0,
                        wilson(sum(v), len(v))))
    for (a, b), v in sorted(by_lb.items()):
        label = f"{a}+" if b == DFS_LOOKBACK_EDGES[-1] else f"{a}-{b}"
        rows.append(row(name, policy, position, budget, "dfs", len(v), f"acc@lookback{label}", np.mean(v),
                        wilson(sum(v), len(v))))
    return rows
