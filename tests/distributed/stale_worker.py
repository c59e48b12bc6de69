"""Worker for the FSDP2 carried-dot tests: `python -m torch.distributed.run --nproc_per_node=2
stale_worker.py stale OUT_DIR` (gloo, CPU, world size 2).

Each scenario trains the model of `worker.py` (uneven and empty shards) under FSDP2 and the same
scenario in one process with plain tensors, and reports per scenario the max relative difference of
the gathered parameters. Scenarios: a λ schedule (λ = 0 steps run torch's AdamW on the DTensors, for
each of torch's for-loop / foreach / fused), and writes to the DTensor parameters between steps
(`p.mul_`, `p.copy_`, `model.load_state_dict`, `torch._foreach_mul_`). Rank 0 writes OUT_DIR/stale.json.
"""

from __future__ import annotations

import sys
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from asft_optim import Anchors, AsFTAdamW

from worker import anchors_file, batch, finish, full, groups, loss_fn, make_model, max_rel, shard, train_single

STEPS = 8
LAMS = [1.0, 0.0, 0.0, 2.0, 2.0, 2.0, 2.0, 2.0]
WRITE_AFTER = (2, 5)  # steps after which the writes happen
FLAGS = {"for-loop": {"foreach": False}, "foreach": {"foreach": True}, "fused": {"fused": True}}


def _write(route: str, model: nn.Module) -> None:
    """p ← 0.9·p for every parameter, through `route`."""
    params = list(model.parameters())
    with torch.no_grad():
        if route == "mul_":
            for p in params:
                p.mul_(0.9)
        elif route == "copy_":
            for p in params:
                p.copy_(p * 0.9)
        elif route == "_foreach_mul_":
            torch._foreach_mul_(params, 0.9)
        elif route == "load_state_dict":
            model.load_state_dict({k: v * 0.9 for k, v in model.state_dict().items()})
        else:
            raise ValueError(route)


def _opt(model: nn.Module, anchors: Anchors, flags: dict) -> AsFTAdamW:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the zero direction of c.bias warns
        return AsFTAdamW(groups(model), lr=2e-2, anchors=anchors, asft_lambda=LAMS[0], **flags)


def _run(model: nn.Module, opt: AsFTAdamW, one_step: Callable[[int], None], lams: list[float] | None,
         route: str | None) -> dict[str, torch.Tensor]:
    for step in range(STEPS):
        if lams is not None:
            for group in opt.param_groups:
                group["asft_lambda"] = lams[step]
        one_step(step)
        if route is not None and step + 1 in WRITE_AFTER:
            _write(route, model)
    return {n: full(p.detach()).clone() for n, p in model.named_parameters()}


def scenario(anchors: Anchors, rank: int, flags: dict, lams: list[float] | None, route: str | None) -> float:
    """Max relative difference between the FSDP2 run and the single-process run of one scenario."""
    model = shard(make_model(0))
    opt = _opt(model, anchors, flags)

    def sharded_step(step: int) -> None:
        opt.zero_grad()
        loss_fn(model, *batch(step, rank)).backward()
        opt.step()

    mine = _run(model, opt, sharded_step, lams, route)
    single = make_model(0)
    single_opt = _opt(single, anchors, flags)
    ref = _run(single, single_opt, lambda step: train_single(single, single_opt, range(step, step + 1)), lams, route)
    return max(max_rel(mine, ref).values())


def run_stale(out: Path, rank: int) -> dict:
    anchors = anchors_file(out, rank)
    result = {f"lam/{k}": scenario(anchors, rank, f, LAMS, None) for k, f in FLAGS.items()}
    for route in ("mul_", "copy_", "load_state_dict", "_foreach_mul_"):
        result[f"write/{route}"] = scenario(anchors, rank, {}, None, route)
    return result if rank == 0 else {}


def main() -> None:
    mode, out = sys.argv[1], Path(sys.argv[2])
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    torch.use_deterministic_algorithms(True)
    result = {"stale": run_stale}[mode](out, rank)
    finish(out / f"{mode}.json", result)


if __name__ == "__main__":
    main()
