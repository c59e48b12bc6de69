"""Greedy, batched generation that records the exact text fed to the model.

Prompt formats (`template`):
    auto    the tokenizer's chat template when it has one, else the Alpaca format (what
            `asft finetune` and `asft demo` train with; `prompt_text`)
    chat    the tokenizer's chat template (an error when it has none)
    alpaca  the Alpaca instruction format, after the tokenizer's BOS text
    raw     the prompt itself, after the tokenizer's BOS text

The recorded input is tokenized with `add_special_tokens=False` (the text already holds BOS).
Decoder-only batches are left-padded, so each response equals transformers' own greedy `generate`
on that input alone (checked in tests/test_evaluation.py).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

__all__ = ["ALPACA", "TEMPLATES", "format_prompt", "generate", "prompt_text"]

TEMPLATES = ("auto", "chat", "alpaca", "raw")
ALPACA = ("Below is an instruction that describes a task{inp_note}. Write a response that appropriately "
          "completes the request.\n\n### Instruction:\n{instruction}\n\n{input_block}### Response:\n")


def prompt_text(tokenizer: Any, instruction: str, input: str = "") -> str:
    """The prompt of one record: the tokenizer's chat template when it has one, else Alpaca's."""
    if getattr(tokenizer, "chat_template", None):
        content = f"{instruction}\n\n{input}" if input else instruction
        return tokenizer.apply_chat_template([{"role": "user", "content": content}],
                                             add_generation_prompt=True, tokenize=False)
    block = f"### Input:\n{input}\n\n" if input else ""
    note = ", paired with an input that provides further context" if input else ""
    return (tokenizer.bos_token or "") + ALPACA.format(inp_note=note, instruction=instruction,
                                                      input_block=block)


def format_prompt(tokenizer: Any, rec: dict[str, str], template: str = "auto") -> str:
    """The exact text fed to the model for one record `{"instruction", "input"}`."""
    if template not in TEMPLATES:
        raise ValueError(f"unknown prompt template {template!r}; expected one of {', '.join(TEMPLATES)}")
    has_chat = bool(getattr(tokenizer, "chat_template", None))
    if template == "chat" and not has_chat:
        raise ValueError("--template chat: the tokenizer has no chat template")
    if template in ("auto", "chat"):
        return prompt_text(tokenizer, rec["instruction"], rec.get("input", ""))
    bos = tokenizer.bos_token or ""
    inp = rec.get("input", "")
    if template == "raw":
        return bos + (f"{rec['instruction']}\n\n{inp}" if inp else rec["instruction"])
    block = f"### Input:\n{inp}\n\n" if inp else ""
    note = ", paired with an input that provides further context" if inp else ""
    return bos + ALPACA.format(inp_note=note, instruction=rec["instruction"], input_block=block)


def pad_id(tokenizer: Any) -> int:
    """The tokenizer's pad id, else its EOS id (decoder-only models often have no pad token)."""
    pid = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pid is None:
        raise ValueError("the tokenizer has neither a pad nor an EOS token: cannot pad batches")
    return pid


@torch.no_grad()
def generate(model: nn.Module, tokenizer: Any, inputs: Sequence[str], *, max_new_tokens: int,
             batch_size: int = 16, on_batch: Callable[[int], None] | None = None,
             scores_for: Sequence[int] | None = None) -> tuple[list[str], list[list[float]] | None]:
    """Greedy responses (decoded, special tokens skipped) to each input text.

    Args:
        inputs: the exact texts (see `format_prompt`); tokenized without adding special tokens.
        max_new_tokens: at most this many generated tokens per response.
        batch_size: inputs per left-padded batch.
        on_batch: called with the number of inputs done in each batch (progress bars).
        scores_for: token ids whose softmax probability at the first generated position is
            returned per input (the generative guard's P("unsafe")).

    Returns:
        (responses, probabilities per input for `scores_for`, or None).
    """
    if max_new_tokens < 1:
        raise ValueError(f"--max-new-tokens must be ≥ 1, got {max_new_tokens}")
    if batch_size < 1:
        raise ValueError(f"--batch-size must be ≥ 1, got {batch_size}")
    device = next(model.parameters()).device
    pad = pad_id(tokenizer)
    responses: list[str] = []
    probs: list[list[float]] | None = [] if scores_for is not None else None
    for i in range(0, len(inputs), batch_size):
        ids = [tokenizer(t, add_special_tokens=False).input_ids for t in inputs[i:i + batch_size]]
        n = max(map(len, ids))
        batch = torch.full((len(ids), n), pad, dtype=torch.long)
        mask = torch.zeros_like(batch)
        for j, p in enumerate(ids):
            batch[j, n - len(p):] = torch.tensor(p, dtype=torch.long)
            mask[j, n - len(p):] = 1
        out = model.generate(input_ids=batch.to(device), attention_mask=mask.to(device), do_sample=False,
                             num_beams=1, max_new_tokens=max_new_tokens, pad_token_id=pad,
                             output_scores=scores_for is not None, return_dict_in_generate=True)
        responses += tokenizer.batch_decode(out.sequences[:, n:], skip_special_tokens=True)
        if probs is not None:
            first = torch.softmax(out.scores[0].float(), dim=-1)[:, list(scores_for)]
            probs += first.cpu().tolist()
        if on_batch is not None:
            on_batch(len(ids))
    return responses, probs
