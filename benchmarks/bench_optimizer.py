"""Step time of AsFTAdamW against torch.optim.AdamW on CPU, measured side by side in one run.

    pytest benchmarks/bench_optimizer.py --benchmark-columns=mean,stddev,rounds --benchmark-group-by=group

50M fp32 parameters in 20 tensors (the issue's setting). Each pair (AsFT, AdamW) uses the same torch
AdamW kernel (fused or foreach); the ratio of their means is the cost of the AsFT penalty on this
machine. Bytes per parameter per step from memory: AdamW 28; AsFT's torch path works in pieces of
`asft_optim.functional.CHUNK` elements that stay in cache between its ops, so it adds W0 and d
(+8, floor 36/28 = 1.29×); what it pays above that is the per-op cost of five eager elementwise
ops per piece, which run slower per byte than torch's fused AdamW kernel.
"""

from __future__ import annotations

import pytest
import torch

from asft_optim import AsFTAdamW

N_TENSORS = 20
NUMEL = 2_500_000  # 20 × 2.5M = 50M parameters


def _setup(kind: str, flags: dict):
    g = torch.Generator().manual_seed(0)
    named = [(f"w{i}", torch.nn.Parameter(torch.randn(NUMEL, generator=g))) for i in range(N_TENSORS)]
    for _, p in named:
        p.grad = torch.randn(NUMEL, generator=g)
    if kind == "asft":
        dirs = {n: torch.randn(NUMEL, generator=g) * 1e-3 for n, _ in named}
        opt = AsFTAdamW(named, lr=1e-4, anchors=dirs, asft_lambda=1.0, **flags)
    else:
        opt = torch.optim.AdamW([p for _, p in named], lr=1e-4, **flags)
    opt.step()  # lazy state, W0 snapshot, workspace
    return opt


@pytest.mark.parametrize("impl", ["fused", "foreach"])
@pytest.mark.parametrize("kind", ["adamw", "asft"])
def test_step(benchmark, kind, impl):
    benchmark.group = f"50M fp32 / 20 tensors, {impl}"
    opt = _setup(kind, {impl: True})
    benchmark.pedantic(opt.step, rounds=8, warmup_rounds=1, iterations=1)
