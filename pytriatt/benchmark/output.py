"""The benchmark's report as text tables and as a plot of decode speed against position."""

from __future__ import annotations

from pathlib import Path

from ..report import mib_number, require_matplotlib

__all__ = ["format_report", "plot_report"]


def format_report(rep: dict) -> str:
    lines = [f"model {rep['model']}  budget {rep['budget']}  interval {rep['interval']}  n_batch {rep['n_batch']}  "
             f"threads {rep['threads']}  window {rep['window']} x {rep['repeat']}  backends {','.join(rep['backends'])}"
             f"  ngl {rep['n_gpu_layers']}"]
    lines.append(f"{'policy':<14}{'position':>9}{'tok/s':>10}{'ms/tok':>9}{'score%':>8}{'rounds':>7}"
                 f"{'KV cells':>9}{'KV MiB':>9}{'x full@B':>9}")
    for r in rep["rows"]:
        ref = f"{r['vs_ref']:.3f}" if "vs_ref" in r else "-"
        lines.append(f"{r['policy']:<14}{r['position']:>9}{r['decode_tok_s']:>10.2f}{r['decode_ms_per_tok']:>9.2f}"
                     f"{100 * r['score_share']:>8.2f}{r['n_rounds']:>7}{r['kv_cells']:>9}{mib_number(r['kv_bytes']):>9}{ref:>9}")
    if any("vs_ref" in r for r in rep["rows"]):
        lines.append("  (x full@B: tok/s over full attention's at position = budget, timed in the adjacent window)")
    lines.append("")
    lines.append(f"{'policy':<14}{'prefill tok/s':>14}{'rounds':>8}{'score ms':>10}{'evict ms':>10}"
                 f"{'KV MiB alloc':>13}{'log MiB':>9}{'peak RSS MiB':>13}")
    for name, s in rep["policies"].items():
        chk = "" if s["kv_bytes_check"] in (None, True) else " (!)"
        lines.append(f"{name:<14}{s['prefill_tok_s'] or 0:>14.1f}{s['n_rounds_total']:>8}{s['score_ms_total']:>10.1f}"
                     f"{s['evict_ms_total']:>10.1f}{mib_number(s['kv_bytes_allocated']):>13}"
                     f"{mib_number(s['kv_bytes_log']) + chk:>9}{mib_number(s['peak_rss_bytes']):>13}")
    if any(s["peak_rss_bytes"] is None for s in rep["policies"].values()):
        lines.append(f"  (peak RSS per policy needs --sequential: interleaved policies share one process, whose peak "
                     f"was {mib_number(rep.get('peak_rss_bytes'))} MiB)")
    idle = sorted({f"{r['policy']}@{r['position']}" for r in rep["rows"] if not r["policy"].startswith("full")
                   and r["position"] >= rep["budget"] + rep["interval"] and r["n_rounds"] == 0})
    if idle:
        lines.append(f"  (score% is 0 where no eviction round fell in the timed window ({', '.join(idle)}): a "
                     f"--window of at least --interval ({rep['interval']}) times one round per window)")
    if rep["ratios"]:
        lines.append("")
        lines.append(f"{'policy':<14}{'position':>9}{'vs full@budget':>15}{'vs full@pos':>12}{'KV full/pol':>12}"
                     f"{'score%':>8}{'shift cost':>11}")
        for x in rep["ratios"]:
            def f(k, pct=False):
                v = x.get(k)
                return "-" if v is None else (f"{100 * v:.1f}%" if pct else f"{v:.3f}")
            lines.append(f"{x['policy']:<14}{x['position']:>9}{f('tok_s_vs_full_at_budget'):>15}"
                         f"{f('tok_s_vs_full'):>12}{f('kv_bytes_full_over_policy'):>12}"
                         f"{100 * x['score_share']:>8.2f}{f('shift_cost_share', True):>11}")
    if rep.get("parallel"):
        p = rep["parallel"]
        lines.append("")
        lines.append(f"parallel: {p['n_seq']} x {p['policy']} (budget {rep['budget']}, position {p['position']}, "
                     f"{'unified' if p['kv_unified'] else 'one stream per sequence'}): "
                     f"{p['aggregate_tok_s']:.2f} tok/s aggregate, {p['per_seq_tok_s']:.2f} per sequence, "
                     f"scoring {100 * p['score_share']:.2f}%, KV {mib_number(p['kv_bytes'])} MiB")
        v = p.get("vs_full")
        if v:
            lines.append(f"  vs one full sequence at {v['full_position']}: {v['full_tok_s']:.2f} tok/s, KV "
                         f"{mib_number(v['full_kv_bytes'])} MiB -> throughput x{v['throughput_ratio']:.2f}, "
                         f"KV memory x{v['kv_bytes_ratio']}")
    return "\n".join(lines)


def plot_report(rep: dict, out: Path) -> None:
    plt = require_matplotlib()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name in rep["policies"]:
        rows = [r for r in rep["rows"] if r["policy"] == name]
        ax.plot([r["position"] for r in rows], [r["decode_tok_s"] for r in rows], marker="o", label=name)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("position (tokens in the sequence)")
    ax.set_ylabel("decode tok/s")
    ax.set_ylim(bottom=0)
    ax.axvline(rep["budget"], color="grey", lw=0.8, ls="--")
    ax.set_title(f"{Path(rep['model']).name}: decode speed vs position, budget {rep['budget']}", fontsize=10)
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)
