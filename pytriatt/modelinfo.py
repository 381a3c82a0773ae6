"""What a calibration says about a model: concentration profile, summaries, plots.

Shared by ``pytriatt calibrate`` (its closing summary), ``pytriatt info`` and
``pytriatt plot``.

**Concentration.** TriAttention relies on pre-RoPE queries clustering around a fixed
center per head and frequency band. For band ``f`` of a head, the mean resultant length
is ``R_f = |E q_f| / E|q_f|`` (0 = no common direction, 1 = every query has the same
phase). A head's R is the ``E|q_f|``-weighted mean of its bands' R_f::

    R_head = sum_f |E q_f| / sum_f E|q_f|

so bands that carry more of the query's magnitude count more, and ``R_head = 1`` exactly
when every band is perfectly concentrated. Layers without a KV cache of their own
(all-zero statistics, or ``rope.kv_layers`` False) are left out of every figure. The
paper reports about 90% of Qwen3-8B's heads above 0.95.

    from pytriatt.modelinfo import concentration_profile, format_profile
    prof = concentration_profile(Calibration.from_gguf("model.tri.gguf"))
    print(format_profile(prof))
"""

from __future__ import annotations

import os
import shlex
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

from . import gguf_io
from .errors import CalibrationError
from .gguf_model import ModelMeta, model_shape, open_model
from .report import decimal_size, require_matplotlib

__all__ = [
    "THRESHOLDS",
    "head_concentration",
    "concentration_profile",
    "format_profile",
    "model_summary",
    "info_report",
    "format_info",
    "support_report",
    "format_support",
    "distance_curve",
    "pick_heads",
    "plot_calibration",
]

THRESHOLDS = (0.95, 0.8)
PAPER_NOTE = "the paper reports ~90% of Qwen3-8B heads above 0.95"


def _key(t: float) -> str:
    return "share_above_" + f"{t:.2f}".replace(".", "")  # 0.95 -> share_above_095


# ---------------------------------------------------------------------------
# concentration
# ---------------------------------------------------------------------------


def head_concentration(q_mean, q_abs_mean, kv_layers: Optional[Sequence[bool]] = None) -> np.ndarray:
    """R per layer and query head, ``[n_layer, n_head]`` float64.

    ``R = sum_f |q_mean_f| / sum_f q_abs_mean_f``; NaN where it is undefined (a layer
    without KV per ``kv_layers``, or a head whose statistics are all zero).
    """
    qm = np.asarray(q_mean)
    qa = np.asarray(q_abs_mean, dtype=np.float64)
    if qm.ndim != 3 or qa.shape != qm.shape:
        raise ValueError(f"expected two [n_layer, n_head, n_freq] arrays, got {qm.shape} and {qa.shape}")
    num = np.abs(qm.astype(np.complex128)).sum(axis=2)
    den = qa.sum(axis=2)
    with np.errstate(invalid="ignore", divide="ignore"):
        R = np.where(den > 0, num / np.where(den > 0, den, 1.0), np.nan)
    if kv_layers is not None:
        R[~np.asarray(kv_layers, dtype=bool)] = np.nan
    return R


def concentration_profile(cal) -> Dict[str, Any]:
    """The concentration profile of a :class:`pytriatt.core.Calibration` (JSON-ready dict).

    Keys: ``definition``; ``n_layer``, ``n_head``, ``n_freq``; ``n_heads`` (heads counted);
    ``mean``, ``median``, ``min`` of R over those heads; ``share_above_095`` and
    ``share_above_080`` (fraction of heads with R > 0.95 / > 0.8), ``count_above_095``,
    ``count_above_080``; ``layers``: one entry per layer with statistics (``layer``, ``mean``,
    ``min``, ``max``, ``min_head``, ``n_heads``, ``count_above_095``); ``excluded_layers``
    (no KV cache or all-zero statistics); ``heads``: R per layer and head (None where
    excluded), rounded to 6 digits.
    """
    kv = getattr(getattr(cal, "rope", None), "kv_layers", None)
    R = head_concentration(cal.q_mean, cal.q_abs_mean, kv)
    L, H = R.shape
    layers: List[Dict[str, Any]] = []
    excluded: List[int] = []
    for l in range(L):
        row = R[l]
        ok = np.isfinite(row)
        if not ok.any():
            excluded.append(l)
            continue
        vals = row[ok]
        idx = np.flatnonzero(ok)
        layers.append({
            "layer": l,
            "mean": float(vals.mean()),
            "min": float(vals.min()),
            "max": float(vals.max()),
            "min_head": int(idx[np.argmin(vals)]),
            "n_heads": int(ok.sum()),
            "count_above_095": int((vals > 0.95).sum()),
        })
    allv = R[np.isfinite(R)]
    prof: Dict[str, Any] = {
        "definition": "R_head = sum_f |E q_f| / sum_f E|q_f| (E|q_f|-weighted mean of the per-band R_f)",
        "n_layer": int(L),
        "n_head": int(H),
        "n_freq": int(np.asarray(cal.q_mean).shape[2]),
        "n_heads": int(allv.size),
        "mean": float(allv.mean()) if allv.size else None,
        "median": float(np.median(allv)) if allv.size else None,
        "min": float(allv.min()) if allv.size else None,
    }
    for t in THRESHOLDS:
        c = int((allv > t).sum())
        prof["count_above_" + _key(t)[len("share_above_"):]] = c
        prof[_key(t)] = (c / allv.size) if allv.size else None
    # the same shares measured on each head's dominant band (largest |E q_f|): the band that
    # dominates the trigonometric term, and the reading closest to the paper's figure
    qm = np.abs(np.asarray(cal.q_mean).astype(np.complex128))
    qa = np.asarray(cal.q_abs_mean, dtype=np.float64)
    f_dom = qm.argmax(axis=2)[..., None]
    with np.errstate(invalid="ignore", divide="ignore"):
        R_dom = (np.take_along_axis(qm, f_dom, 2) / np.take_along_axis(qa, f_dom, 2))[..., 0]
    dom = R_dom[np.isfinite(R)]
    prof["dominant_band"] = {
        "definition": "R_f of each head's band with the largest |E q_f|",
        "mean": float(dom.mean()) if dom.size else None,
        "share_above_095": float((dom > 0.95).mean()) if dom.size else None,
        "share_above_080": float((dom > 0.8).mean()) if dom.size else None,
    }
    prof["layers"] = layers
    prof["excluded_layers"] = excluded
    prof["heads"] = [[None if not np.isfinite(v) else round(float(v), 6) for v in row] for row in R]
    return prof


def _pct(x: Optional[float]) -> str:
    if x is None:
        return "n/a"
    return f"{100 * x:.1f}%" if 0 < x < 0.1 or 0.9 < x < 1 else f"{100 * x:.0f}%"


def _strip(heads: Sequence[Optional[float]], lo: float, width: int) -> str:
    """One text row: a mark per head at its R on [lo, 1] ('o', or a digit when several share a cell)."""
    cells = [0] * width
    below = 0
    for v in heads:
        if v is None:
            continue
        if v < lo:
            below += 1
            continue
        cells[min(width - 1, int((v - lo) / (1.0 - lo) * width))] += 1
    mark = int((0.95 - lo) / (1.0 - lo) * width)
    row = "".join("o" if c == 1 else (str(c) if c < 10 else "*") if c else ("|" if i == mark else ".")
                  for i, c in enumerate(cells))
    return ("<" if below else " ") + row


def format_profile(prof: Dict[str, Any], *, width: int = 30) -> str:
    """A text table of a :func:`concentration_profile`: R per layer, then the totals.

    The last column places each head of the layer on an R axis (``o`` = one head, a digit =
    that many heads in one cell, ``|`` = 0.95, ``<`` = heads below the axis).
    """
    vals = [v for row in prof["heads"] for v in row if v is not None]
    lo = 0.5 if not vals or min(vals) < 0.8 else 0.8
    axis = [" "] * (width + 1)  # labels over the strip column: lo, 0.95 (ending at its '|'), 1
    mark = 1 + int((0.95 - lo) / (1.0 - lo) * width)
    for text, end in ((f"R {lo:g}", 1 + len(f"R {lo:g}")), ("0.95", mark + 1), ("1", width + 1)):
        axis[end - len(text):end] = text
    axis = "".join(axis)
    lines = [
        "concentration: mean resultant length R of each query head's pre-RoPE queries",
        "  (R = sum_f |E q_f| / sum_f E|q_f|; 1 = all queries point one way)",
        f"  layer  R mean  R min (head)  R>0.95   {axis}",
    ]
    for e in prof["layers"]:
        lines.append(
            f"  {e['layer']:>5}  {e['mean']:6.3f}  {e['min']:5.3f} {'(h' + str(e['min_head']) + ')':<6}"
            f"  {e['count_above_095']:>3}/{e['n_heads']:<3}  {_strip(prof['heads'][e['layer']], lo, width)}")
    if prof["excluded_layers"]:
        lines.append(f"  layers without a KV cache of their own (not counted): "
                     f"{', '.join(map(str, prof['excluded_layers']))}")
    if prof["n_heads"]:
        lines.append(
            f"  heads with R > 0.95: {_pct(prof['share_above_095'])} ({prof['count_above_095']} of "
            f"{prof['n_heads']}); R > 0.8: {_pct(prof['share_above_080'])}; mean R {prof['mean']:.3f}, "
            f"median {prof['median']:.3f}, min {prof['min']:.3f}")
        d = prof.get("dominant_band")
        if d and d["mean"] is not None:
            lines.append(f"  on each head's dominant band (largest |E q_f|): R > 0.95 for {_pct(d['share_above_095'])}, "
                         f"R > 0.8 for {_pct(d['share_above_080'])}, mean {d['mean']:.3f}")
        lines.append(f"  ({PAPER_NOTE})")
    else:
        lines.append("  no head has statistics")
    return "\n".join(lines)


# ---------------------------------------------------------------------------
# info
# ---------------------------------------------------------------------------


def model_summary(path_or_reader) -> Dict[str, Any]:
    """Architecture facts of a GGUF model: what ``pytriatt info`` prints first."""
    from .rope import ROPE_PAIRING

    m = open_model(path_or_reader)
    arch = str(m.scalar("general.architecture", "") or "")
    out: Dict[str, Any] = {
        "architecture": arch or None,
        "name": str(m.scalar("general.name", "") or "") or None,
        "rope_type": ROPE_PAIRING.get(arch, "unknown"),
        "n_tensors": len(m.tensors),
    }
    try:
        shape = model_shape(m)
        # an integer llama.cpp reads (a value of another type: the file is malformed, CalibrationError)
        n_rot = m.integer(f"{arch}.rope.dimension_count", shape["head_dim"]) or shape["head_dim"]
    except (NotImplementedError, CalibrationError) as e:
        out.update(n_layer=_shown_int(m, f"{arch}.block_count"), supported=False, unsupported_reason=str(e))
        return out
    n_head, n_kv = shape["heads"][0] if shape["heads"] else 0, shape["heads_kv"][0] if shape["heads_kv"] else 0
    attn = [h for h in shape["heads"] if h > 0]
    n_head = attn[0] if attn else n_head
    kv = [h for h in shape["heads_kv"] if h > 0]
    n_kv = kv[0] if kv else n_kv
    out.update(
        n_layer=shape["n_layer"],
        n_embd=shape["n_embd"],
        n_head=n_head,
        n_head_kv=n_kv,
        head_dim=shape["head_dim"],
        n_rot=n_rot,
        rope_freq_base=_shown_float(m, f"{arch}.rope.freq_base"),
        context_length=_shown_int(m, f"{arch}.context_length"),
        sliding_window=_shown_int(m, f"{arch}.attention.sliding_window"),
    )
    try:
        out.update(_support(m, arch, out))
    except CalibrationError as e:
        out.update(supported=False, unsupported_reason=str(e))
    return out


def _shown_int(m: ModelMeta, key: str) -> Optional[int]:
    """An integer value to show, or None (absent, or not an integer in a malformed file)."""
    f = m.field(key)
    return int(f.value) if f is not None and f.type in gguf_io.INT_TYPES else None


def _shown_float(m: ModelMeta, key: str) -> Optional[float]:
    """A number to show, or None (absent, or not a number in a malformed file)."""
    f = m.field(key)
    return float(f.value) if f is not None and f.type in gguf_io.INT_TYPES + gguf_io.FLOAT_TYPES else None


def _support(m: ModelMeta, arch: str, summary: Dict[str, Any]) -> Dict[str, Any]:
    """Whether TriAttention applies to the model and why not (``supported``, ``unsupported_reason``), and
    what a user should know about how it is scored (``notes``; ``note`` joins them): the answers of
    docs/architectures.md for one file."""
    from .rope import FREQ_FACTOR_ARCHS, MROPE_ARCHS, VERIFIED_ARCHS, no_rope_layers

    k = lambda name, default=None: m.scalar(f"{arch}.{name}", default)  # noqa: E731
    if arch in MROPE_ARCHS:
        summary["rope_type"] = "mrope" if k("rope.dimension_sections") is not None else MROPE_ARCHS[arch]
    rope_type = summary["rope_type"]
    if (m.integer(f"{arch}.attention.kv_lora_rank", 0) or 0) > 0:
        return dict(supported=False, unsupported_reason=(
            f"architecture {arch!r} uses multi-head latent attention (MLA): its cache holds a compressed latent, "
            f"not per-head keys, so tri and snapkv cannot score it and are refused; streaming and random still "
            f"apply"))
    if rope_type == "none":
        return dict(supported=False, unsupported_reason=f"architecture {arch!r} does not use RoPE: the TriAttention "
                                                         f"score needs rotary keys")
    if rope_type == "mrope":
        return dict(supported=False, unsupported_reason=(
            f"architecture {arch!r} with {arch}.rope.dimension_sections uses M-RoPE (multi-axis positions, vision "
            f"models): the scorer handles NORM and NEOX RoPE only"))
    if rope_type == "unknown":
        return dict(supported=False, unsupported_reason=f"architecture {arch!r}: unknown rope type (not NORM or "
                                                         f"NEOX in this llama.cpp)")
    notes: List[str] = []
    n_layer, head_dim, n_rot = summary.get("n_layer") or 0, summary.get("head_dim"), summary.get("n_rot")
    nope = [il for il, no in enumerate(no_rope_layers(arch, n_layer)) if no]
    if nope:
        shown = ", ".join(map(str, nope[:6])) + (", ..." if len(nope) > 6 else "")
        notes.append(f"{'layer' if len(nope) == 1 else 'layers'} {shown} {'has' if len(nope) == 1 else 'have'} no RoPE (NoPE): scored by the distance-free term "
                     f"(docs/method.md)")
    if arch in ("llama4", "afmoe", "smallthinker"):
        notes.append("this architecture skips RoPE in some layers (NoPE) and its RoPE reading is not verified")
    if arch in FREQ_FACTOR_ARCHS:
        names = {t.name for t in m.tensors}
        if "rope_freqs.weight" in names:
            notes.append("per-band rope_freqs (llama 3 style scaling): applied to the scoring frequencies")
        elif {"rope_factors_long.weight", "rope_factors_short.weight"} & names:
            orig = k("rope.scaling.original_context_length", k("context_length"))
            notes.append(f"LongRoPE: llama.cpp uses the long factors when the context's sequence length exceeds "
                         f"{orig}, the short ones otherwise; the policy scores with the same ones")
    if head_dim and n_rot and n_rot < head_dim:
        notes.append(f"partial rotary ({n_rot} of {head_dim} dims): only the rotary dims are scored")
    if arch not in VERIFIED_ARCHS:
        notes.append(f"RoPE reading not verified for {arch!r} (verified: {', '.join(VERIFIED_ARCHS)}); "
                     f"the C++ policy takes its RoPE from llama.cpp itself")
    out: Dict[str, Any] = dict(supported=True)
    if notes:
        out.update(notes=notes, note="; ".join(notes))
    return out


def support_report(path) -> Dict[str, Any]:
    """``pytriatt doctor MODEL``: does TriAttention apply to this GGUF, how is it scored, and why not.

    ``{"file", "architecture", "supported", "reason" (when not), "notes", "policies"}``: ``policies``
    says per policy whether it attaches (``"yes"``), what it needs first (``"needs ..."``: tri on a file
    without statistics) or why not; the answers follow
    docs/architectures.md (refusals are those the C++ policy makes at attach).
    """
    m = model_summary(open_model(path))
    arch = m.get("architecture") or "?"
    rep: Dict[str, Any] = {"file": str(path), "architecture": arch, "supported": bool(m.get("supported")),
                           "notes": list(m.get("notes") or [])}
    from .policy import CALIBRATED_POLICIES, EVICTING, SCORING_POLICIES
    if arch in ("mamba", "mamba2", "rwkv6", "rwkv6qwen2", "rwkv7", "arwkv7"):
        why = f"{arch} keeps a recurrent state, not a KV cache of tokens: token eviction does not apply"
        rep.update(supported=False, reason=why, policies={p: why for p in EVICTING})
        return rep
    if not rep["supported"]:
        rep["reason"] = m.get("unsupported_reason")
        if "latent attention" in (rep["reason"] or ""):
            # the policies that score keys need per-head keys
            why = "MLA: the cache holds a compressed latent shared by the heads, no per-head keys to score"
            refused = SCORING_POLICIES
        else:
            # what TriAttention cannot read here concerns the policies scored with its calibration
            why, refused = rep["reason"], CALIBRATED_POLICIES
        rep["policies"] = {p: why if p in refused else "yes" for p in EVICTING}
        return rep
    rep["policies"] = {p: "yes" for p in EVICTING}
    # what run would ask for first: the statistics (run refuses tri without them, naming this command)
    from . import gguf_io
    hdr = gguf_io.read_header(path)
    if not any(k.startswith("triattention.") for k in hdr.keys()):
        for p in CALIBRATED_POLICIES:
            rep["policies"][p] = f"needs a calibration first: {calibrate_command(str(path))}"
    n_swa = int(hdr.get(f"{arch}.attention.sliding_window") or 0)
    if n_swa > 0:
        rep["notes"].append(f"sliding-window layers keep their own {n_swa}-token window (a cache of their own, "
                            f"never evicted): a budget applies to the global-attention layers; --shift is "
                            f"refused on this model (the local layers' positions would no longer match)")
    return rep


def format_support(rep: Dict[str, Any]) -> str:
    """The text of a :func:`support_report`."""
    lines = [f"model           {rep['file']}", f"architecture    {rep['architecture']}",
             f"TriAttention    {'supported' if rep['supported'] else 'not applicable: ' + str(rep['reason'])}"]
    for note in rep["notes"]:
        lines.append(f"  note          {note}")
    for p, v in rep["policies"].items():
        lines.append(f"  {p:<13} {v if v == 'yes' or v.startswith('needs') else 'refused: ' + v}")
    return "\n".join(lines)


def calibrate_command(model_arg: str) -> str:
    """The command that adds a calibration to ``model_arg`` (a path or a model name)."""
    p = Path(model_arg)
    if p.suffix == ".gguf":
        out = str(p.with_name(p.stem + ".tri.gguf"))
    else:
        out = f"{p.name}.tri.gguf"
    return f"pytriatt calibrate {shlex.quote(model_arg)} -o {shlex.quote(out)}"


def info_report(path, model_arg: Optional[str] = None) -> Dict[str, Any]:
    """Everything ``pytriatt info`` shows, as a JSON-ready dict.

    ``calibration`` is None for a file without ``triattention.*`` keys (then
    ``calibrate_command`` says how to add them), or a dict with ``version``, ``tokens``,
    ``source``, ``fingerprint``, ``model_fingerprint`` (this file's), ``fingerprint_matches``
    and ``n_layer/n_head/n_freq``; ``profile`` is the :func:`concentration_profile`.
    A calibration that cannot be read gives ``calibration: {"error": ...}``.
    """
    from .calibration import Calibration
    from .fingerprint import model_fingerprint

    path = Path(path)
    r = open_model(path)
    rep: Dict[str, Any] = {"file": str(path), "bytes": path.stat().st_size, "model": model_summary(r)}
    try:
        own_fp: Optional[str] = model_fingerprint(r)
    except (NotImplementedError, CalibrationError):
        own_fp = None
    rep["model"]["fingerprint"] = own_fp
    if r.field("triattention.version") is None:
        rep["calibration"] = None
        rep["profile"] = None
        rep["calibrate_command"] = calibrate_command(model_arg or str(path))
        return rep
    try:
        cal = Calibration.from_gguf(r, strict=False)
    except (CalibrationError, NotImplementedError, ValueError) as e:
        msg = str(e).replace("GGUF: ", "", 1)
        rep["calibration"] = {"error": msg}
        rep["profile"] = None
        rep["calibrate_command"] = calibrate_command(model_arg or str(path))
        return rep
    rep["calibration"] = {
        "version": r.integer("triattention.version"),
        "tokens": cal.calib_tokens,
        "source": cal.calib_source,
        "fingerprint": cal.model_fingerprint,
        "model_fingerprint": own_fp,
        "fingerprint_matches": bool(own_fp) and cal.model_fingerprint == own_fp,
        "n_layer": cal.n_layer,
        "n_head": cal.n_head,
        "n_freq": cal.n_freq,
    }
    rep["profile"] = concentration_profile(cal)
    return rep


def format_info(rep: Dict[str, Any]) -> str:
    """The text ``pytriatt info`` prints for an :func:`info_report`."""
    m = rep["model"]
    lines = [f"file          {rep['file']}  ({decimal_size(rep['bytes'])}, {m['n_tensors']} tensors)"]
    lines.append(f"architecture  {m['architecture'] or '?'}" + (f"  \"{m['name']}\"" if m.get("name") else ""))
    if m.get("n_head") is not None:
        gqa = f", GQA {m['n_head'] // m['n_head_kv']}" if m.get("n_head_kv") else ""
        lines.append(f"layers        {m['n_layer']}")
        lines.append(f"heads         {m['n_head']} query, {m['n_head_kv']} KV{gqa}; head_dim {m['head_dim']}")
        rope = m["rope_type"].upper() if m["rope_type"] not in ("none", "unknown") else m["rope_type"]
        base = f", base {m['rope_freq_base']:g}" if m.get("rope_freq_base") is not None else ""
        lines.append(f"rope          {rope} over {m['n_rot']} dims ({m['n_rot'] // 2} bands){base}")
        if m.get("context_length"):
            swa = f"; sliding window {m['sliding_window']}" if m.get("sliding_window") else ""
            lines.append(f"context       {m['context_length']} (trained){swa}")
    elif m.get("n_layer") is not None:
        lines.append(f"layers        {m['n_layer']}")
    if not m.get("supported", True):
        lines.append(f"TriAttention  not applicable: {m['unsupported_reason']}")
    else:
        for i, note in enumerate(m.get("notes") or ([m["note"]] if m.get("note") else [])):
            lines.append(f"{'note' if i == 0 else '':<14}{note}")
    cal = rep["calibration"]
    lines.append("")
    if cal is None:
        lines.append("calibration   none: this file carries no TriAttention statistics (no triattention.* keys)")
        if m.get("supported", True):
            lines.append(f"              add them with:  {rep['calibrate_command']}")
        return "\n".join(lines)
    if "error" in cal:
        lines.append(f"calibration   unreadable: {cal['error']}")
        lines.append(f"              re-create it with:  {rep['calibrate_command']}")
        return "\n".join(lines)
    lines.append(f"calibration   TriAttention statistics, format version {cal['version']} "
                 f"({cal['n_layer']} layers x {cal['n_head']} heads x {cal['n_freq']} bands)")
    lines.append(f"tokens        {cal['tokens']}")
    lines.append(f"source        {cal['source'] or '(not recorded)'}")
    if cal["fingerprint_matches"]:
        match = "matches this model"
    elif not cal["fingerprint"]:
        match = "not recorded"
    else:
        match = (f"DOES NOT match this model ({cal['model_fingerprint']}): the statistics were measured "
                 f"on another model; re-calibrate this one")
    lines.append(f"fingerprint   {cal['fingerprint'] or '-'}  ({match})")
    lines.append("")
    lines.append(format_profile(rep["profile"]))
    return "\n".join(lines)


# ---------------------------------------------------------------------------
# plots
# ---------------------------------------------------------------------------


def distance_curve(cal, layer: int, head: int, deltas) -> np.ndarray:
    """Expected attention logit of a key aligned with the head's mean query, vs distance.

    For a key whose pre-RoPE bands equal the mean query's (``k_f = E q_f``), the logit a
    query at distance Δ gives it is, in expectation over queries,
    ``sum_f |E q_f|^2 cos(omega_f Δ)`` (the paper's trigonometric series with
    ``phi_f = 0``). Returned relative to Δ = 0 (so 1 at Δ = 0, in [-1, 1]).
    """
    w = np.abs(np.asarray(cal.q_mean[layer, head], dtype=np.complex128)) ** 2
    om = np.asarray(cal.omega(layer), dtype=np.float64)
    d = np.asarray(deltas, dtype=np.float64)
    tot = w.sum()
    if tot <= 0:
        return np.zeros_like(d)
    return (np.cos(np.outer(d, om)) @ w) / tot


def pick_heads(R: np.ndarray, n: int) -> List[Tuple[int, int]]:
    """The ``ceil(n/2)`` most and ``floor(n/2)`` least concentrated heads (layer, head), most first."""
    flat = [(float(R[l, h]), l, h) for l in range(R.shape[0]) for h in range(R.shape[1]) if np.isfinite(R[l, h])]
    flat.sort(key=lambda x: (-x[0], x[1], x[2]))
    n = max(1, min(int(n), len(flat)))
    n_top = (n + 1) // 2
    top = flat[:n_top]
    rest = flat[n_top:]
    low = rest[len(rest) - (n - n_top):] if n - n_top > 0 else []
    return [(l, h) for _, l, h in top + low]


def plot_calibration(cal, out, *, n_heads: int = 4, title: Optional[str] = None, dpi: int = 120,
                     max_delta: int = 65536) -> Dict[str, Any]:
    """Draw the calibration of ``cal`` into the image file ``out`` (format from its suffix).

    Top: R of every query head by layer (dots), the layer mean (line), the 0.95 and 0.8
    marks. Bottom: for the ``n_heads`` most and least concentrated heads, the expected
    logit of a key aligned with the head's mean query versus distance
    (:func:`distance_curve`), Δ = 1 .. ``max_delta`` on a log axis.
    Returns ``{"path", "heads": [{"layer", "head", "R"}], "profile"}``.
    """
    plt = require_matplotlib()
    out = Path(out)
    prof = concentration_profile(cal)
    R = head_concentration(cal.q_mean, cal.q_abs_mean, cal.rope.kv_layers)
    if not np.isfinite(R).any():
        raise ValueError("the calibration has no head with statistics (all zero): nothing to plot")
    heads = pick_heads(R, n_heads)
    n = len(heads)
    ncols = min(n, 4)
    nrows = (n + ncols - 1) // ncols
    n_top = (n + 1) // 2
    top_c = ["#006d2c", "#31a354", "#00441b", "#41ab5d"]  # greens: most concentrated
    low_c = ["#cb181d", "#e6550d", "#99000d", "#fb6a4a"]  # reds: least concentrated
    colors = [top_c[i % 4] for i in range(n_top)] + [low_c[i % 4] for i in range(n - n_top)]

    # layout in inches from the top, so that any number of rows of heads keeps its spacing
    W = max(11.0, 3.2 * ncols)
    top_title, a_head, a_h, a_foot, b_head = 0.4, 0.35, 3.2, 0.6, 0.75
    row_head, row_h, row_foot = 0.35, 2.0, 0.55
    Hfig = top_title + a_head + a_h + a_foot + b_head + nrows * (row_head + row_h + row_foot) + 0.05
    left, right, gap = 0.75, 0.2, 0.55
    fig = plt.figure(figsize=(W, Hfig), dpi=dpi)

    def box(x_in: float, y_top_in: float, w_in: float, h_in: float):
        return [x_in / W, 1 - (y_top_in + h_in) / Hfig, w_in / W, h_in / Hfig]

    def y_at(y_in: float) -> float:
        return 1 - y_in / Hfig

    # (a) R by layer
    ax = fig.add_axes(box(left, top_title + a_head, W - left - right, a_h))
    rng = np.random.default_rng(0)
    L, H = R.shape
    jitter = rng.uniform(-0.18, 0.18, size=R.shape)  # spread a layer's heads sideways
    ok = np.isfinite(R)
    xs = (np.arange(L)[:, None] + jitter)[ok]
    ys = R[ok]
    ax.scatter(xs, ys, s=14, color="#555555", alpha=0.55, linewidths=0, label="one query head", zorder=2)
    lm = [(e["layer"], e["mean"]) for e in prof["layers"]]
    ax.plot([a for a, _ in lm], [b for _, b in lm], "-", color="#2c7fb8", lw=1.8, marker="o", ms=3.5,
            label="layer mean", zorder=3)
    ax.axhline(0.95, color="#d7301f", ls="--", lw=1.1, label="R = 0.95", zorder=1)
    ax.axhline(0.8, color="#999999", ls=":", lw=1.1, label="R = 0.8", zorder=1)
    for i, (l, h) in enumerate(heads):
        ax.scatter([l + jitter[l, h]], [R[l, h]], s=70, facecolors="none", edgecolors=colors[i], linewidths=2.0, zorder=4)
    for l in prof["excluded_layers"]:
        ax.axvspan(l - 0.5, l + 0.5, color="#eeeeee", zorder=0)
    lo = float(np.nanmin(R))
    ax.set_ylim(max(0.0, min(0.75, lo - 0.05)), 1.01)
    ax.set_xlim(-0.7, L - 0.3)
    step = 1 if L <= 32 else 2 if L <= 64 else 4
    ax.set_xticks(range(0, L, step))
    ax.set_xlabel("layer")
    ax.set_ylabel("R  (mean resultant length)")
    share = prof["share_above_095"]
    ax.set_title(
        f"(a) R per query head: {_pct(share)} of {prof['n_heads']} heads above 0.95, "
        f"{_pct(prof['share_above_080'])} above 0.8  (circled: drawn below)", fontsize=10, loc="left")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(loc="lower right", bbox_to_anchor=(1.0, 1.0), fontsize=8, ncol=4, frameon=False,
              borderaxespad=0.2, handletextpad=0.4, columnspacing=1.2)

    # (b) predicted logit vs distance
    deltas = np.unique(np.round(np.geomspace(1, max_delta, 4000)).astype(np.int64))
    # geometric bins, 4 per octave: the mean over each bin shows the trend under the fast bands
    edges = np.unique(np.round(np.geomspace(1, max_delta + 1, int(4 * np.log2(max_delta)) + 1)).astype(np.int64))
    info = []
    for i, (l, h) in enumerate(heads):
        w_in = (W - left - right - gap * (ncols - 1)) / ncols
        y0 = top_title + a_head + a_h + a_foot + b_head + (i // ncols) * (row_head + row_h + row_foot) + row_head
        axb = fig.add_axes(box(left + (i % ncols) * (w_in + gap), y0, w_in, row_h))
        y = distance_curve(cal, l, h, deltas)
        axb.plot(deltas, y, color=colors[i], lw=0.6, alpha=0.45)
        centers, means = [], []
        for a, b in zip(edges[:-1], edges[1:]):
            if b <= a:
                continue
            dd = np.arange(a, b) if b - a <= 4096 else np.unique(np.round(np.linspace(a, b - 1, 4096)))
            centers.append(np.sqrt(a * max(a, b - 1)))
            means.append(distance_curve(cal, l, h, dd).mean())
        axb.plot(centers, means, color=colors[i], lw=2.0)
        axb.axhline(0, color="#999999", lw=0.7)
        axb.set_xscale("log", base=2)
        axb.set_xlim(1, max_delta)
        axb.set_ylim(-1.05, 1.05)
        axb.set_yticks([-1, -0.5, 0, 0.5, 1])
        ticks = [t for t in (1, 16, 256, 4096, 65536) if t <= max_delta]
        axb.set_xticks(ticks)
        axb.set_xticklabels([f"{t // 1024}K" if t >= 1024 else str(t) for t in ticks])
        kind = "most" if i < n_top else "least"
        axb.set_title(f"layer {l}, head {h}:  R = {R[l, h]:.3f}  ({kind})", fontsize=9, color=colors[i])
        axb.set_xlabel("distance Δ (tokens)", fontsize=8)
        if i % ncols == 0:
            axb.set_ylabel("relative logit", fontsize=8)
        axb.tick_params(labelsize=8)
        axb.grid(alpha=0.25)
        info.append({"layer": l, "head": h, "R": float(R[l, h])})
    fig.text(0.01, y_at(0.12), title or "TriAttention calibration", fontsize=12, va="top")
    y_b = top_title + a_head + a_h + a_foot
    fig.text(0.01, y_at(y_b + 0.12),
             "(b) predicted attention vs distance, most and least concentrated heads: expected logit of a key "
             "aligned with the head's mean query,", fontsize=10, va="top")
    fig.text(0.01, y_at(y_b + 0.4),
             "     Σ_f |E q_f|² cos(ω_f Δ) / Σ_f |E q_f|²   (relative to Δ = 0; thin: exact at each Δ, "
             "thick: mean over quarter-octave bins of Δ)", fontsize=10, va="top")

    fmt = out.suffix[1:].lower() or "png"
    if fmt not in fig.canvas.get_supported_filetypes():
        plt.close(fig)
        raise ValueError(f"cannot write a {fmt!r} image; use one of: "
                         f"{', '.join(sorted(fig.canvas.get_supported_filetypes()))}")
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    try:
        fig.savefig(tmp, format=fmt)
        os.replace(tmp, out)
    finally:
        plt.close(fig)
        if tmp.exists():
            tmp.unlink()
    return {"path": str(out), "heads": info, "profile": prof}
