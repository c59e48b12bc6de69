"""DDP and FSDP2 with exact AsFT: `torchrun --nproc_per_node=2` (gloo, CPU) on `worker.py`.

Each test launches the worker, which trains a small model whose layers have 5 rows (uneven shards
3/2), 4 rows and 1 row (rank 1's shard is empty), and asserts on the numbers rank 0 measured.
"""

from __future__ import annotations

import json
import os
import signal
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
             timeout: float = 180, worker: Path = WORKER) -> dict:
    """Launch 2 gloo ranks of `worker` with MODE and OUT; return rank 0's OUT/MODE.json."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(worker), mode, str(out)]
    proc = subprocess.Popen(cmd, env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # torchrun and the workers it started
        stdout, stderr = proc.communicate()
        pytest.fail(f"torchrun {mode} timed out after {timeout} s (a collective mismatch hangs):\n"
                    f"{stderr[-6000:]}")
    if expect_ok:
        assert proc.returncode == 0, f"torchrun {mode} failed:\n{stdout[-3000:]}\n{stderr[-6000:]}"
        return json.loads((out / f"{mode}.json").read_text())
    assert proc.returncode != 0, f"torchrun {mode} was expected to fail"
    return {}


def test_ddp_replicas_bitwise_equal_and_equal_single_process(tmp_path):
    r = torchrun("ddp", tmp_path)
    assert r["replicas_equal"]
    assert r["equals_single"]
    assert r["penalty_effect"] > 0.05  # λ changes the trajectory: the comparison has teeth
    assert r["optimizer_collectives"] == [0] * 10  # DDP replicas need no optimizer communication


def _check_fsdp(r: dict, tol: float, first_step_collectives: int = 0) -> None:
    assert r["is_dtensor"]
    assert r["local_rows"][0]["a.weight"] == 3 and r["local_rows"][1]["a.weight"] == 2  # uneven
    assert r["local_rows"][0]["c.weight"] == 1 and r["local_rows"][1]["c.weight"] == 0  # empty shard
    assert r["whole_reads"] == []  # only sliced reads of the directions file
    assert r["penalty_effect"] > 0.05
    worst = max(r["max_rel"].values())
    assert worst <= tol, {k: v for k, v in r["max_rel"].items() if v > tol}
    assert r["unreduced_max_rel"] > 100 * tol  # without the all-reduce the result is wrong
    assert r["loaded_step_max_rel"] <= tol  # a step right after load_state_dict is exact too
    # Drift metrics of sharded parameters equal those of the single-process run.
    assert r["drift_names"] == ["a.bias", "a.weight", "b.bias", "b.weight", "c.bias", "c.weight"]
    assert r["drift_max_diff"] < 1e-5
    # Under wrapper names (`module.`) the state resumes and drift_sums keys match the single process.
    assert r["prefixed_sums_keys"] == r["ref_sums_keys"] == r["drift_names"]
    assert r["prefixed_sums_max_rel"] < 1e-5
    # One collective per optimizer step, also right after opt.resync() (step 6): an all-reduce of
    # one float per penalised tensor; none at the first step (ΔW = 0 everywhere).
    assert r["comms"][0]["total"] == first_step_collectives, r["comms"][0]
    for step in r["comms"][1:]:
        assert step["total"] == 1, step
        assert step["all_reduce_numel"] == [r["n_penalised"]], step


def test_fsdp2_matches_single_process(tmp_path):
    _check_fsdp(torchrun("fsdp", tmp_path), TOL)


def test_fsdp2_reference_impl_matches_single_process(tmp_path):
    _check_fsdp(torchrun("fsdp", tmp_path, env={"ASFT_IMPL": "reference"}), TOL)


def test_fsdp2_triton_interpreted_matches_single_process(tmp_path):
    pytest.importorskip("triton")
    _check_fsdp(torchrun("fsdp", tmp_path, env={"ASFT_IMPL": "triton", "TRITON_INTERPRET": "1"}), TOL)


def test_fsdp2_accelerate_parameter_swap(tmp_path):
    """accelerate builds the optimizer on the whole model and swaps in the DTensors afterwards:
    the directions are bound again, sharded, at the first step (a MAX and a SUM all-reduce)."""
    pytest.importorskip("accelerate")
    _check_fsdp(torchrun("fsdp", tmp_path, env={"ASFT_SWAP": "1"}), TOL, first_step_collectives=2)


def test_hsdp_reduces_over_the_shard_dimension_only(tmp_path):
    """HSDP on a (replicate=2, shard=1) mesh: every rank holds whole tensors, so c needs no
    communication; summing over the replicate dimension would double it."""
    r = torchrun("fsdp", tmp_path, env={"ASFT_MESH": "2,1"})
    assert r["local_rows"][1]["a.weight"] == 5
    assert max(r["max_rel"].values()) <= TOL
    assert [step["total"] for step in r["comms"]] == [0] * 10


def test_fsdp2_on_a_2d_mesh_shard_dimension(tmp_path):
    _check_fsdp(torchrun("fsdp", tmp_path, env={"ASFT_MESH": "1,2"}), TOL)


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


def test_shard1_and_replicate_placements_and_rank_consistent_errors(tmp_path):
    r = torchrun("placements", tmp_path)
    assert r["local_cols"] == [3, 2]  # Shard(1): each rank reads its rows, then narrows to its columns
    assert max(r["max_rel"].values()) <= TOL
    assert r["comms"] == [0, 1, 1, 1]  # the Replicate tensor needs no reduction
    # The NaN sits in rank 1's columns only, yet both ranks raise (no rank left waiting).
    assert r["errors"] == ["direction for 'col.weight' contains NaN or Inf"] * 2


def _worker_module():
    """worker.py imported into this process (its `main` runs only under torchrun)."""
    import importlib.util
    spec = importlib.util.spec_from_file_location("asft_torchrun_worker", WORKER)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_fsdp2_checkpoint_resumed_in_one_process_keeps_w0_exact(tmp_path):
    """A 2-rank FSDP2 checkpoint (fp32 W0, not exact in bf16) resumed in one process into freshly
    built models: random weights, and constant ones (exact in bf16, so the state `get_state_dict`
    initialises holds bf16 W0). W0 must come back bitwise, both resumes must agree bitwise, and
    finishing the run must match the uninterrupted FSDP2 run."""
    import torch

    from asft_optim import Anchors
    from asft_optim.distributed import load_checkpoint

    r = torchrun("save_for_one", tmp_path)
    worker = _worker_module()
    uninterrupted = torch.load(tmp_path / "uninterrupted.pt")
    anchors = Anchors.load(tmp_path / "directions.safetensors")
    resumed = {}
    for init in ("random", "constant"):
        model = worker.make_model(7)
        if init == "constant":
            with torch.no_grad():
                for p in model.parameters():
                    p.fill_(0.5)
        opt = worker.make_opt(model, anchors)
        info = load_checkpoint(tmp_path / "ckpt" / r["latest"], model, opt)
        for n, p in model.named_parameters():
            w0 = opt.state[p]["w0"]
            assert w0.dtype == torch.float32, (init, n, w0.dtype)
            assert torch.equal(w0, uninterrupted[f"{n}/w0"]), (init, n)
        worker.train_single(model, opt, range(info["extra"]["next_step"], worker.STEPS))
        resumed[init] = worker.snapshot(model, opt)
    for k, v in resumed["random"].items():
        assert torch.equal(resumed["constant"][k], v), k
    worst = worker.max_rel(resumed["constant"], uninterrupted)
    assert max(worst.values()) <= TOL, {k: v for k, v in worst.items() if v > TOL}
