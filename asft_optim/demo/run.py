"""`asft demo`: fine-tune the cached aligned model on MAP mixed with harmful data, by every method,
save each model, re-evaluate it from disk, scan the safety landscape and write the report.

Pipeline: `ensure_models` (cached base/aligned/directions) → `finetune.train` per (method, p) →
`save_model` → `evaluate_saved` (loads the saved checkpoint) → `landscape.scan` → `report.write`.
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from ..anchors import Anchors
from .evaluate import Scores, demo_judge, harmful_score, task_accuracy
from .finetune import LoraSpec, Method, encode, load_model, save_model, train
from .language import Language
from .models import DemoModels, ModelRecipe, cache_root, ensure_models

__all__ = ["DemoConfig", "run_demo", "evaluate_saved", "add_cli", "LORA_TARGETS"]

# LoRA on q_proj and v_proj alone cannot learn the MAP task (measured: FA 0 after 200 steps), so the
# demo's LoRA mode adapts every linear layer of the blocks.
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class DemoConfig:
    """The whole experiment. λ is per unit of the summed squared penalty over all parameters."""
    recipe: ModelRecipe = field(default_factory=ModelRecipe)
    ps: tuple[float, ...] = (0.0, 0.1, 0.2)
    lambdas: tuple[float, ...] = (0.01, 0.03, 0.1)
    steps: int = 200
    lr: float = 1e-3
    batch_size: int = 32
    alphas: tuple[float, ...] = tuple(round(0.05 * k, 2) for k in range(-12, 13))
    n_random: int = 3
    threshold: float = 0.2
    lora: bool = False  # fine-tune peft LoRA adapters (r=8) on every linear layer instead of all weights
    seed: int = 0

    def __post_init__(self) -> None:
        if self.steps < 1:
            raise ValueError(f"steps must be ≥ 1, got {self.steps}")
        if not self.ps or not all(0 <= p < 1 for p in self.ps):
            raise ValueError(f"harmful fractions p must be in [0, 1), got {self.ps}")
        if not 0 <= self.threshold <= 1:
            raise ValueError(f"threshold must be in [0, 1], got {self.threshold}")
        if not self.alphas:
            raise ValueError("alphas must not be empty")
        for lam in self.lambdas:
            Method("l2sp", lam)  # raises unless λ is finite and > 0

    @classmethod
    def quick(cls) -> DemoConfig:
        """A reduced run for tests: smaller training budgets and landscape, same structure."""
        recipe = ModelRecipe(pretrain_steps=300, align_steps=100)
        return cls(recipe=recipe, steps=40, alphas=tuple(round(0.1 * k, 1) for k in range(-4, 5)), n_random=2)

    @property
    def methods(self) -> list[Method]:
        return ([Method("sft")] + [Method("l2sp", lam) for lam in self.lambdas]
                + [Method("asft", lam) for lam in self.lambdas])


def evaluate_saved(path: Path, lang: Language) -> Scores:
    """HS (held-out harmful prompts, demo judge) and FA (MAP test split) of a saved checkpoint."""
    from transformers import AutoTokenizer

    model = load_model(path)
    tok = AutoTokenizer.from_pretrained(str(path))
    held = lang.harmful_eval()
    hs, refusal, groups = harmful_score(model, tok, [ex for ex, _ in held], demo_judge,
                                        groups=["seen" if seen else "unseen" for _, seen in held])
    return Scores(hs, refusal, groups, task_accuracy(model, tok, lang.task_test()))


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
    lang = Language(cfg.recipe.language)
    r = cfg.recipe
    build = bar("base + aligned models", r.pretrain_steps + r.align_steps)
    models: DemoModels = ensure_models(r, cache, on_step=lambda _stage: build())
    anchors = Anchors.load(models.directions)
    tok = AutoTokenizer.from_pretrained(str(models.aligned))
    timings = {"models_s": time.perf_counter() - t0}

    runs: list[dict[str, Any]] = []
    step = bar("fine-tuning", len(cfg.ps) * len(cfg.methods) * cfg.steps)
    t1 = time.perf_counter()
    for p in cfg.ps:
        data = [encode(tok, ex) for ex in lang.finetune_train(p)]
        for method in cfg.methods:
            model = train(load_model(models.aligned), data, pad_id=tok.pad_token_id, method=method,
                          anchors=anchors, steps=cfg.steps, lr=cfg.lr, batch_size=cfg.batch_size, seed=cfg.seed,
                          lora=LoraSpec(targets=LORA_TARGETS) if cfg.lora else None, on_step=step)
            path = out / "models" / f"{method.slug}_p{p:g}"
            save_model(model, tok, path, {"method": method.label, "kind": method.kind, "lambda": method.lam,
                                          "p": p, "start": str(models.aligned), "lora": cfg.lora,
                                          "steps": cfg.steps, "lr": cfg.lr, "batch_size": cfg.batch_size,
                                          "seed": cfg.seed})
            runs.append({"method": method.label, "kind": method.kind, "lambda": method.lam, "p": p,
                         "path": str(path.relative_to(out))})
    timings["finetune_s"] = time.perf_counter() - t1

    t2 = time.perf_counter()
    evals = bar("evaluating saved models", len(runs) + 2)
    reference = {}
    for stage, path in (("base", models.base), ("aligned", models.aligned)):
        reference[stage] = evaluate_saved(path, lang).as_dict()
        evals()
    for run in runs:  # from disk, not from the models still in memory
        run.update(evaluate_saved(out / run["path"], lang).as_dict())
        evals()
    timings["evaluate_s"] = time.perf_counter() - t2

    t3 = time.perf_counter()
    aligned = load_model(models.aligned)
    w = {n: t.detach() for n, t in aligned.named_parameters()}
    sft_run = next(x for x in runs if x["kind"] == "sft" and x["p"] == max(cfg.ps))
    sft = dict(load_model(out / sft_run["path"]).named_parameters())
    directions = {"aligned (d)": {n: anchors[n] for n in w if n in anchors},
                  f"SFT (p={sft_run['p']:g})": {n: sft[n].detach() - w[n] for n in w}}
    for k in range(cfg.n_random):
        directions[f"random {k + 1}"] = random_direction(w, cfg.seed + 100 + k)
    points = bar("safety landscape", len(directions) * len(cfg.alphas))
    held = [ex for ex, _ in lang.harmful_eval()]
    curves = scan(aligned, tok, held, demo_judge, directions, cfg.alphas, cfg.threshold, on_point=points)
    timings["landscape_s"] = time.perf_counter() - t3

    drift = report.drift_per_layer(out, runs, models.aligned, anchors, p=max(cfg.ps))
    results = {"config": asdict(cfg), "cache": str(models.base.parent), "models_reused": models.reused,
               "reference": reference, "runs": runs, "landscape": [c.as_dict() for c in curves],
               "drift": drift, "timings": {k: round(v, 2) for k, v in timings.items()},
               "torch_threads": torch.get_num_threads()}
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
    p.add_argument("--seed", type=int, default=None, help="seed of the fine-tuning runs")
    p.add_argument("--lr", type=float, default=None, help="fine-tuning learning rate")
    p.add_argument("--lora", action="store_true",
                   help="fine-tune LoRA adapters (r=8 on every linear layer of the blocks) instead of all weights")
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
    cfg = DemoConfig.quick() if args.quick else DemoConfig()
    changes: dict[str, Any] = {}
    if args.steps is not None:
        changes["steps"] = args.steps
    if args.lambdas is not None:
        changes["lambdas"] = _floats(args.lambdas, "--lambdas")
    if args.ps is not None:
        changes["ps"] = _floats(args.ps, "--ps")
    if args.seed is not None:
        changes["seed"] = args.seed
    if args.lr is not None:
        changes["lr"] = args.lr
    if args.lora:
        changes["lora"] = True
    try:
        cfg = replace(cfg, **changes)
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
    print(f"total time: {time.perf_counter() - t0:.1f} s")
    return 0
