"""`asft evaluate`: HS, refusal rate and task accuracy of one model (and adapter), the field's way.

    asft evaluate MODEL [--adapter DIR] --prompts FILE|ID:SPLIT [--judge JUDGE] [--task FILE]
                  [--max-new-tokens N] [--batch-size N] --out DIR

Greedy responses to the harmful prompts are judged (`judges`); HS = flagged share, refusal rate =
refusing share, both in percent (HS null with the keyword judge, which sees refusals only). With `--task`, FA = share of task responses matching the answer.
Writes DIR/samples.jsonl (one line per prompt: prompt, input, response, flagged, refused, scores),
DIR/task_samples.jsonl with --task, and last DIR/results.json, each atomically. An earlier run's
files in DIR are replaced (with --overwrite) only once every input has been checked and the new
files are complete; DIR may hold inputs, but never the files it replaces.
"""

from __future__ import annotations

import argparse
import datetime
import sys
import time
from pathlib import Path
from typing import Any

import torch

from .generation import TEMPLATES, format_prompt, generate
from .judges import JUDGE_KINDS, Judge, load_judge, verdict_row
from .models import fingerprint, load_causal_lm, resolve_dtype
from .records import Records, load_prompts, load_task, prompt_of
from ..outputs import refuse_overlap
from .results import FORMAT, RESULTS, SAMPLES, TASK_SAMPLES, write_run
from .scoring import MATCHES, matches

__all__ = ["evaluate", "score_responses", "add_cli"]


def _bar(total: int, desc: str, show: bool) -> Any:
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="prompt", dynamic_ncols=True, disable=not show)


def score_responses(judge: Judge, prompts: Records, responses: list[str], show: bool = False) -> tuple[list, float]:
    """(verdicts, seconds) of `judge` on the responses to `prompts`."""
    t = time.perf_counter()
    with _bar(len(responses), f"judging ({judge.kind})", show) as bar:
        verdicts = judge.judge([prompt_of(r) for r in prompts.records], responses, on_batch=bar.update)
    return verdicts, time.perf_counter() - t


def _responses(lm: torch.nn.Module, tok: Any, records: Records, desc: str, *, template: str, max_new_tokens: int,
               batch_size: int, show: bool) -> tuple[list[str], list[str], float]:
    """(the exact inputs, the greedy responses, seconds) for `records`, with a progress bar."""
    inputs = [format_prompt(tok, r, template) for r in records.records]
    t = time.perf_counter()
    with _bar(len(inputs), desc, show) as bar:
        responses, _ = generate(lm, tok, inputs, max_new_tokens=max_new_tokens, batch_size=batch_size,
                                on_batch=bar.update)
    return inputs, responses, time.perf_counter() - t


def evaluate(model: str, out: Path, *, prompts: str, judge: str = "keyword", judge_kind: str | None = None,
             adapter: str | None = None, task: str | None = None, match: str = "exact", limit: int | None = None,
             max_new_tokens: int = 128, batch_size: int = 16, threshold: float = 0.5, template: str = "auto",
             dtype: str = "auto", device: str | None = None, overwrite: bool = False,
             show_progress: bool = True) -> dict[str, Any]:
    """Evaluate and write `out` (see the module docstring); returns what results.json holds.

    Everything that can be checked is checked before the first generation: the prompts and task
    files, the judge, the model and the adapter's fit.

    Raises:
        FileNotFoundError, ValueError: bad input; the message names the file, line, or argument; an
            input is one of the files this run would replace, or `out` lies inside an input folder.
        FileExistsError: `out` already holds a results.json and not `overwrite`.
    """
    if match not in MATCHES:
        raise ValueError(f"unknown --match {match!r}; expected one of {', '.join(MATCHES)}")
    if template not in TEMPLATES:
        raise ValueError(f"unknown --template {template!r}; expected one of {', '.join(TEMPLATES)}")
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"--out {out} is a file, not a folder")
    if (out / RESULTS).exists() and not overwrite:
        raise FileExistsError(f"{out / RESULTS} exists: pass --overwrite or choose another --out")
    refuse_overlap(out, "--out", [("MODEL", model), ("--adapter", adapter), ("--prompts", prompts), ("--task", task),
                                  ("--judge", judge)], replaced=(RESULTS, SAMPLES, TASK_SAMPLES))
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    torch_dtype = resolve_dtype(dtype, device)
    harmful = load_prompts(prompts, limit)
    task_records = load_task(task) if task is not None else None
    the_judge = load_judge(judge, judge_kind, threshold=threshold, batch_size=batch_size, device=device,
                           dtype=torch_dtype)
    lm, tok, tok_source = load_causal_lm(model, adapter, dtype=torch_dtype, device=device)

    gen = {"template": template, "max_new_tokens": max_new_tokens, "batch_size": batch_size, "show": show_progress}
    inputs, responses, gen_s = _responses(lm, tok, harmful, "generating", **gen)
    verdicts, judge_s = score_responses(the_judge, harmful, responses, show_progress)
    samples = [{"prompt": prompt_of(r), "input": x, "response": y, **verdict_row(v)}
               for r, x, y, v in zip(harmful.records, inputs, responses, verdicts)]
    n = len(samples)
    n_flagged = sum(bool(v.flagged) for v in verdicts) if the_judge.reads_harm else None
    results: dict[str, Any] = {
        "format": FORMAT,
        "harmful_score": None if n_flagged is None else 100 * n_flagged / n,
        "refusal_rate": 100 * sum(v.refused for v in verdicts) / n,
        "task_accuracy": None,
        "n": n,
        "n_flagged": n_flagged,
        "model": {**fingerprint(model), "revision": getattr(lm.config, "_commit_hash", None)},
        "adapter": fingerprint(adapter) if adapter is not None else None,
        "tokenizer": tok_source,
        "judge": {**the_judge.describe(),
                  **({"fingerprint": fingerprint(judge)["sha256"]} if the_judge.source else {})},
        "prompts": harmful.describe(),
        "task": None,
        "generation": {"do_sample": False, "num_beams": 1, "max_new_tokens": max_new_tokens,
                       "batch_size": batch_size, "template": template, "padding": "left",
                       "dtype": str(torch_dtype).removeprefix("torch."), "device": device},
        "throughput": {"generation_prompts_per_s": n / gen_s if gen_s > 0 else None,
                       "judge_prompts_per_s": n / judge_s if judge_s > 0 else None},
        "timings_s": {"generation": round(gen_s, 3), "judge": round(judge_s, 3)},
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    task_rows = None
    if task_records is not None:
        t_inputs, t_resp, task_s = _responses(lm, tok, task_records, "task", **gen)
        task_rows = [{"prompt": prompt_of(r), "input": x, "response": y, "answer": r["answer"],
                      "correct": matches(y, r["answer"], match)}
                     for r, x, y in zip(task_records.records, t_inputs, t_resp)]
        correct = sum(r["correct"] for r in task_rows)
        results["task_accuracy"] = 100 * correct / len(task_rows)
        results["task"] = {**task_records.describe(), "match": match, "n_correct": correct}
        results["throughput"]["task_prompts_per_s"] = len(task_rows) / task_s if task_s > 0 else None
        results["timings_s"]["task"] = round(task_s, 3)
    out.mkdir(parents=True, exist_ok=True)
    write_run(out, results, samples, task_rows)
    return results


# ----------------------------------------------------------------------------------- CLI
def add_cli(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "evaluate", help="harmful score, refusal rate and task accuracy of a model (and adapter)",
        description=__doc__.split("\n\n")[0])
    p.add_argument("model", help="transformers model folder or Hub id")
    p.add_argument("--adapter", default=None, help="peft LoRA adapter folder applied on top (merged)")
    p.add_argument("--prompts", required=True,
                   help="harmful prompts: JSONL with a 'prompt' (or 'instruction'/'question') field, or a "
                        "datasets id with split, e.g. PKU-Alignment/BeaverTails:30k_test")
    p.add_argument("--limit", type=int, default=None, help="use the first N prompts (e.g. 500)")
    p.add_argument("--judge", default="keyword",
                   help="judge model folder or Hub id (QA-moderation classifier or generative guard), "
                        "or 'keyword' (refusal phrases) or 'toy' (the demo language); default %(default)s")
    p.add_argument("--judge-kind", default=None, help=f"override the detected kind: {', '.join(JUDGE_KINDS)}")
    p.add_argument("--threshold", type=float, default=0.5,
                   help="QA-moderation: flagged when any category's probability exceeds this (default %(default)s)")
    p.add_argument("--task", default=None, help="task test records: JSONL with a prompt and an 'answer'/'label'/'output'")
    p.add_argument("--match", default="exact", help=f"task matching: {', '.join(MATCHES)} (default %(default)s)")
    p.add_argument("--template", default="auto", help=f"prompt format: {', '.join(TEMPLATES)} (default %(default)s)")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=16, help="prompts per generation and judge batch")
    p.add_argument("--dtype", default="auto", help="auto (bfloat16 on CUDA, else float32), float32, bfloat16, float16")
    p.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    p.add_argument("--overwrite", action="store_true", help="replace an earlier run's files in --out (once this run is complete)")
    p.add_argument("--out", type=Path, required=True, help="output folder")
    p.set_defaults(func=_run_cli)


def _run_cli(args: argparse.Namespace) -> int:
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        res = evaluate(args.model, args.out, prompts=args.prompts, judge=args.judge, judge_kind=args.judge_kind,
                       adapter=args.adapter, task=args.task, match=args.match, limit=args.limit,
                       max_new_tokens=args.max_new_tokens, batch_size=args.batch_size, threshold=args.threshold,
                       template=args.template, dtype=args.dtype, device=args.device, overwrite=args.overwrite)
    except (FileNotFoundError, FileExistsError, ValueError, ModuleNotFoundError) as e:
        print(f"asft evaluate: error: {e}", file=sys.stderr)
        return 2
    fa = "–" if res["task_accuracy"] is None else f"{res['task_accuracy']:.1f}%"
    hs = "–" if res["harmful_score"] is None else f"{res['harmful_score']:.1f}%"
    print(f"HS {hs}  refusal {res['refusal_rate']:.1f}%  FA {fa}  (n = {res['n']}, judge {res['judge']['kind']})")
    if res["harmful_score"] is None:
        print(f"note: the {res['judge']['kind']} judge sees refusals only, not harm: no HS (pass --judge with a "
              "QA-moderation classifier or a guard model)")
    print(f"results: {args.out / RESULTS}")
    return 0
