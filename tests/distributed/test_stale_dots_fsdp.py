"""FSDP2 (DTensor) parameters and the carried dot: λ = 0 steps through torch's for-loop / foreach /
fused AdamW, and writes between steps (`p.mul_`, `p.copy_`, `model.load_state_dict`,
`torch._foreach_mul_`), 2 gloo ranks against the same scenario in one process."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch.distributed as dist

from test_torchrun import TOL, torchrun

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="needs torch.distributed with the gloo backend")

WORKER = Path(__file__).with_name("stale_worker.py")


def test_fsdp2_lambda_schedules_and_writes_between_steps(tmp_path):
    r = torchrun("stale", tmp_path, worker=WORKER)
    assert sorted(r) == ["lam/for-loop", "lam/foreach", "lam/fused", "write/_foreach_mul_", "write/copy_",
                         "write/load_state_dict", "write/mul_"]
    bad = {k: v for k, v in r.items() if not v <= TOL}
    assert not bad, f"FSDP2 differs from the single-process run by more than {TOL}: {bad}"
