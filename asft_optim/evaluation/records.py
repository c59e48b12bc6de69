"""Prompts and task records, from JSONL files or a `datasets` id: the one record format of every
command (`asft evaluate --prompts/--task`, `asft finetune --data/--test/--harmful`).

A prompt record is `{"instruction", "input"}`: the instruction comes from the first string field of
`prompt`, `instruction` or `question`; `input` is optional. Task records add `answer`, from the first
of `answer`, `label` or `output` (numbers are turned into strings).

`PKU-Alignment/BeaverTails:30k_test` names a `datasets` id and a split (loaded with the `datasets`
library, extra `eval`); a local dataset folder works the same way (`folder:train`). When every row
carries BeaverTails' boolean `is_safe`, only the unsafe rows (`is_safe == false`) are kept, as the
field's HS protocol does, and the filter is recorded.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["ANSWER_FIELDS", "PROMPT_FIELDS", "Records", "jsonl_rows", "load_prompts", "load_task", "parse_record",
           "prompt_of"]

PROMPT_FIELDS = ("prompt", "instruction", "question")
ANSWER_FIELDS = ("answer", "label", "output")


@dataclass(frozen=True)
class Records:
    """Loaded records and where they came from (`source`, the filter applied, the limit)."""
    records: list[dict[str, str]]
    source: str
    filter: str | None
    limit: int | None

    def describe(self) -> dict[str, Any]:
        return {"source": self.source, "n": len(self.records), "filter": self.filter, "limit": self.limit}


def prompt_of(rec: dict[str, str]) -> str:
    """The user's prompt as one string: the instruction, then the input after a blank line."""
    return f"{rec['instruction']}\n\n{rec['input']}" if rec.get("input") else rec["instruction"]


def jsonl_rows(path: Path) -> Iterator[tuple[str, dict[str, Any]]]:
    """("FILE:LINE", the JSON object) for each non-blank line; ValueError naming FILE:LINE otherwise."""
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{where}: not valid JSON ({e.msg} at column {e.colno})") from None
            if not isinstance(row, dict):
                raise ValueError(f"{where}: expected a JSON object, got {type(row).__name__}")
            yield where, row


def _rows_dataset(spec: str) -> Iterator[tuple[str, dict[str, Any]]]:
    name, _, split = spec.rpartition(":")
    if not name or not split:
        raise ValueError(f"prompts {spec!r}: a datasets id needs a split, e.g. PKU-Alignment/BeaverTails:30k_test")
    try:
        import datasets
    except ModuleNotFoundError:
        raise ModuleNotFoundError("loading a `datasets` id needs the datasets library: "
                                  "pip install 'asft_optim[eval]'") from None
    try:
        ds = datasets.load_dataset(name, split=split)
    except Exception as e:  # datasets raises many kinds (FileNotFoundError, ValueError, hub errors)
        raise ValueError(f"prompts {spec!r}: datasets could not load {name!r} split {split!r}: {e}") from None
    for i, row in enumerate(ds):
        yield f"{spec}[{i}]", dict(row)


def _first(row: dict[str, Any], fields: Iterable[str], numbers: bool = False) -> str | None:
    for key in fields:
        v = row.get(key)
        if isinstance(v, str):
            return v
        if numbers and isinstance(v, (int, float)) and not isinstance(v, bool):
            return str(v)
    return None


def parse_record(where: str, row: dict[str, Any], need_answer: bool) -> dict[str, str]:
    """One record `{"instruction", "input"}` (plus `"answer"` when `need_answer`) from a JSON row.

    Every command reads this one format (see the module docstring); `where` ("FILE:LINE") names the
    row in errors.

    Raises:
        ValueError: no prompt field, a non-string `input`, or (when `need_answer`) no answer field.
    """
    instruction = _first(row, PROMPT_FIELDS)
    if instruction is None:
        raise ValueError(f"{where}: no prompt: expected a string field " + ", ".join(f"'{k}'" for k in PROMPT_FIELDS))
    inp = row.get("input", "")
    if not isinstance(inp, str):
        raise ValueError(f"{where}: field 'input' is not a string")
    rec = {"instruction": instruction, "input": inp}
    if need_answer:
        answer = _first(row, ANSWER_FIELDS, numbers=True)
        if answer is None:
            raise ValueError(f"{where}: no answer: expected a field "
                             + ", ".join(f"'{k}'" for k in ANSWER_FIELDS) + " (string or number)")
        rec["answer"] = answer
    return rec


def _load(spec: str | Path, what: str, limit: int | None, need_answer: bool) -> Records:
    if limit is not None and limit < 1:
        raise ValueError(f"--limit must be ≥ 1, got {limit}")
    text = str(spec)
    path = Path(text)
    if path.is_file():
        rows: Iterator[tuple[str, dict[str, Any]]] = jsonl_rows(path)
        source = str(path.resolve())
    elif ":" in text and not need_answer:
        rows, source = _rows_dataset(text), text
    else:
        hint = "" if need_answer else (", or a datasets id with a split such as "
                                       "PKU-Alignment/BeaverTails:30k_test")
        raise FileNotFoundError(f"{what} file not found: {text} (expected a JSONL file{hint})")
    kept: list[tuple[dict[str, str], Any]] = []
    for where, row in rows:
        kept.append((parse_record(where, row, need_answer), row.get("is_safe")))
    if not kept:
        raise ValueError(f"{what} {text}: no records")
    unsafe_only = not need_answer and all(isinstance(flag, bool) for _, flag in kept)
    out = [rec for rec, flag in kept if not (unsafe_only and flag)]
    if not out:
        raise ValueError(f"{what} {text}: no unsafe records (every row has is_safe = true)")
    if limit is not None:
        out = out[:limit]
    return Records(out, source, "is_safe == false" if unsafe_only else None, limit)


def load_prompts(spec: str | Path, limit: int | None = None) -> Records:
    """Harmful prompts from a JSONL file or `ID:SPLIT` (see the module docstring); the first `limit`.

    Raises:
        FileNotFoundError: neither a file nor a datasets id.
        ValueError: a record without a prompt (the message names the file and line), or no records.
    """
    return _load(spec, "prompts", limit, need_answer=False)


def load_task(path: str | Path, limit: int | None = None) -> Records:
    """Task test records (prompt and answer) from a JSONL file.

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: a record without a prompt or an answer (the message names the file and line).
    """
    return _load(path, "task", limit, need_answer=True)
