"""`asft finetune`: fine-tuning and evaluation (as in the demo) on your checkpoints and instruction data.

    asft finetune --aligned ALIGNED --base BASE --data train.jsonl [--harmful harmful.jsonl]
                  [--lora | --full] [--methods sft,l2sp,asft] [--lambdas 1,10,100] [--out DIR]

Every method fine-tunes a fresh copy of ALIGNED on the data through the same `Trainer` path
(`training.train`; loss and drift printed every --logging-steps), saves it (the LoRA adapter, or the
full model) under `DIR/models/`, and is then re-evaluated from the saved files: FA on the test
records (exact match of the greedy response), HS and the refusal rate on the harmful prompts (any
judge of `asft evaluate`; the default keyword judge sees refusals only and gives no HS), and the
drift per layer of its update (`asft inspect`'s `drift_report`). Models not named by --save are
deleted once measured. Input files use the one record format of `asft_optim.evaluation.records`.
DIR holds one run only: `table.md`, `drift.md`, `drift.png`, `results.json`; it is written as a
temporary folder beside DIR and renamed onto it when the run is complete.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import torch

from ..anchors import Anchors
from ..checkpoints import is_hub_id
from ..directions import check_made_from, compute_directions
from ..outputs import refuse_overlap
from ..tempfiles import staged_dir
from ..inspection import drift_report
from ..evaluation.judges import JUDGE_KINDS, load_judge
from ..evaluation.scores import harmful_score, task_accuracy
from ..evaluation.generation import prompt_text
from .training import (SCHEDULERS, LoraSpec, encode, load_jsonl, load_model, parse_methods,
                       save_model, train)
from .report import drift_table, plot_drift, results_table

__all__ = ["add_cli", "run_finetune", "RUN_INFO"]

RUN_INFO = "asft_finetune_run.json"  # marks a folder as one run's output (and holds its arguments)
_JUDGE_NAMES = {"keywords": "keyword", "demo": "toy"}  # this command's earlier --judge values
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "vocab.txt",
                    "spiece.model")


def _checkpoint(path: Path | None, what: str, flag: str) -> Path:
    """A local checkpoint folder for `flag`: the folder itself, or a Hub id's snapshot (downloaded)."""
    if path is None:
        hint = " (or --directions FILE, directions computed from it)" if flag == "--base" else ""
        raise ValueError(f"{flag} is required{hint}: the {what} checkpoint folder or Hub id")
    if not path.exists() and is_hub_id(str(path)):
        path = _snapshot(str(path), what, flag)
    if not path.exists():
        raise FileNotFoundError(f"{what} model not found: {path} ({flag} takes a local Hugging Face checkpoint "
                                "folder or a Hub id such as org/name)")
    if not (path / "config.json").is_file():
        hint = (f"; it is a LoRA adapter folder: pass its base model as {flag}" if (path / "adapter_config.json").is_file()
                else "")
        raise FileNotFoundError(f"{what} model folder {path} has no config.json: not a Hugging Face checkpoint{hint}")
    return path


def _snapshot(repo: str, what: str, flag: str) -> Path:
    """The local snapshot of a Hub model (config, tokenizer and safetensors weights), downloaded once."""
    repo_id, _, revision = repo.partition("@")
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(repo_id, revision=revision or None,
                                      allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt", "*.tiktoken"]))
    except Exception as e:  # huggingface_hub raises many types: offline, not found, gated, HTTP
        raise FileNotFoundError(
            f"{flag} {repo}: not a local folder, and fetching the {what} model from the Hugging Face Hub failed "
            f"({type(e).__name__}: {e}). On an offline machine, download it elsewhere (`hf download {repo_id} "
            f"--local-dir DIR`) and pass DIR") from None


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


def _positive(args: argparse.Namespace) -> None:
    for flag, value, low in (("--steps", args.steps, 1), ("--batch-size", args.batch_size, 1),
                             ("--grad-accum", args.grad_accum, 1), ("--warmup-steps", args.warmup_steps, 0),
                             ("--logging-steps", args.logging_steps, 0), ("--lora-r", args.lora_r, 1),
                             ("--eval-batch-size", args.eval_batch_size, 1), ("--max-new-tokens", args.max_new_tokens, 1)):
        if value < low:
            raise ValueError(f"{flag} must be ≥ {low}, got {value}")
    if not 0 < args.judge_threshold < 1:
        raise ValueError(f"--judge-threshold must be in (0, 1), got {args.judge_threshold}")
    if args.max_length is not None and args.max_length < 2:
        raise ValueError(f"--max-length must be ≥ 2, got {args.max_length}")


def _check_out(out: Path, overwrite: bool) -> None:
    """`out` must be new or empty, or, with `overwrite`, hold an earlier run (replaced only once this
    run is complete); never mix two runs' files."""
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"--out {out} is a file, not a folder")
    if out.is_dir() and any(out.iterdir()):
        if not overwrite:
            raise FileExistsError(f"output folder {out} is not empty: give a new --out, or pass --overwrite to "
                                  "replace an earlier asft finetune run there (never mix two runs in one folder)")
        if not (out / RUN_INFO).is_file():
            raise FileExistsError(f"--overwrite: {out} holds no {RUN_INFO}, so asft finetune did not write it; "
                                  "not deleting it")


def _tokenizer(path: Path, flag: str) -> Any:
    from transformers import AutoTokenizer

    if not any((path / f).is_file() for f in _TOKENIZER_FILES):
        raise FileNotFoundError(f"{path} holds no tokenizer (none of {', '.join(_TOKENIZER_FILES)}): save the "
                                f"tokenizer there, or pass --tokenizer DIR{' (default: ' + flag + ')' if flag else ''}")
    tok = AutoTokenizer.from_pretrained(str(path))
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def _max_length(path: Path, asked: int | None) -> int | None:
    """--max-length, checked against the model's position limit (its default)."""
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(str(path))
    limit = getattr(cfg, "max_position_embeddings", None) or getattr(cfg, "n_positions", None)
    if asked is not None and limit is not None and asked > limit:
        raise ValueError(f"--max-length {asked} exceeds the {limit} positions of the model in {path}")
    return asked if asked is not None else limit


def _prompt_len(tok: Any, r: dict[str, str]) -> int:
    return len(tok(prompt_text(tok, r["instruction"], r.get("input", "")), add_special_tokens=False).input_ids)


def _encode_train(tok: Any, records: list[dict[str, str]], max_length: int | None, log: Any) -> list[dict]:
    """Encoded training records cut to `max_length` tokens; records left with no response token dropped."""
    full = [encode(tok, ex) for ex in records]
    cut = [{k: v[:max_length] for k, v in e.items()} for e in full]
    long = sum(len(c["input_ids"]) < len(e["input_ids"]) for c, e in zip(cut, full))
    kept = [c for c in cut if any(x != -100 for x in c["labels"])]
    if long:
        log(f"note: {long} training record(s) longer than --max-length {max_length} tokens were cut to it"
            + (f"; {len(cut) - len(kept)} of them, whose prompt alone fills it, were left out" if len(kept) < len(cut)
               else ""))
    if not kept:
        raise ValueError(f"no training record has a response token within --max-length {max_length}")
    return kept


def _fit_eval(tok: Any, test: list[dict[str, str]], harmful: list[dict[str, str]] | None, max_length: int | None,
              max_new_tokens: int, log: Any) -> tuple[list, list | None, int, int]:
    """The test records and harmful prompts that fit `max_length` with their generated tokens, and the
    generation budgets: FA's (longest kept response + 2) and HS's (`max_new_tokens`, or less to fit)."""
    need = [(r, _prompt_len(tok, r), len(tok(r["output"], add_special_tokens=False).input_ids) + 2) for r in test]
    if max_length is None:
        return test, harmful, max(n for *_, n in need), max_new_tokens
    need = [x for x in need if x[1] + x[2] <= max_length]
    fa_tokens = max((n for *_, n in need), default=0)
    fits = [r for r, prompt, _ in need if prompt + fa_tokens <= max_length]
    if len(fits) < len(test):
        log(f"note: {len(test) - len(fits)} test record(s) left out of FA: prompt + {fa_tokens} response "
            f"tokens exceed --max-length {max_length}")
    if not fits:
        raise ValueError(f"no test record fits --max-length {max_length} with its response")
    if harmful is None:
        return fits, None, fa_tokens, max_new_tokens
    lengths = [_prompt_len(tok, r) for r in harmful]
    fit_h = [r for r, n in zip(harmful, lengths) if n < max_length]
    if len(fit_h) < len(harmful):
        log(f"note: {len(harmful) - len(fit_h)} harmful prompt(s) left out of HS: longer than --max-length "
            f"{max_length} tokens")
    if not fit_h:
        raise ValueError(f"no harmful prompt is shorter than --max-length {max_length} tokens")
    room = max_length - max(n for n in lengths if n < max_length)
    if room < max_new_tokens:
        log(f"note: HS responses limited to {room} tokens (not --max-new-tokens {max_new_tokens}): the longest "
            f"harmful prompt leaves no more within --max-length {max_length}")
    return fits, fit_h, fa_tokens, min(room, max_new_tokens)


def run_finetune(args: argparse.Namespace, log: Any = print) -> dict[str, Any]:
    """Fine-tune and evaluate every method; writes `args.out/results.json`, `table.md`, `drift.md`
    and `drift.png`, and keeps the models named by `args.save`."""
    from tqdm.auto import tqdm

    _positive(args)
    aligned = _checkpoint(args.aligned, "aligned", "--aligned")
    data = load_jsonl(args.data)
    harmful = load_jsonl(args.harmful, need_output=False, what="harmful prompts") if args.harmful else None
    if harmful is None and (args.judge not in ("keyword", "keywords") or args.judge_kind is not None):
        raise ValueError(f"--judge {args.judge} judges the responses to --harmful prompts: pass --harmful FILE")
    if args.test is not None:
        train_set, test_set = data, load_jsonl(args.test, what="test data")
    else:
        train_set, test_set = _split(data, args.test_fraction, args.seed)
    methods = parse_methods(args.methods, args.lambdas)
    keep = _saved(args.save, methods)
    if args.directions is not None and not args.directions.is_file():
        raise FileNotFoundError(f"directions file not found: {args.directions}")
    out: Path = args.out
    _check_out(out, args.overwrite)
    refuse_overlap(out, "--out", [("--aligned", aligned), ("--base", args.base), ("--directions", args.directions),
                                  ("--data", args.data), ("--test", args.test), ("--harmful", args.harmful),
                                  ("--tokenizer", args.tokenizer), ("--judge", args.judge)])
    if args.directions is not None and not args.allow_mismatch:
        note = check_made_from(args.directions, aligned)
        if note:
            log(note)
    tok = _tokenizer(args.tokenizer or aligned, "" if args.tokenizer else "the --aligned folder")
    max_length = _max_length(aligned, args.max_length)
    base = _checkpoint(args.base, "base", "--base") if args.directions is None and (
        args.base is not None or any(m.kind != "sft" for m in methods)) else None
    lora = LoraSpec(args.lora_r, args.lora_alpha, tuple(args.lora_targets.split(","))) if not args.full else None
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    device = "cuda" if torch.cuda.is_available() else "cpu"
    judge = load_judge(_JUDGE_NAMES.get(args.judge, args.judge), args.judge_kind, threshold=args.judge_threshold,
                       batch_size=args.eval_batch_size, device=device, dtype=dtype) if harmful is not None else None
    start_model = load_model(aligned, "aligned", dtype)
    if lora is not None:
        lora.check_targets(start_model)
    encoded = _encode_train(tok, train_set, max_length, log)
    test_set, harmful, fa_tokens, hs_tokens = _fit_eval(tok, test_set, harmful, max_length, args.max_new_tokens, log)
    log(_settings(args, methods, lora, max_length, len(encoded), len(test_set), harmful, judge, device))

    with staged_dir(out) as work:  # replaces an earlier run in `out` only once this one is complete
        (work / RUN_INFO).write_text(json.dumps({k: str(v) if isinstance(v, Path) else v
                                                 for k, v in vars(args).items() if k != "func"}, indent=1))
        if args.directions is not None:
            directions: Path | None = args.directions
        elif base is not None:
            directions = work / "directions.safetensors"
            log(f"computing directions {aligned} - {base} -> {out / directions.name}")
            compute_directions(base, aligned, out=directions)
        else:
            directions = None
            log("note: drift not measured (pass --base or --directions)")
        anchors = Anchors.load(directions) if directions is not None and any(m.kind != "sft" for m in methods) else None

        def scores(model: torch.nn.Module) -> dict[str, float]:
            model = model.to(device)
            row = {"fa": task_accuracy(model, tok, test_set, batch_size=args.eval_batch_size, max_new_tokens=fa_tokens)}
            if harmful is not None:
                row["hs"], row["refusal"], _ = harmful_score(model, tok, harmful, judge, batch_size=args.eval_batch_size,
                                                             max_new_tokens=hs_tokens)
            return row

        rows: list[dict[str, Any]] = [{"method": "aligned (not fine-tuned)", "path": str(aligned), **scores(start_model)}]
        del start_model
        drift: dict[str, dict[str, dict[str, float]]] = {}
        for method in methods:
            t0 = time.perf_counter()
            label = f"{method.label} ({'LoRA' if lora else 'full-parameter'})"
            with tqdm(total=args.steps, unit="step", dynamic_ncols=True, desc=label) as bar:
                def show(step: int, logs: dict[str, float], bar: Any = bar, method: Any = method) -> None:
                    text = f"loss {logs['loss']:.4f}, lr {logs['learning_rate']:.3g}"
                    if "asft/cos" in logs:
                        text += f", cos(ΔW,d) {logs['asft/cos']:+.4f}, ‖C⊥ΔW‖/‖ΔW‖ {logs['asft/orth_ratio']:.4f}"
                    bar.write(f"{method.label} step {step}/{args.steps}: {text}")

                model = train(load_model(aligned, "aligned", dtype), encoded, pad_id=tok.pad_token_id,
                              method=method, anchors=anchors, steps=args.steps, lr=args.lr,
                              batch_size=args.batch_size, seed=args.seed, lora=lora, on_step=lambda: bar.update(1),
                              grad_accum=args.grad_accum, warmup_steps=args.warmup_steps, scheduler=args.scheduler,
                              logging_steps=args.logging_steps, on_log=show)
            train_s = round(time.perf_counter() - t0, 2)
            path = work / "models" / method.slug
            save_model(model, tok, path, {"method": method.label, "kind": method.kind, "lambda": method.lam,
                                          "start": str(aligned.resolve()), "lora": lora is not None,
                                          "steps": args.steps, "lr": args.lr, "seed": args.seed})
            del model
            row = {"method": method.label, "path": str(out / "models" / method.slug), "train_s": train_s,
                   **scores(load_model(path, dtype=dtype))}  # what was saved, not the model in memory
            if directions is not None:
                _, layers, _ = drift_report(directions, path, start=None if lora else aligned)
                drift[method.label] = {k: {"delta_norm": v.delta_norm, "cos": v.cos, "orth_ratio": v.orth_ratio}
                                       for k, v in layers.items()}
            if method.slug not in keep:
                shutil.rmtree(path)
                row["path"] = None
            rows.append(row)
        if (work / "models").is_dir() and not any((work / "models").iterdir()):
            (work / "models").rmdir()
        recorded = None if directions is None else out / directions.name if args.directions is None else directions
        results = {"aligned": str(aligned), "data": str(args.data), "n_train": len(encoded), "n_test": len(test_set),
                   "n_harmful": len(harmful) if harmful else 0, "judge": judge and judge.describe(),
                   "lora": lora is not None, "max_length": max_length, "directions": recorded and str(recorded),
                   "runs": rows, "drift": drift}
        (work / "results.json").write_text(json.dumps(results, indent=1))
        (work / "table.md").write_text(results_table(rows, len(test_set), len(harmful) if harmful else 0,
                                                     judge.kind if judge else None))
        if drift:
            (work / "drift.md").write_text(
                "Drift per layer, ΔW = W_finetuned − W_aligned: cos(ΔW, d) (< 0: back towards the base model) and "
                "‖C⊥ΔW‖/‖ΔW‖ (share of the update off the alignment direction).\n\n" + drift_table(drift))
            plot_drift(drift, work / "drift.png", f"drift per layer ({'LoRA' if lora else 'full-parameter'}, "
                                                 f"{args.steps} steps)")
    return results


def _settings(args: argparse.Namespace, methods: list, lora: LoraSpec | None, max_length: int | None, n_train: int,
              n_test: int, harmful: list | None, judge: Any, device: str) -> str:
    """The resolved settings of a run, printed before it starts."""
    mode = (f"LoRA r={lora.r}, alpha={lora.alpha}, targets {','.join(lora.targets)}" if lora else "full-parameter")
    source = f"from --test {args.test}" if args.test else f"--test-fraction {args.test_fraction} of --data"
    hs = f"{len(harmful)} harmful prompt(s) for HS (judge {judge.kind})" if harmful else "no HS (no --harmful)"
    lines = [f"methods: {', '.join(m.label for m in methods)} ({mode})",
             f"data: {n_train} training record(s), {n_test} test record(s) for FA ({source}), {hs}",
             (f"training: {args.steps} step(s), lr {args.lr:g} ({args.scheduler}, warmup {args.warmup_steps}), "
              f"batch {args.batch_size} × {args.grad_accum} accumulation, max length {max_length}, seed {args.seed}, "
              f"{args.dtype} on {device}")]
    if harmful and not judge.reads_harm:
        lines.append(f"note: the {judge.kind} judge sees refusals only, not harm: the table gives the refusal rate "
                     "and no HS (pass --judge with a QA-moderation classifier or a guard model for HS)")
    return "\n".join(lines)


def _saved(spec: str, methods: list) -> set[str]:
    """--save: "none", "all", or comma-separated method slugs (sft, asft_l10, l2sp_l1, ...)."""
    slugs = [m.slug for m in methods]
    if spec == "none":
        return set()
    if spec == "all":
        return set(slugs)
    asked = [x.strip() for x in spec.split(",") if x.strip()]
    unknown = [x for x in asked if x not in slugs]
    if unknown:
        raise ValueError(f"--save {spec!r}: {', '.join(unknown)} is not a run of this command; expected none, all "
                         f"or some of {', '.join(slugs)}")
    return set(asked)


def add_cli(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "finetune", help="fine-tune real checkpoints with SFT, L2-SP and AsFT and evaluate HS and FA",
        description=__doc__.split("\n\n")[0])
    p.add_argument("--aligned", type=Path, required=True,
                   help="aligned (chat) model folder or Hub id: the starting point")
    p.add_argument("--base", type=Path, default=None, help="its base model folder or Hub id (for the directions)")
    p.add_argument("--directions", type=Path, default=None,
                   help="precomputed directions file (asft directions); replaces --base")
    p.add_argument("--allow-mismatch", action="store_true",
                   help="use --directions even when they were made from another aligned checkpoint than --aligned")
    p.add_argument("--data", type=Path, required=True,
                   help="training data, JSONL with fields instruction, input (optional), output")
    p.add_argument("--test", type=Path, default=None, help="test data (same format); default: split --data")
    p.add_argument("--test-fraction", type=float, default=0.1, help="share of --data held out for FA")
    p.add_argument("--harmful", type=Path, default=None,
                   help="harmful prompts for HS, JSONL with instruction (and input); HS is skipped without it")
    p.add_argument("--judge", default="keyword",
                   help="harmfulness judge, as for asft evaluate: 'keyword' (refusal phrases; also 'keywords'), "
                        "'toy' (the demo language; also 'demo'), or a judge model folder or Hub id "
                        "(QA-moderation classifier or generative guard, kept loaded for the whole run)")
    p.add_argument("--judge-kind", default=None,
                   help=f"override the judge model's detected kind: {', '.join(JUDGE_KINDS)}")
    p.add_argument("--judge-threshold", type=float, default=0.5,
                   help="QA-moderation judge: flagged when any category's probability exceeds this")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--lora", action="store_true", help="train a peft LoRA adapter (default)")
    mode.add_argument("--full", action="store_true", help="train all parameters")
    p.add_argument("--lora-r", type=int, default=8, help="LoRA rank r")
    p.add_argument("--lora-alpha", type=int, default=16, help="LoRA alpha (the update is scaled by alpha/r)")
    p.add_argument("--lora-targets", default="q_proj,v_proj", help="comma-separated module names")
    p.add_argument("--methods", default="sft,l2sp,asft", help="comma-separated: sft, l2sp, asft")
    p.add_argument("--lambdas", default="1,10,100", help="λ values for l2sp and asft")
    p.add_argument("--steps", type=int, default=100, help="optimizer steps per run (≥ 1)")
    p.add_argument("--lr", type=float, default=1e-4, help="peak learning rate")
    p.add_argument("--batch-size", type=int, default=8, help="records per micro-batch")
    p.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step")
    p.add_argument("--warmup-steps", type=int, default=0, help="linear warmup steps")
    p.add_argument("--scheduler", choices=SCHEDULERS, default="constant", help="learning rate after the warmup")
    p.add_argument("--max-length", type=int, default=None,
                   help="tokens per training record, longer ones are cut (default: the model's position limit)")
    p.add_argument("--logging-steps", type=int, default=10, help="print loss and drift every N steps (0: never)")
    p.add_argument("--tokenizer", type=Path, default=None, help="tokenizer folder (default: --aligned)")
    p.add_argument("--max-new-tokens", type=int, default=64, help="response length for HS")
    p.add_argument("--eval-batch-size", type=int, default=16, help="prompts per generation batch")
    p.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32", help="model weights dtype")
    p.add_argument("--seed", type=int, default=0, help="seed of the data split, data order and LoRA initialisation")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--out", type=Path, default=Path("asft_finetune_out"), help="output folder (new or empty)")
    p.add_argument("--overwrite", action="store_true", help="replace an earlier asft finetune run in --out")
    p.add_argument("--save", default="none",
                   help="models to keep under --out/models: none, all, or run names such as sft,asft_l10")
    p.set_defaults(func=_run_cli)


def _run_cli(args: argparse.Namespace) -> int:
    from transformers.utils import logging as hf_logging

    if args.threads:
        torch.set_num_threads(args.threads)
    elif os.environ.get("ASFT_THREADS"):
        torch.set_num_threads(int(os.environ["ASFT_THREADS"]))
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        results = run_finetune(args)
    except (FileNotFoundError, FileExistsError, ValueError) as e:
        print(f"asft finetune: error: {e}", file=sys.stderr)
        return 2
    print((args.out / "table.md").read_text())
    print(f"results: {args.out / 'results.json'}")
    if results["drift"]:
        print(f"drift:   {args.out / 'drift.md'}, {args.out / 'drift.png'}")
    kept = [r["path"] for r in results["runs"][1:] if r["path"]]
    print(f"models:  {', '.join(kept)}" if kept else "models:  none kept (--save all, or --save NAME,...)")
    return 0
