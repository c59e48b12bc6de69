"""`attach` (torch AdamW + the AsFT penalty) under DDP and FSDP2: 2 gloo ranks equal one process."""

from __future__ import annotations

from pathlib import Path

import pytest

from test_torchrun import TOL, torchrun

WORKER = Path(__file__).with_name("attach_worker.py")


def test_attach_ddp_replicas_bitwise_equal_and_equal_single_process(tmp_path):
    r = torchrun("ddp", tmp_path, worker=WORKER)
    assert r["replicas_equal"]
    assert r["equals_single"]
    assert r["penalty_effect"] > 0.05
    assert r["optimizer_collectives"] == [0] * 10  # the penalty adds no communication under DDP


def _check(r: dict, first_step_collectives: int = 0) -> None:
    assert r["is_dtensor"]
    assert r["penalty_effect"] > 0.05
    worst = max(r["max_rel"].values())
    assert worst <= TOL, {k: v for k, v in r["max_rel"].items() if v > TOL}
    assert r["unreduced_max_rel"] > 100 * TOL  # without the all-reduce of the dots the run is wrong
    assert r["drift_names"] == ["a.bias", "a.weight", "b.bias", "b.weight", "c.bias", "c.weight"]
    assert r["drift_max_diff"] < 1e-5
    # One all-reduce of one float per penalised tensor per step; none at the first (ΔW = 0) but binding's.
    assert len(r["comms"][0]["all_reduce_numel"]) == first_step_collectives, r["comms"][0]
    for step in r["comms"][1:]:
        assert step["all_reduce_numel"] == [r["n_penalised"]], step


def test_attach_fsdp2_matches_single_process(tmp_path):
    _check(torchrun("fsdp", tmp_path, worker=WORKER))


def test_attach_fsdp2_accelerate_parameter_swap(tmp_path):
    """attach on the whole model, then FSDP2 and accelerate's swap of the optimizer's tensors: the
    directions are bound again, sharded, at the first step (a MAX and a SUM all-reduce)."""
    pytest.importorskip("accelerate")
    _check(torchrun("swap", tmp_path, worker=WORKER), first_step_collectives=2)
