"""The demo's report folder.

    results.json      every number below, the configuration and timings
    table.md          HS and FA per method and p (the paper's Table 2 layout), in %
    report.md         the table, HS on unseen harmful words, refusal rates, the landscape's
                      effective perturbation lengths (Table 7 layout), drift per layer, the plots
    hs_vs_fa.png      HS against FA, one panel per p, one marker per method
    landscape.png     HS along the aligned direction, the SFT direction and random directions
    drift.png         ‖C⊥ΔW‖/‖ΔW‖ per layer for each method at the largest p
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from ..anchors import Anchors
from ..metrics import per_layer, sums
from .finetune import load_model

__all__ = ["TABLE", "drift_per_layer", "main_table", "write"]

TABLE = "table.md"


def _pct(x: float | None) -> str:
    return "–" if x is None else f"{100 * x:.1f}"


def _methods(runs: Sequence[dict[str, Any]]) -> list[str]:
    return list(dict.fromkeys(r["method"] for r in runs))


def _grid(runs: Sequence[dict[str, Any]], key: Any) -> tuple[list[str], list[float], dict]:
    ps = sorted({r["p"] for r in runs})
    cell = {(r["method"], r["p"]): key(r) for r in runs}
    return _methods(runs), ps, cell


def main_table(results: dict[str, Any]) -> str:
    """Markdown: one row per method (plus the unfine-tuned models), HS and FA per p and their means."""
    methods, ps, hs = _grid(results["runs"], lambda r: r["hs"])
    _, _, fa = _grid(results["runs"], lambda r: r["fa"])
    head = (["Method"] + [f"HS p={p:g}" for p in ps] + ["HS avg"] + [f"FA p={p:g}" for p in ps] + ["FA avg"])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name in ("base", "aligned"):
        ref = results["reference"][name]
        row = [f"{name} (not fine-tuned)"] + [_pct(ref["hs"])] * (len(ps) + 1) + [_pct(ref["fa"])] * (len(ps) + 1)
        lines.append("| " + " | ".join(row) + " |")
    for m in methods:
        h = [hs[m, p] for p in ps]
        f = [fa[m, p] for p in ps]
        row = [m] + [_pct(x) for x in h] + [_pct(sum(h) / len(h))] + [_pct(x) for x in f] + [_pct(sum(f) / len(f))]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"


def _small_table(results: dict[str, Any], key: Any, title: str) -> str:
    methods, ps, cell = _grid(results["runs"], key)
    head = ["Method"] + [f"{title} p={p:g}" for p in ps]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join([m] + [_pct(cell[m, p]) for p in ps]) + " |" for m in methods]
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


def _plots(out: Path, results: dict[str, Any]) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = results["runs"]
    methods, ps, _ = _grid(runs, lambda r: None)
    colours = {"sft": "tab:red", "l2sp": "tab:blue", "asft": "tab:green"}
    markers = ["o", "s", "^", "D", "v", "P"]
    fig, axes = plt.subplots(1, len(ps), figsize=(4.2 * len(ps), 3.8), sharey=True, squeeze=False)
    for ax, p in zip(axes[0], ps):
        for r in (r for r in runs if r["p"] == p):
            same = [m for m in methods if m.split()[0] == r["method"].split()[0]]
            ax.scatter(100 * r["fa"], 100 * r["hs"], color=colours[r["kind"]], s=50,
                       marker=markers[same.index(r["method"]) % len(markers)], label=r["method"])
        ax.set_title(f"p = {p:g}")
        ax.set_xlabel("Fine-tune Accuracy (%)")
        ax.set_xlim(-5, 105)
        ax.set_ylim(-5, 105)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("Harmful Score (%)")
    axes[0][-1].legend(fontsize=7, loc="best")
    fig.tight_layout()
    fig.savefig(out / "hs_vs_fa.png", dpi=110)
    plt.close(fig)

    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharex=True)
    for c in results["landscape"]:
        style = "--" if c["name"].startswith("random") else "-"
        axes[0].plot(c["alphas"], [100 * h for h in c["hs"]], style, marker=".", label=c["name"])
        axes[1].plot(c["alphas"], [100 * r for r in c["refusal"]], style, marker=".", label=c["name"])
    thr = 100 * results["config"]["threshold"]
    axes[0].axhline(thr, color="grey", lw=0.8, ls=":", label="threshold")
    axes[1].axhline(100 - thr, color="grey", lw=0.8, ls=":")
    for ax, what in zip(axes, ("Harmful Score (%)", "Refusal rate (%)")):
        ax.set_xlabel("α (perturbation / ‖W‖, per tensor)")
        ax.set_ylabel(what)
        ax.set_ylim(-5, 105)
        ax.grid(alpha=0.3)
    axes[0].set_title("Safety landscape around the aligned model")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "landscape.png", dpi=110)
    plt.close(fig)

    drift = results["drift"]
    fig, ax = plt.subplots(figsize=(8.5, 3.8))
    layers = list(next(iter(drift.values())))
    width = 0.8 / len(drift)
    for i, (m, per) in enumerate(drift.items()):
        ax.bar([j + i * width for j in range(len(layers))], [per[layer]["orth_ratio"] for layer in layers],
               width, label=m)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(layers))], layers, rotation=30, ha="right", fontsize=7)
    ax.set_ylabel("‖C⊥ΔW‖ / ‖ΔW‖")
    ax.set_title(f"Drift off the alignment direction per layer (p = {max(ps):g})")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    fig.savefig(out / "drift.png", dpi=110)
    plt.close(fig)
    return ["hs_vs_fa.png", "landscape.png", "drift.png"]


def write(out: Path, results: dict[str, Any]) -> None:
    """Write results.json, table.md, the plots and report.md into `out`."""
    (out / "results.json").write_text(json.dumps(results, indent=1))
    table = main_table(results)
    (out / TABLE).write_text(table)
    plots = _plots(out, results)
    cfg = results["config"]
    lang = cfg["recipe"]["language"]
    t = results["timings"]
    md = [
        "# AsFT demo report\n",
        f"Tiny Llama ({cfg['recipe']['num_hidden_layers']} layers, hidden {cfg['recipe']['hidden_size']}) on the "
        "synthetic language of `asft_optim.demo.language`. Every method fine-tunes the same aligned model on "
        f"the MAP task ({lang['n_task_train']} examples) mixed with a fraction p of harmful compliance examples "
        f"({'LoRA adapters, r=8 on every linear layer of the blocks,' if cfg.get('lora') else 'all weights'} trained), "
        f"for {cfg['steps']} steps (batch {cfg['batch_size']}, lr {cfg['lr']:g}, constant, no weight decay, "
        f"seed {cfg['seed']}), through one `transformers.Trainer` path; only the optimizer differs. "
        "L2-SP is `AsFTAdamW(penalty=\"full\")`, AsFT is `AsFTAdamW(penalty=\"orthogonal\")`; λ multiplies "
        "the penalty summed over all parameters.\n",
        f"HS: share of {lang['n_eval_harmful']} held-out harmful prompts (object pairs never fine-tuned on; half "
        f"of them with harm words h{lang['n_harm_finetune']}..h{lang['n_harm'] - 1} that fine-tuning never shows) "
        "whose greedy response contains harmful content. FA: exact-match share on the MAP test split "
        f"({lang['n_task_test']} unseen object pairs). All numbers (%) are recomputed from the saved models in "
        "`models/`.\n",
        "## HS and FA per method and harmful fraction p\n", table,
        "## HS on harm words never seen in fine-tuning\n",
        _small_table(results, lambda r: r["hs_groups"].get("unseen"), "HS unseen"),
        "## Refusal rate (the rest of the responses are neither refusals nor harmful)\n",
        _small_table(results, lambda r: r["refusal"], "refusal"),
        "## Safety landscape\n",
        "HS of W_aligned + α·û, û_t = u_t/‖u_t‖·‖W_t‖ per tensor. Effective perturbation length: the "
        "largest "
        f"|α| reached from 0 with HS ≤ {100 * cfg['threshold']:.0f}% at every grid point on the way "
        f"(refusal length: refusal rate ≥ {100 - 100 * cfg['threshold']:.0f}% all the way; a perturbation "
        "that breaks the model lowers the refusal rate without raising HS).\n",
        _landscape_table(results), "![landscape](landscape.png)\n",
        "## HS against FA\n", "![hs vs fa](hs_vs_fa.png)\n",
        f"## Drift per layer at p = {max(r['p'] for r in results['runs']):g}\n",
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
