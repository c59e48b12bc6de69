"""DeepSpeed ZeRO 1/2/3 with AsFTAdamW as the client optimizer: `torchrun --nproc_per_node=2` (gloo,
CPU) on `zero_worker.py`, two launches; each asserts on the numbers rank 0 measured.

The small MLP's tensors (30, 5, 15, 3, 3, 1 elements) do not divide by the world size: ZeRO-1/2
split a.weight and b.bias across the ranks (and one rank's partition of c.bias's group is all
padding), ZeRO-3 splits every tensor unevenly.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from test_torchrun import torchrun

pytest.importorskip("deepspeed")
pytest.importorskip("transformers")

WORKER = Path(__file__).with_name("zero_worker.py")
TOL = 1e-5  # relative (max|a - b| / max|b| per tensor), 2-rank ZeRO vs the single-process run
BASELINE_TOL = 1e-6  # torch.optim.AdamW as the client optimizer (the harness itself)
N_TENSORS = 6
TAGS = [f"zero{s}_{p}" for p in ("fp32", "bf16") for s in (1, 2, 3)]


@pytest.fixture(scope="module")
def train(tmp_path_factory) -> dict:
    return torchrun("train", tmp_path_factory.mktemp("zero_train"), worker=WORKER, timeout=400)["train"]


@pytest.fixture(scope="module")
def resume(tmp_path_factory) -> dict:
    return torchrun("ckpt,trainer", tmp_path_factory.mktemp("zero_ckpt"), worker=WORKER, timeout=500)


@pytest.mark.parametrize("tag", TAGS)
def test_zero_equals_single_process(train, tag):
    assert train[f"{tag}/adamw_max_rel"] <= BASELINE_TOL  # the harness: torch's AdamW matches
    assert train[f"{tag}/max_rel"] <= TOL


def test_zero3_model_built_under_zero_init(train):
    assert train["zero_init/kinds"] == ["zero"]  # bound as ZeRO tensors at construction, nothing read
    assert train["zero_init/max_rel"] <= TOL


def test_zero3_sub_groups_still_one_all_reduce_per_step(train):
    assert train["subgroups/partitions"] == 5  # DeepSpeed calls step() once per sub-group
    assert train["subgroups/max_rel"] <= TOL
    first, *rest = train["subgroups/comms"]
    assert [dtype for _, dtype in first] == ["torch.float64"] * 10  # binding: MAX + SUM per sub-group
    assert all(step == [[N_TENSORS, "torch.float32"]] for step in rest)


def test_zero1_bf16_with_fp32_gradient_accumulation(train):
    assert train["bf16_optimizer/wrapper"] == "BF16_Optimizer"  # links partitions as ZeRO-1/2 do
    assert train["bf16_optimizer/max_rel"] <= TOL
    assert all(step == [[N_TENSORS, "torch.float32"]] for step in train["bf16_optimizer/comms"][1:])


def test_zero_comparison_has_teeth(train):
    for precision in ("fp32", "bf16"):
        assert train[f"{precision}/penalty_effect"] > 0.05  # λ changes the trajectory
    assert train["unreduced_max_rel"] > 1e-3  # partial dots taken as global ones: visibly wrong


@pytest.mark.parametrize("tag", TAGS)
def test_zero_one_all_reduce_of_dots_per_step(train, tag):
    comms = train[f"{tag}/comms"]
    # Step 1 binds the three partitions (a MAX and a SUM of fp64 each, no dots: ΔW = 0) ...
    assert [dtype for _, dtype in comms[0]] == ["torch.float64"] * 6
    # ... every later step makes exactly one all-reduce: one fp32 per anchored tensor.
    assert all(step == [[N_TENSORS, "torch.float32"]] for step in comms[1:])


@pytest.mark.parametrize("tag", TAGS)
def test_zero_drift_is_global_on_every_rank(train, tag):
    names = ["a.bias", "a.weight", "b.bias", "b.weight", "c.bias", "c.weight"]
    assert train[f"{tag}/drift_names"] == [names, names]
    assert train[f"{tag}/drift_max_diff"] < 1e-6


@pytest.mark.parametrize("stage", [2, 3])
def test_zero_resume_from_deepspeed_checkpoint(resume, stage):
    r = resume["ckpt"]
    assert r[f"zero{stage}/resumed_max_abs"] == 0.0  # bitwise the uninterrupted run
    first, *rest = r[f"zero{stage}/resumed_comms"]
    assert [dtype for _, dtype in first] == ["torch.float64"] * 6  # the dots ride on the binding's SUM
    assert all(step == [[N_TENSORS, "torch.float32"]] for step in rest)
    assert {"asft_anchors", "asft_lambda", "penalty", "param_names"} <= set(r[f"zero{stage}/saved_group_keys"])
    assert r[f"zero{stage}/saved_state_keys"] == ["exp_avg", "exp_avg_sq", "step", "w0"]
    assert r[f"zero{stage}/lambda_error"] == ("cannot resume: param group 0 of the checkpoint was made "
                                              "with asft_lambda 1.0, this optimizer has 2.0")
    assert r[f"zero{stage}/anchors_error"].startswith(
        "cannot resume: param group 0 of the checkpoint was made with anchors (fingerprint) '")


def test_zero_config_errors_and_offload(resume):
    r = resume["ckpt"]
    assert r["config_errors"]["untested"] == (
        'DeepSpeed ZeRO stage 2 accepts AsFTAdamW as its client optimizer only with '
        '"zero_allow_untested_optimizer": true in the DeepSpeed config (it is not in DeepSpeed\'s list '
        "of tested optimizers); add that key")
    assert r["config_errors"]["offload"] == (
        'ZeRO-Offload ("offload_optimizer": {"device": "cpu"}) steps AsFTAdamW on the CPU partitions '
        'only with "zero_force_ds_cpu_optimizer": false in the DeepSpeed config; add that key')
    assert r["offload/max_rel"] <= TOL


@pytest.mark.parametrize("stage", [2, 3])
def test_zero_trainer_with_deepspeed_config(resume, stage):
    r = resume["trainer"]
    assert r[f"zero{stage}/client"] == "AsFTAdamW"
    assert r[f"zero{stage}/max_rel"] <= TOL
    rank0, rank1 = r[f"zero{stage}/drift_logs"]
    assert rank0 == rank1 and len(rank0) == 2 and "asft/cos/net.a" in rank0[-1]
    assert abs(rank0[-1]["asft/cos"] - r[f"zero{stage}/ref_cos"]) < 1e-6
    if stage == 2:  # resume_from_checkpoint=checkpoint-4 into other initial weights: bitwise the same
        assert r["zero2/trainer_resumed_max_abs"] == 0.0


def test_zero_trainer_refuses_a_deepspeed_optimizer_section(resume):
    assert resume["trainer"]["optimizer_section_error"] == (
        'the DeepSpeed config has an "optimizer" section: DeepSpeed would build that optimizer instead of '
        "AsFTAdamW; remove the section and pass the AsFTAdamW as the client optimizer")
