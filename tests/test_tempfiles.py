"""Temporary files of killed writers: removed by the next writer of the same output, never a live one's."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from asft_optim import Anchors
from asft_optim.cli import main
from asft_optim.tempfiles import remove_stale_temps

# A child that runs compute_directions(BASE, ALIGNED, OUT) and, after its first piece is written
# to the temporary file, either kills itself with SIGKILL or says "writing" and waits for a line.
_CHILD = textwrap.dedent("""
    import os, signal, sys
    from asft_optim import compute_directions, directions
    mode, base, aligned, out = sys.argv[1:]
    write = directions._StreamingWriter.write
    first = [True]
    def hooked(self, name, piece):
        write(self, name, piece)
        if not first[0]:
            return
        first[0] = False
        self._fh.flush()
        if mode == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        print("writing", flush=True)
        sys.stdin.readline()
    directions._StreamingWriter.write = hooked
    compute_directions(base, aligned, out, chunk_bytes=64)
    print("done", flush=True)
""")


def _temps(out: Path) -> list[Path]:
    return sorted(out.parent.glob(f".{out.name}.*.tmp"))


def _pid_of(tmp: Path) -> int:
    return int(tmp.name.split(".")[-3])


@pytest.fixture
def checkpoints(tmp_path):
    g = torch.Generator().manual_seed(0)
    base = {"a": torch.randn(40, generator=g), "b": torch.randn(7, 3, generator=g)}
    aligned = {k: v + 0.5 for k, v in base.items()}
    save_file(base, str(tmp_path / "base.safetensors"))
    save_file(aligned, str(tmp_path / "aligned.safetensors"))
    return tmp_path / "base.safetensors", tmp_path / "aligned.safetensors"


def _child(mode: str, base: Path, aligned: Path, out: Path) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-c", _CHILD, mode, str(base), str(aligned), str(out)],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)


def test_killed_writer_is_cleaned_up_and_a_live_one_is_kept(checkpoints, tmp_path, capsys):
    """A live writer pauses mid-write; a second writer of the same output is killed with SIGKILL
    mid-write; the next `asft directions` run removes the killed one's file only."""
    base, aligned = checkpoints
    out = tmp_path / "d.safetensors"
    live = _child("pause", base, aligned, out)
    try:
        assert live.stdout.readline() == "writing\n"
        (mine,) = _temps(out)
        assert _pid_of(mine) == live.pid
        killed = _child("kill", base, aligned, out)
        killed.wait(timeout=120)
        assert killed.returncode == -signal.SIGKILL
        (stale,) = [t for t in _temps(out) if t != mine]  # the killed writer kept the live one's file
        assert _pid_of(stale) == killed.pid and stale.stat().st_size > 0

        assert main(["directions", str(base), str(aligned), "-o", str(out), "--no-progress"]) == 0
        assert (f"note: removed {stale}, left by a writer of {out} that was killed (pid {killed.pid})"
                in capsys.readouterr().err)
        assert _temps(out) == [mine]
        assert torch.allclose(Anchors.load(out)["a"], torch.full((40,), 0.5), rtol=0, atol=1e-6)
        live.stdin.write("\n")
        live.stdin.flush()
        assert live.stdout.readline() == "done\n"
        live.wait(timeout=120)
    finally:
        live.kill()
        live.wait()
    assert live.returncode == 0 and _temps(out) == []
    assert len(Anchors.load(out, verify=True)) == 2


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_anchors_save_removes_only_stale_temps_of_its_output(tmp_path):
    out = tmp_path / "d.safetensors"
    host = socket.gethostname().replace(".", "-")
    dead, live = _dead_pid(), os.getppid()
    files = {name: tmp_path / name for name in (
        f".d.safetensors.{host}.{dead}.abc123.tmp",       # a killed writer of this output: removed
        f".d.safetensors.{host}.{os.getpid()}.x_1.tmp",   # this pid, but not a file this process opened
        f".d.safetensors.{host}.{live}.abc123.tmp",       # a live writer: kept
        f".d.safetensors.other-host.{dead}.abc123.tmp",   # another host's writer: kept
        f".e.safetensors.{host}.{dead}.abc123.tmp",       # another output: kept
        ".d.safetensors.k2j4l_1x.tmp",                    # the old naming (no pid): kept
    )}
    for f in files.values():
        f.write_bytes(b"partial")
    Anchors.from_tensors({"a": torch.ones(3)}).save(out)
    left = sorted(p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp"))
    assert left == sorted(list(files)[2:])
    assert remove_stale_temps(out) == []  # nothing more to remove


def test_staged_folder_replaces_only_when_complete_and_stale_folders_go(tmp_path):
    """`staged_dir`: a block that raises leaves the target as it was and no temporary folder; one that
    completes replaces it whole; the folder of a killed writer (its process gone) is removed by the
    next writer of the same target; the new folder has the permissions `mkdir` would give."""
    from asft_optim.tempfiles import _HOST, staged_dir

    target = tmp_path / "run"
    target.mkdir()
    (target / "old.txt").write_text("earlier run")
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = tmp_path / f".run.{_HOST}.{dead.pid}.abc123.tmp"
    (stale / "models").mkdir(parents=True)
    with pytest.raises(RuntimeError), staged_dir(target) as work:
        (work / "new.txt").write_text("half")
        raise RuntimeError("killed")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"] and (target / "old.txt").read_text() == "earlier run"
    with staged_dir(target) as work:
        (work / "new.txt").write_text("complete")
        assert not (target / "new.txt").exists()  # nothing replaced before the block completes
    assert sorted(p.name for p in target.iterdir()) == ["new.txt"] and sorted(p.name for p in tmp_path.iterdir()) == ["run"]
    mask = os.umask(0o022)
    os.umask(mask)
    assert (target.stat().st_mode & 0o777) == 0o777 & ~mask
