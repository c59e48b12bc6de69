"""Optimizer step time on FSDP2 (DTensor) shards: AsFTAdamW against torch.optim.AdamW, side by side
in one launch (2 gloo ranks on CPU):

    OMP_NUM_THREADS=1 python -m torch.distributed.run --standalone --nproc_per_node=2 benchmarks/bench_fsdp2.py

Model: a small Llama-shaped stack of Linear layers (hidden 512, MLP 1408, 8 layers, 8000-token
embedding and head as Linear: 20.8M fp32 parameters), each layer and the root `fully_shard`ed, so
every parameter is a DTensor shard of half its rows. One AsFTAdamW (λ = 1, every tensor anchored)
and one AdamW (same flags) on twin models step alternately for 20 rounds after 2 warm-up steps (W0,
binding); gradients are set once. Rank 0 prints the median `opt.step()` per optimizer and the ratio.
AsFT's step includes the one all-reduce of the carried dots.
"""

from __future__ import annotations

import os
import statistics
import sys
import time

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import distribute_tensor

from asft_optim import AsFTAdamW

HIDDEN, MLP, LAYERS, VOCAB, ROUNDS, WARMUP = 512, 1408, 8, 8000, 20, 2


def model() -> nn.Module:
    torch.manual_seed(0)
    layers = [nn.Linear(VOCAB, HIDDEN, bias=False)]
    for _ in range(LAYERS):
        layers.append(nn.Sequential(*[nn.Linear(HIDDEN, HIDDEN, bias=False) for _ in range(4)],
                                    nn.Linear(HIDDEN, MLP, bias=False), nn.Linear(HIDDEN, MLP, bias=False),
                                    nn.Linear(MLP, HIDDEN, bias=False)))
    layers.append(nn.Linear(HIDDEN, VOCAB, bias=False))
    m = nn.Sequential(*layers)
    for sub in m:
        fully_shard(sub)
    fully_shard(m)
    return m


def main() -> None:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    flags = {"fused": True} if os.environ.get("FLAGS", "fused") == "fused" else {"foreach": False}
    twins = [model(), model()]
    gen = torch.Generator().manual_seed(1)
    for m in twins:
        for p in m.parameters():
            p.grad = distribute_tensor(torch.randn(p.shape, generator=gen), p.device_mesh, p.placements)
    names = [n for n, _ in twins[0].named_parameters()]
    dirs = {n: torch.randn(p.shape, generator=torch.Generator().manual_seed(2)) * 1e-3
            for n, p in twins[0].named_parameters()}
    asft = AsFTAdamW(twins[0].named_parameters(), lr=1e-4, anchors=dirs, **flags)
    adamw = torch.optim.AdamW(twins[1].parameters(), lr=1e-4, **flags)
    times: dict[str, list[float]] = {"adamw": [], "asft": []}
    for r in range(WARMUP + ROUNDS):
        for name, opt in (("adamw", adamw), ("asft", asft)):
            dist.barrier()
            t0 = time.perf_counter()
            opt.step()
            if r >= WARMUP:
                times[name].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) * 1e3 for k, v in times.items()}
    if rank == 0:
        n = sum(p.numel() for p in twins[0].parameters())
        print(f"FSDP2, 2 ranks, {n / 1e6:.1f}M params in {len(names)} tensors, {flags}: AdamW {med['adamw']:.1f} ms  "
              f"AsFT {med['asft']:.1f} ms  ratio {med['asft'] / med['adamw']:.2f}x")
    sys.stdout.flush()
    dist.barrier()
    dist.destroy_process_group()
    os._exit(0)  # torch 2.13 + gloo can abort in C++ teardown


if __name__ == "__main__":
    main()
