"""DDP and FSDP2 with exact AsFT: `torchrun --nproc_per_node=2` (gloo, CPU) on `worker.py`.

Each test launches the worker, which trains a small model whose layers have 5 rows (uneven shards
3/2), 4 rows and 1 row (rank 1's shard is empty), and asserts on the numbers rank 0 measured.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch.distributed as dist

WORKER = Path(__file__).with_name("worker.py")
TOL = 1e-6  # relative (max|a - b| / max|b| per tensor), FSDP2 vs the single-process run

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="needs torch.distributed with the gloo backend")


def torchrun(mode: str, out: Path, env: dict[str, str] | None = None, expect_ok: bool = True,
             timeout: float = 240) -> dict:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(WORKER), mode, str(out)]
    proc = subprocess.run(cmd, env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})},
                          capture_output=True, text=True, timeout=timeout)
    if expect_ok:
        assert proc.returncode == 0, f"torchrun {mode} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
        return json.loads((out / f"{mode}.json").read_text())
    assert proc.returncode != 0, f"torchrun {mode} was expected to fail"
    return {}


def test_ddp_replicas_bitwise_equal_and_equal_single_process(tmp_path):
    r = torchrun("ddp", tmp_path)
    assert r["replicas_equal"]
    assert r["equals_single"]
    assert r["penalty_effect"] > 0.05  # λ changes the trajectory: the comparison has teeth
    assert r["optimizer_collectives"] == [0] * 10  # DDP replicas need no optimizer communication


def _check_fsdp(r: dict, tol: float) -> None:
    assert r["is_dtensor"]
    assert r["local_rows"][0]["a.weight"] == 3 and r["local_rows"][1]["a.weight"] == 2  # uneven
    assert r["local_rows"][0]["c.weight"] == 1 and r["local_rows"][1]["c.weight"] == 0  # empty shard
    assert r["whole_reads"] == []  # only sliced reads of the directions file
    assert r["penalty_effect"] > 0.05
    worst = max(r["max_rel"].values())
    assert worst <= tol, {k: v for k, v in r["max_rel"].items() if v > tol}
    assert r["unreduced_max_rel"] > 100 * tol  # without the all-reduce the result is wrong
    # One collective per optimizer step: an all-reduce of one float per penalised tensor.
    for step in r["comms"]:
        assert step["total"] == 1, step
        assert step["all_reduce_numel"] == [r["n_penalised"]], step


def test_fsdp2_matches_single_process(tmp_path):
    _check_fsdp(torchrun("fsdp", tmp_path), TOL)


@pytest.mark.slow
def test_fsdp2_reference_impl_matches_single_process(tmp_path):
    _check_fsdp(torchrun("fsdp", tmp_path, env={"ASFT_IMPL": "reference"}), TOL)


def test_fsdp2_triton_interpreted_matches_single_process(tmp_path):
    pytest.importorskip("triton")
    _check_fsdp(torchrun("fsdp", tmp_path, env={"ASFT_IMPL": "triton", "TRITON_INTERPRET": "1"}), TOL)


def test_checkpoint_resume_exact_and_failed_save_leaves_nothing(tmp_path):
    r = torchrun("ckpt", tmp_path)
    assert r["failures"] == [["CheckpointException"], ["CheckpointException"]]  # both ranks raise
    assert r["listing"] == ["latest", "step_00000005"]  # no step 7, no partial folder
    assert r["latest"] == "step_00000005" and r["info"] == {"step": 5, "extra": {"next_step": 5}}
    assert all(r["resumed_equal"].values()), r["resumed_equal"]
    _check_w0_saved_sharded(tmp_path / "ckpt" / "step_00000005")


def _check_w0_saved_sharded(path: Path) -> None:
    """W0 of a.weight (5×6) is stored as two chunks, rows 0:3 and 3:5, like the parameter."""
    from torch.distributed.checkpoint import FileSystemReader
    meta = FileSystemReader(str(path)).read_metadata().state_dict_metadata
    for key in ("optim.state.a.weight.w0", "optim.state.a.weight.exp_avg", "model.a.weight"):
        chunks = sorted((tuple(c.offsets), tuple(c.sizes)) for c in meta[key].chunks)
        assert chunks == [((0, 0), (3, 6)), ((3, 0), (2, 6))], (key, chunks)


def test_rank_crash_mid_save_then_resume_exact(tmp_path):
    torchrun("crash", tmp_path, expect_ok=False)
    r = torchrun("resume", tmp_path)
    # The crashed save left no step_00000007 (at most its hidden partial folder).
    assert {"latest", "step_00000005"} <= set(r["listing"]) <= {"latest", "step_00000005",
                                                                 ".step_00000007.partial"}
    assert r["latest"] == "step_00000005"
    assert all(r["resumed_equal"].values()), r["resumed_equal"]
    assert r["after"] == ["latest", "step_00000005", "step_00000010"]
