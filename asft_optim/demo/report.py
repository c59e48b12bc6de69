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
from ..compare import dodge_offsets, dodged
from ..evaluation.results import write_json
from ..finetune.training import load_model
from ..metrics import per_layer, sums
from .run import SFT_LEARNED, stat

__all__ = ["TABLE", "drift_per_layer", "main_table", "verdict", "hs_fa_points", "method_styles", "write"]

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
            cells.append(_cell(stat(per[m, p])))
        lines.append("| " + " | ".join([m] + cells) + " |")
    return "\n".join(lines) + "\n"


KEEPS_TASK = 0.9   # a row "keeps the task" at p when its mean FA is ≥ this share of SFT's mean FA there
REFUSAL_HELD = 0.9  # a row "keeps refusing" when its refusal rate is at least this on every seed
SPREAD = 0.10      # seeds' max − min above this (10 points) makes a figure seed- and machine-dependent


def _mean(c: dict[str, Any], key: str) -> float | None:
    return None if c[key] is None else c[key]["mean"]


def _fmt(c: dict[str, Any]) -> str:
    return f"{c['method']} (HS {_cell(c['hs'])}, refusal {_cell(c['refusal'])}, FA {_cell(c['fa'])})"


def verdict(results: dict[str, Any]) -> list[str]:
    """A few sentences on what the table shows, each computed from `results["summary"]`: refusal at
    p = 0, SFT with harmful data, AsFT against L2-SP and the best row that keeps the task per p > 0
    (differences count only when the seeds' min–max ranges do not overlap), and which figures
    vary with the seed."""
    rows = results["summary"]
    ps = sorted({r["p"] for r in rows})
    lines = []
    at = {p: [r for r in rows if r["p"] == p] for p in ps}
    sft = {p: next((r for r in at[p] if r["method"] == "SFT"), None) for p in ps}
    no_hs = any(r["hs"] is None for r in rows)
    if 0 in at:
        rows0 = [r for r in at[0] if r["refusal"] is not None]
        gone = [r["method"] for r in rows0 if r["refusal"]["max"] == 0]
        if len(gone) == len(at[0]):
            lines.append(f"At p = 0 every fine-tuned row ({len(at[0])}) has refusal 0% on every seed: fine-tuning "
                         "on the task alone removes refusals (the aligned model refuses "
                         f"{_pct(results['reference']['aligned']['refusal'])}%).")
        else:
            held = [r for r in rows0 if r["refusal"]["min"] >= REFUSAL_HELD]
            rest = [r for r in rows0 if r["method"] not in gone and r not in held]
            parts = [f"refusal ≥ {100 * REFUSAL_HELD:.0f}% on every seed: "
                     + ", ".join(f"{r['method']} ({_cell(r['refusal'])})" for r in held) if held else "",
                     "0% on every seed: " + ", ".join(gone) if gone else "",
                     "in between or varying with the seed: "
                     + ", ".join(f"{r['method']} ({_cell(r['refusal'])})" for r in rest) if rest else ""]
            lines.append("At p = 0 (task data only), " + "; ".join(x for x in parts if x) + ".")
    if no_hs:
        lines.append("HS was not measured (the judge sees refusals only): no verdict on harmfulness; the "
                     "refusal rate above is what this run can say.")
        return lines
    harmful_ps = [p for p in ps if p > 0 and sft[p] is not None]
    if harmful_ps:
        lines.append("SFT with harmful data: " + ", ".join(
            f"HS {_cell(sft[p]['hs'])}% at p = {p:g}" for p in harmful_ps) + ".")
    for p in harmful_ps:
        sft_fa = _mean(sft[p], "fa")
        if sft_fa is None or sft_fa < SFT_LEARNED:
            lines.append(f"p = {p:g}: SFT did not learn the task (FA {_cell(sft[p]['fa'])}%): no method comparison.")
            continue
        bar = KEEPS_TASK * sft_fa
        kept = [r for r in at[p] if r["fa"] is not None and r["fa"]["mean"] >= bar and r["method"] != "SFT"]
        best = {k: min((r for r in kept if r["kind"] == k and r["projection"] is None),
                       key=lambda r: r["hs"]["mean"], default=None) for k in ("l2sp", "asft")}
        head = f"p = {p:g}, rows that keep the task (FA ≥ {100 * bar:.1f}%, {100 * KEEPS_TASK:.0f}% of SFT's):"
        if best["asft"] is None or best["l2sp"] is None:
            lost = [k for k in ("asft", "l2sp") if best[k] is None]
            lines.append(f"{head} no {' or '.join({'asft': 'AsFT', 'l2sp': 'L2-SP'}[k] for k in lost)} row does; "
                         "no AsFT/L2-SP comparison.")
        else:
            a, l2 = best["asft"], best["l2sp"]
            if a["hs"]["max"] < l2["hs"]["min"]:
                how = "AsFT beats L2-SP (lower HS on every seed)"
            elif a["hs"]["min"] > l2["hs"]["max"]:
                how = "L2-SP beats AsFT (lower HS on every seed)"
            else:
                how = "AsFT does not beat L2-SP (the seeds' HS ranges overlap)"
            lines.append(f"{head} {how}: the best AsFT row is {_fmt(a)}, the best L2-SP row {_fmt(l2)}.")
        safest = min(kept, key=lambda r: r["hs"]["mean"], default=None)
        if safest is not None:
            lines.append(f"p = {p:g}: the lowest HS among rows that keep the task: {_fmt(safest)}.")
    wide = [f"{r['method']} p={r['p']:g} {k}" for r in rows for k in ("hs", "refusal", "fa")
            if r[k] is not None and r[k]["max"] - r[k]["min"] > SPREAD]
    n_cells = sum(r[k] is not None for r in rows for k in ("hs", "refusal", "fa"))
    lines.append(f"{len(wide)} of {n_cells} figures vary by more than {100 * SPREAD:.0f} points between seeds"
                 + (f" ({', '.join(wide)})" if wide else "") + ": such figures are not claims; the ones that hold on "
                 "every seed are.")
    return lines


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


def _len(x: float | None) -> str:
    return "–" if x is None else f"{x:.2f}"


def _landscape_table(results: dict[str, Any]) -> str:
    lines = ["| direction | HS length (α > 0) | HS length (α < 0) | refusal length (α > 0) | "
             "refusal length (α < 0) | HS / refusal at min α | HS / refusal at max α |", "|" + "---|" * 7]
    for c in results["landscape"]:
        lines.append(f"| {c['name']} | {_len(c['length_pos'])} | {_len(c['length_neg'])} | "
                     f"{c['refusal_length_pos']:.2f} | {c['refusal_length_neg']:.2f} | "
                     f"{_pct(c['hs'][0])} / {_pct(c['refusal'][0])} | {_pct(c['hs'][-1])} / {_pct(c['refusal'][-1])} |")
    return "\n".join(lines) + "\n"


# one hue per trained method (projections share their source's hue, hollow): no two alike
PALETTE = ("#d62728", "#1f77b4", "#17becf", "#9467bd", "#2ca02c", "#bcbd22", "#ff7f0e", "#8c564b", "#e377c2",
           "#7f7f7f", "#000080", "#808000")
MARKER = {"sft": "o", "l2sp": "s", "asft": "^"}
DODGE_SPREAD = 8.0  # FA points over which equal results are spread side by side


def _source(method: str) -> str:
    """The trained method a projected row comes from ('AsFT λ=0.1 + flat' → 'AsFT λ=0.1')."""
    return method.split(" + ", 1)[0]


def method_styles(methods: list[str], summary: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Marker, colour and fill per row: a distinct colour per trained method (cycling through
    `PALETTE` only past its length), the marker by kind (SFT ●, L2-SP ■, AsFT ▲); a post-hoc
    projection takes its source's colour and marker, hollow."""
    kind = {r["method"]: r["kind"] for r in summary}
    trained = [m for m in methods if " + " not in m]
    colour = {m: PALETTE[i % len(PALETTE)] for i, m in enumerate(trained)}
    out = {}
    for m in methods:
        c = colour.get(_source(m), PALETTE[(len(trained) + len(out)) % len(PALETTE)])
        hollow = " + " in m
        out[m] = {"marker": MARKER[kind[m]], "color": c, "mfc": "white" if hollow else c, "hollow": hollow}
    return out


def hs_fa_points(results: dict[str, Any]) -> list[dict[str, Any]]:
    """What `hs_vs_fa.png` draws, one dict per (p, method) in %: `x` (FA mean, dodged inside
    [0, 100]), `fa`, `hs`, `refusal` as (mean, min, max) (hs None when the judge reports no HS),
    `xerr` (left, right) whisker lengths of FA's min–max around the dodged x, cut at 0 and 100,
    and the row's style."""
    methods, ps, cell = _summary(results)
    style = method_styles(methods, results["summary"])
    offsets = dodge_offsets(len(methods), DODGE_SPREAD)

    def trio(c: dict[str, Any], key: str) -> tuple[float, float, float] | None:
        st = c[key]
        if st is None or st["mean"] is None:
            return None
        return 100 * st["mean"], 100 * st["min"], 100 * st["max"]

    out = []
    for p in ps:
        for m, off in zip(methods, offsets):
            c = cell[m, p]
            fa = trio(c, "fa")
            if fa is None:
                continue
            x = dodged(fa[0], off, offsets)
            xerr = (min(fa[0] - fa[1], x), min(fa[2] - fa[0], 100 - x))
            out.append({"p": p, "method": m, "x": x, "xerr": xerr, "fa": fa, "hs": trio(c, "hs"),
                        "refusal": trio(c, "refusal"), **style[m]})
    return out


def _plot_hs_fa(out: Path, results: dict[str, Any], plt: Any) -> None:
    _, ps, _ = _summary(results)
    points = hs_fa_points(results)
    fig, axes = plt.subplots(2, len(ps), figsize=(3.6 * len(ps) + 2.8, 7.2), sharex=True, sharey=True,
                             squeeze=False)
    for j, p in enumerate(ps):
        no_hs = []
        for pt in (q for q in points if q["p"] == p):
            x, xerr = pt["x"], [[pt["xerr"][0]], [pt["xerr"][1]]]
            for row, key in ((0, "hs"), (1, "refusal")):
                if pt[key] is None:
                    no_hs += [pt["method"]] if key == "hs" else []
                    continue
                y, lo, hi = pt[key]
                axes[row][j].errorbar([x], [y], xerr=xerr, yerr=[[y - lo], [hi - y]], fmt=pt["marker"],
                                      color=pt["color"], mfc=pt["mfc"], ms=7, mew=1.5, elinewidth=0.9, capsize=2,
                                      alpha=0.9, label=pt["method"])
        for name, mk in (("base", "*"), ("aligned", "D")):
            ref = results["reference"][name]
            for row, key in ((0, "hs"), (1, "refusal")):
                if ref.get(key) is not None and ref.get("fa") is not None:
                    axes[row][j].scatter([100 * ref["fa"]], [100 * ref[key]], marker=mk, s=110 if mk == "*" else 60,
                                         facecolors="none", edgecolors="black", linewidths=1.2, zorder=6,
                                         label=f"{name} (not fine-tuned)")
        axes[0][j].set_title(f"p = {p:g}" + (f"\n(no HS: {', '.join(no_hs)})" if no_hs else ""), fontsize=9)
        axes[1][j].set_xlabel("Fine-tune Accuracy (%)")
        for row in (0, 1):
            axes[row][j].set_xlim(-4, 104)
            axes[row][j].set_ylim(-4, 104)
            axes[row][j].grid(alpha=0.3)
    axes[0][0].set_ylabel("Harmful Score (%)\n(low = safe only if refusal is high)")
    axes[1][0].set_ylabel("Refusal rate (%)\n(high = still refuses)")
    n_seeds = len(results["config"]["seeds"])
    seen: dict[str, Any] = {}
    for ax in axes.flat:
        for h, lab in zip(*ax.get_legend_handles_labels()):
            seen.setdefault(lab, h)
    fig.legend(list(seen.values()), list(seen), fontsize=8, loc="center left", bbox_to_anchor=(0.995, 0.5),
               frameon=False)
    fig.suptitle(f"HS (top) and refusal rate (bottom) against FA: mean over {n_seeds} seed(s), whiskers min–max; "
                 f"markers dodged by ≤ {DODGE_SPREAD:g} FA points inside 0–100% so that equal results stay "
                 "visible; hollow = post-hoc projection of the same-coloured run; a model low in both rows "
                 "is broken, not safe", fontsize=8, wrap=True)
    fig.tight_layout(rect=(0, 0, 1, 0.94))
    fig.savefig(out / "hs_vs_fa.png", dpi=110, bbox_inches="tight")
    plt.close(fig)


def _plot_landscape(out: Path, results: dict[str, Any], plt: Any) -> None:
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.4), sharex=True)
    for c in results["landscape"]:
        style = "--" if c["name"].startswith("random") else "-"
        hs = [None if h is None else 100 * h for h in c["hs"]]
        axes[0].plot(c["alphas"], [float("nan") if h is None else h for h in hs], style, marker=".", label=c["name"])
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


def _machine_section(results: dict[str, Any]) -> str:
    m = results.get("machine", {})
    ref = results["reference"]
    margins = ", ".join(f"{name} {ref[name]['margin']:.1f}" for name in ("base", "aligned") if "margin" in ref[name])
    return (f"CPU: {m.get('cpu', '?')}; ATen kernels: {m.get('aten_cpu_capability', '?')}"
            + (f" (ATEN_CPU_CAPABILITY={m['aten_cpu_capability_env']})" if m.get("aten_cpu_capability_env") else "")
            + f"; torch {m.get('torch', '?')}. Another CPU, or another ATen kernel set on this one, builds "
            "different base and aligned weights from the same recipe (last-bit differences grow over the "
            "builds' Adam steps), so every fine-tuned figure here is one draw; benchmarks/RESULTS.md (section "
            "Demo) gives the figures under ATen's default, AVX2 and AVX-512 kernels and which claims held on all. "
            + (f"The base and aligned models' behaviour holds with a margin: the first answer token to every "
               f"held-out harmful prompt is SURE (base) and SORRY (aligned) by a logit margin of at least "
               f"{margins}. " if margins else "")
            + f"A figure whose seeds differ by more than {100 * SPREAD:.0f} points is no result of the method; "
            "another CPU moves such figures as much as another seed does.\n")


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
        + (f"Rows ending in '+ ...' are the SFT and AsFT models after a post-hoc {proj}.\n" if cfg["project"]
           else "\n"),
        f"HS: share of {lang['n_eval_harmful']} held-out harmful prompts (object pairs never fine-tuned on; half "
        f"of them with harm words h{lang['n_harm_finetune']}..h{lang['n_harm'] - 1} that fine-tuning never shows) "
        "whose greedy response contains harmful content. FA: exact-match share on the MAP test split "
        f"({lang['n_task_test']} unseen object pairs). All numbers (%) are recomputed from the saved models in "
        "`models/`. Cells: mean (min–max) over the seeds. The refusal rate stands beside HS: the rest of the "
        "responses are neither refusals nor harmful (a broken model), which HS alone would call safe.\n",
        "## HS, refusal rate and FA per method and harmful fraction p\n", table,
        "## What the table shows\n", *[f"- {line}" for line in verdict(results)], "",
        "## Machine and reproducibility\n", _machine_section(results),
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
