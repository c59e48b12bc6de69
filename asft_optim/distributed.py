"""AsFT across processes: sharded (DTensor) parameters, distributed checkpoints, flattening checks.

DDP needs nothing here: every replica holds whole tensors, receives the same averaged gradients and
takes the same deterministic step, so the replicas stay bitwise identical without communication.

FSDP2 (`torch.distributed.fsdp.fully_shard`) and HSDP hold each parameter as a DTensor sharded along
dim 0 (torch.chunk semantics: uneven shards, possibly empty ones); tensor parallelism shards other
dims. Offsets come from each DTensor's mesh and placements. For such a parameter the optimizer

- binds only the shard's block of d, read from the directions file with a sliced read; the rescaling
  power of two and ‖v‖² are global (one MAX and one SUM all-reduce per param group, at binding);
- snapshots W0 of the local shard, kept as a DTensor sharded like the parameter (so
  `torch.distributed.checkpoint` saves it sharded) and in the parameter's dtype: bf16 storage would
  need every shard's agreement, i.e. a collective;
- computes per tensor the partial ⟨v_local, ΔW_local⟩ and sums them over the shards (the sharded
  mesh dims only) with one all-reduce of one fp32 per tensor for the whole step (`all_reduce_dots`);
  the Triton path's carried-over c, linear in the shards, is summed in the same all-reduce.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import warnings
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed.tensor import DTensor, Replicate, Shard
from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

from .anchors import Anchors
from .functional import BoundDirection, acc_dtype, direction_dtype, exact_dots, times_pow2
from .metrics import DriftSums, sums

__all__ = ["is_dtensor", "local", "like", "local_direction", "bind_sharded", "all_reduce_dots", "shard_dots",
           "shard_drift_sums",
           "snapshot_w0", "check_not_flattened", "save_checkpoint",
           "load_checkpoint", "latest_checkpoint", "LATEST"]

LATEST = "latest"  # file in a checkpoint folder naming its newest complete checkpoint


# ----------------------------------------------------------------------------------- DTensors
def is_dtensor(t: Any) -> bool:
    return isinstance(t, DTensor)


def local(t: Tensor) -> Tensor:
    """The local shard of a DTensor (shares its storage), or `t` itself."""
    return t._local_tensor if isinstance(t, DTensor) else t


def like(local_tensor: Tensor, ref: DTensor) -> DTensor:
    """`local_tensor` (shaped like ref's local shard) as a DTensor with ref's mesh and placements."""
    return DTensor.from_local(local_tensor, ref.device_mesh, ref.placements, run_check=False,
                              shape=ref.shape, stride=ref.stride())


def _local_box(name: str, p: DTensor) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(global offset, local shape) of this rank's shard of p, from its mesh and placements."""
    for pl in p.placements:
        if type(pl) is not Shard and not isinstance(pl, Replicate):
            raise ValueError(f"parameter '{name}' has placements {p.placements}; AsFTAdamW supports "
                             "Shard and Replicate placements (FSDP2, HSDP, tensor parallel)")
    shape, offset = compute_local_shape_and_global_offset(p.shape, p.device_mesh, p.placements)
    if tuple(shape) != tuple(p._local_tensor.shape):
        raise ValueError(f"parameter '{name}': local shard has shape {tuple(p._local_tensor.shape)} "
                         f"but its placements {p.placements} give {tuple(shape)}")
    return tuple(offset), tuple(shape)


def local_direction(anchors: Anchors, name: str, p: DTensor) -> Tensor:
    """This rank's block of the direction of `name`, shaped like p's local shard (CPU, stored dtype).

    Reads only rows offset:offset+rows along dim 0 from a directions file; other sharded dims are
    narrowed after that read.
    """
    offset, shape = _local_box(name, p)
    if p.dim() == 0:
        return anchors[name]
    d = anchors.get_slice(name, offset[0], offset[0] + shape[0])
    for dim in range(1, p.dim()):
        if shape[dim] != p.shape[dim]:
            d = d.narrow(dim, offset[dim], shape[dim])
    return d


def _reduce_key(p: DTensor) -> tuple[Any, tuple[int, ...]]:
    """(mesh, mesh dims of size > 1 along which p is sharded): tensors with one key reduce together."""
    mesh = p.device_mesh
    return mesh, tuple(i for i, pl in enumerate(p.placements) if isinstance(pl, Shard) and mesh.size(i) > 1)


def _all_reduce(params: list[Tensor], vec: Tensor, op: dist.ReduceOp) -> Tensor:
    """Reduce row i of `vec` over the shards of params[i] (non-DTensors untouched), in place.

    One collective per (mesh, sharded mesh dim): one in total for FSDP2 and HSDP.
    """
    groups: dict[tuple[Any, tuple[int, ...]], list[int]] = {}
    for i, p in enumerate(params):
        if isinstance(p, DTensor):
            groups.setdefault(_reduce_key(p), []).append(i)
    for (mesh, dims), idx in groups.items():
        whole = len(idx) == vec.shape[0]
        part = vec if whole else vec[idx]
        for dim in dims:
            dist.all_reduce(part, op=op, group=mesh.get_group(dim))
        if not whole:
            vec[idx] = part
    return vec


def all_reduce_dots(params: list[Tensor], dots: Tensor) -> Tensor:
    """Sum per-tensor partial dots over the shards of each DTensor in `params`, in place.

    Args:
        params: the parameters (DTensors or plain tensors), one per row of `dots`.
        dots: shape (len(params),) or (len(params), k): rank-local partial sums per tensor, e.g.
            ⟨v, ΔW⟩ in fp32 (or c = ⟨v, ΔW⟩/‖v‖², which is linear in the shards too).
    Returns:
        `dots`, now holding the global sums of each tensor (plain tensors keep their row).
    """
    if dots.dim() not in (1, 2) or dots.shape[0] != len(params):
        raise ValueError(f"all_reduce_dots: {len(params)} parameters but dots has shape {tuple(dots.shape)}")
    return _all_reduce(params, dots, dist.ReduceOp.SUM)


def shard_dots(shards: Sequence[tuple[str, Tensor, Tensor, BoundDirection]],
               extra: Sequence[tuple[Tensor, Tensor]] = ()) -> tuple[dict[str, Tensor], Tensor]:
    """Global ⟨v, ΔW⟩ of DTensor parameters from their local shards, in one all-reduce.

    Args:
        shards: (name, DTensor parameter, its W0, its direction bound on the local shard's device)
            per tensor; each local dot is computed exactly here (`functional.exact_dots`).
        extra: (parameter, 0-d rank-local partial) rows summed in the same all-reduce (the Triton
            path's c partials, `TritonCache.shard_partials`).
    Returns:
        The global dot per name (0-d: float64 where the native fold made it, bitwise the dense
        twin's carried dot, else in its parameter's `acc_dtype`), and the summed `extra` rows
        (shape (len(extra),)). Collective when any parameter is a DTensor; ({}, empty) when both
        inputs are empty.
    """
    if not shards and not extra:
        return {}, torch.zeros(0)
    partials = (list(exact_dots([local(p) for _, p, _, _ in shards], [local(w0) for _, _, w0, _ in shards],
                                [d for _, _, _, d in shards]).unbind()) if shards else [])
    vec = torch.stack(partials + [c for _, c in extra])
    vec = all_reduce_dots([p for _, p, _, _ in shards] + [p for p, _ in extra], vec)
    return ({n: d if d.dtype == torch.float64 else d.to(acc_dtype(p.dtype))
             for (n, p, _, _), d in zip(shards, vec[:len(shards)].unbind())}, vec[len(shards):])


@torch.no_grad()
def shard_drift_sums(shards: Sequence[tuple[Tensor, Tensor, BoundDirection]]) -> list[DriftSums]:
    """(‖ΔW‖², ‖d‖², ⟨ΔW, d⟩, numel) in float64 of whole DTensor parameters: sums over the local
    shards, then one all-reduce of three fp64 per tensor (collective when any is a DTensor).

    shards: (parameter, its W0, its direction bound on the local shard's device) per tensor; the
    sums are of the unrescaled d (the direction's `scale` undone).
    """
    if not shards:
        return []
    local_sums = []
    for p, w0, bound in shards:
        q = local(p)
        xx, uu, xu, _ = sums(q.double() - local(w0).double(), bound.v)
        local_sums.append([xx, uu, xu])
    summed = all_reduce_dots([p for p, _, _ in shards],
                             torch.tensor(local_sums, dtype=torch.float64, device=local(shards[0][0]).device))
    return [DriftSums(xx, uu * bound.scale ** 2, xu * bound.scale, p.numel())
            for (p, _, bound), (xx, uu, xu) in zip(shards, summed.tolist())]


def bind_sharded(anchors: Anchors, named: list[tuple[str, DTensor]]) -> list[BoundDirection]:
    """Bind the directions of sharded parameters (in order): each rank reads and keeps only its block.

    Collective: every rank of the parameters' meshes must call it with the same names, in the same
    order. The rescaling 2**-k (from the global max|d|) and 1/‖v‖² are global, so a shard's
    `BoundDirection.v` equals the matching block of the one an unsharded parameter would get.

    Raises:
        ValueError naming the tensor for a shape or dtype mismatch, or (on every rank) for a
        NaN or Inf anywhere in the direction.
    """
    blocks = []
    for name, p in named:
        if tuple(anchors.shape(name)) != tuple(p.shape):
            raise ValueError(f"direction for '{name}' has shape {tuple(anchors.shape(name))} but the "
                             f"parameter has shape {tuple(p.shape)}")
        if not anchors.dtype(name).is_floating_point:
            raise ValueError(f"direction for '{name}' has dtype {anchors.dtype(name)}; expected a floating dtype")
        blocks.append(local_direction(anchors, name, p).to(p._local_tensor.device))
    if not blocks:
        return []
    params = [p for _, p in named]
    device = params[0]._local_tensor.device
    amax = torch.tensor([_abs_max(d) for d in blocks], dtype=torch.float64, device=device)
    amax = _all_reduce(params, amax, dist.ReduceOp.MAX).tolist()
    bad = [name for (name, _), a in zip(named, amax) if not math.isfinite(a)]
    if bad:
        raise ValueError(f"direction for '{bad[0]}' contains NaN or Inf"
                         + (f" (as do {len(bad) - 1} more)" if len(bad) > 1 else ""))
    vs, scales = [], []
    for (_, p), d, a in zip(named, blocks, amax):
        v = torch.empty_like(p._local_tensor, dtype=direction_dtype(d.dtype, p.dtype))
        if a == 0.0:
            v.zero_()
            scales.append(1.0)
        else:  # as `functional.rescaled`, with the global max: exact, in float64
            k = math.floor(math.log2(a))
            if d.dtype == v.dtype:
                times_pow2(v.copy_(d.reshape(v.shape)), -k)
            else:
                v.copy_(times_pow2(d.reshape(v.shape).to(torch.float64, copy=True), -k))
            scales.append(math.ldexp(1.0, k))
        vs.append(v)
    nv2 = torch.stack([v.double().square().sum() for v in vs]).to(device)
    nv2 = _all_reduce(params, nv2, dist.ReduceOp.SUM).tolist()
    return [BoundDirection(v, 1.0 / n if n > 0 else 0.0, s) for v, n, s in zip(vs, nv2, scales)]


def _abs_max(d: Tensor) -> float:
    """max|d| of a block (0 when empty), +inf when it holds a NaN or Inf."""
    if d.numel() == 0:
        return 0.0
    if not bool(torch.isfinite(d).all()):
        return math.inf
    return float(d.abs().max())


def snapshot_w0(p: DTensor) -> DTensor:
    """W0 of a sharded parameter: a copy of its local shard, as a DTensor sharded like p."""
    return like(p._local_tensor.detach().clone(memory_format=torch.preserve_format), p)


# ----------------------------------------------------------------------------------- flattening
def check_not_flattened(group: Mapping[str, Any], index: int) -> None:
    """Raise if a param group's tensors no longer match its names (and DeepSpeed ZeRO, which
    `asft_optim.zero` follows through its bookkeeping, did not do it)."""
    params, names = group["params"], group.get("param_names")
    if names is not None and len(names) == len(params):
        return
    raise RuntimeError(
        f"param group {index} holds {len(params)} tensor(s) but "
        f"{'no names' if names is None else f'{len(names)} parameter name(s)'}: its parameters were "
        "replaced after the optimizer was built by something other than DeepSpeed ZeRO. AsFTAdamW binds "
        "directions by name; build the optimizer on the parameters it will step")


# ----------------------------------------------------------------------------------- checkpoints
def save_checkpoint(directory: str | os.PathLike, step: int, model: nn.Module,
                    optimizer: torch.optim.Optimizer, extra: Mapping[str, Any] | None = None) -> Path:
    """Save model and optimizer state with `torch.distributed.checkpoint`, atomically.

    Collective (all ranks call it; also works in a single process). Writes
    `directory/step_{step:08d}` through a temporary folder that is renamed only after every rank
    has written its shards, then points `directory/latest` at it (also by rename). A rank failing
    mid-save leaves the previous checkpoint and `latest` untouched; the partial folder is removed
    then, or by the next save if the processes died.
    W0, exp_avg and exp_avg_sq of sharded parameters are saved sharded like the parameters.

    Args:
        extra: JSON-serialisable values stored alongside (e.g. the data loader position).
    Returns:
        The checkpoint folder.
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    directory = Path(directory)
    final = directory / f"step_{step:08d}"
    tmp = directory / f".{final.name}.partial"
    rank0 = _rank() == 0
    if rank0:
        directory.mkdir(parents=True, exist_ok=True)
        for stale in directory.glob(".step_*.partial"):  # left by a save that crashed
            shutil.rmtree(stale, ignore_errors=True)
    _barrier()
    model_sd, optim_sd = get_state_dict(model, optimizer)
    state = {"model": model_sd, "optim": optim_sd, "extra": json.dumps(dict(extra or {})), "step": step}
    try:
        with _single_process_quiet():
            dcp.save(state, checkpoint_id=str(tmp), no_dist=not _initialized())
    except BaseException:
        if rank0:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    _barrier()
    if rank0:
        old = directory / f".{final.name}.old"
        if final.exists():
            os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
        pointer = directory / f".{LATEST}.tmp"
        pointer.write_text(final.name + "\n")
        os.replace(pointer, directory / LATEST)
    _barrier()
    return final


def latest_checkpoint(directory: str | os.PathLike) -> Path | None:
    """The newest complete checkpoint written by `save_checkpoint` in `directory`, or None."""
    pointer = Path(directory) / LATEST
    if not pointer.is_file():
        return None
    path = Path(directory) / pointer.read_text().strip()
    if not path.is_dir():
        raise FileNotFoundError(f"{pointer} names {path.name}, which does not exist")
    return path


def load_checkpoint(path: str | os.PathLike, model: nn.Module,
                    optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """Load a checkpoint of `save_checkpoint` into `model` and `optimizer` (sharded as they are now).

    Collective. The model may be sharded differently from the one that saved (DCP reshards).
    Returns `{"step": int, "extra": dict}`. The optimizer refuses a checkpoint made with other
    anchors, λ or penalty.
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    path = Path(path)
    if not (path / ".metadata").is_file():
        raise FileNotFoundError(f"{path} is not a complete distributed checkpoint (no .metadata)")
    model_sd, optim_sd = get_state_dict(model, optimizer)
    _w0_at_full_precision(model_sd, optim_sd)
    state = {"model": model_sd, "optim": optim_sd, "extra": "{}", "step": 0}
    with _single_process_quiet():
        dcp.load(state, checkpoint_id=str(path), no_dist=not _initialized())
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
    return {"step": int(state["step"]), "extra": json.loads(state["extra"])}


def _w0_at_full_precision(model_sd: Mapping[str, Any], optim_sd: dict[str, Any]) -> None:
    """Give every W0 of `optim_sd` its parameter's dtype, in place, so that `dcp.load` (which copies
    into the tensors it is given) lands the saved values at full precision.

    `get_state_dict` creates the optimizer state of a fresh model with a zero-gradient step, and W0
    then takes bf16 storage wherever the fresh values happen to be exact in bf16 (constants, norms
    at 1, zero biases, an empty skeleton): loading fp32 W0 into that would round it. The optimizer's
    `load_state_dict` (through `set_state_dict`) keeps bf16 afterwards only where the loaded W0 is
    exact in it.
    """
    for fqn, st in optim_sd["state"].items():
        if "w0" not in st:
            continue
        if fqn not in model_sd:
            raise KeyError(f"optimizer state of '{fqn}' holds W0 but the model's state dict has no "
                           f"'{fqn}' to take its dtype from")
        dtype = model_sd[fqn].dtype
        if st["w0"].dtype != dtype:
            st["w0"] = st["w0"].to(dtype)


@contextlib.contextmanager
def _single_process_quiet() -> Iterator[None]:
    """Silence DCP's notice that it runs in a single process (intended here)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def _initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def _rank() -> int:
    return dist.get_rank() if _initialized() else 0


def _barrier() -> None:
    if _initialized():
        dist.barrier()
