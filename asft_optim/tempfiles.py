"""Temporary files and folders beside an output, renamed onto it when complete (atomic writes).

A temporary file (or folder) is named `.{output name}.{host}.{pid}.{random}.tmp` after the process writing
it. A writer killed mid-write (SIGKILL, OOM, a lost node) cannot remove its own; the next writer
of the same output on the same host removes those whose process is gone, and never one of a live
process (a reused pid keeps a stale file, the safe side). Files of other hosts, of other outputs
and of other naming schemes are left alone. Outputs get the permissions of a file (folder) that `open`
(`mkdir`) would create under the process's umask, not `tempfile`'s private 0600 (0700).
"""

from __future__ import annotations

import glob
import logging
import os
import re
import shutil
import socket
import tempfile
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import IO

import torch
from safetensors.torch import save_file

__all__ = ["create_temp", "create_temp_dir", "staged_dir", "remove_stale_temps", "release_temp",
           "atomic_write", "atomic_save_safetensors"]

log = logging.getLogger(__name__)

_HOST = re.sub(r"[^A-Za-z0-9_-]", "-", socket.gethostname()) or "host"
_OWN: set[Path] = set()  # temporary files this process created and has not yet released


def _pattern(path: Path) -> re.Pattern[str]:
    return re.compile(rf"^\.{re.escape(path.name)}\.{re.escape(_HOST)}\.(\d+)\.[A-Za-z0-9_]+\.tmp$")


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return False  # this process's own files are told apart by `_OWN`
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by another user
        return True
    return True


def remove_stale_temps(path: Path) -> list[Path]:
    """Remove the temporary files of `path` left by writers on this host that no longer run.

    Returns the removed files (a file another process removed first is skipped).
    """
    pattern = _pattern(path)
    removed = []
    for tmp in path.parent.glob(f".{glob.escape(path.name)}.*.tmp"):
        m = pattern.match(tmp.name)
        if m is None or tmp in _OWN or _alive(int(m.group(1))):
            continue
        try:
            if tmp.is_dir() and not tmp.is_symlink():
                shutil.rmtree(tmp)
            else:
                tmp.unlink()
        except FileNotFoundError:
            continue
        log.info("removed %s, left by a writer of %s that was killed (pid %s)", tmp, path, m.group(1))
        removed.append(tmp)
    return removed


def create_temp(path: Path) -> tuple[int, Path]:
    """Create the parent folder, remove stale temporary files of `path`, and open a new one.

    Returns (an open file descriptor, its path). Call `release_temp` once it is renamed or removed.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.{_HOST}.{os.getpid()}.", suffix=".tmp", dir=path.parent)
    os.fchmod(fd, 0o666 & ~_umask())
    _OWN.add(Path(tmp))
    return fd, Path(tmp)


def create_temp_dir(path: Path) -> Path:
    """`create_temp` for a folder: a new empty temporary folder beside `path` (stale ones removed)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(path)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.{_HOST}.{os.getpid()}.", suffix=".tmp", dir=path.parent))
    tmp.chmod(0o777 & ~_umask())
    _OWN.add(tmp)
    return tmp


def release_temp(tmp: Path, *, remove: bool) -> None:
    """Forget a temporary file or folder of this process (renamed onto its target, or to be removed)."""
    _OWN.discard(tmp)
    if remove:
        if tmp.is_dir() and not tmp.is_symlink():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            tmp.unlink(missing_ok=True)


@contextmanager
def staged_dir(path: Path) -> Iterator[Path]:
    """A new temporary folder beside `path` to write the output into.

    When the block completes, the folder replaces `path`: an existing `path` is moved aside, the new
    folder renamed onto it, and only then the old one deleted. When the block raises, the new folder
    is deleted and `path` is left as it was.
    """
    tmp = create_temp_dir(path)
    try:
        yield tmp
    except BaseException:
        release_temp(tmp, remove=True)
        raise
    aside = None
    if os.path.lexists(path):
        aside = create_temp_dir(path)
        os.replace(path, aside / "old")
    os.replace(tmp, path)
    release_temp(tmp, remove=False)
    if aside is not None:
        release_temp(aside, remove=True)


def atomic_write(path: Path, write: Callable[[IO[bytes]], object]) -> None:
    """Call `write` on a new temporary file beside `path`, then rename it onto `path`."""
    fd, tmp = create_temp(path)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
        os.replace(tmp, path)
    except BaseException:
        release_temp(tmp, remove=True)
        raise
    release_temp(tmp, remove=False)


def atomic_save_safetensors(tensors: Mapping[str, torch.Tensor], path: Path,
                            metadata: Mapping[str, str]) -> None:
    """Write a safetensors file to a temporary name in the target folder, then rename it."""
    fd, tmp = create_temp(path)
    os.close(fd)
    try:
        save_file(dict(tensors), str(tmp), metadata=dict(metadata))
        os.replace(tmp, path)
    except BaseException:
        release_temp(tmp, remove=True)
        raise
    release_temp(tmp, remove=False)
