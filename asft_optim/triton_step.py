"""The impl="triton" step of `AsFTAdamW`: which groups take it, and the one owner of the glue from
param groups to the fused kernels of `asft_optim.kernels` (`TritonCache`: c slots, launch tables,
launch plans, step buffers).

c = ⟨v, p - W0⟩/‖v‖² lives in the kernels' c slots between steps. Whether a slot may be read
follows the optimizer's `DotCache` rule (version counter after our update, load/resync epoch):
the kernels write p through raw pointers, which does not bump the version counter, so an outside
write between two steps still shows. Parameters whose layout the kernels cannot walk (not dense,
or state tensors with other strides) step on the torch path instead.
"""

from __future__ import annotations

import functools
import importlib.util
from typing import TYPE_CHECKING, Any, NamedTuple

import torch
from torch import Tensor

from . import distributed as _dist
from .binding import Kind
from .functional import dense_flat, partial_dots, storage_w0

if TYPE_CHECKING:
    from .kernels import Row
    from .optimizer import AsFTAdamW

__all__ = ["TritonCache", "resolve_impl", "triton_group_step"]


@functools.cache
def _triton_importable() -> bool:
    return importlib.util.find_spec("triton") is not None


def resolve_impl(group: dict[str, Any], has_lora: bool) -> str:
    """The implementation a group's step runs: impl=None means triton on CUDA when importable.

    Groups holding LoRA adapters take the PyTorch path (the adapters are small). Raises ValueError
    for impl="triton" with foreach/fused/capturable, without triton, or on CPU tensors outside the
    Triton interpreter.
    """
    impl = group["impl"]
    if impl is None:
        explicit_torch = group["foreach"] or group["fused"] or group["capturable"]
        if (explicit_torch or has_lora or not _triton_importable()
                or not all(p.is_cuda and not _dist.is_dtensor(p) for p in group["params"])):
            return "torch"
        return "triton"
    if impl != "triton":
        return impl
    if has_lora:
        return "torch"
    for key in ("foreach", "fused", "capturable"):
        if group[key]:
            raise ValueError(f"impl='triton' cannot honour {key}=True (it runs its own fused "
                             f"kernel); pass {key}=None or impl='torch'")
    if not _triton_importable():
        raise ValueError("impl='triton' needs the triton package (pip install 'asft_optim[triton]')")
    from .kernels import is_interpreted
    on_cpu = [(n, p) for n, p in zip(group["param_names"], group["params"]) if not p.is_cuda]
    if on_cpu and not is_interpreted():
        raise ValueError(f"impl='triton' runs on CUDA tensors, or on CPU only under TRITON_INTERPRET=1 "
                         f"(set before triton is imported); '{on_cpu[0][0]}' is on {on_cpu[0][1].device}")
    return impl


class Launch(NamedTuple):
    """One cached kernel launch of a plan: its table, device, penalty and the positions (in the
    group) of its tensors. The c buffer is looked up at launch time: it may have been reallocated."""
    table: Any
    device: torch.device
    penalty: str | None
    positions: list[int]


class Plan(NamedTuple):
    """A group's launches, reusable while `signature` and the dot-cache epoch are unchanged."""
    signature: tuple
    epoch: int
    steps: Tensor
    positions: Tensor | None
    launches: list[Launch]


def _signature(group: dict[str, Any]) -> tuple | None:
    """What a cached plan depends on: the options that shape it, which parameters have gradients,
    the addresses, layouts and version counters of those parameters and gradients (None for a
    sparse gradient: the full path reports it)."""
    entries = []
    for p in group["params"]:
        g = p.grad
        if g is None:
            entries.append(None)
        elif g.layout != torch.strided:
            return None
        else:
            entries.append((p.data_ptr(), p._version, g.data_ptr(), g.stride(), g.dtype))
    return group["asft_lambda"], group["penalty"], group["amsgrad"], tuple(entries)


def _hyper(group: dict[str, Any]) -> dict[str, Any]:
    """A group's hyper-parameters as the fused kernel takes them (read at every step; a tensor lr
    or beta is read with float(), a host sync when it lives on the GPU)."""
    lr, (beta1, beta2) = group["lr"], group["betas"]
    return dict(lr=float(lr), beta1=float(beta1), beta2=float(beta2), eps=group["eps"],
                weight_decay=group["weight_decay"], amsgrad=group["amsgrad"], maximize=group["maximize"],
                coef=(-2.0 if group["maximize"] else 2.0) * group["asft_lambda"])


def _increment_steps(buf: Tensor, positions: Tensor | None) -> list[float]:
    """Add 1 to the step counts at `positions` (all when None) of a group's step buffer; return all."""
    if positions is None:
        buf.add_(1)
    else:
        buf.index_add_(0, positions, torch.ones(positions.numel(), dtype=buf.dtype))
    return buf.tolist()


def _walkable(row: Row) -> bool:
    """The kernels walk p and every state tensor as flat memory in one order: all dense, p's strides."""
    p = row[0]
    return dense_flat(p) is not None and all(x is None or x.stride() == p.stride() for x in row[2:])


class TritonCache:
    """Everything the Triton path keeps between steps, owned in one place.

    slots: `kernels.CSlots` (one fp32 c per parameter name, one buffer per device).
    tables: (group index, subset key) → (what the table was built from, `LaunchTable`).
    plans: group index → `Plan`. step_bufs: group index → the group's step counts (each
    state["step"] is a view into it: one add per step). synced: shards whose c slot
    `set_shard_c` filled with the global c this step (a DTensor's dot is never carried: see
    `dot_cache`, so it is recomputed at every step). narrowed: names whose direction was checked
    for exact bf16 storage.
    """

    def __init__(self) -> None:
        self.slots: Any = None
        self.tables: dict[tuple, tuple[tuple, Any]] = {}
        self.plans: dict[int, Plan] = {}
        self.step_bufs: dict[int, Tensor] = {}
        self.synced: set[str] = set()
        self.narrowed: set[str] = set()

    def _c_slots(self) -> Any:
        if self.slots is None:
            from .kernels import CSlots
            self.slots = CSlots()
        return self.slots

    def shard_partials(self, opt: AsFTAdamW) -> list[tuple[str, Tensor, Tensor]]:
        """(name, parameter, local part of c) of every Triton-stepped shard with a gradient and a
        W0, computed exactly here, to be summed over ranks in the step's one all-reduce."""
        self.synced = set()
        if self.slots is None:
            return []
        out = []
        for group in opt.param_groups:
            if group["asft_lambda"] == 0 or group["penalty"] == "full":
                continue
            for name, p in zip(group["param_names"], group["params"]):
                b = opt._bindings.get(name)
                st = opt.state.get(p)
                if (p.grad is None or b is None or b.kind is not Kind.SHARD or not st or "w0" not in st
                        or name not in self.slots.slot):
                    continue
                q = _dist.local(p)
                bound = b.direction_on(q.device)
                if bound.is_zero:  # c = 0 whatever ΔW: nothing to sum
                    self.slots.buffers[q.device][self.slots.slot[name]] = 0.0
                    self.synced.add(name)
                    continue
                dot = partial_dots([q], [_dist.local(st["w0"])], [bound])[0]
                out.append((name, p, dot * bound.inv_nv2))
        return out

    def set_shard_c(self, named: list[tuple[str, Tensor, Tensor]], values: Tensor) -> None:
        """Write the summed c of `shard_partials`' shards into their slots, valid for this step."""
        for (name, p, _), value in zip(named, values.unbind()):
            q = _dist.local(p)
            self.slots.buffers[q.device][self.slots.slot[name]] = value
            self.synced.add(name)

    def _slot_value(self, name: str, p: Tensor) -> Tensor:
        """A shard's c slot as a 0-d fp32 tensor; 0 for an empty local shard (no kernel writes it)."""
        q = _dist.local(p)
        if not q.numel():
            return torch.zeros((), device=q.device)
        return self.slots.buffers[q.device][self.slots.slot[name]].clone()


def triton_group_step(opt: AsFTAdamW, group_index: int, group: dict[str, Any], cache: TritonCache) -> None:
    """One group's step with the fused Triton kernels: one update (+ one fold) launch per
    (device, dtypes, penalised) subset; an exact c pass first where c is not known.

    The launches are kept as a plan; while the same parameters have gradients at the same addresses
    and versions and the dot cache's epoch holds, the next step reuses it without building lists.
    """
    from .kernels import Row, exact_c_, fused_step_, make_table  # noqa: F811 (imports triton: only here)
    cs = cache._c_slots()
    signature = _signature(group)
    plan = cache.plans.get(group_index)
    if plan is not None and plan.signature == signature and plan.epoch == opt._dots.epoch:
        steps = _increment_steps(plan.steps, plan.positions)
        hyper = _hyper(group)
        for launch in plan.launches:
            c_buf = cs.buffers[launch.device] if launch.penalty is not None else launch.table.partials
            fused_step_(launch.table, c_buf, [steps[j] for j in launch.positions], penalty=launch.penalty, **hyper)
        return
    fresh = {n for n, p in zip(group["param_names"], group["params"])
             if p.grad is not None and "w0" not in opt.state.get(p, {})}
    t = opt._gather(group)
    if not t.params:
        return
    amsgrad, lam, penalty = group["amsgrad"], group["asft_lambda"], group["penalty"]
    rows: list[Row] = []
    bounds = []
    copied = False  # a gradient copied to its parameter's strides: the table points at the copy
    for i, (name, p, g) in enumerate(zip(t.names, t.params, t.grads)):
        b = opt._bindings.get(name)
        bound = b.direction_on(_dist.local(p).device) if lam > 0 and b is not None and b.anchored else None
        # bf16 where exact: fewer bytes per step (not for shards: every rank must launch alike)
        if bound is not None and name not in cache.narrowed and b.kind is not Kind.SHARD:
            bound.v = storage_w0(bound.v)
            cache.narrowed.add(name)
        if g.stride() != p.stride() and dense_flat(p) is not None:
            g = torch.empty_like(p).copy_(g)
            copied = True
        w0 = opt.state[p]["w0"] if bound is not None else None
        row = (p, g, t.exp_avgs[i], t.exp_avg_sqs[i], t.max_exp_avg_sqs[i] if amsgrad else None, w0,
               None if bound is None else bound.v)
        rows.append(Row(*[None if x is None else _dist.local(x) for x in row]))  # DTensors: their local shards
        bounds.append(bound)
    walk = [_walkable(r) for r in rows]
    if not all(walk):  # layouts the kernels cannot walk: the torch path, exactly
        from .optimizer import GroupTensors
        sub = GroupTensors(*[[x for x, w in zip(xs, walk) if not w] for xs in t[:7]], t.has_complex)
        opt._torch_group_step(group, "torch", sub, {}, {})
    # state["step"] of every walked parameter is a view into one buffer per group: one add per step
    all_positions = [j for j, p in enumerate(group["params"]) if p.grad is not None]
    keep = [i for i, w in enumerate(walk) if w]
    if not keep:
        cache.plans.pop(group_index, None)
        return
    position = {i: all_positions[i] for i in keep}
    positions = list(position.values())
    buf = cache.step_bufs.get(group_index)
    if buf is None or buf.numel() != len(group["params"]) or buf.dtype != t.state_steps[0].dtype:
        buf = cache.step_bufs[group_index] = torch.zeros(len(group["params"]), dtype=t.state_steps[0].dtype)
    for i, j in position.items():
        step_t = t.state_steps[i]
        if step_t._base is not buf or step_t.storage_offset() != j:
            buf[j] = step_t
            opt.state[group["params"][j]]["step"] = buf[j]
    positions_t = torch.tensor(positions)
    carried = cache.synced.union(t.names[i] for i in keep
                                 if opt._dots.held(t.names[i], t.params[i], opt.state[t.params[i]]["step"]))
    all_steps = _increment_steps(buf, positions_t)
    subsets: dict[tuple, list[int]] = {}
    for i in keep:
        key = (rows[i][0].device, bounds[i] is not None) + tuple(None if x is None else x.dtype for x in rows[i])
        subsets.setdefault(key, []).append(i)
    hyper = _hyper(group)
    launches = []
    reusable = all(walk) and not copied and not any(_dist.is_dtensor(p) for p in t.params)
    for key, idx in subsets.items():
        device, penalised = key[0], key[1]
        names = [t.names[i] for i in idx]
        sub_rows = [rows[i] for i in idx]
        built_from = (tuple(names), tuple(tuple(r[0].shape) for r in sub_rows), tuple(r[1].stride() for r in sub_rows),
                      tuple(0 if x is None else x.data_ptr() for r in sub_rows for x in r))
        slots = cs.slots(names, device) if penalised else [0] * len(idx)
        cached = cache.tables.get((group_index, key))
        if cached is None or cached[0] != built_from:
            inv = [bounds[i].inv_nv2 if penalised else 0.0 for i in idx]
            cached = (built_from, make_table(sub_rows, slots, inv, names))
            cache.tables[(group_index, key)] = cached
        table = cached[1]
        needs_c = penalised and penalty != "full"
        c_buf = cs.buffers[device] if penalised else table.partials
        stale = [n for n in names if n not in carried] if needs_c else []
        if stale and set(stale) <= fresh:  # first step: p = W0, so c = 0
            c_buf.index_fill_(0, torch.tensor([cs.slot[n] for n in stale], device=device), 0.0)
        elif stale:
            exact_c_(table, c_buf)
            _reduce_shard_slots(cache, [(t.names[i], t.params[i]) for i in idx])
        fused_step_(table, c_buf, [all_steps[position[i]] for i in idx], penalty=penalty if penalised else None,
                    **hyper)
        launches.append(Launch(table, device, penalty if penalised else None, [position[i] for i in idx]))
        if needs_c:
            for n, i in zip(names, idx):
                opt._dots.put(n, t.params[i], opt.state[t.params[i]]["step"], None)
    if reusable and signature is not None:
        cache.plans[group_index] = Plan(signature, opt._dots.epoch, buf,
                                        None if len(positions) == buf.numel() else positions_t, launches)
    else:
        cache.plans.pop(group_index, None)


def _reduce_shard_slots(cache: TritonCache, named: list[tuple[str, Tensor]]) -> None:
    """Sum over the shards the c slots that `exact_c_` just filled for sharded parameters."""
    sharded = [(n, p) for n, p in named if _dist.is_dtensor(p)]
    if not sharded:
        return
    values = torch.stack([cache._slot_value(n, p) for n, p in sharded])
    values = _dist.all_reduce_dots([p for _, p in sharded], values)
    for (n, p), value in zip(sharded, values.unbind()):
        q = _dist.local(p)
        cache.slots.buffers[q.device][cache.slots.slot[n]] = value
