"""The impl="triton" step of `AsFTAdamW`: which groups take it, and the one owner of the glue from
param groups to the fused kernels of `asft_optim.kernels` (`TritonCache`: c slots, launch tables,
launch plans, step buffers).

c = ⟨v, p - W0⟩/‖v‖² lives in the kernels' c slots between steps. Whether a slot may be read
follows the optimizer's `DotCache` rule (p's version and its step tensor as our update left them,
no load/resync since; `DotCache.held`: the entry is this path's slot, not another path's dot):
the kernels write p through raw pointers, which does not bump p's version counter, so an outside
write between two steps still shows. Parameters whose layout the kernels cannot walk (not dense,
or state tensors with other strides) step on the torch path instead.
"""

from __future__ import annotations

import functools
import importlib.util
import operator
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from itertools import chain, repeat
from typing import TYPE_CHECKING, Any, NamedTuple

import torch
from torch import Tensor
from torch.distributed.tensor import DTensor

from . import distributed as _dist
from .binding import Binding, Kind
from .dot_cache import DotCache
from .functional import BoundDirection, StepTensors, dense_flat, partial_dots, penalty_coef, storage_w0

if TYPE_CHECKING:
    from .kernels import Row

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
        params = group["params"]
        if (explicit_torch or has_lora or not _triton_importable() or not all(map(_IS_CUDA, params))
                or any(issubclass(t, DTensor) for t in set(map(type, params)))):
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
    if not all(map(_IS_CUDA, group["params"])):
        from .kernels import is_interpreted
        if not is_interpreted():
            name, p = next((n, p) for n, p in zip(group["param_names"], group["params"]) if not p.is_cuda)
            raise ValueError(f"impl='triton' runs on CUDA tensors, or on CPU only under TRITON_INTERPRET=1 "
                             f"(set before triton is imported); '{name}' is on {p.device}")
    return impl


_GRAD = operator.attrgetter("grad")
_PTR = Tensor.data_ptr
_STRIDE = Tensor.stride
_IS_CUDA = operator.attrgetter("is_cuda")


@dataclass(eq=False)
class Launch:
    """One kernel launch of a plan: its table (shared with `TritonCache.tables`), the penalty it
    applies (None: plain AdamW), whether it carries c, and its tensors: positions in the group
    (increasing), names, bound directions (None when not penalised), the (shape, strides) every
    role has, the parameters and their step tensors (`state[p]["step"]`, views into the group's
    step buffer).

    keys: the state entries the launch reads, "step" first (`state_keys`). strides: p's strides
    (every role's). directions: the bound directions, [] when not penalised. seen: what the last
    replay verified, (table.host_grads, table.host_others, gradient addresses, other addresses in
    role-major order: T parameters, T exp_avg, ..., T directions); empty before the first replay.
    """
    table: Any
    penalty: str | None
    needs_c: bool
    positions: list[int]
    names: list[str]
    bounds: list[BoundDirection | None]
    layouts: list[tuple[torch.Size, tuple[int, ...]]]
    params: list[Tensor]
    steps: list[Tensor]
    keys: Callable[[Any], tuple[Tensor, ...]]
    strides: list[tuple[int, ...]] = field(init=False)
    directions: list[BoundDirection] = field(init=False)
    seen: tuple = ()

    def __post_init__(self) -> None:
        self.strides = [stride for _, stride in self.layouts]
        self.directions = [b for b in self.bounds if b is not None]  # all of them, or none


class Plan(NamedTuple):
    """A group's launches, replayed while the options, the dot-cache epoch, the parameters (by
    identity), which of them have gradients and the step counters (by identity) hold; addresses
    may change (new gradient tensors each step, a replaced state tensor): then only the pointer
    tables are uploaded again."""
    options: tuple
    params: list[Tensor]
    has_grad: list[bool]
    steps: Tensor
    positions: Tensor | None
    launches: list[Launch]


def state_keys(amsgrad: bool, penalised: bool) -> Callable[[Any], tuple[Tensor, ...]]:
    """The state entries a launch reads from each `state[p]`, as one getter: "step", the moments,
    then "w0" when penalised (`OTHER_ROLES` order)."""
    return operator.itemgetter("step", "exp_avg", "exp_avg_sq", *(("max_exp_avg_sq",) if amsgrad else ()),
                               *(("w0",) if penalised else ()))


def _options(group: dict[str, Any], dots: DotCache) -> tuple:
    """What a plan's shape depends on besides the tensors."""
    return group["asft_lambda"], group["penalty"], group["amsgrad"], dots.epoch


def _hyper(group: dict[str, Any]) -> dict[str, Any]:
    """A group's hyper-parameters as the fused kernel takes them (read at every step; a tensor lr
    or beta is read with float(), a host sync when it lives on the GPU)."""
    lr, (beta1, beta2) = group["lr"], group["betas"]
    return dict(lr=float(lr), beta1=float(beta1), beta2=float(beta2), eps=group["eps"],
                weight_decay=group["weight_decay"], amsgrad=group["amsgrad"], maximize=group["maximize"],
                coef=penalty_coef(group["asft_lambda"], group["maximize"]))


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


def _launch(cs: Any, launch: Launch, steps: list[float], hyper: dict[str, Any]) -> None:
    """Issue one launch. The kernels write p through raw pointers (p's version counter stays), but
    the step counters advanced before it (`_increment_steps`, version-counted), which makes every
    dot carried from before this step stale (`asft_optim.dot_cache`): after a launch that carries
    c the caller puts its slots' entries again; one that writes no c (λ = 0, penalty="full",
    unanchored) leaves none."""
    from .kernels import fused_step_
    table = launch.table
    c_buf = cs.buffers[table.device] if launch.penalty is not None else table.partials
    mine = steps if len(launch.positions) == len(steps) else list(map(steps.__getitem__, launch.positions))
    fused_step_(table, c_buf, mine, penalty=launch.penalty, **hyper)


def _replay(group: dict[str, Any], plan: Plan, cs: Any, state: Mapping[Tensor, Any], dots: DotCache) -> bool:
    """Step a group with its cached plan; False (having stepped nothing) when the plan does not fit.

    It fits while the group holds the same parameters, the same of them have gradients, every
    step counter is the plan's, every c it reads is current (`DotCache.all_held`: the slot was
    written by this path, nothing moved p since) and every tensor whose address changed still has
    its launch's layout, dtype and device (`_fits`); then moved launches upload their pointer
    tables again (an aligned launch that a move made unaligned is rebuilt). The plan thus notices
    every tensor it reads or writes, by address: all of them are read at every step, each role
    in one C loop (`Launch.seen` holds the addresses its table holds).
    """
    params = group["params"]
    if len(params) != len(plan.params) or not all(map(operator.is_, params, plan.params)):
        return False
    grads = list(map(_GRAD, params))
    if list(map(operator.is_not, grads, repeat(None))) != plan.has_grad:
        return False
    amsgrad, buf = group["amsgrad"], plan.steps
    moved, held = [], []
    try:
        for launch in plan.launches:
            # one tuple per role: the step tensors, the moments, W0 (state.get: a defaultdict would
            # add an empty state; a missing state fails in `keys`)
            cols = list(zip(*map(launch.keys, map(state.get, launch.params))))
            if not all(map(operator.is_, cols[0], launch.steps)):
                return False
            if launch.needs_c:  # (the steps are views of one buffer: they share its version counter)
                versions = dots.all_held(launch.names, launch.params, launch.steps, buf._version)
                if versions is None:
                    return False
                held.append((launch, versions))
            gs = grads if len(launch.positions) == len(grads) else list(map(grads.__getitem__, launch.positions))
            gaddrs = list(map(_PTR, gs))
            oaddrs = list(map(_PTR, chain(launch.params, *cols[1:], [d.v for d in launch.directions])))
            table, seen = launch.table, launch.seen
            same = bool(seen) and seen[1] is table.host_others and oaddrs == seen[3]
            if same and seen[0] is table.host_grads and gaddrs == seen[2]:
                continue
            # (new gradients alone, as every step of zero_grad(set_to_none=True) gives: others as held)
            others = table.host_others if same else _row_major(oaddrs, len(gs), amsgrad, launch.penalty is not None)
            if (gaddrs != table.host_grads or others != table.host_others) and not _fits(
                    launch, gs, gaddrs, others, state, amsgrad):
                return False
            moved.append((launch, gaddrs, oaddrs, others))
    except (KeyError, TypeError, RuntimeError):  # a state entry gone, a gradient without storage: rebuild
        return False
    lost = False
    for launch, gaddrs, oaddrs, others in moved:
        table = launch.table
        was = table.aligned
        table.upload(gaddrs, others)
        lost |= was and not table.aligned
        launch.seen = (table.host_grads, table.host_others, gaddrs, oaddrs)
    if lost:  # the slow path puts the unaligned tensors into a launch of their own
        return False
    steps = _increment_steps(buf, plan.positions)
    hyper = _hyper(group)
    for launch in plan.launches:
        _launch(cs, launch, steps, hyper)
    # the slots hold c of the new p (the kernels write p without bumping its version), stamped
    # with the new step
    for launch, versions in held:
        dots.put_slots(launch.names, launch.params, launch.steps, versions, buf._version)
    return True


def _row_major(oaddrs: list[int], n: int, amsgrad: bool, penalised: bool) -> list[int]:
    """A launch's role-major addresses (`Launch.seen`) as its pointer table holds them: T rows of
    `OTHER_ROLES`, 0 for an unused role."""
    cols = [oaddrs[i * n:(i + 1) * n] for i in range(len(oaddrs) // n)]
    zeros = [0] * n
    if not amsgrad:
        cols.insert(3, zeros)
    if not penalised:
        cols += [zeros, zeros]
    return list(chain.from_iterable(zip(*cols)))


def _fits(launch: Launch, grads: list[Tensor], gptrs: list[int], others: list[int], state: Any,
          amsgrad: bool) -> bool:
    """Every tensor of `launch` whose address differs from its table's has the layout, dtype and
    device the table was built for. grads: the launch's gradients. (A new gradient has its
    parameter's dtype, shape and device, torch checks that on assignment: only its strides can
    differ.)"""
    from .kernels import OTHER_ROLES, ROLES
    table = launch.table
    if gptrs != table.host_grads and list(map(_STRIDE, grads)) != launch.strides:
        return False
    if others == table.host_others:
        return True
    old = table.host_others
    roles = [ROLES.index(role) for role in OTHER_ROLES]
    for i, (p, bound, (shape, stride)) in enumerate(zip(launch.params, launch.bounds, launch.layouts)):
        if others[6 * i:6 * i + 6] == old[6 * i:6 * i + 6]:
            continue
        st = state[p]
        row = (p, st["exp_avg"], st["exp_avg_sq"], st["max_exp_avg_sq"] if amsgrad else None,
               None if bound is None else st["w0"], None if bound is None else bound.v)
        for k, x in zip(roles, row):
            if x is not None and (x.layout != torch.strided or x.dtype != table.dtypes[k]
                                  or x.device != table.device or x.shape != shape or x.stride() != stride):
                return False
    return True


class TritonCache:
    """Everything the Triton path keeps between steps, owned in one place.

    slots: `kernels.CSlots` (one fp32 c per parameter name, one buffer per device).
    tables: (group index, subset key) → (the names and layouts it was built for, `LaunchTable`):
    block tables are built once per set of shapes, pointer tables uploaded again when tensors move.
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

    def shard_partials(self, param_groups: list[dict[str, Any]], bindings: Mapping[str, Binding],
                       state: Mapping[Tensor, Any]) -> list[tuple[str, Tensor, Tensor]]:
        """(name, parameter, local part of c) of every Triton-stepped shard with a gradient and a
        W0 (`state[p]["w0"]`), computed exactly here, to be summed over ranks in the step's one
        all-reduce."""
        self.synced = set()
        if self.slots is None:
            return []
        out = []
        for group in param_groups:
            if group["impl"] != "triton" or group["asft_lambda"] == 0 or group["penalty"] == "full":
                continue
            for name, p in zip(group["param_names"], group["params"]):
                b = bindings.get(name)
                st = state.get(p)
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


def triton_group_step(group_index: int, group: dict[str, Any], cache: TritonCache, *, state: dict[Tensor, Any],
                      bindings: Mapping[str, Binding], dots: DotCache, gather: Callable[[], StepTensors],
                      torch_step: Callable[[StepTensors], None]) -> None:
    """One group's step with the fused Triton kernels: one update (+ one fold) launch per
    (device, dtypes, penalised, aligned) subset; an exact c pass first where c is not current.

    state: the optimizer's per-parameter state (W0 in "w0"; "step" re-pointed into the group's step
    buffer). bindings: by parameter name. dots: the carried-dot cache (c slots are valid by its rule).
    gather: the group's tensors with gradients (lazy state created). torch_step: steps a subset on
    the PyTorch path (layouts the kernels cannot walk).

    The launches are kept as a plan that the next step replays (`_replay`) while it fits; else they
    are rebuilt here, reusing each subset's block tables while its names and layouts are unchanged.
    """
    cs = cache._c_slots()
    options = _options(group, dots)
    plan = cache.plans.get(group_index)
    if plan is not None and plan.options == options and _replay(group, plan, cs, state, dots):
        return
    from .kernels import Row, all_aligned, exact_c_, make_table, row_pointers, split_pointers
    cache.plans.pop(group_index, None)
    fresh = {n for n, p in zip(group["param_names"], group["params"])
             if p.grad is not None and "w0" not in state.get(p, {})}
    t = gather()
    if not t.params:
        return
    amsgrad, lam, penalty = group["amsgrad"], group["asft_lambda"], group["penalty"]
    rows: list[Row] = []
    bounds: list[BoundDirection | None] = []
    copied = False  # a gradient copied to its parameter's strides: the table points at the copy
    for i, (name, p, g) in enumerate(zip(t.names, t.params, t.grads)):
        b = bindings.get(name)
        bound = b.direction_on(_dist.local(p).device) if lam > 0 and b is not None and b.anchored else None
        # bf16 where exact: fewer bytes per step (not for shards: every rank must launch alike)
        if bound is not None and name not in cache.narrowed and b.kind is not Kind.SHARD:
            bound.v = storage_w0(bound.v)
            cache.narrowed.add(name)
        if g.stride() != p.stride() and dense_flat(p) is not None:
            g = torch.empty_like(p).copy_(g)
            copied = True
        w0 = state[p]["w0"] if bound is not None else None
        row = (p, g, t.exp_avgs[i], t.exp_avg_sqs[i], t.max_exp_avg_sqs[i] if amsgrad else None, w0,
               None if bound is None else bound.v)
        rows.append(Row(*[None if x is None else _dist.local(x) for x in row]))  # DTensors: their local shards
        bounds.append(bound)
    walk = [_walkable(r) for r in rows]
    if not all(walk):  # layouts the kernels cannot walk: the torch path, exactly
        torch_step(t.select([i for i, w in enumerate(walk) if not w]))
    # state["step"] of every walked parameter is a view into one buffer per group: one add per step
    all_positions = [j for j, p in enumerate(group["params"]) if p.grad is not None]
    keep = [i for i, w in enumerate(walk) if w]
    if not keep:
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
            state[group["params"][j]]["step"] = buf[j]
    positions_t = torch.tensor(positions)
    carried = cache.synced.union(t.names[i] for i in keep
                                 if dots.held(t.names[i], t.params[i], state[t.params[i]]["step"]))
    all_steps = _increment_steps(buf, positions_t)
    subsets: dict[tuple, list[int]] = {}
    for i in keep:  # one launch per (device, penalised, dtypes, aligned): an unaligned tensor keeps to its own
        key = ((rows[i][0].device, bounds[i] is not None) + tuple(None if x is None else x.dtype for x in rows[i])
               + (all_aligned(row_pointers(rows[i])),))
        subsets.setdefault(key, []).append(i)
    hyper = _hyper(group)
    launches = []
    for key, idx in subsets.items():
        device, penalised = key[0], key[1]
        names = [t.names[i] for i in idx]
        sub_rows = [rows[i] for i in idx]
        layouts = [(r[0].shape, r[0].stride()) for r in sub_rows]
        slots = cs.slots(names, device) if penalised else [0] * len(idx)
        inv = [bounds[i].inv_nv2 if penalised else 0.0 for i in idx]
        built_from = (tuple(names), tuple(layouts), tuple(slots), tuple(inv))
        cached = cache.tables.get((group_index, key))
        if cached is None or cached[0] != built_from:
            cached = (built_from, make_table(sub_rows, slots, inv, names))
            cache.tables[(group_index, key)] = cached
        else:
            gptrs, others = split_pointers(sub_rows)
            if gptrs != cached[1].host_grads or others != cached[1].host_others:
                cached[1].upload(gptrs, others)
        launch = Launch(cached[1], penalty if penalised else None, penalised and penalty != "full",
                        [position[i] for i in idx], names, [bounds[i] for i in idx], layouts,
                        [t.params[i] for i in idx], [state[t.params[i]]["step"] for i in idx],
                        state_keys(amsgrad, penalised))
        if launch.needs_c:
            c_buf = cs.buffers[device]
            stale = [n for n in names if n not in carried]
            if stale and set(stale) <= fresh:  # first step: p = W0, so c = 0
                c_buf.index_fill_(0, torch.tensor([cs.slot[n] for n in stale], device=device), 0.0)
            elif stale:
                exact_c_(launch.table, c_buf)
                _reduce_shard_slots(cache, [(t.names[i], t.params[i]) for i in idx])
        _launch(cs, launch, all_steps, hyper)
        launches.append(launch)
        if launch.needs_c:
            dots.put_slots(launch.names, launch.params, launch.steps)
    if all(walk) and not copied and not any(_dist.is_dtensor(p) for p in t.params):
        cache.plans[group_index] = Plan(options, list(group["params"]), [p.grad is not None for p in group["params"]],
                                        buf, None if len(positions) == buf.numel() else positions_t, launches)


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
