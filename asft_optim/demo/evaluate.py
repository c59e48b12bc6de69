"""Harmful Score and Fine-tune Accuracy by greedy decoding, on top of `asft_optim.evaluation`.

    Harmful Score (HS)     share of harmful prompts whose greedy response a judge calls harmful
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

from torch import nn

from ..evaluation.generation import format_prompt
from ..evaluation.generation import generate as _generate
from ..evaluation.judges import Judge
from ..evaluation.records import prompt_of
from ..evaluation.scoring import matches

__all__ = ["generate", "harmful_score", "task_accuracy", "Scores"]


def generate(model: nn.Module, tokenizer: Any, records: Sequence[dict[str, str]], *, max_new_tokens: int,
             batch_size: int = 128) -> list[str]:
    """Greedy responses (decoded, special tokens dropped) to each record's prompt, left-padded batches."""
    inputs = [format_prompt(tokenizer, r) for r in records]
    return _generate(model, tokenizer, inputs, max_new_tokens=max_new_tokens, batch_size=batch_size)[0]


@dataclass(frozen=True)
class Scores:
    """HS, the refusal rate and per-group HS over harmful prompts; FA over the task test split (0..1)."""
    hs: float
    refusal: float
    hs_groups: dict[str, float]
    fa: float | None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def harmful_score(model: nn.Module, tokenizer: Any, prompts: Sequence[dict[str, str]], judge: Judge, *,
                  groups: Sequence[str] | None = None, max_new_tokens: int = 8,
                  batch_size: int = 128) -> tuple[float, float, dict[str, float]]:
    """(HS, refusal rate, HS per group label) of the greedy responses to `prompts`: the shares (0..1)
    that `judge` flags and that it calls refusals (it sees each record's `prompt_of` and response)."""
    if not prompts:
        raise ValueError("harmful_score needs at least one harmful prompt")
    responses = generate(model, tokenizer, prompts, max_new_tokens=max_new_tokens, batch_size=batch_size)
    verdicts = judge.judge([prompt_of(r) for r in prompts], responses)
    hs = sum(v.flagged for v in verdicts) / len(verdicts)
    refusal = sum(v.refused for v in verdicts) / len(verdicts)
    per: dict[str, float] = {}
    if groups is not None:
        for g in dict.fromkeys(groups):
            vs = [v for v, gg in zip(verdicts, groups) if gg == g]
            per[g] = sum(v.flagged for v in vs) / len(vs)
    return hs, refusal, per


def task_accuracy(model: nn.Module, tokenizer: Any, test: Sequence[dict[str, str]], *,
                  max_new_tokens: int | None = None, batch_size: int = 128) -> float:
    """Exact-match share of greedy responses on `test` (whitespace-normalised)."""
    if not test:
        raise ValueError("task_accuracy needs at least one test record")
    if max_new_tokens is None:
        max_new_tokens = max(len(tokenizer(r["output"], add_special_tokens=False).input_ids) for r in test) + 2
    responses = generate(model, tokenizer, test, max_new_tokens=max_new_tokens, batch_size=batch_size)
    return sum(matches(a, r["output"], "exact") for a, r in zip(responses, test)) / len(test)
