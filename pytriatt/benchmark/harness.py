"""`pytriatt bench`: decode speed, scoring cost and KV memory of eviction policies against full attention.

For each policy the benchmark brings one sequence to each requested position (prefill with the
policy attached, so the policy evicts during the prefill as it would in use), then times a window
of single-token decode steps there. It reports per policy and position:

  decode tok/s            over the window (median over --repeat windows)
  scoring share           (t_score_ms + t_evict_ms of the policy counters during the window) / window time
  KV bytes                what llama.cpp allocated: cells x layers x (K row + V row bytes of the cache types),
                          cross-checked against llama.cpp's own "llama_kv_cache: size = ..." log line
  prefill tok/s, peak host RSS

and the ratios policy / full from the same run, in particular the target metric: decode tok/s of the
policy at position P against full attention's at position = budget (a fixed budget should make every
step cost what a step at a short context costs, whatever the position).

Full attention runs in one context sized for its largest position; its decode speed depends on the
cells in use, not on the cells allocated (llama.cpp attends over the used cells, padded to 256). Its
"kv_bytes" at position P is what a context just large enough for P + window tokens allocates
(pad256(P + window) cells), the same formula the allocated context is checked against.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np

from ..calibrate import QUICK_TOKENS, ensure_calibrated
from ..corpus import default_text, text_tokens
from ..errors import UserError
from ..policy import DEFAULT_HORIZON, DEFAULT_INTERVAL, DEFAULT_SINK, DEFAULT_WINDOW, cells_needed, parse_variant
from .kvmath import ModelShape, model_shape, pad256
from .logs import KvLog, parse_kv_log
from .rss import rss_peak, rss_reset

__all__ = ["PolicySpec", "parse_policies", "PolicyRun", "run_parallel", "run_bench", "ratios"]


# -- policies and calibration ---------------------------------------------------

@dataclass
class PolicySpec:
    name: str            # as given, e.g. "tri:q8_0"
    policy: str          # full, tri, ...
    shift: bool
    type_k: str
    type_v: str
    per_head: Optional[str] = None   # "head" or "layer": per-head eviction (tri@head, tri@layer)
    settings: dict = field(default_factory=dict)   # window / horizon of the variant (tri/paper, tri/w=32)


def parse_policies(text: str, type_k: str, type_v: str) -> list:
    """The --policies list: one variant each, in pytriatt.policy's one spelling (VARIANT_SYNTAX)."""
    out, seen = [], set()
    for item in [s.strip() for s in text.split(",") if s.strip()]:
        v = parse_variant(item)
        if item in seen:
            raise UserError(f"--policies: {item} is listed twice")
        seen.add(item)
        out.append(PolicySpec(item, v.policy, v.shift, v.cache_type or type_k, v.cache_type or type_v, v.per_head,
                              dict(v.settings)))
    if not out:
        raise UserError("--policies is empty; e.g. --policies full,tri")
    return out


# -- one sequence under one policy ----------------------------------------------

class PolicyRun:
    """One policy's context, advanced through the positions; collects the rows."""

    def __init__(self, spec: PolicySpec, model, shape: ModelShape, log: KvLog, cfg: dict, n_cells: int,
                 calib: Optional[Path]):
        from ..context import Context
        self.spec, self.cfg, self.model = spec, cfg, model
        log.take()
        kw = dict(n_ctx=n_cells, n_batch=cfg["n_batch"], n_threads=cfg["threads"],
                  type_k=spec.type_k, type_v=spec.type_v)
        try:
            self.ctx = Context(model, **kw)
        except ValueError as e:
            hint = (" (a quantized V cache needs flash attention, which this backend may lack)"
                    if spec.type_v not in ("f16", "f32", "bf16") else "")
            raise ValueError(f"{spec.name}: {e}{hint}") from None
        self.kv_log = parse_kv_log(log.take())
        self.n_cells = self.ctx.n_ctx
        self.kv_bytes = None if shape.swa else self.n_cells * shape.bytes_per_cell(spec.type_k, spec.type_v)
        if spec.policy != "full":
            kw = dict(budget=cfg["budget"], interval=cfg["interval"], sink=cfg["sink"], window=DEFAULT_WINDOW,
                      horizon=cfg["horizon"], n_threads=cfg["score_threads"])
            kw.update(spec.settings)
            if spec.policy == "tri":
                kw["calib"] = calib
            if spec.shift:
                import inspect
                if "shift" not in inspect.signature(self.ctx.set_kv_policy).parameters:
                    raise ValueError(f"{spec.name}: this build has no shift position mode yet")
                kw["shift"] = True
            if spec.per_head:
                kw["per_head"] = spec.per_head
            self.ctx.set_kv_policy(spec.policy, **kw)
        self.n_past = 0              # tokens decoded (the logical position; with +shift positions compact)
        self.next_tok = None
        self.prefill_tokens, self.prefill_s = 0, 0.0
        self.rows = []

    def stats(self) -> dict:
        if self.spec.policy == "full":
            return {"n_rounds": 0, "n_evicted": 0, "t_score_ms": 0.0, "t_evict_ms": 0.0,
                    "n_cells_used": int(self.ctx.positions(0).size)}
        return self.ctx.kv_policy_stats(0)

    def advance(self, target: int, tokens: list) -> None:
        """Prefill with the policy attached until target tokens have been decoded."""
        if target <= self.n_past:
            return
        chunk = tokens[self.n_past:target]
        t0 = time.perf_counter()
        logits = self.ctx.decode(chunk, logits="last")
        self.prefill_s += time.perf_counter() - t0
        self.prefill_tokens += len(chunk)
        self.n_past = target
        self.next_tok = int(np.argmax(logits))

    def step(self) -> None:
        logits = self.ctx.decode([self.next_tok], logits="last")
        self.next_tok = int(np.argmax(logits))
        self.n_past += 1

    def prepare(self, pos: int, tokens: list) -> None:
        """Bring the sequence to position pos: prefill pos - 1 tokens, then one untimed decode step."""
        self.advance(pos - 1, tokens)
        self.step()                  # position pos - 1, untimed: the round a prefill leaves pending runs here
        self.pos, self.windows = pos, []
        self.start = (self.n_past, self.next_tok)
        self.s0 = self.stats()

    def window(self) -> float:
        """Time --window decode steps; full attention then rewinds, so every window runs at the same position
        (an evicting policy cannot take back its evictions: its windows follow each other, at the same cost)."""
        a = self.stats()
        t0 = time.perf_counter()
        for _ in range(self.cfg["window"]):
            self.step()
        dt = time.perf_counter() - t0
        b = self.stats()
        self.windows.append((dt, b["t_score_ms"] - a["t_score_ms"] + b["t_evict_ms"] - a["t_evict_ms"],
                             b["n_rounds"] - a["n_rounds"]))
        if self.spec.policy == "full":
            self.ctx.lc.llama_memory_seq_rm(self.ctx.memory, 0, self.start[0], -1)
            self.n_past, self.next_tok = self.start
        return dt

    def finish(self, shape: ModelShape, ref: Optional[list] = None) -> dict:
        """The row of the position prepared last; ref: the reference windows timed alongside (full at the budget)."""
        cfg, pos = self.cfg, self.pos
        s1 = self.stats()
        times = [w[0] for w in self.windows]
        total = sum(times)
        # rates over the total time of the windows: a round costs what it costs, amortized over the steps
        row = {
            "policy": self.spec.name, "position": pos, "window": cfg["window"], "repeat": len(times),
            "decode_tok_s": round(cfg["window"] * len(times) / total, 3),
            "decode_ms_per_tok": round(total * 1e3 / (cfg["window"] * len(times)), 4),
            "score_share": round(sum(w[1] for w in self.windows) / (total * 1e3), 5),
            "n_rounds": sum(w[2] for w in self.windows),
            "score_ms": round(s1["t_score_ms"] - self.s0["t_score_ms"], 4),
            "evict_ms": round(s1["t_evict_ms"] - self.s0["t_evict_ms"], 4),
            "decode_ms": round(total * 1e3, 4),
            "cells_used": s1["n_cells_used"],
            "kv_cells": self.n_cells,
        }
        if ref:
            # against the reference windows timed next to these (robust to changing machine load)
            row["vs_ref"] = round(sum(ref) / total, 4)
        if self.spec.policy == "full":
            # what a context just large enough for this position allocates (the formula the real one is checked by)
            cells = pad256(pos + cfg["window"])
            row["kv_cells"] = cells
            row["kv_bytes"] = None if shape.swa else cells * shape.bytes_per_cell(self.spec.type_k, self.spec.type_v)
        else:
            row["kv_bytes"] = self.kv_bytes
        self.rows.append(row)
        return row

    def summary(self) -> dict:
        st = self.stats()
        log_bytes = self.kv_log["bytes"]
        check = None
        if self.kv_bytes is not None and log_bytes is not None:
            check = abs(self.kv_bytes - log_bytes) <= self.kv_log["resolution"]
        return {
            "policy": self.spec.name, "type_k": self.spec.type_k, "type_v": self.spec.type_v,
            "shift": self.spec.shift,
            "kv_cells_allocated": self.n_cells, "kv_bytes_allocated": self.kv_bytes,
            "kv_bytes_log": log_bytes, "kv_bytes_check": check, "kv_buffers": self.kv_log["buffers"],
            "prefill_tokens": self.prefill_tokens,
            "prefill_tok_s": round(self.prefill_tokens / self.prefill_s, 2) if self.prefill_s > 0 else None,
            "n_rounds_total": st["n_rounds"], "n_evicted_total": st["n_evicted"],
            "score_ms_total": round(st["t_score_ms"], 3), "evict_ms_total": round(st["t_evict_ms"], 3),
            "tokens_decoded": self.n_past, "cells_used_final": st["n_cells_used"],
        }

    def close(self) -> None:
        self.ctx.close()


# -- parallel sequences -----------------------------------------------------------

def decode_parallel(ctx, toks: list, pos: list) -> list:
    """One batch: token toks[s] at position pos[s] of sequence s, logits for each; returns the argmax tokens."""
    lc, b, n = ctx.lc, ctx.batch, len(toks)
    for s in range(n):
        b.token[s], b.pos[s], b.n_seq_id[s], b.logits[s] = int(toks[s]), int(pos[s]), 1, True
        b.seq_id[s][0] = s
    b.n_tokens = n
    rc = lc.llama_decode(ctx.ctx_ptr, b)
    if rc != 0:
        raise RuntimeError(f"llama_decode failed with {rc} decoding {n} parallel sequences"
                           + (" (no free KV cell)" if rc == 1 else ""))
    out = []
    for s in range(n):
        p = lc.llama_get_logits_ith(ctx.ctx_ptr, s)
        out.append(int(np.argmax(np.ctypeslib.as_array(p, shape=(ctx.model.n_vocab,)))))
    return out


def run_parallel(model, shape: ModelShape, log: KvLog, spec: PolicySpec, cfg: dict, n_seq: int, position: int,
                 tokens: list, calib: Optional[Path], progress) -> dict:
    """n_seq sequences under one policy in one context, decoding together: aggregate tok/s."""
    from ..context import Context
    per_seq = pad256(cells_needed(model.lc, cfg["budget"], cfg["interval"], cfg["n_batch"]))
    log.take()
    ctx = Context(model, n_ctx=n_seq * per_seq, n_batch=max(cfg["n_batch"], n_seq), n_seq_max=n_seq,
                  n_threads=cfg["threads"], kv_unified=cfg["kv_unified"], type_k=spec.type_k, type_v=spec.type_v)
    try:
        kv_log = parse_kv_log(log.take())
        kw = dict(budget=cfg["budget"], interval=cfg["interval"], sink=cfg["sink"], window=DEFAULT_WINDOW,
                  horizon=cfg["horizon"], n_threads=cfg["score_threads"])
        kw.update(spec.settings)
        if spec.policy == "tri":
            kw["calib"] = calib
        ctx.set_kv_policy(spec.policy, **kw)
        t0 = time.perf_counter()
        nxt = []
        for s in range(n_seq):
            progress(f"parallel: prefilling sequence {s + 1}/{n_seq} to position {position - 1}")
            logits = ctx.decode(tokens[:position - 1], seq_id=s, logits="last")
            nxt.append(int(np.argmax(logits)))
        prefill_s = time.perf_counter() - t0

        def step(toks):
            return decode_parallel(ctx, toks, [ctx.pos_max(s) + 1 for s in range(n_seq)])

        nxt = step(nxt)                       # untimed: the rounds the prefill left pending
        stats = lambda: [ctx.kv_policy_stats(s) for s in range(n_seq)]   # noqa: E731

        def policy_ms(sts):
            # per-sequence counters (newer builds) add up; context-wide ones are the same for every sequence
            same = all((x["n_rounds"], x["t_score_ms"]) == (sts[0]["n_rounds"], sts[0]["t_score_ms"]) for x in sts)
            use = sts[:1] if same else sts
            return sum(x["t_score_ms"] + x["t_evict_ms"] for x in use), sum(x["n_rounds"] for x in use)

        progress(f"parallel: {n_seq} sequences x {cfg['window']} steps")
        windows, shares, rounds = [], [], 0
        for _ in range(cfg["repeat"]):
            ms0, r0 = policy_ms(stats())
            t0 = time.perf_counter()
            for _ in range(cfg["window"]):
                nxt = step(nxt)
            dt = time.perf_counter() - t0
            ms1, r1 = policy_ms(stats())
            windows.append(dt)
            shares.append(ms1 - ms0)
            rounds += r1 - r0
        total = sum(windows)
        kv_bytes = None if shape.swa else ctx.n_ctx * shape.bytes_per_cell(spec.type_k, spec.type_v)
        return {
            "policy": spec.name, "n_seq": n_seq, "kv_unified": cfg["kv_unified"], "position": position,
            "window": cfg["window"], "repeat": len(windows),
            "aggregate_tok_s": round(n_seq * cfg["window"] * len(windows) / total, 3),
            "per_seq_tok_s": round(cfg["window"] * len(windows) / total, 3),
            "score_share": round(sum(shares) / (total * 1e3), 5),
            "n_rounds": rounds, "kv_cells": ctx.n_ctx, "kv_bytes": kv_bytes, "kv_bytes_log": kv_log["bytes"],
            "prefill_tok_s": round(n_seq * (position - 1) / prefill_s, 2),
            "cells_used": [ctx.kv_policy_stats(s)["n_cells_used"] for s in range(n_seq)],
        }
    finally:
        ctx.close()


# -- the benchmark ---------------------------------------------------------------

def _positions_with_rounds(positions: list, *, budget: int, interval: int, steps: int, evicting: bool) -> None:
    """A round runs only once a sequence would exceed budget + interval (docs/eviction.md). At a position P the
    sequence reaches P + steps (the timed decode steps); where that stays within budget + interval the evicting
    policies run as full attention. At every position: refused (UserError); at some: said in one line."""
    limit = budget + interval
    idle = [p for p in positions if p + steps <= limit]
    if not evicting or not idle:
        return
    if len(idle) == len(positions):
        raise UserError(f"no eviction round can happen: at --positions {','.join(map(str, positions))} the "
                        f"sequence reaches at most {max(idle) + steps} tokens (position + {steps} timed steps), "
                        f"within --budget + --interval = {limit}, so the policies would be measured as full "
                        f"attention; give --positions above {limit - steps}, or lower --budget")
    s = "s" if len(idle) > 1 else ""
    print(f"pytriatt: note: bench: at position{s} {', '.join(map(str, idle))} no eviction round happens (the "
          f"sequence stays within --budget + --interval = {limit}): the policies run as full attention there",
          file=sys.stderr, flush=True)


def run_bench(model_path, *, budget: int, positions: list, policies: list, window: int = 128, repeat: int = 1,
              interval: int = DEFAULT_INTERVAL, n_batch: int = 512, sink: int = DEFAULT_SINK,
              threads: Optional[int] = None, score_threads: int = 0, n_gpu_layers: int = 0, calib: Optional[Path] = None,
              calib_tokens: int = QUICK_TOKENS, parallel=None, parallel_position: Optional[int] = None,
              kv_unified: bool = False, interleave: bool = True, progress: bool = True,
              horizon: int = DEFAULT_HORIZON) -> dict:
    """Run the benchmark; returns the report (the --json output). See the module docstring.
    The policies run with their default protections (the -1 window rule); horizon: tri's."""
    from .. import _llama
    from ..context import Model

    def say(msg):
        if progress:
            print(f"bench: {msg}", file=sys.stderr, flush=True)

    model_path = Path(model_path)
    positions = sorted(set(int(p) for p in positions))
    if budget < 1:
        raise ValueError("--budget must be positive")
    if window < 1 or repeat < 1:
        raise ValueError("--window and --repeat must be positive")
    if not positions or positions[0] < 2:
        raise ValueError("--positions must be at least 2")
    has_full = any(p.policy == "full" for p in policies)
    full_positions = sorted(set(positions) | ({budget} if has_full else set()))
    span = window * repeat + 1
    for a, b in zip(full_positions, full_positions[1:]):
        if b - a < span:
            raise ValueError(f"positions {a} and {b} (the budget is measured too, for full attention) are closer "
                             f"than window x repeat + 1 = {span} tokens; space them further or shorten --window")
    _positions_with_rounds(positions, budget=budget, interval=interval, steps=window * repeat,
                           evicting=any(p.policy != "full" for p in policies))
    lc = _llama.require_patched("kv policy")
    if any(p.policy == "tri" for p in policies) and calib is None:
        calib = ensure_calibrated(model_path, tokens=calib_tokens, n_gpu_layers=n_gpu_layers, progress=progress)

    model = Model(model_path, n_gpu_layers=n_gpu_layers)
    log = KvLog(lc)
    try:
        shape = model_shape(model)
        nt = threads or _llama.default_threads()
        cfg = dict(budget=budget, interval=interval, n_batch=n_batch, sink=sink, threads=nt,
                   score_threads=score_threads, window=window, repeat=repeat, kv_unified=kv_unified,
                   horizon=horizon)
        max_pos = max(full_positions)
        tokens = text_tokens(model, default_text(), max_pos + 1, repeat=True)
        rss_ok = rss_reset()
        runs = []

        def open_run(spec):
            cells = (max_pos + window) if spec.policy == "full" else cells_needed(model.lc, budget, interval, n_batch)
            r = PolicyRun(spec, model, shape, log, cfg, cells, calib)
            say(f"{spec.name}: {r.n_cells} KV cells ({r.kv_bytes / 2**20:.2f} MiB)" if r.kv_bytes is not None
                else f"{spec.name}: {r.n_cells} KV cells")
            return r

        def positions_of(spec):
            return full_positions if spec.policy == "full" else positions

        def say_row(row):
            say(f"{row['policy']} @ {row['position']}: {row['decode_tok_s']:.2f} tok/s, scoring "
                f"{100 * row['score_share']:.2f}% ({row['n_rounds']} rounds)"
                + (f", x{row['vs_ref']:.3f} of full at the budget" if "vs_ref" in row else ""))

        summaries, ref = {}, None
        if interleave:
            # all contexts alive, positions in the outer loop, windows of the policies alternating; full attention
            # at position = budget is timed again next to every window (a second small context that rewinds), so
            # the target ratio compares windows a few seconds apart, whatever the machine's load does meanwhile
            runs = [open_run(s) for s in policies]
            full = next((s for s in policies if s.policy == "full"), None)
            if full is not None:
                ref = PolicyRun(PolicySpec("full@budget", "full", False, full.type_k, full.type_v), model, shape, log,
                           cfg, budget + window, None)
                ref.prepare(budget, tokens)
            for pos in full_positions:
                active = [r for r in runs if pos in positions_of(r.spec)]
                for r in active:
                    n0, t0 = r.prefill_tokens, r.prefill_s
                    say(f"{r.spec.name}: prefilling to position {pos}")
                    r.prepare(pos, tokens)
                    if r.prefill_s > t0:
                        say(f"{r.spec.name}: {r.prefill_tokens - n0} tokens prefilled at "
                            f"{(r.prefill_tokens - n0) / (r.prefill_s - t0):.1f} tok/s")
                say(f"position {pos}: {repeat} x {window} decode steps per policy, alternating")
                ref_times = {id(r): [] for r in active}
                for k in range(repeat):
                    order = active if k % 2 == 0 else active[::-1]
                    for r in order:
                        r.window()
                        if ref is not None:
                            ref_times[id(r)].append(ref.window())
                for r in active:
                    say_row(r.finish(shape, ref_times[id(r)] if ref is not None else None))
            peak = rss_peak()
            for r in runs:
                summaries[r.spec.name] = dict(r.summary(), peak_rss_bytes=None)
            if ref is not None:
                ref.close()
        else:
            peak = None
            for s in policies:
                rss_reset()
                r = open_run(s)
                for pos in positions_of(s):
                    say(f"{r.spec.name}: to position {pos}, then {repeat} x {window} decode steps")
                    r.prepare(pos, tokens)
                    for _ in range(repeat):
                        r.window()
                    say_row(r.finish(shape))
                summaries[s.name] = dict(r.summary(), peak_rss_bytes=rss_peak() if rss_ok else None)
                runs.append(r)
                r.close()
        rows = [row for r in runs for row in r.rows]
        for r in runs:
            r.close()

        report = {
            "model": str(model_path), "calib": str(calib) if calib else None,
            "budget": budget, "interval": interval, "n_batch": n_batch, "sink": sink, "threads": nt,
            "score_threads": score_threads or nt, "n_gpu_layers": n_gpu_layers, "window": window, "repeat": repeat,
            "positions": positions, "interleaved": interleave,
            "backends": _llama.built_backends(),
            "kv_bytes_per_cell": {s.name: (None if shape.swa else shape.bytes_per_cell(s.type_k, s.type_v))
                                  for s in policies},
            "peak_rss_bytes": peak,
            "policies": summaries, "rows": rows,
            "ratios": ratios(rows, policies, budget),
        }
        if parallel:
            spec = next((p for p in policies if p.policy != "full"), None)
            if spec is None:
                raise ValueError("--parallel needs an evicting policy in --policies (e.g. tri)")
            per_seq = (pad256(cells_needed(model.lc, budget, interval, n_batch))
                       * shape.bytes_per_cell(spec.type_k, spec.type_v))
            full = next((p for p in policies if p.policy == "full"), None)
            full_bytes = (pad256(max_pos + window) * shape.bytes_per_cell(full.type_k, full.type_v)
                          if full else None)
            if parallel == "auto":
                if full_bytes is None:
                    raise ValueError("--parallel auto sizes the sequences by full attention's KV memory at the "
                                     "largest position: include full in --policies, or give N")
                n_seq = max(1, full_bytes // per_seq)
            else:
                n_seq = int(parallel)
            ppos = parallel_position or 4 * budget
            par = run_parallel(model, shape, log, spec, cfg, n_seq, ppos, tokens if ppos <= len(tokens)
                               else text_tokens(model, default_text(), ppos, repeat=True), calib, say)
            ref = next((r for r in rows if r["policy"] == (full.name if full else None) and r["position"] == max_pos),
                       None)
            if ref:
                par["vs_full"] = {"full_position": max_pos, "full_tok_s": ref["decode_tok_s"],
                                  "full_kv_bytes": ref["kv_bytes"],
                                  "throughput_ratio": round(par["aggregate_tok_s"] / ref["decode_tok_s"], 3),
                                  "kv_bytes_ratio": (round(par["kv_bytes"] / ref["kv_bytes"], 3)
                                                     if par["kv_bytes"] and ref["kv_bytes"] else None)}
            report["parallel"] = par
        return report
    finally:
        log.close()
        model.close()


def ratios(rows: list, policies: list, budget: int) -> list:
    """policy / full at the same position, and against full at position = budget (the target metric)."""
    full = next((p for p in policies if p.policy == "full"), None)
    if full is None:
        return []
    f = {r["position"]: r for r in rows if r["policy"] == full.name}
    gaps = {(p.policy, p.type_k, p.type_v): p.name for p in policies if not p.shift and not p.per_head}
    out = []
    for r in rows:
        if r["policy"] == full.name:
            continue
        spec = next(p for p in policies if p.name == r["policy"])
        same, at_budget = f.get(r["position"]), f.get(budget)
        x = {"policy": r["policy"], "position": r["position"]}
        if "vs_ref" in r:
            x["tok_s_vs_full_at_budget"] = r["vs_ref"]          # paired windows (interleaved runs)
        elif at_budget:
            x["tok_s_vs_full_at_budget"] = round(r["decode_tok_s"] / at_budget["decode_tok_s"], 4)
        if same:
            x["tok_s_vs_full"] = round(r["decode_tok_s"] / same["decode_tok_s"], 4)
            if r["kv_bytes"] and same["kv_bytes"]:
                x["kv_bytes_full_over_policy"] = round(same["kv_bytes"] / r["kv_bytes"], 3)
        x["score_share"] = r["score_share"]
        if spec.shift:
            base = gaps.get((spec.policy, spec.type_k, spec.type_v))
            g = next((q for q in rows if q["policy"] == base and q["position"] == r["position"]), None)
            if g:
                # the extra time per step the shift mode costs, as a share of its decode time
                x["shift_cost_share"] = round(1 - r["decode_tok_s"] / g["decode_tok_s"], 4)
        out.append(x)
    return out
