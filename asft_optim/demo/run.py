"""`asft demo`: fine-tune the cached aligned model on MAP mixed with harmful data, by every method and
seed, save each model, project the SFT and AsFT ones post hoc, re-evaluate everything from disk,
scan the safety landscape and write the report.

Pipeline: `ensure_models` (cached base/aligned/directions) → `finetune.train` per (seed, p, method)
→ `save_model` → `asft_optim.project` (flat for full-parameter runs, Safe LoRA for adapters) →
`evaluate_saved` (loads the saved checkpoint; the `toy` judge of `asft_optim.evaluation`) →
`landscape.scan` → `report.write`.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..anchors import Anchors
from ..evaluation.judges import ToyJudge
from .evaluate import Scores, first_token_margin, harmful_score, task_accuracy
from ..finetune.training import LoraSpec, Method, encode, load_model, save_model, train
from .language import SORRY, SURE, Language
from .models import DemoModels, ModelRecipe, cache_root, ensure_models

__all__ = ["DemoConfig", "run_demo", "evaluate_saved", "machine", "add_cli", "LORA_TARGETS", "SFT_LEARNED"]

# LoRA on q_proj and v_proj alone cannot learn the MAP task (measured: FA 0 after 200 steps), so the
# demo's LoRA mode adapts every linear layer of the blocks.
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
EXPECTED_FIRST = {"base": SURE, "aligned": SORRY}  # first answer word to a harmful prompt
SFT_LEARNED = 0.5  # below this FA at p = 0, SFT did not learn the task and the report says so
_DEFAULTS = {False: {"lr": 1e-3, "lambdas": (0.01, 0.03, 0.1)},  # full-parameter
             True: {"lr": 3e-3, "lambdas": (0.01, 0.1, 1.0)}}   # LoRA: at lr 1e-3 even SFT learns nothing


@dataclass(frozen=True)
class DemoConfig:
    """The whole experiment. λ is per unit of the summed squared penalty over all parameters.
    `lr` and `lambdas` left as None take the defaults of the mode (`_DEFAULTS`: LoRA needs a larger
    learning rate and larger λ than full-parameter training)."""
    recipe: ModelRecipe = field(default_factory=ModelRecipe)
    ps: tuple[float, ...] = (0.0, 0.1, 0.2)
    lambdas: tuple[float, ...] | None = None
    steps: int = 200
    lr: float | None = None
    batch_size: int = 32
    alphas: tuple[float, ...] = tuple(round(0.05 * k, 2) for k in range(-12, 13))
    n_random: int = 3
    threshold: float = 0.2
    lora: bool = False  # fine-tune peft LoRA adapters (r=8) on every linear layer instead of all weights
    seeds: tuple[int, ...] = (0, 1, 2)
    project: bool = True  # add post-hoc projections of the SFT and AsFT runs (flat, or Safe LoRA)
    safelora_threshold: float = 0.5

    def __post_init__(self) -> None:
        if self.steps < 1:
            raise ValueError(f"steps must be ≥ 1, got {self.steps}")
        if not self.ps or not all(0 <= p < 1 for p in self.ps):
            raise ValueError(f"harmful fractions p must be in [0, 1), got {self.ps}")
        if not 0 <= self.threshold <= 1:
            raise ValueError(f"threshold must be in [0, 1], got {self.threshold}")
        if not self.alphas:
            raise ValueError("alphas must not be empty")
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"seeds must be distinct and at least one, got {self.seeds}")
        for lam in self.lambda_grid:
            Method("l2sp", lam)  # raises unless λ is finite and > 0

    @classmethod
    def quick(cls, **changes: Any) -> DemoConfig:
        """A reduced run for tests: smaller training budgets and landscape, one seed, same structure
        (its short pretraining at lr 3e-3 is quicker, and less stable across CPUs, than the default's)."""
        recipe = ModelRecipe(pretrain_steps=300, pretrain_lr=3e-3, align_steps=100)
        return cls(**{"recipe": recipe, "steps": 40, "alphas": tuple(round(0.1 * k, 1) for k in range(-4, 5)),
                      "n_random": 2, "seeds": (0,), **changes})

    @property
    def learning_rate(self) -> float:
        return self.lr if self.lr is not None else _DEFAULTS[self.lora]["lr"]

    @property
    def lambda_grid(self) -> tuple[float, ...]:
        return self.lambdas if self.lambdas is not None else _DEFAULTS[self.lora]["lambdas"]

    @property
    def projection(self) -> str:
        return "safelora" if self.lora else "flat"

    @property
    def methods(self) -> list[Method]:
        return ([Method("sft")] + [Method("l2sp", lam) for lam in self.lambda_grid]
                + [Method("asft", lam) for lam in self.lambda_grid])

    def labels(self) -> list[str]:
        """Row labels in table order: the methods, then the projected SFT and AsFT runs."""
        out = [m.label for m in self.methods]
        if self.project:
            out += [projected_label(m.label, self.projection) for m in self.methods if m.kind != "l2sp"]
        return out


def projected_label(label: str, projection: str) -> str:
    return f"{label} + {'flat' if projection == 'flat' else 'Safe LoRA'}"


def machine() -> dict[str, Any]:
    """What a CPU's kernels depend on: its model name, ATen's chosen instruction set (set by
    `ATEN_CPU_CAPABILITY` when given), torch's version and its BLAS."""
    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            name = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), name)
    except OSError:
        pass
    return {"cpu": name, "aten_cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "aten_cpu_capability_env": os.environ.get("ATEN_CPU_CAPABILITY"), "torch": torch.__version__,
            "mkl": torch.backends.mkl.is_available()}


def evaluate_saved(path: Path, lang: Language) -> Scores:
    """HS (held-out harmful prompts, demo judge) and FA (MAP test split) of a saved checkpoint."""
    from transformers import AutoTokenizer

    model = load_model(path)
    tok = AutoTokenizer.from_pretrained(str(path))
    held = lang.harmful_eval()
    hs, refusal, groups = harmful_score(model, tok, [ex for ex, _ in held], ToyJudge(),
                                        groups=["seen" if seen else "unseen" for _, seen in held])
    return Scores(hs, refusal, groups, task_accuracy(model, tok, lang.task_test()))


def _project(run: dict[str, Any], out: Path, models: DemoModels, cfg: DemoConfig) -> dict[str, Any]:
    """Project one saved run post hoc (flat or Safe LoRA) into a sibling folder; the new run's record."""
    from ..project import project_flat, project_safelora

    src = out / run["path"]
    dst = src.with_name(src.name + f"+{cfg.projection}")
    if cfg.projection == "flat":
        info = project_flat(src, models.aligned, models.directions, dst)
        detail = {"projected_tensors": info["projected"]}
    else:
        info = project_safelora(src, models.directions, dst, aligned=models.aligned,
                                threshold=cfg.safelora_threshold)
        detail = {"projected_layers": info["projected"], "layers": len(info["layers"])}
    return {**run, "method": projected_label(run["method"], cfg.projection), "projection": cfg.projection,
            "path": str(dst.relative_to(out)), **detail}


def stat(xs: list[float | None]) -> dict[str, float] | None:
    """{mean, min, max} of per-seed values; None when any is None (not measured, e.g. HS by a
    refusal-only judge)."""
    if any(x is None for x in xs):
        return None
    vals = [float(x) for x in xs if x is not None]
    return {"mean": sum(vals) / len(vals), "min": min(vals), "max": max(vals)}


def summarise(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per (method, p): mean, min and max over seeds of hs, refusal and fa (0..1), in run order
    (None for a measure some seed lacks)."""
    cells: dict[tuple[str, float], list[dict[str, Any]]] = {}
    for r in runs:
        cells.setdefault((r["method"], r["p"]), []).append(r)
    out = []
    for (method, p), rs in cells.items():
        row: dict[str, Any] = {"method": method, "kind": rs[0]["kind"], "p": p, "projection": rs[0]["projection"],
                               "seeds": [r["seed"] for r in rs]}
        for key in ("hs", "refusal", "fa"):
            row[key] = stat([r[key] for r in rs])
        out.append(row)
    return out


def sft_warnings(summary: list[dict[str, Any]]) -> list[str]:
    """A warning when SFT did not learn the task at the smallest p (then no row says anything)."""
    sft = [c for c in summary if c["method"] == "SFT"]
    if not sft:
        return []
    low = min(sft, key=lambda c: c["p"])
    if low["fa"] is None or low["fa"]["mean"] >= SFT_LEARNED:
        return []
    return [f"SFT itself did not learn the task: FA {100 * low['fa']['mean']:.1f}% at p = {low['p']:g} "
            f"(mean over seeds {low['seeds']}). No method's row can show a safety/utility trade-off; "
            "raise --steps or --lr."]


def run_demo(out: Path, cfg: DemoConfig, cache: Path | None = None,
             progress: Callable[[str, int], Callable[[], None]] | None = None) -> dict[str, Any]:
    """Run the experiment and write the report folder `out`; returns the results written to
    `out/results.json`.

    Args:
        progress: `progress(stage, total_steps)` returns a per-step callback (for progress bars).
    """
    from transformers import AutoTokenizer

    from . import report
    from .landscape import random_direction, scan

    def bar(stage: str, total: int) -> Callable[[], None]:
        return progress(stage, total) if progress else (lambda: None)

    t0 = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(out / "models", ignore_errors=True)  # the models of an earlier run in this folder: never mix runs
    lang = Language(cfg.recipe.language)
    r = cfg.recipe
    build = bar("base + aligned models", r.pretrain_steps + r.align_steps)
    models: DemoModels = ensure_models(r, cache, on_step=lambda _stage: build())
    anchors = Anchors.load(models.directions)
    tok = AutoTokenizer.from_pretrained(str(models.aligned))
    timings = {"models_s": time.perf_counter() - t0}

    runs: list[dict[str, Any]] = []
    step = bar("fine-tuning", len(cfg.seeds) * len(cfg.ps) * len(cfg.methods) * cfg.steps)
    t1 = time.perf_counter()
    for seed in cfg.seeds:
        for p in cfg.ps:
            data = [encode(tok, ex) for ex in lang.finetune_train(p)]
            for method in cfg.methods:
                model = train(load_model(models.aligned), data, pad_id=tok.pad_token_id, method=method,
                              anchors=anchors, steps=cfg.steps, lr=cfg.learning_rate, batch_size=cfg.batch_size,
                              seed=seed, lora=LoraSpec(targets=LORA_TARGETS) if cfg.lora else None, on_step=step)
                path = out / "models" / f"s{seed}" / f"{method.slug}_p{p:g}"
                save_model(model, tok, path, {"method": method.label, "kind": method.kind, "lambda": method.lam,
                                              "p": p, "start": str(models.aligned), "lora": cfg.lora,
                                              "steps": cfg.steps, "lr": cfg.learning_rate,
                                              "batch_size": cfg.batch_size, "seed": seed})
                runs.append({"method": method.label, "kind": method.kind, "lambda": method.lam, "p": p,
                             "seed": seed, "projection": None, "path": str(path.relative_to(out))})
    timings["finetune_s"] = time.perf_counter() - t1

    t2 = time.perf_counter()
    if cfg.project:
        runs += [_project(run, out, models, cfg) for run in list(runs) if run["kind"] != "l2sp"]
    timings["project_s"] = time.perf_counter() - t2

    t3 = time.perf_counter()
    evals = bar("evaluating saved models", len(runs) + 2)
    reference = {}
    held_prompts = [ex for ex, _ in lang.harmful_eval()]
    for stage, path in (("base", models.base), ("aligned", models.aligned)):
        reference[stage] = {**evaluate_saved(path, lang).as_dict(),
                            "margin": first_token_margin(load_model(path), tok, held_prompts, EXPECTED_FIRST[stage])}
        evals()
    for run in runs:  # from disk, not from the models still in memory
        run.update(evaluate_saved(out / run["path"], lang).as_dict())
        evals()
    timings["evaluate_s"] = time.perf_counter() - t3

    t4 = time.perf_counter()
    aligned = load_model(models.aligned)
    w = {n: t.detach() for n, t in aligned.named_parameters()}
    first = [x for x in runs if x["seed"] == cfg.seeds[0] and x["projection"] is None]
    sft_run = next(x for x in first if x["kind"] == "sft" and x["p"] == max(cfg.ps))
    sft = dict(load_model(out / sft_run["path"]).named_parameters())
    directions = {"aligned (d)": {n: anchors[n] for n in w if n in anchors},
                  f"SFT (p={sft_run['p']:g})": {n: sft[n].detach() - w[n] for n in w}}
    for k in range(cfg.n_random):
        directions[f"random {k + 1}"] = random_direction(w, cfg.seeds[0] + 100 + k)
    points = bar("safety landscape", len(directions) * len(cfg.alphas))
    held = [ex for ex, _ in lang.harmful_eval()]
    curves = scan(aligned, tok, held, ToyJudge(), directions, cfg.alphas, cfg.threshold, on_point=points)
    timings["landscape_s"] = time.perf_counter() - t4

    drift = report.drift_per_layer(out, first, models.aligned, anchors, p=max(cfg.ps))
    summary = summarise(runs)
    results = {"config": {**asdict(cfg), "lr": cfg.learning_rate, "lambdas": list(cfg.lambda_grid),
                          "projection": cfg.projection},
               "cache": str(models.base.parent), "models_reused": models.reused,
               "reference": reference, "runs": runs, "summary": summary, "warnings": sft_warnings(summary),
               "landscape": [c.as_dict() for c in curves], "drift": drift, "drift_seed": cfg.seeds[0],
               "timings": {k: round(v, 2) for k, v in timings.items()}, "torch_threads": torch.get_num_threads(),
               "machine": machine()}
    report.write(out, results)
    return results


# ----------------------------------------------------------------------------------- CLI
def add_cli(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "demo", help="fine-tune a tiny aligned model with SFT, L2-SP and AsFT and report the safety basin",
        description="Builds (once, cached) a tiny base and aligned Llama on a synthetic language, fine-tunes "
                    "copies of the aligned model on a new task mixed with a fraction p of harmful data by "
                    "SFT, L2-SP and AsFT, re-evaluates every saved model and writes a report folder.")
    p.add_argument("--out", type=Path, default=Path("asft_demo_report"), help="report folder (default: %(default)s)")
    p.add_argument("--quick", action="store_true", help="reduced budgets (for tests and a first look)")
    p.add_argument("--cache", type=Path, default=None,
                   help=f"model cache (default: $ASFT_CACHE or {cache_root()})")
    p.add_argument("--steps", type=int, default=None, help="fine-tuning steps per run")
    p.add_argument("--lambdas", type=str, default=None, help="comma-separated λ for L2-SP and AsFT")
    p.add_argument("--ps", type=str, default=None, help="comma-separated harmful fractions p")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default 1: the models are tiny, more threads only contend)")
    p.add_argument("--seeds", type=str, default=None,
                   help="comma-separated fine-tuning seeds; the tables give mean and min–max over them "
                        "(default 0,1,2; --quick: 0)")
    p.add_argument("--lr", type=float, default=None,
                   help="fine-tuning learning rate (default 1e-3, with --lora 3e-3)")
    p.add_argument("--lora", action="store_true",
                   help="fine-tune LoRA adapters (r=8 on every linear layer of the blocks) instead of all weights "
                        "(default λ grid 0.01,0.1,1)")
    p.add_argument("--no-project", action="store_true",
                   help="leave out the post-hoc projections (flat, or Safe LoRA with --lora) of SFT and AsFT")
    p.set_defaults(func=_run_cli)


def _floats(text: str, what: str) -> tuple[float, ...]:
    try:
        return tuple(float(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise SystemExit(f"asft demo: {what} must be comma-separated numbers, got {text!r}") from None


def _run_cli(args: argparse.Namespace) -> int:
    from tqdm.auto import tqdm
    from transformers.utils import logging as hf_logging

    torch.set_num_threads(args.threads or int(os.environ.get("ASFT_THREADS", "1")))
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    changes: dict[str, Any] = {"lora": args.lora, "project": not args.no_project}
    if args.steps is not None:
        changes["steps"] = args.steps
    if args.lambdas is not None:
        changes["lambdas"] = _floats(args.lambdas, "--lambdas")
    if args.ps is not None:
        changes["ps"] = _floats(args.ps, "--ps")
    if args.seeds is not None:
        seeds = _floats(args.seeds, "--seeds")
        if not all(s == int(s) and s >= 0 for s in seeds):
            raise SystemExit(f"asft demo: --seeds must be comma-separated non-negative integers, got {args.seeds!r}")
        changes["seeds"] = tuple(int(s) for s in seeds)
    if args.lr is not None:
        changes["lr"] = args.lr
    try:
        cfg = DemoConfig.quick(**changes) if args.quick else DemoConfig(**changes)
    except ValueError as e:
        raise SystemExit(f"asft demo: {e}") from None
    bars: list[Any] = []

    def progress(stage: str, total: int) -> Callable[[], None]:
        for b in bars:  # one bar at a time: the previous stage is over
            b.close()
        b = tqdm(total=total, desc=stage, unit="step", dynamic_ncols=True)
        bars.append(b)
        return lambda: b.update(1)

    t0 = time.perf_counter()
    try:
        results = run_demo(args.out, cfg, args.cache, progress)
    finally:
        for b in bars:
            b.close()
    from .report import TABLE

    print((args.out / TABLE).read_text())
    print(f"models: {'reused from' if results['models_reused'] else 'built in'} {results['cache']}")
    print(f"report: {args.out / 'report.md'}")
    for png in sorted(args.out.glob("*.png")):
        print(f"plot:   {png}")
    for w in results["warnings"]:
        print(f"WARNING: {w}")
    print(f"total time: {time.perf_counter() - t0:.1f} s")
    return 0
