"""`asft finetune`: the demo's fine-tuning and evaluation on your checkpoints and instruction data.

    asft finetune --aligned ALIGNED --base BASE --data train.jsonl [--harmful harmful.jsonl]
                  [--lora | --full] [--methods sft,l2sp,asft] [--lambdas 1,10,100] [--out DIR]

Every method fine-tunes a fresh copy of ALIGNED on the data through the same `Trainer` path
(`finetune.train`), saves it (the LoRA adapter, or the full model) under `DIR/models/`, and is then
re-evaluated from the saved files: FA on the test records (exact match of the greedy response), HS
on the harmful prompts (keyword judge by default: a response without a refusal phrase counts).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
from pathlib import Path
from typing import Any

import torch

from ..anchors import Anchors
from .evaluate import demo_judge, harmful_score, keyword_judge, task_accuracy
from .finetune import (LoraSpec, encode, load_jsonl, load_model, parse_methods, save_model,
                       train)

__all__ = ["add_cli", "run_finetune"]


def _checkpoint(path: Path | None, what: str, flag: str) -> Path:
    if path is None:
        raise ValueError(f"{flag} is required: the {what} checkpoint folder")
    if not path.exists():
        raise FileNotFoundError(f"{what} model not found: {path} ({flag} must be a local Hugging Face "
                                "checkpoint folder; download hub models first, e.g. with `huggingface-cli download`)")
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{what} model folder {path} has no config.json: not a Hugging Face checkpoint")
    return path


def _split(records: list[dict[str, str]], fraction: float, seed: int) -> tuple[list, list]:
    if not 0 < fraction < 1:
        raise ValueError(f"--test-fraction must be in (0, 1), got {fraction}")
    order = list(range(len(records)))
    random.Random(seed).shuffle(order)
    n_test = max(1, round(fraction * len(records)))
    if n_test >= len(records):
        raise ValueError(f"{len(records)} record(s) cannot be split into training and test data; "
                         "give more data or --test FILE")
    return [records[i] for i in order[n_test:]], [records[i] for i in order[:n_test]]


def run_finetune(args: argparse.Namespace, log: Any = print) -> dict[str, Any]:
    """Fine-tune and evaluate every method; writes `args.out/results.json` and `table.md`."""
    from tqdm.auto import tqdm
    from transformers import AutoTokenizer

    aligned = _checkpoint(args.aligned, "aligned", "--aligned")
    data = load_jsonl(args.data)
    harmful = load_jsonl(args.harmful, need_output=False, what="harmful prompts") if args.harmful else None
    if args.test is not None:
        train_set, test_set = data, load_jsonl(args.test, what="test data")
    else:
        train_set, test_set = _split(data, args.test_fraction, args.seed)
    methods = parse_methods(args.methods, args.lambdas)
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    if args.directions is not None:
        if not args.directions.is_file():
            raise FileNotFoundError(f"directions file not found: {args.directions}")
        anchors = Anchors.load(args.directions)
    elif any(m.kind != "sft" for m in methods):
        from ..directions import compute_directions

        base = _checkpoint(args.base, "base", "--base")
        log(f"computing directions {aligned} - {base} -> {out / 'directions.safetensors'}")
        anchors = compute_directions(base, aligned, out=out / "directions.safetensors")
    else:
        anchors = None
    tok = AutoTokenizer.from_pretrained(str(aligned))
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    encoded = [encode(tok, ex) for ex in train_set]
    lora = LoraSpec(args.lora_r, args.lora_alpha, tuple(args.lora_targets.split(","))) if not args.full else None
    judge = demo_judge if args.judge == "demo" else keyword_judge
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    device = "cuda" if torch.cuda.is_available() else "cpu"
    def scores(path: Path) -> dict[str, float]:
        model = load_model(path, dtype=dtype).to(device)  # what was saved, not a model in memory
        row = {"fa": task_accuracy(model, tok, test_set, batch_size=args.eval_batch_size)}
        if harmful is not None:
            row["hs"], row["refusal"], _ = harmful_score(model, tok, harmful, judge, batch_size=args.eval_batch_size,
                                                         max_new_tokens=args.max_new_tokens)
        return row

    rows: list[dict[str, Any]] = [{"method": "aligned (not fine-tuned)", "path": str(aligned), **scores(aligned)}]
    for method in methods:
        t0 = time.perf_counter()
        with tqdm(total=args.steps, unit="step", dynamic_ncols=True,
                  desc=f"{method.label} ({'LoRA' if lora else 'full-parameter'})") as bar:
            model = train(load_model(aligned, "aligned", dtype), encoded, pad_id=tok.pad_token_id,
                          method=method, anchors=anchors, steps=args.steps, lr=args.lr,
                          batch_size=args.batch_size, seed=args.seed, lora=lora, on_step=lambda: bar.update(1))
        train_s = round(time.perf_counter() - t0, 2)
        path = out / "models" / method.slug
        save_model(model, tok, path, {"method": method.label, "kind": method.kind, "lambda": method.lam,
                                      "start": str(aligned.resolve()), "lora": lora is not None,
                                      "steps": args.steps, "lr": args.lr, "seed": args.seed})
        del model
        rows.append({"method": method.label, "path": str(path), "train_s": train_s, **scores(path)})
    results = {"aligned": str(aligned), "data": str(args.data), "n_train": len(train_set),
               "n_test": len(test_set), "n_harmful": len(harmful) if harmful else 0, "judge": args.judge,
               "lora": lora is not None, "runs": rows}
    (out / "results.json").write_text(json.dumps(results, indent=1))
    lines = ["| Method | HS (%) | FA (%) |", "|---|---|---|"]
    for r in rows:
        hs = f"{100 * r['hs']:.1f}" if "hs" in r else "–"
        lines.append(f"| {r['method']} | {hs} | {100 * r['fa']:.1f} |")
    (out / "table.md").write_text("\n".join(lines) + "\n")
    return results


def add_cli(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "finetune", help="fine-tune real checkpoints with SFT, L2-SP and AsFT and evaluate HS and FA",
        description=__doc__.split("\n\n")[0])
    p.add_argument("--aligned", type=Path, required=True, help="aligned (chat) model folder: the starting point")
    p.add_argument("--base", type=Path, default=None, help="its base model folder (for the directions)")
    p.add_argument("--directions", type=Path, default=None,
                   help="precomputed directions file (asft directions); replaces --base")
    p.add_argument("--data", type=Path, required=True,
                   help="training data, JSONL with fields instruction, input (optional), output")
    p.add_argument("--test", type=Path, default=None, help="test data (same format); default: split --data")
    p.add_argument("--test-fraction", type=float, default=0.1, help="share of --data held out for FA")
    p.add_argument("--harmful", type=Path, default=None,
                   help="harmful prompts for HS, JSONL with instruction (and input); HS is skipped without it")
    p.add_argument("--judge", choices=("keywords", "demo"), default="keywords",
                   help="harmfulness judge: refusal keywords (real models) or the demo language's")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--lora", action="store_true", help="train a peft LoRA adapter (default)")
    mode.add_argument("--full", action="store_true", help="train all parameters")
    p.add_argument("--lora-r", type=int, default=8)
    p.add_argument("--lora-alpha", type=int, default=16)
    p.add_argument("--lora-targets", default="q_proj,v_proj", help="comma-separated module names")
    p.add_argument("--methods", default="sft,l2sp,asft", help="comma-separated: sft, l2sp, asft")
    p.add_argument("--lambdas", default="1,10,100", help="λ values for l2sp and asft")
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-new-tokens", type=int, default=64, help="response length for HS")
    p.add_argument("--eval-batch-size", type=int, default=16, help="prompts per generation batch")
    p.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32", help="model weights dtype")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--out", type=Path, default=Path("asft_finetune_out"), help="output folder")
    p.set_defaults(func=_run_cli)


def _run_cli(args: argparse.Namespace) -> int:
    from transformers.utils import logging as hf_logging

    if args.threads:
        torch.set_num_threads(args.threads)
    elif os.environ.get("ASFT_THREADS"):
        torch.set_num_threads(int(os.environ["ASFT_THREADS"]))
    hf_logging.set_verbosity_error()
    try:
        results = run_finetune(args)
    except (FileNotFoundError, ValueError) as e:
        print(f"asft finetune: error: {e}", file=sys.stderr)
        return 2
    print((args.out / "table.md").read_text())
    print(f"results: {args.out / 'results.json'}")
    print(f"models:  {args.out / 'models'}")
    return 0 if results["runs"] else 1
