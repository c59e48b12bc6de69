"""Optimizer step time under DeepSpeed ZeRO: AsFTAdamW against torch.optim.AdamW as the client
optimizer, side by side in one launch (2 gloo ranks on CPU):

    OMP_NUM_THREADS=1 python -m torch.distributed.run --standalone --nproc_per_node=2 benchmarks/bench_zero.py

Model: 8 Linear(999, 999) layers (8M fp32 parameters; no tensor divides by the world size), so each
rank's partitions hold 4M elements. For each ZeRO stage and client optimizer, `engine.step()` is timed
over 20 steps after 2 warm-up steps (W0 snapshot, binding); rank 0 prints the median per step and
the ratio. `engine.step()` includes DeepSpeed's own work (gradient norm, copying the masters to the
model), the same for both optimizers.
"""

from __future__ import annotations

import statistics
import sys
import time
import warnings

import deepspeed
import torch
import torch.distributed as dist
from torch import nn

from asft_optim import AsFTAdamW

LAYERS, WIDTH, STEPS, WARMUP = 8, 999, 20, 2


def model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(*[nn.Sequential(nn.Linear(WIDTH, WIDTH), nn.Tanh()) for _ in range(LAYERS)])


def step_times(stage: int, asft: bool, rank: int) -> list[float]:
    m = model()
    if asft:
        gen = torch.Generator().manual_seed(1)
        dirs = {n: torch.randn(p.shape, generator=gen) for n, p in m.named_parameters()}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            opt = AsFTAdamW(m.named_parameters(), lr=1e-4, anchors=dirs)
    else:
        opt = torch.optim.AdamW(m.parameters(), lr=1e-4)
    config = {"train_micro_batch_size_per_gpu": 4, "zero_optimization": {"stage": stage},
              "zero_allow_untested_optimizer": True, "steps_per_print": 10 ** 9}
    engine, _, _, _ = deepspeed.initialize(model=m, optimizer=opt, config=config)
    x = torch.randn(4, WIDTH, generator=torch.Generator().manual_seed(rank))
    times = []
    for _ in range(WARMUP + STEPS):
        engine.backward(engine(x).square().mean())
        dist.barrier()
        t0 = time.perf_counter()
        engine.step()
        times.append(time.perf_counter() - t0)
    engine.destroy()
    return times[WARMUP:]


def main() -> None:
    deepspeed.init_distributed(dist_backend="gloo")
    rank = dist.get_rank()
    rows = []
    for stage in (1, 2, 3):
        adamw = statistics.median(step_times(stage, False, rank))
        asft = statistics.median(step_times(stage, True, rank))
        rows.append((stage, adamw * 1e3, asft * 1e3, asft / adamw))
    if rank == 0:
        print("| ZeRO stage | AdamW step ms (median) | AsFTAdamW step ms (median) | ratio |")
        print("|---|---|---|---|")
        for stage, a, b, r in rows:
            print(f"| {stage} | {a:.1f} | {b:.1f} | {r:.2f}× |")
    sys.stdout.flush()
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
