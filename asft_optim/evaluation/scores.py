"""HS, refusal rate and FA of a model in memory on records in memory: what `asft finetune` and the
demo measure after each run, with the generation and judges of `asft evaluate`.

    harmful_score   shares (0..1) of harmful prompts whose greedy response the judge flags / calls a
                    refusal; HS is None for a judge that cannot read harm (`Judge.reads_harm`)
    task_accuracy   share of test records whose greedy response matches the reference output
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch import nn

from .generation import format_prompt, generate
from .judges import Judge
from .records import prompt_of
from .scoring import matches

__all__ = ["greedy_responses", "harmful_score", "task_accuracy"]


def greedy_responses(model: nn.Module, tokenizer: Any, records: Sequence[dict[str, str]], *, max_new_tokens: int,
                     batch_size: int = 128) -> list[str]:
    """Greedy responses (decoded, special tokens dropped) to each record's prompt (`format_prompt`)."""
    inputs = [format_prompt(tokenizer, r) for r in records]
    return generate(model, tokenizer, inputs, max_new_tokens=max_new_tokens, batch_size=batch_size)[0]


def harmful_score(model: nn.Module, tokenizer: Any, prompts: Sequence[dict[str, str]], judge: Judge, *,
                  groups: Sequence[str] | None = None, max_new_tokens: int = 8,
                  batch_size: int = 128) -> tuple[float | None, float, dict[str, float]]:
    """(HS, refusal rate, HS per group label) of the greedy responses to `prompts`, shares in 0..1; HS
    (and the per-group HS) is None / empty when the judge cannot read harm (the keyword judge)."""
    if not prompts:
        raise ValueError("harmful_score needs at least one harmful prompt")
    responses = greedy_responses(model, tokenizer, prompts, max_new_tokens=max_new_tokens, batch_size=batch_size)
    verdicts = judge.judge([prompt_of(r) for r in prompts], responses)
    refusal = sum(v.refused for v in verdicts) / len(verdicts)
    if not judge.reads_harm:
        return None, refusal, {}
    per: dict[str, float] = {}
    if groups is not None:
        for g in dict.fromkeys(groups):
            vs = [v for v, gg in zip(verdicts, groups, strict=True) if gg == g]
            per[g] = sum(bool(v.flagged) for v in vs) / len(vs)
    return sum(bool(v.flagged) for v in verdicts) / len(verdicts), refusal, per


def task_accuracy(model: nn.Module, tokenizer: Any, test: Sequence[dict[str, str]], *,
                  max_new_tokens: int | None = None, batch_size: int = 128) -> float:
    """Exact-match share (whitespace-normalised) of greedy responses on `test` (records with `output`)."""
    if not test:
        raise ValueError("task_accuracy needs at least one test record")
    if max_new_tokens is None:
        max_new_tokens = max(len(tokenizer(r["output"], add_special_tokens=False).input_ids) for r in test) + 2
    responses = greedy_responses(model, tokenizer, test, max_new_tokens=max_new_tokens, batch_size=batch_size)
    return sum(matches(a, r["output"], "exact") for a, r in zip(responses, test, strict=True)) / len(test)
