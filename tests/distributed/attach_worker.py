"""Worker for `attach` under torchrun: `python -m torch.distributed.run --nproc_per_node=2 attach_worker.py MODE OUT`.

The model, data and directions of `worker.py` (a: uneven shards 3/2, c: rank 1's shard empty); the
optimizer is torch's AdamW with the penalty attached (`asft_optim.attach`). Modes (gloo, CPU):
  ddp    DDP for 10 steps; replicas and the single-process attach run compared bitwise.
  fsdp   FSDP2 for 10 steps; gathered parameters, moments and W0 against the single-process run;
         the collectives of every optimizer step counted; drift compared; a run with the
         all-reduce of the dots skipped as a negative control.
  swap   FSDP2 the accelerate way: attach on the whole model, then shard and swap the optimizer's
         tensors for the DTensors; compared with the single-process run.
Rank 0 writes OUT/MODE.json.
"""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor

import asft_optim.distributed as asft_distributed
from asft_optim import Anchors, attach
from asft_optim.penalty import W0_KEY

sys.path.insert(0, str(Path(__file__).parent))
import worker as base


def make_opt(model: nn.Module, anchors: Anchors, lam: float = base.LAM) -> torch.optim.Optimizer:
    named = dict(model.named_parameters())
    groups = [{"params": [p for n, p in named.items() if n.endswith("weight")]},
              {"params": [p for n, p in named.items() if n.endswith("bias")], "weight_decay": 0.0}]
    opt = torch.optim.AdamW(groups, lr=base.LR)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the zero direction of c.bias warns
        attach(opt, model, anchors=anchors, asft_lambda=lam)
    return opt


def snapshot(model: nn.Module, opt: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    """Parameters, exp_avg, exp_avg_sq and W0 by name, gathered (collective for DTensors)."""
    out = {}
    for n, p in model.named_parameters():
        out[n] = base.full(p.detach()).clone()
        st = opt.state[p]
        for key in ("exp_avg", "exp_avg_sq", W0_KEY):
            out[f"{n}/{key}"] = base.full(st[key]).float().clone()
    return out


def reference(anchors: Anchors, lam: float = base.LAM) -> tuple[nn.Module, torch.optim.Optimizer]:
    model = base.make_model(0)
    opt = make_opt(model, anchors, lam)
    base.train_single(model, opt, range(base.STEPS))
    return model, opt


def run_ddp(out: Path, rank: int) -> dict:
    from torch.nn.parallel import DistributedDataParallel as DDP
    anchors = Anchors.from_tensors(base.directions(base.make_model(0)))
    model = DDP(base.make_model(0))
    opt = make_opt(model, anchors)
    comms = base.train(model, opt, rank, range(base.STEPS))
    mine = snapshot(model.module, opt)
    gathered: list = [None, None]
    dist.all_gather_object(gathered, {k: v.tolist() for k, v in mine.items()})
    if rank != 0:
        return {}
    other = {k: torch.tensor(v) for k, v in gathered[1].items()}
    ref = snapshot(*reference(anchors))
    plain = snapshot(*reference(anchors, lam=0.0))
    return {"replicas_equal": all(torch.equal(mine[k], other[k]) for k in mine),
            "equals_single": all(torch.equal(mine[k], ref[k]) for k in mine),
            "penalty_effect": max(v for k, v in base.max_rel(ref, plain).items() if "/" not in k),
            "optimizer_collectives": [c["total"] + len(c["all_reduce_numel"]) for c in comms]}


def _swapped(anchors: Anchors) -> tuple[nn.Module, torch.optim.Optimizer]:
    from accelerate.utils.fsdp_utils import fsdp2_switch_optimizer_parameters
    model = base.make_model(0)
    opt = make_opt(model, anchors)
    old = dict(model.named_parameters())
    base.shard(model)
    new = dict(model.named_parameters())
    fsdp2_switch_optimizer_parameters(opt, {old[n].data_ptr: new[n] for n in old})
    return model, opt


def run_fsdp(out: Path, rank: int, swap: bool = False) -> dict:
    anchors = base.anchors_file(out, rank)
    if swap:
        model, opt = _swapped(anchors)
    else:
        model = base.shard(base.make_model(0))
        opt = make_opt(model, anchors)
    comms = base.train(model, opt, rank, range(base.STEPS))
    mine = snapshot(model, opt)
    handle = asft_optim_attached(opt)
    drift = handle.drift()  # collective
    real = asft_distributed.all_reduce_dots  # negative control: dots of the local shard only
    asft_distributed.all_reduce_dots = lambda params, dots: dots
    try:
        unreduced_model = base.shard(base.make_model(0))
        unreduced_opt = make_opt(unreduced_model, anchors)
        base.train(unreduced_model, unreduced_opt, rank, range(base.STEPS))
    finally:
        asft_distributed.all_reduce_dots = real
    unreduced = snapshot(unreduced_model, unreduced_opt)
    if rank != 0:
        return {}
    ref_model, ref_opt = reference(anchors)
    ref = snapshot(ref_model, ref_opt)
    ref_drift = asft_optim_attached(ref_opt).drift()
    plain = snapshot(*reference(anchors, lam=0.0))
    return {"max_rel": base.max_rel(mine, ref),
            "unreduced_max_rel": max(base.max_rel(unreduced, ref).values()),
            "penalty_effect": max(v for k, v in base.max_rel(ref, plain).items() if "/" not in k),
            "drift_max_diff": max(abs(a - b) for n, d in ref_drift.items()
                                  for a, b in zip(drift[n].as_dict().values(), d.as_dict().values())),
            "drift_names": sorted(drift), "comms": comms,
            "n_penalised": sum(1 for n in ref_drift if n != "c.bias"),
            "is_dtensor": all(isinstance(p, DTensor) for p in model.parameters())}


def asft_optim_attached(opt: torch.optim.Optimizer):
    from asft_optim.penalty import attached
    handle = attached(opt)
    assert handle is not None
    return handle


def main() -> None:
    mode, out = sys.argv[1], Path(sys.argv[2])
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    torch.use_deterministic_algorithms(True)
    result = {"ddp": run_ddp, "fsdp": run_fsdp, "swap": lambda o, r: run_fsdp(o, r, swap=True)}[mode](out, rank)
    base.finish(out / f"{mode}.json", result)


if __name__ == "__main__":
    main()
