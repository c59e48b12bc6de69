"""The demo's report folder.

    results.json      every number below (per seed, and summarised), the configuration and timings
    table.md          HS, refusal rate and FA per method and p, in %: mean (min–max) over seeds
    report.md         the table, HS on unseen harmful words, the landscape's effective perturbation
                      lengths (Table 7 layout), drift per layer, the plots, and a warning when SFT
                      itself did not learn the task
    hs_vs_fa.png      HS against FA, one panel per p: mean per method with min–max whiskers, the base
                      and aligned models as reference points
    landscape.png     HS and refusal rate along the aligned direction, the SFT direction and random ones
    drift.png         per layer at the largest p: the signed parallel part cos(ΔW, d) and ‖C⊥ΔW‖/‖ΔW‖
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from ..anchors import Anchors
from ..compare import dodge_offsets
from ..metrics import per_layer, sums
from ..evaluation.results import write_json
from .finetune import load_model

__all__ = ["TABLE", "drift_per_layer", "main_table", "write"]

TABLE = "table.md"


def _pct(x: float | None) -> str:
    return "–" if x is None else f"{100 * x:.1f}"


def _cell(stat: dict[str, float] | None) -> str:
    """'mean (min–max)' in %, or just the value when the seeds agree."""
    if stat is None or stat["mean"] is None:
        return "–"
    if stat["min"] == stat["max"]:
        return _pct(stat["mean"])
    return f"{_pct(stat['mean'])} ({_pct(stat['min'])}–{_pct(stat['max'])})"


def _summary(results: dict[str, Any]) -> tuple[list[str], list[float], dict[tuple[str, float], dict]]:
    rows = results["summary"]
    return (list(dict.fromkeys(r["method"] for r in rows)), sorted({r["p"] for r in rows}),
            {(r["method"], r["p"]): r for r in rows})


def main_table(results: dict[str, Any]) -> str:
    """Markdown: one row per method (the unfine-tuned models first, projections last); per p the HS,
    the refusal rate beside it, and FA; cells are mean (min–max) over seeds, in %."""
    methods, ps, cell = _summary(results)
    head = ["Method"] + [f"{k} p={p:g}" for p in ps for k in ("HS", "refusal", "FA")]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name in ("base", "aligned"):
        ref = results["reference"][name]
        row = [f"{name} (not fine-tuned)"] + [_pct(ref[k]) for _ in ps for k in ("hs", "refusal", "fa")]
        lines.append("| " + " | ".join(row) + " |")
    for m in methods:
        row = [m] + [_cell(cell[m, p][k]) for p in ps for k in ("hs", "refusal", "fa")]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"


def _unseen_table(results: dict[str, Any]) -> str:
    methods, ps, _ = _summary(results)
    per: dict[tuple[str, float], list[float]] = {}
    for r in results["runs"]:
        per.setdefault((r["method"], r["p"]), []).append(r["hs_groups"].get("unseen"))
    head = ["Method"] + [f"HS unseen p={p:g}" for p in ps]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for m in methods:
        cells = []
        for p in ps:
            xs = per[m, p]
            cells.append(_cell({"mean": sum(xs) / len(xs), "min": min(xs), "max": max(xs)}))
        lines.append("| " + " | ".join([m] + cells) + " |")
    return "\n".join(lines) + "\n"


@torch.no_grad()
def drift_per_layer(out: Path, runs: Sequence[dict[str, Any]], aligned: Path, anchors: Anchors,
                    p: float) -> dict[str, dict[str, dict[str, float]]]:
    """method → layer → {delta_norm, cos, orth_ratio} of ΔW = W_finetuned - W_aligned at harmful
    fraction p, recomputed from the saved checkpoints (`asft_optim.metrics.per_layer`)."""
    w0 = dict(load_model(aligned).named_parameters())
    result = {}
    for run in (r for r in runs if r["p"] == p):
        w = dict(load_model(out / run["path"]).named_parameters())
        s = {n: sums(w[n].detach() - w0[n].detach(), anchors[n]) for n in w0 if n in anchors}
        result[run["method"]] = {layer: {"delta_norm": d.delta_norm, "cos": d.cos, "orth_ratio": d.orth_ratio}
                                 for layer, d in per_layer(s).items()}
    return result


def _drift_table(drift: dict[str, dict[str, dict[str, float]]], key: str) -> str:
    methods = list(drift)
    layers = list(next(iter(drift.values())))
    lines = ["| layer | " + " | ".join(methods) + " |", "|" + "---|" * (len(methods) + 1)]
    lines += ["| " + " | ".join([layer] + [f"{drift[m][layer][key]:.3f}" for m in methods]) + " |" for layer in layers]
    return "\n".join(lines) + "\n"


def _landscape_table(results: dict[str, Any]) -> str:
    lines = ["| direction | HS length (α > 0) | HS length (α < 0) | refusal length (α > 0) | "
             "refusal length (α < 0) | HS / refusal at min α | HS / refusal at max α |", "|" + "---|" * 7]
    for c in results["landscape"]:
        lines.append(f"| {c['name']} | {c['length_pos']:.2f} | {c['length_neg']:.2f} | "
                     f"{c['refusal_length_pos']:.2f} | {c['refusal_length_neg']:.2f} | "
                     f"{_pct(c['hs'][0])} / {_pct(c['refusal'][0])} | {_pct(c['hs'][-1])} / {_pct(c['refusal'][-1])} |")
    return "\n".join(lines) + "\n"


def _style(methods: list[str], summary: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Marker, colour and fill per row: one colour family per kind (shade by λ), hollow markers for
    the post-hoc projections."""
    import matplotlib

    kind = {r["method"]: r["kind"] for r in summary}
    family = {"sft": "Reds", "l2sp": "Blues", "asft": "Greens"}
    marker = {"sft": "o", "l2sp": "s", "asft": "^"}
    out = {}
    for m in methods:
        same = [x for x in methods if kind[x] == kind[m] and (" + " in x) == (" + " in m)]
        shade = 0.55 + 0.4 * (same.index(m) / max(len(same) - 1, 1))
        colour = matplotlib.colormaps[family[kind[m]]](shade)
        hollow = " + " in m
        out[m] = {"marker": marker[kind[m]], "color": colour, "mfc": "white" if hollow else colour,
                  "ms": 8 if hollow else 7}
    return out


def _plot_hs_fa(out: Path, results: dict[str, Any], plt: Any) -> None:
    methods, ps, cell = _summary(results)
    style = _style(methods, results["summary"])
    dodge = dict(zip(methods, dodge_offsets(len(methods))))
    fig, axes = plt.subplots(1, len(ps), figsize=(3.9 * len(ps) + 2.8, 4.0), sharey=True, squeeze=False)
    for ax, p in zip(axes[0], ps):
        for m in methods:
            c = cell[m, p]
            x, y = 100 * c["fa"]["mean"] + dodge[m], 100 * c["hs"]["mean"]
            xerr = [[100 * (c["fa"]["mean"] - c["fa"]["min"])], [100 * (c["fa"]["max"] - c["fa"]["mean"])]]
            yerr = [[100 * (c["hs"]["mean"] - c["hs"]["min"])], [100 * (c["hs"]["max"] - c["hs"]["mean"])]]
            st = style[m]
            ax.errorbar([x], [y], xerr=xerr, yerr=yerr, fmt=st["marker"], color=st["color"], mfc=st["mfc"],
                        ms=st["ms"], mew=1.4, elinewidth=0.9, capsize=2, alpha=0.9, label=m)
        for name, mk in (("base", "*"), ("aligned", "D")):
            ref = results["reference"][name]
            ax.scatter([100 * ref["fa"]], [100 * ref["hs"]], marker=mk, s=90 if mk == "*" else 45, color="black",
                       zorder=5, label=f"{name} (not fine-tuned)")
        ax.set_title(f"p = {p:g}")
        ax.set_xlabel("Fine-tune Accuracy (%)")
        ax.set_xlim(-8, 108)
        ax.set_ylim(-8, 108)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("Harmful Score (%)")
    n_seeds = len(results["config"]["seeds"])
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, fontsize=7.5, loc="center left", bbox_to_anchor=(0.995, 0.5), frameon=False)
    fig.suptitle(f"HS against FA: mean over {n_seeds} seed(s), whiskers min–max; markers dodged "
                 "horizontally by ≤ ±4 FA points so that equal results stay visible; hollow = post-hoc projection",
                 fontsize=8.5)
    fig.tight_layout(rect=(0, 0, 1, 0.95))
    fig.savefig(out / "hs_vs_fa.png", dpi=110, bbox_inches="tight")
    plt.close(fig)


def _plot_landscape(out: Path, results: dict[str, Any], plt: Any) -> None:
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.4), sharex=True)
    for c in results["landscape"]:
        style = "--" if c["name"].startswith("random") else "-"
        axes[0].plot(c["alphas"], [100 * h for h in c["hs"]], style, marker=".", label=c["name"])
        axes[1].plot(c["alphas"], [100 * r for r in c["refusal"]], style, marker=".")
    thr = 100 * results["config"]["threshold"]
    axes[0].axhline(thr, color="grey", lw=0.8, ls=":", label=f"threshold ({thr:.0f}% / {100 - thr:.0f}%)")
    axes[1].axhline(100 - thr, color="grey", lw=0.8, ls=":")
    for ax, what in zip(axes, ("Harmful Score (%)", "Refusal rate (%)")):
        ax.set_xlabel("α (perturbation / ‖W‖, per tensor)")
        ax.set_ylabel(what)
        ax.set_ylim(-5, 105)
        ax.grid(alpha=0.3)
    axes[0].set_title("Harmful Score around the aligned model")
    axes[1].set_title("Refusal rate around the aligned model")
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, fontsize=8, loc="lower center", ncol=min(len(labels), 6), frameon=False,
               bbox_to_anchor=(0.5, -0.01))
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    fig.savefig(out / "landscape.png", dpi=110)
    plt.close(fig)


def _plot_drift(out: Path, results: dict[str, Any], plt: Any) -> None:
    drift = results["drift"]
    layers = list(next(iter(drift.values())))
    width = 0.8 / len(drift)
    fig, axes = plt.subplots(2, 1, figsize=(9.5, 6.2), sharex=True)
    for i, (m, per) in enumerate(drift.items()):
        xs = [j + i * width for j in range(len(layers))]
        axes[0].bar(xs, [per[layer]["cos"] for layer in layers], width, label=m)
        axes[1].bar(xs, [per[layer]["orth_ratio"] for layer in layers], width)
    axes[0].axhline(0, color="black", lw=0.8)
    axes[0].set_ylim(-1.05, 1.05)
    axes[0].set_ylabel("cos(ΔW, d)\n(signed parallel part)")
    axes[0].set_title(f"Where the update went, per layer (p = {max(r['p'] for r in results['runs']):g}, "
                      f"seed {results['drift_seed']}): +1 towards the aligned model, −1 back towards the base",
                      fontsize=9)
    axes[1].set_ylim(0, 1.05)
    axes[1].set_ylabel("‖C⊥ΔW‖ / ‖ΔW‖\n(orthogonal part)")
    axes[1].set_xticks([j + 0.4 - width / 2 for j in range(len(layers))], layers, rotation=30, ha="right",
                       fontsize=7)
    for ax in axes:
        ax.grid(alpha=0.3, axis="y")
    fig.legend(*axes[0].get_legend_handles_labels(), fontsize=7, loc="center left", bbox_to_anchor=(0.995, 0.5),
               frameon=False)
    fig.tight_layout()
    fig.savefig(out / "drift.png", dpi=110, bbox_inches="tight")
    plt.close(fig)


def _plots(out: Path, results: dict[str, Any]) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    _plot_hs_fa(out, results, plt)
    _plot_landscape(out, results, plt)
    _plot_drift(out, results, plt)
    return ["hs_vs_fa.png", "landscape.png", "drift.png"]


def write(out: Path, results: dict[str, Any]) -> None:
    """Write results.json, table.md, the plots and report.md into `out`."""
    write_json(out / "results.json", results)
    table = main_table(results)
    (out / TABLE).write_text(table)
    plots = _plots(out, results)
    cfg = results["config"]
    lang = cfg["recipe"]["language"]
    t = results["timings"]
    proj = ("flat projection W_aligned + C⊥ΔW (`asft project --mode flat`)" if cfg["projection"] == "flat"
            else f"Safe LoRA (`asft project --mode safelora`, threshold {cfg['safelora_threshold']:g})")
    warnings = [f"> **Warning:** {w}\n" for w in results["warnings"]]
    md = [
        "# AsFT demo report\n", *warnings,
        f"Tiny Llama ({cfg['recipe']['num_hidden_layers']} layers, hidden {cfg['recipe']['hidden_size']}) on the "
        "synthetic language of `asft_optim.demo.language`. Every method fine-tunes the same aligned model on "
        f"the MAP task ({lang['n_task_train']} examples) mixed with a fraction p of harmful compliance examples "
        f"({'LoRA adapters, r=8 on every linear layer of the blocks,' if cfg.get('lora') else 'all weights'} trained), "
        f"for {cfg['steps']} steps (batch {cfg['batch_size']}, lr {cfg['lr']:g}, constant, no weight decay, "
        f"seeds {', '.join(map(str, cfg['seeds']))}), through one `transformers.Trainer` path; only the optimizer "
        "differs. L2-SP is `AsFTAdamW(penalty=\"full\")`, AsFT is `AsFTAdamW(penalty=\"orthogonal\")`; λ "
        "multiplies the penalty summed over all parameters. "
        + (f"Rows ending in '+ ...' are the SFT and AsFT models after a post-hoc {proj}.\n" if cfg["project"] else "\n"),
        f"HS: share of {lang['n_eval_harmful']} held-out harmful prompts (object pairs never fine-tuned on; half "
        f"of them with harm words h{lang['n_harm_finetune']}..h{lang['n_harm'] - 1} that fine-tuning never shows) "
        "whose greedy response contains harmful content. FA: exact-match share on the MAP test split "
        f"({lang['n_task_test']} unseen object pairs). All numbers (%) are recomputed from the saved models in "
        "`models/`. Cells: mean (min–max) over the seeds. The refusal rate stands beside HS: the rest of the "
        "responses are neither refusals nor harmful (a broken model), which HS alone would call safe.\n",
        "## HS, refusal rate and FA per method and harmful fraction p\n", table,
        "## HS on harm words never seen in fine-tuning\n", _unseen_table(results),
        "## Safety landscape\n",
        "HS of W_aligned + α·û, û_t = u_t/‖u_t‖·‖W_t‖ per tensor. Effective perturbation length: the "
        "largest "
        f"|α| reached from 0 with HS ≤ {100 * cfg['threshold']:.0f}% at every grid point on the way "
        f"(refusal length: refusal rate ≥ {100 - 100 * cfg['threshold']:.0f}% all the way; a perturbation "
        "that breaks the model lowers the refusal rate without raising HS).\n",
        _landscape_table(results), "![landscape](landscape.png)\n",
        "## HS against FA\n", "![hs vs fa](hs_vs_fa.png)\n",
        f"## Drift per layer at p = {max(r['p'] for r in results['runs']):g} (seed {results['drift_seed']})\n",
        "‖C⊥ΔW‖/‖ΔW‖ (share of the update off the alignment direction; ΔW = W_finetuned − W_aligned):\n",
        _drift_table(results["drift"], "orth_ratio"),
        "cos(ΔW, d):\n", _drift_table(results["drift"], "cos"),
        "‖ΔW‖:\n", _drift_table(results["drift"], "delta_norm"),
        "![drift](drift.png)\n",
        "## Run\n",
        f"Models {'reused from' if results['models_reused'] else 'built in'} `{results['cache']}`; "
        f"torch threads {results['torch_threads']}; times (s): " + ", ".join(f"{k} {v}" for k, v in t.items()) + ".\n",
    ]
    md.insert(-2, "Plots: " + ", ".join(f"[{p}]({p})" for p in plots) + ".\n")
    (out / "report.md").write_text("\n".join(md))
