"""`asft compare DIR...`: one table and one HS-against-FA plot over `asft evaluate` folders.

    asft compare eval_sft eval_asft eval_asft_flat [--out DIR]

Rows keep the order given; each is labelled by its folder name. With `--out`, writes
DIR/compare.md and DIR/hs_vs_fa.png (needs matplotlib, extra `plot`), each atomically; existing ones
are replaced only with `--overwrite`, and DIR is never one of the evaluation folders.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .evaluation.results import read_results, write_text_atomic
from .outputs import refuse_overlap
from .tempfiles import atomic_write

__all__ = ["compare_table", "compare_plot", "add_cli"]


def _pct(x: float | None) -> str:
    return "–" if x is None else f"{x:.1f}"


def compare_table(rows: Sequence[tuple[str, dict[str, Any]]]) -> str:
    """Markdown: run, HS, refusal, FA (%), n, judge, model, adapter."""
    lines = ["| run | HS (%) | refusal (%) | FA (%) | n | judge | model | adapter |", "|" + "---|" * 8]
    for label, r in rows:
        adapter = Path(r["adapter"]["source"]).name if r.get("adapter") else "–"
        lines.append(f"| {label} | {_pct(r['harmful_score'])} | {_pct(r['refusal_rate'])} | "
                     f"{_pct(r['task_accuracy'])} | {r['n']} | {r['judge']['kind']} | "
                     f"{Path(r['model']['source']).name} | {adapter} |")
    if any(r["harmful_score"] is None for _, r in rows):
        lines.append("\nHS –: the judge (keyword) sees refusals only, not harm; HS needs a judge model.")
    return "\n".join(lines) + "\n"


def dodge_offsets(n: int, spread: float = 8.0) -> list[float]:
    """Horizontal offsets (FA points) for n markers of an HS-against-FA plot, evenly spaced within
    ±spread/2 (at most 1 point apart), so that runs with equal results stay visible side by side."""
    step = min(1.0, spread / max(n - 1, 1))
    return [(k - (n - 1) / 2) * step for k in range(n)]


def compare_plot(rows: Sequence[tuple[str, dict[str, Any]]], path: Path) -> None:
    """HS against FA, one labelled marker per run with its refusal rate in the legend (a broken model
    has HS ≈ 0 without refusing); runs without FA or HS are left out and listed."""
    try:
        import matplotlib
    except ModuleNotFoundError:
        raise ModuleNotFoundError("the plot needs matplotlib: pip install 'asft_optim[plot]'") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.8))
    markers = "osD^vP*Xh<>"
    missing = [label for label, r in rows if r["task_accuracy"] is None or r["harmful_score"] is None]
    dodge = iter(dodge_offsets(len(rows) - len(missing)))
    for i, (label, r) in enumerate(rows):
        if label in missing:
            continue
        ax.scatter(r["task_accuracy"] + next(dodge), r["harmful_score"], s=60, marker=markers[i % len(markers)],
                   label=f"{label} (refusal {r['refusal_rate']:.0f}%)", alpha=0.85, edgecolors="black", linewidths=0.5)
    ax.set_xlabel("Task accuracy (%; markers dodged by ≤ ±4 points so that equal results stay visible)",
                  fontsize=8)
    ax.set_ylabel("Harmful score (%)")
    ax.set_xlim(-5, 105)
    ax.set_ylim(-5, 105)
    ax.grid(alpha=0.3)
    ax.set_title("HS against FA" + (f" (left out, no FA or HS: {', '.join(missing)})" if missing else ""),
                 fontsize=9)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.02, 1.0))
    fig.tight_layout()
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=110))
    plt.close(fig)


def add_cli(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("compare", help="table and HS-vs-FA plot over `asft evaluate` folders",
                              description=__doc__.split("\n\n")[0])
    p.add_argument("dirs", nargs="+", type=Path, help="evaluation folders (each with results.json)")
    p.add_argument("--out", type=Path, default=None, help="write compare.md and hs_vs_fa.png here")
    p.add_argument("--overwrite", action="store_true", help="replace compare.md and hs_vs_fa.png in --out")
    p.set_defaults(func=_run_cli)


_OUTPUTS = ("compare.md", "hs_vs_fa.png")


def _check_out(out: Path, dirs: Sequence[Path], overwrite: bool) -> None:
    """--out: a folder outside the evaluation folders; its earlier outputs replaced only with `overwrite`."""
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"--out {out} is a file, not a folder")
    existing = [n for n in _OUTPUTS if (out / n).exists()]
    if existing and not overwrite:
        raise FileExistsError(f"{out} already holds {' and '.join(existing)}: pass --overwrite to replace them, "
                              "or choose another --out")
    refuse_overlap(out, "--out", [("DIR", d) for d in dirs], replaced=_OUTPUTS)


def _run_cli(args: argparse.Namespace) -> int:
    try:
        rows = [(d.resolve().name, read_results(d)) for d in args.dirs]
        table = compare_table(rows)
        if args.out is not None:
            _check_out(args.out, args.dirs, args.overwrite)
            args.out.mkdir(parents=True, exist_ok=True)
            compare_plot(rows, args.out / "hs_vs_fa.png")
            write_text_atomic(args.out / "compare.md", table)
    except (FileNotFoundError, FileExistsError, ValueError, ModuleNotFoundError) as e:
        print(f"asft compare: error: {e}", file=sys.stderr)
        return 2
    print(table, end="")
    if args.out is not None:
        print(f"wrote {args.out / 'compare.md'} and {args.out / 'hs_vs_fa.png'}")
    return 0
