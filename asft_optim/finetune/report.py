"""`asft finetune`'s report files: the HS/FA table, the drift per layer of every run, its plot.

    table.md     HS, refusal rate and FA per method, in %
    drift.md     per layer and method: cos(ΔW, d) (signed: < 0 is a move back towards the base
                 model) and ‖C⊥ΔW‖/‖ΔW‖, for ΔW = W_finetuned − W_aligned
    drift.png    the same two quantities over the layers in depth order, one series per method
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ..drift_plot import draw, layout

__all__ = ["results_table", "drift_table", "plot_drift"]

Drifts = Mapping[str, Mapping[str, Mapping[str, float]]]  # method -> layer -> {delta_norm, cos, orth_ratio}


def _pct(x: float | None) -> str:
    return "–" if x is None else f"{100 * x:.1f}"


def results_table(rows: Sequence[Mapping[str, Any]], n_test: int, n_harmful: int, judge: str | None) -> str:
    """Markdown: one row per run with HS, refusal rate and FA (%), the counts they are shares of in the
    header; "–" where HS was not measured (no harmful prompts, or a judge that sees refusals only)."""
    hs = f"n={n_harmful}, {judge}" if n_harmful else "not measured"
    lines = [f"| Method | HS (%, {hs}) | refusal (%, n={n_harmful}) | FA (%, n={n_test}) |", "|---|---|---|---|"]
    lines += [f"| {r['method']} | {_pct(r.get('hs'))} | {_pct(r.get('refusal'))} | {_pct(r['fa'])} |" for r in rows]
    return "\n".join(lines) + "\n"


def drift_table(drift: Drifts) -> str:
    """Markdown: one row per layer, two columns per method (cos(ΔW,d) and ‖C⊥ΔW‖/‖ΔW‖)."""
    methods = list(drift)
    layers = list(dict.fromkeys(layer for per in drift.values() for layer in per))
    head = ["layer"] + [f"{m}: {q}" for m in methods for q in ("cos(ΔW,d)", "‖C⊥ΔW‖/‖ΔW‖")]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for layer in layers:
        cells = [layer]
        for m in methods:
            d = drift[m].get(layer)
            if d is None or d["delta_norm"] == 0.0:
                cells += ["–", "–"] if d is None else ["ΔW = 0", ""]
            else:
                cells += [f"{d['cos']:+.3f}", f"{d['orth_ratio']:.3f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot_drift(drift: Drifts, path: Path, title: str) -> Path:
    """Save a PNG: signed cos(ΔW, d) (top) and ‖C⊥ΔW‖/‖ΔW‖ (bottom) per layer, one series per method, in
    depth order (`drift_plot`); a layer a method left unchanged (ΔW = 0) has no marker for it, and a
    layer no method changed is marked "(not trained)"."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def value(per: Mapping[str, Mapping[str, float]], layer: str, key: str) -> float:
        d = per.get(layer)
        return float("nan") if d is None or d["delta_norm"] == 0.0 else d[key]

    plot = layout((layer for per in drift.values() for layer in per),
                  (layer for per in drift.values() for layer, d in per.items() if d["delta_norm"] > 0.0))
    fig, axes = plt.subplots(2, 1, figsize=(max(7.0, 0.4 * len(plot.layers) + 4), 6.5), sharex=True)
    for i, (method, per) in enumerate(drift.items()):
        style = {"marker": "osD^v<>P*X"[i % 10], "color": f"C{i % 10}", "label": method, "lw": 1.2, "ms": 4}
        draw(axes[0], plot, [value(per, layer, "cos") for layer in plot.layers], **style)
        draw(axes[1], plot, [value(per, layer, "orth_ratio") for layer in plot.layers], **style)
    axes[0].axhline(0.0, color="grey", lw=0.8)
    axes[0].set_ylabel("cos(ΔW, d)\n(< 0: back towards base)")
    axes[0].set_ylim(-1.05, 1.05)
    axes[1].set_ylabel("‖C⊥ΔW‖ / ‖ΔW‖")
    axes[1].set_ylim(-0.02, 1.05)
    for ax in axes:
        ax.grid(alpha=0.3)
    axes[1].set_xticks(range(len(plot.layers)), plot.ticks(), rotation=60, ha="right", fontsize=7)
    axes[0].set_title(title, fontsize=9)
    axes[0].legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
