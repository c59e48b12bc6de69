"""results.json and samples.jsonl, written atomically (a temporary file in the same folder, then
`os.replace`): a run that fails leaves no results.json behind."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

__all__ = ["RESULTS", "SAMPLES", "TASK_SAMPLES", "FORMAT", "write_text_atomic", "write_json", "write_jsonl",
           "read_results"]

RESULTS, SAMPLES, TASK_SAMPLES = "results.json", "samples.jsonl", "task_samples.jsonl"
FORMAT = "asft-evaluate/1"


def write_text_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json(path: Path, obj: Any) -> None:
    write_text_atomic(path, json.dumps(obj, indent=1, ensure_ascii=False) + "\n")


def write_jsonl(path: Path, rows: Iterable[dict[str, Any]]) -> None:
    write_text_atomic(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


def read_results(folder: str | Path) -> dict[str, Any]:
    """An evaluation folder's results.json.

    Raises:
        FileNotFoundError: the folder has no results.json.
        ValueError: it is not an `asft evaluate` results file.
    """
    path = Path(folder) / RESULTS
    if not path.is_file():
        raise FileNotFoundError(f"{folder}: no {RESULTS} (not an `asft evaluate` folder, or its run failed)")
    res = json.loads(path.read_text(encoding="utf-8"))
    if res.get("format") != FORMAT:
        raise ValueError(f"{path}: format {res.get('format')!r}, expected {FORMAT!r}")
    return res
