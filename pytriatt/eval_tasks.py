"""The generation-side tasks of `pytriatt eval`: nll, passkey, agree and dfs.

Each runs the model through the patched llama.cpp with the policy attached, so tokens
are really evicted inside llama_decode every `interval` tokens, exactly as in a long
generation (pytriatt.eval_common.open_context). Each `run_*` function returns result
rows (pytriatt.eval_common.row); the pieces they are built from (prompt builders,
answer parsers, the DFS generator and checker) are importable and tested on their own.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from .eval_common import (EvalError, load_model, log_softmax_at, mean_ci, model_name, open_context, read_text,
                          row, text_tokens, wilson)

# keyword arguments every task passes through to the policy (eval_common.attach_policy)
POLICY_KW = ("sink", "window", "seed", "calib", "shift", "snap_window", "kv_agg")


def _policy_kw(kw: dict) -> dict:
    return {k: kw[k] for k in POLICY_KW if k in kw}


def _position(policy: str, kw: dict) -> Optional[str]:
    return None if policy == "full" else ("shift" if kw.get("shift") else "gaps")


def _name(model, kw: dict) -> str:
    return kw.get("name") or model_name(model.path)


# -- nll --------------------------------------------------------------------------------

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
    with open_context(model, policy, budget, n, interval=interval, **_policy_kw(kw)) as ctx:
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
    """Teacher-forced NLL of `tokens` tokens of text (default: Python's docs, see eval_common.default_text).

    Returns (rows, per-token NLL); pass full attention's per-token NLL as `reference` to get
    the perplexity ratio."""
    model = load_model(model_path)
    toks = text_tokens(model, text if text is not None else read_text(text_file), tokens)
    nll = nll_per_token(model, toks, policy, budget, interval=interval, **kw)
    return nll_rows(_name(model, kw), policy, _position(policy, kw), budget, nll, reference,
                    interval=interval, buckets=buckets), nll


# -- greedy decoding with the policy active ---------------------------------------------

def _prefill(ctx, prompt: Sequence[int], interval: int) -> np.ndarray:
    """Decode the prompt in chunks of `interval` (eviction between them); the last token's logits."""
    logits = None
    for s in range(0, len(prompt), interval):
        logits = ctx.decode(list(prompt[s:s + interval]), logits="last")
    return logits


def greedy(model, prompt: Sequence[int], n: int, policy: str = "full", budget: Optional[int] = None, *,
           interval: int = 128, force: Optional[Sequence[int]] = None, stop: Sequence[int] = (),
           **kw) -> Tuple[List[int], List[int]]:
    """Greedy decoding, one token per llama_decode as in a generation, with the policy active.

    Returns (argmax at each step, tokens fed back). With `force` the given tokens are fed
    back instead of the argmax (teacher forcing): up to the first step where they differ
    this is exactly the free greedy generation. Stops after n steps or at a `stop` token."""
    model = load_model(model)
    preds, fed = [], []
    with open_context(model, policy, budget, len(prompt) + n + 1, interval=interval, **_policy_kw(kw)) as ctx:
        logits = _prefill(ctx, prompt, interval)
        for i in range(n):
            tok = int(np.argmax(logits))
            preds.append(tok)
            nxt = tok if force is None else int(force[i])
            fed.append(nxt)
            if force is None and tok in stop:
                break
            if i + 1 < n:
                logits = ctx.decode([nxt], logits="last")
    return preds, fed


# -- passkey ----------------------------------------------------------------------------

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
    name, position = _name(model, kw), _position(policy, kw)
    eog = [t for t in (model._lc.llama_vocab_eos(model.vocab), model._lc.llama_vocab_eot(model.vocab)) if t >= 0]
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


def model_detokenize(model, tokens: Sequence[int]) -> str:
    lc = model._lc
    out = bytearray()
    buf = __import__("ctypes").create_string_buffer(64)
    for t in tokens:
        n = lc.llama_token_to_piece(model.vocab, int(t), buf, len(buf), 0, False)
        if n > 0:
            out += buf.raw[:n]
    return out.decode("utf-8", "replace")


# -- agree ------------------------------------------------------------------------------

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
    bos = model._lc.llama_vocab_bos(model.vocab)
    add_bos = bool(model._lc.llama_vocab_get_add_bos(model.vocab)) and bos >= 0
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
    name, position = _name(model, kw), _position(policy, kw)
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
    return [row(name, policy, position, budget, "agree", n, "prefix", m1, _clip01(c1)),
            row(name, policy, position, budget, "agree", n, "overall", m2, _clip01(c2))]


def _clip01(ci):
    return (max(0.0, ci[0]), min(1.0, ci[1]))


# -- dfs: recursive state queries -------------------------------------------------------

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
    with open_context(model, policy, budget, n, interval=interval, **_policy_kw(kw)) as ctx:
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
    name, position = _name(model, kw), _position(policy, kw)
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
