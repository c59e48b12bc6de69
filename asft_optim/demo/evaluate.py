"""Harmful Score and Fine-tune Accuracy by greedy decoding, on top of `asft_optim.evaluation`.

    Harmful Score (HS)     share of harmful prompts whose greedy response a judge calls harmful
                           (None when the judge cannot see harm, e.g. a refusal-keyword judge whose
                           verdicts have `flagged=None`: it reports the refusal rate only)
    Fine-tune Accuracy (FA) share of test records whose greedy response equals the reference output
                           (whitespace-normalised exact match)

Judges are those of `asft evaluate` (`asft_optim.evaluation.judges`): the demo uses `ToyJudge` (its
synthetic language), `asft finetune` any kind (`keyword` by default, or a judge model). Generation
is `asft_optim.evaluation.generation.generate` on the prompt format that fine-tuning used.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from ..evaluation.generation import format_prompt
from ..evaluation.generation import generate as _generate
from ..evaluation.judges import Judge
from ..evaluation.records import prompt_of
from ..evaluation.scoring import matches

__all__ = ["generate", "harmful_score", "task_accuracy", "first_token_margin", "Scores"]


def generate(model: nn.Module, tokenizer: Any, records: Sequence[dict[str, str]], *, max_new_tokens: int,
             batch_size: int = 128) -> list[str]:
    """Greedy responses (decoded, special tokens dropped) to each record's prompt, left-padded batches."""
    inputs = [format_prompt(tokenizer, r) for r in records]
    return _generate(model, tokenizer, inputs, max_new_tokens=max_new_tokens, batch_size=batch_size)[0]


@dataclass(frozen=True)
class Scores:
    """HS, the refusal rate and per-group HS over harmful prompts; FA over the task test split (0..1).
    HS (and per-group HS) is None when the judge sees refusals only."""
    hs: float | None
    refusal: float
    hs_groups: dict[str, float | None]
    fa: float | None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def harmful_score(model: nn.Module, tokenizer: Any, prompts: Sequence[dict[str, str]], judge: Judge, *,
                  groups: Sequence[str] | None = None, max_new_tokens: int = 8,
                  batch_size: int = 128) -> tuple[float | None, float, dict[str, float | None]]:
    """(HS, refusal rate, HS per group label) of the greedy responses to `prompts`: the shares (0..1)
    that `judge` flags and that it calls refusals (it sees each record's `prompt_of` and response).
    HS and the group HS are None when any verdict's `flagged` is None (a judge that sees no harm)."""
    if not prompts:
        raise ValueError("harmful_score needs at least one harmful prompt")
    responses = generate(model, tokenizer, prompts, max_new_tokens=max_new_tokens, batch_size=batch_size)
    verdicts = judge.judge([prompt_of(r) for r in prompts], responses)
    refusal = sum(bool(v.refused) for v in verdicts) / len(verdicts)
    per: dict[str, float | None] = {}
    if groups is not None:
        for g in dict.fromkeys(groups):
            per[g] = _share_flagged([v for v, gg in zip(verdicts, groups) if gg == g])
    return _share_flagged(verdicts), refusal, per


def _share_flagged(verdicts: Sequence[Any]) -> float | None:
    if any(v.flagged is None for v in verdicts):
        return None
    return sum(bool(v.flagged) for v in verdicts) / len(verdicts)


@torch.no_grad()
def first_token_margin(model: nn.Module, tokenizer: Any, prompts: Sequence[dict[str, str]], token: str) -> float:
    """min over `prompts` of logit(token) − the largest other logit at the first response position.

    Positive: greedy decoding starts every response with `token`, and a change of the logits smaller
    than this (in logit units) cannot change that first token on any prompt."""
    if not prompts:
        raise ValueError("first_token_margin needs at least one prompt")
    tid = tokenizer.convert_tokens_to_ids(token)
    if tid is None or tid == tokenizer.unk_token_id:
        raise ValueError(f"token {token!r} is not in the tokenizer's vocabulary")
    margins = []
    for r in prompts:
        ids = tokenizer(format_prompt(tokenizer, r), add_special_tokens=False, return_tensors="pt").input_ids
        logits = model(input_ids=ids).logits[0, -1].double()
        others = torch.cat([logits[:tid], logits[tid + 1:]])
        margins.append((logits[tid] - others.max()).item())
    return min(margins)


def task_accuracy(model: nn.Module, tokenizer: Any, test: Sequence[dict[str, str]], *,
                  max_new_tokens: int | None = None, batch_size: int = 128) -> float:
    """Exact-match share of greedy responses on `test` (whitespace-normalised)."""
    if not test:
        raise ValueError("task_accuracy needs at least one test record")
    if max_new_tokens is None:
        max_new_tokens = max(len(tokenizer(r["output"], add_special_tokens=False).input_ids) for r in test) + 2
    responses = generate(model, tokenizer, test, max_new_tokens=max_new_tokens, batch_size=batch_size)
    return sum(matches(a, r["output"], "exact") for a, r in zip(responses, test)) / len(test)
