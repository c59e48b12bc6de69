"""results.json and samples.jsonl, written atomically (a temporary file in the same folder, then
`os.replace`): a run that fails leaves no results.json behind, and an earlier run's files are
replaced only once the new run's are complete (`write_run`)."""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from ..tempfiles import create_temp, release_temp

__all__ = ["RESULTS", "SAMPLES", "TASK_SAMPLES", "FORMAT", "write_text_atomic", "write_json", "write_run",
           "read_results"]

RESULTS, SAMPLES, TASK_SAMPLES = "results.json", "samples.jsonl", "task_samples.jsonl"
FORMAT = "asft-evaluate/1"


def _staged_text(path: Path, text: str) -> Path:
    """`text` written and flushed to a new temporary file beside `path`; returns the file."""
    fd, tmp = create_temp(path)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        release_temp(tmp, remove=True)
        raise
    return tmp


def write_text_atomic(path: Path, text: str) -> None:
    tmp = _staged_text(path, text)
    os.replace(tmp, path)
    release_temp(tmp, remove=False)


def write_json(path: Path, obj: Any) -> None:
    write_text_atomic(path, json.dumps(obj, indent=1, ensure_ascii=False) + "\n")


def _jsonl(rows: Iterable[dict[str, Any]]) -> str:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)


def write_run(out: Path, results: dict[str, Any], samples: Iterable[dict[str, Any]],
              task_samples: Iterable[dict[str, Any]] | None) -> None:
    """Write one evaluation's files into `out`, replacing an earlier run's only once all are complete.

    All three files are written to temporary files first; then the earlier results.json is removed
    (so that no results.json ever describes other samples), the samples files are renamed into place
    (an earlier task_samples.jsonl is removed when this run has none), and results.json comes last.
    """
    texts = {SAMPLES: _jsonl(samples), TASK_SAMPLES: None if task_samples is None else _jsonl(task_samples),
             RESULTS: json.dumps(results, indent=1, ensure_ascii=False) + "\n"}
    staged: dict[str, Path] = {}
    try:
        for name, text in texts.items():
            if text is not None:
                staged[name] = _staged_text(out / name, text)
    except BaseException:
        for tmp in staged.values():
            release_temp(tmp, remove=True)
        raise
    (out / RESULTS).unlink(missing_ok=True)
    for name in texts:
        if name in staged:
            os.replace(staged[name], out / name)
            release_temp(staged[name], remove=False)
        else:
            (out / name).unlink(missing_ok=True)


def read_results(folder: str | Path) -> dict[str, Any]:
    """An evaluation folder's results.json.

    Raises:
        FileNotFoundError: the folder has no results.json.
        ValueError: it is not an `asft evaluate` results file.
    """
    path = Path(folder) / RESULTS
    if not path.is_file():
        raise FileNotFoundError(f"{folder}: no {RESULTS} (not an `asft evaluate` folder, or its run failed)")
    try:
        res = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not JSON ({e.msg} at line {e.lineno}): not an `asft evaluate` results file") from None
    fmt = res.get("format") if isinstance(res, dict) else None
    if fmt is None:
        raise ValueError(f"{path} is not an `asft evaluate` results file (it has no 'format' field; asft finetune "
                         "and asft demo write results.json files of their own)")
    if fmt != FORMAT:
        raise ValueError(f"{path}: format {fmt!r}, expected {FORMAT!r}")
    return res
