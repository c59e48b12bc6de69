"""Where the `asft` commands write: never onto, into or around one of their own inputs.

The rule every command follows: check the inputs, write the whole new output under a temporary name
beside its target (`tempfiles`), and only then replace what was there. Nothing is deleted or
replaced before that, and an output never lands on an input file, inside an input folder, or (when
the command replaces its output whole) around an input.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

__all__ = ["Input", "local_path", "refuse_overlap"]

Input = tuple[str, str | os.PathLike | None]  # (the flag or argument that names it, its path)


def local_path(source: str | os.PathLike | None) -> Path | None:
    """The real path of a local file or folder; None for a Hub id, a datasets id or nothing."""
    if source is None:
        return None
    path = Path(source).expanduser()
    return Path(os.path.realpath(path)) if path.exists() else None


def _within(child: Path, parent: Path) -> bool:
    return child == parent or parent in child.parents


def refuse_overlap(out: str | os.PathLike, out_flag: str, inputs: Iterable[Input], *,
                   replaced: Iterable[str] | None = None) -> None:
    """Raise ValueError, naming both flags and paths, when the output `out` would write onto an input.

    Args:
        out: the output file or folder (need not exist yet).
        inputs: (flag, path) of every input; paths that do not exist locally (Hub ids) are skipped.
            Give a checkpoint as its folder or file and as each of the files it reads.
        replaced: the names inside the output folder that the command replaces; `None` when it
            replaces `out` whole (then no input may lie inside it).

    Refused: `out` is an input (the same real path, or the same file through a link); `out` lies
    inside an input folder (writing there changes that input); an input lies inside `out` and is
    replaced (`replaced` is None, or the input is one of those names).
    """
    target = Path(os.path.realpath(Path(out).expanduser()))
    names = None if replaced is None else {target / n for n in replaced}
    found = [(flag, source, path) for flag, source in inputs if (path := local_path(source)) is not None]
    for flag, source, path in found:  # the plainest message first
        if path == target or (target.exists() and os.path.samefile(path, target)):
            raise ValueError(f"{out_flag} {out} is the {flag} input {source}: the command would replace its own "
                             "input; choose another output")
    for flag, source, path in found:
        if path.is_dir() and _within(target, path):
            raise ValueError(f"{out_flag} {out} lies inside the {flag} folder {source}: the command would change "
                             "its own input; choose an output outside it")
        if _within(path, target) and (names is None or any(_within(path, n) for n in names)):
            raise ValueError(f"the {flag} input {source} lies inside {out_flag} {out}, which this command "
                             "replaces: move the input out of it, or choose another output")
