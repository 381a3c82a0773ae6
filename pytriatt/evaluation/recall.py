"""The `recall` task of `pytriatt eval`: how much of the true attention each policy's choice keeps.

The model reads a text with its full cache while an eval callback copies every layer's
post-RoPE queries and keys out of llama.cpp's graph (the keys exactly as they are cached,
the queries exactly as they meet them). Then, at sampled round starts t, each policy
chooses the `budget` tokens it would keep out of positions 0..t (tri/streaming/random
with pytriatt.core.select on the same keys the patch would score, snapkv with a NumPy
SnapKV), and the queries of the next interval (t+1 .. t+interval, which that choice
would serve) are replayed: the share of their softmax attention mass over positions
0..t that falls on the kept tokens, per query head, averaged over heads, layers and
queries, is that policy's recall at that step. `oracle` keeps the tokens those future
queries attend to most (the best any single token set can do, averaged over heads).
`tri-perhead` and `oracle-perhead` are diagnostics llama.cpp cannot run: every KV head
of every layer keeps its own `budget` tokens (as the paper's reference implementation
does); the gap to `tri` / `oracle` is what sharing one cell set across heads and layers costs.

This is a one-shot diagnostic (a single choice from a full cache), not the iterated
eviction of a generation; nll/agree/passkey/dfs measure that.
"""

from __future__ import annotations

from typing import Dict, List, Optional, Sequence

import numpy as np

from .. import _llama, gguf_io
from ..ggml_tensors import GgmlTensor, ggml_lib, read_tensor
from ..policy import (DEFAULT_HORIZON, DEFAULT_INTERVAL, DEFAULT_SINK, DEFAULT_SNAP_WINDOW, DEFAULT_WINDOW, EVICTING,
                      POLICIES, resolved_horizon, resolved_window)
from .common import EvalError, load_model, mean_ci, model_name, read_text, row, say, text_tokens

RECALL_POLICIES = POLICIES + ("oracle",)
# per-(layer, KV head) choices: diagnostics of what one shared cell set costs
PERHEAD_POLICIES = ("tri-perhead", "oracle-perhead")
# ablations of tri: the name -> keyword arguments of Calibration.score / select
TRI_ABLATIONS = {
    "tri-notrig": dict(score=dict(trig=False)),
    "tri-nonorm": dict(score=dict(norm=False)),
    "tri-kvmean": dict(select=dict(kv_agg="mean")),
    "tri-offmax": dict(score=dict(offset_agg="max")),
}


# -- queries and keys out of llama.cpp's graph --------------------------------------------

def capture_qk(model, tokens: Sequence[int], q_positions: Sequence[int], *, n_batch: int = 256):
    """Decode `tokens` (positions 0..n-1, full cache) and copy every layer's post-RoPE keys (all
    positions) and queries (at q_positions) out of the graph.

    Returns (K, Q, q_index): K[l] float32 [n, n_head_kv, head_dim], Q[l] float32
    [len(q_positions), n_head, head_dim], q_index: position -> row of Q[l]."""
    from ..context import Context

    lc = _llama.require_patched()
    lib = ggml_lib()
    n = len(tokens)
    q_index = {int(p): i for i, p in enumerate(sorted(set(int(p) for p in q_positions)))}
    K: Dict[int, np.ndarray] = {}
    Q: Dict[int, np.ndarray] = {}
    errors: List[str] = []

    @lc.ggml_backend_sched_eval_callback
    def cb(ptr, ask, user_data):
        t = GgmlTensor.from_address(ptr)
        name = t.name
        if not (name.startswith(b"Qcur-") or name.startswith(b"Kcur-")):
            return not ask
        if lib.ggml_op_desc(ptr) != b"ROPE":
            return not ask
        if ask:
            return True
        try:
            il = int(name.split(b"-")[1])
            post = read_tensor(lib, ptr)[0].astype(np.float32)      # [n_tokens, n_heads, head_dim]
            pos = read_tensor(lib, t.src[1]).ravel()[: post.shape[0]].astype(np.int64)
            if name.startswith(b"K"):
                k = K.get(il)
                if k is None:
                    k = K[il] = np.zeros((n,) + post.shape[1:], np.float32)
                k[pos] = post
            else:
                q = Q.get(il)
                if q is None:
                    q = Q[il] = np.zeros((len(q_index),) + post.shape[1:], np.float32)
                for j, p in enumerate(pos.tolist()):
                    i = q_index.get(p)
                    if i is not None:
                        q[i] = post[j]
        except Exception as e:   # never raise through C
            errors.append(f"{name!r}: {e}")
        return True

    with Context(model, n_ctx=n + 1, n_batch=n_batch, cb_eval=cb, type_k="f32") as ctx:
        for s in range(0, n, n_batch):
            ctx.decode(list(tokens[s:s + n_batch]), logits="none")
    if errors:
        raise RuntimeError("reading Q/K from the graph failed: " + "; ".join(errors[:3]))
    if not K or sorted(K) != sorted(Q):
        raise RuntimeError("this model's graph has no post-RoPE Qcur/Kcur nodes the recall task understands")
    return K, Q, q_index


# -- model facts ------------------------------------------------------------------------

def attention_layers(model_path) -> Dict[str, object]:
    """head counts, attention scale and which layers attend globally (Gemma 3's sliding-window
    layers only see the last n_swa tokens and are left out, as the patch's scorer leaves them)."""
    from ..gguf_model import model_shape, open_model
    m = open_model(model_path)
    shape = model_shape(m)
    arch, n_layer = shape["arch"], shape["n_layer"]
    scale = m.scalar(f"{arch}.attention.scale")
    head_dim = shape["head_dim"]
    is_swa = [False] * n_layer
    if arch == "gemma3" and int(m.scalar(f"{arch}.attention.sliding_window", 0) or 0) > 0:
        pattern = m.field(f"{arch}.attention.sliding_window_pattern")
        if pattern is not None and pattern.type == gguf_io.T_ARRAY:
            is_swa = [bool(v) for v in m.array(f"{arch}.attention.sliding_window_pattern")[:n_layer]]
        else:
            k = int(m.scalar(f"{arch}.attention.sliding_window_pattern", 6))
            is_swa = [k == 0 or (il % k < k - 1) for il in range(n_layer)]
    elif arch not in ("llama", "qwen2", "qwen3", "gemma3"):
        raise EvalError(f"the recall task knows the attention of llama, qwen2, qwen3 and gemma3 models, not {arch!r}")
    return dict(arch=arch, n_layer=n_layer, n_head=shape["heads"][0], n_head_kv=shape["heads_kv"][0],
                head_dim=head_dim, scale=float(scale) if scale else 1.0 / np.sqrt(head_dim),
                layers=[il for il in range(n_layer) if not is_swa[il] and shape["heads_kv"][il] > 0])


# -- policies' choices ----------------------------------------------------------------

def _top_keep(score: np.ndarray, budget: int, sink: int, window: int) -> np.ndarray:
    """Indices kept: the protected oldest `sink` and newest `window`, then the best by score."""
    n = score.size
    if budget >= n:
        return np.arange(n)
    prot = np.zeros(n, bool)
    prot[:min(sink, n)] = True
    if window:
        prot[max(0, n - window):] = True
    if prot.sum() > budget:
        raise EvalError(f"sink + window ({int(prot.sum())} tokens) exceed the budget {budget}")
    rest = np.where(~prot)[0]
    k = budget - int(prot.sum())
    # ties keep the newer position, like the core
    order = np.lexsort((-rest, -score[rest]))[:k]
    return np.sort(np.concatenate([np.where(prot)[0], rest[order]]))


def group_scores(raw: np.ndarray, n_head_kv: int) -> np.ndarray:
    """Per KV head token scores [n, n_head_kv] from raw per-query-head scores [n, n_head]: each
    query head z-scored over the candidates (population std, floor 1e-6), max over its GQA group
    (the patch's per-head step, before it averages layers and takes one ranking)."""
    raw = raw.astype(np.float64)
    z = (raw - raw.mean(axis=0)) / np.maximum(raw.std(axis=0), 1e-6)
    return z.reshape(z.shape[0], n_head_kv, -1).max(axis=2)


def _softmax_rows(x: np.ndarray) -> np.ndarray:
    x = x - x.max(axis=-1, keepdims=True)
    np.exp(x, out=x)
    x /= x.sum(axis=-1, keepdims=True)
    return x


def snapkv_scores(K: Dict[int, np.ndarray], Q: Dict[int, np.ndarray], q_index, layers, t: int, info,
                  *, snap_window: int = DEFAULT_SNAP_WINDOW, kernel: int = 7) -> List[np.ndarray]:
    """SnapKV's raw scores at round start t, as the policy computes them (cpp/llama-triatt-score-snapkv.cpp):
    per layer and query head, the softmax attention of each of the last
    `snap_window` queries (positions t-W+1..t) over the candidates 0..t, summed over the
    queries and max-pooled over `kernel` neighbouring candidates. Like the patch, the window's
    queries see every candidate (no causal mask inside the window). Returns per layer
    float32 [t+1, n_head]; pytriatt.core.select("tri", ...) aggregates them as the patch does
    (z-score per head, max over the GQA group, mean over layers, max over KV heads)."""
    H, Hkv = info["n_head"], info["n_head_kv"]
    g = H // Hkv
    wpos = list(range(max(0, t - snap_window + 1), t + 1))
    out = []
    for il in layers:
        kk = np.repeat(K[il][:t + 1], g, axis=1)                     # [n, H, d]
        q = Q[il][[q_index[p] for p in wpos]]                        # [W, H, d]
        logits = np.einsum("whd,nhd->hwn", q, kk) * info["scale"]    # [H, W, n]
        p = _softmax_rows(logits).sum(axis=1)                         # [H, n]
        if kernel > 1:
            pad = kernel // 2
            pp = np.pad(p, ((0, 0), (pad, pad)), constant_values=0.0)
            p = np.lib.stride_tricks.sliding_window_view(pp, kernel, axis=1).max(axis=-1)
        out.append(np.ascontiguousarray(p.T, dtype=np.float32))
    return out


# -- the task ---------------------------------------------------------------------------

def round_starts(n_tokens: int, n_steps: int, interval: int) -> List[int]:
    """n_steps round starts t spread over the second half of the text, each followed by a full interval."""
    hi = n_tokens - 1 - interval
    lo = max(n_tokens // 2, 1)
    if hi < lo:
        raise EvalError(f"recall needs more than {2 * interval + 2} tokens (--tokens) for --interval {interval}")
    return sorted(set(int(round(x)) for x in np.linspace(lo, hi, n_steps)))


def run_recall(model_path, policies: Sequence[str], budgets: Sequence[int], *, tokens: int = 2048,
               samples: int = 6, queries: int = 16, interval: int = DEFAULT_INTERVAL, sink: int = DEFAULT_SINK,
               window: int = DEFAULT_WINDOW, horizon: int = DEFAULT_HORIZON,
               seed: int = 0, calib=None, snap_window: int = DEFAULT_SNAP_WINDOW, kv_agg: str = "max", ablations: bool = False,
               text: Optional[str] = None, text_file=None, progress: bool = False, name: Optional[str] = None,
               **_ignored) -> List[dict]:
    """Recall of every policy at every budget, at `samples` round starts, with `queries` queries
    of the following interval each. Rows: metric "recall", n = round starts, 95% interval over them."""
    from ..core import Calibration, select

    def wnd(p: str, b: int) -> int:
        """The window the patch protects for policy p at budget b (tri's rule for tri and the oracles)."""
        return resolved_window(p if p in EVICTING else "tri", b, sink, interval, window)

    policies = list(policies) + ([p for p in TRI_ABLATIONS if p not in policies] if ablations else [])
    for p in policies:
        if p not in RECALL_POLICIES and p not in TRI_ABLATIONS and p not in PERHEAD_POLICIES:
            raise EvalError(f"recall: unknown policy {p!r}")
    model = load_model(model_path)
    name = name or model_name(model.path)
    info = attention_layers(model.path)
    layers = info["layers"]
    toks = text_tokens(model, text if text is not None else read_text(text_file), tokens)
    steps = round_starts(len(toks), samples, interval)
    qoffs = sorted(set(int(round(x)) for x in np.linspace(1, interval, min(queries, interval))))
    need = set()
    for t in steps:
        need.update(t + o for o in qoffs)
        need.update(range(max(0, t - snap_window + 1), t + 1))
    say(progress, f"recall: reading {len(toks)} tokens with the full cache, capturing post-RoPE Q and K")
    K, Q, q_index = capture_qk(model, toks, sorted(need))
    tri_names = [p for p in policies if p in ("tri", "tri-perhead") or p in TRI_ABLATIONS]
    cal = Calibration.from_gguf(calib, model=model.path) if tri_names else None
    H, Hkv = info["n_head"], info["n_head_kv"]
    g = H // Hkv
    per: Dict[tuple, List[float]] = {}
    for si, t in enumerate(steps):
        say(progress, f"recall: round start {t} ({si + 1}/{len(steps)})")
        pos = np.arange(t + 1, dtype=np.int32)
        keeps: Dict[tuple, np.ndarray] = {}
        raw_cache: Dict[object, list] = {}
        for p in policies:
            for b in budgets:
                if p in ("full", "oracle") or p in PERHEAD_POLICIES:
                    continue
                if b >= t + 1:
                    keeps[(p, b)] = pos
                    continue
                if p in ("streaming", "random"):
                    keeps[(p, b)] = select(p, None, pos, t, b, sink, wnd(p, b), seed=seed)
                elif p == "snapkv":
                    if "snap" not in raw_cache:
                        raw_cache["snap"] = snapkv_scores(K, Q, q_index, layers, t, info, snap_window=snap_window)
                    keeps[(p, b)] = select("tri", raw_cache["snap"], pos, t, b, sink, wnd(p, b), n_head_kv=Hkv,
                                           kv_agg=kv_agg)
                else:
                    ab = TRI_ABLATIONS.get(p, {})
                    sk = dict(dict(offsets_max=resolved_horizon(b, interval, horizon)), **ab.get("score", {}))
                    key = repr(sorted(sk.items()))
                    if key not in raw_cache:
                        raw_cache[key] = [cal.score(il, K[il][:t + 1], pos, t, **sk) for il in layers]
                    keeps[(p, b)] = select("tri", raw_cache[key], pos, t, b, sink, wnd(p, b), n_head_kv=Hkv,
                                           kv_agg=ab.get("select", {}).get("kv_agg", kv_agg))
        masks = {k: np.zeros(t + 1, np.float32) for k in keeps}
        for k, v in keeps.items():
            masks[k][v] = 1.0
        # attention of the next interval's queries to positions 0..t, per layer
        qpos = [t + o for o in qoffs]
        old_mass = []            # per layer: [H, nq, t+1] normalised over 0..t
        for il in layers:
            q = Q[il][[q_index[p] for p in qpos]]                      # [nq, H, d]
            u = qpos[-1]
            kk = np.repeat(K[il][:u + 1], g, axis=1)                   # [u+1, H, d]
            logits = np.einsum("qhd,nhd->hqn", q, kk) * info["scale"]
            logits[:, np.arange(u + 1)[None, :] > np.array(qpos)[:, None]] = -np.inf
            pr = _softmax_rows(logits)[:, :, :t + 1]
            pr /= pr.sum(axis=-1, keepdims=True)
            old_mass.append(pr.astype(np.float32))
        for k, m in masks.items():
            per.setdefault(k, []).append(float(np.mean([(pr @ m).mean() for pr in old_mass])))
        if "oracle" in policies:
            score = np.mean([pr.mean(axis=(0, 1)) for pr in old_mass], axis=0)
            for b in budgets:
                m = np.zeros(t + 1, np.float32)
                m[_top_keep(score, b, sink, wnd("tri", b))] = 1.0
                per.setdefault(("oracle", b), []).append(float(np.mean([(pr @ m).mean() for pr in old_mass])))
        for p in PERHEAD_POLICIES:
            if p not in policies:
                continue
            if p == "tri-perhead":
                hz = resolved_horizon(budgets[0], interval, horizon)
                if ("perhead", hz) not in raw_cache:
                    raw_cache[("perhead", hz)] = [cal.score(il, K[il][:t + 1], pos, t, offsets_max=hz) for il in layers]
                head_scores = [group_scores(r, Hkv) for r in raw_cache[("perhead", hz)]]     # per layer [t+1, Hkv]
            else:
                head_scores = [pr.reshape(Hkv, g, *pr.shape[1:]).mean(axis=(1, 2)).T for pr in old_mass]
            for b in budgets:
                vals = []
                for sc, pr in zip(head_scores, old_mass):
                    for j in range(Hkv):
                        m = np.zeros(t + 1, np.float32)
                        m[_top_keep(sc[:, j], b, sink, wnd("tri", b))] = 1.0
                        vals.append((pr[j * g:(j + 1) * g] @ m).mean())
                per.setdefault((p, b), []).append(float(np.mean(vals)))
    rows = []
    if "full" in policies:
        rows.append(row(name, "full", None, None, "recall", len(steps), "recall", 1.0, (1.0, 1.0)))
    for p in policies:
        for b in budgets:
            v = per.get((p, b))
            if v is None:
                continue
            m, ci = mean_ci(v)
            rows.append(row(name, p, "gaps", b, "recall", len(v), "recall", m, (max(0.0, ci[0]), min(1.0, ci[1]))))
    return rows
