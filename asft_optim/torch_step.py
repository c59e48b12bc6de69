"""The impl="torch"/"native"/"reference" step of `AsFTAdamW`'s param groups: from a group's tensors to
`functional.asft_adamw` and back.

The carried ⟨v, ΔW⟩ come from the optimizer's `records.ParamRecords` (`DotCache`: valid by its one
rule, else recomputed by the implementation) and the new ones go back there; DTensor shards get
their global dot of this step (`global_shard_dots`, one all-reduce); LoRA adapters and parameters without
a penalty take torch's `adam` (the adapters with their penalty gradient added).
"""

from __future__ import annotations

import itertools
import operator
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor
from torch.optim.adam import adam

from . import distributed as _dist
from .binding import Kind
from .functional import StepTensors, asft_adamw, penalty_coef
from .records import ParamRecords
from .triton_step import TritonCache

__all__ = ["adam_kwargs", "torch_group_step", "global_shard_dots", "penalty_only_grads"]

_GRAD = operator.attrgetter("grad")
_KIND = operator.attrgetter("kind")


def adam_kwargs(group: Mapping[str, Any]) -> dict[str, Any]:
    """Keyword arguments of torch's functional `adam` for one group (decoupled decay: AdamW; no
    complex parameters: `binding.bind_group` refuses them)."""
    beta1, beta2 = group["betas"]
    return dict(foreach=group["foreach"], capturable=group["capturable"], differentiable=False,
                fused=group["fused"], grad_scale=None, found_inf=None, has_complex=False,
                decoupled_weight_decay=True, amsgrad=group["amsgrad"], beta1=beta1, beta2=beta2,
                lr=group["lr"], weight_decay=group["weight_decay"], eps=group["eps"],
                maximize=group["maximize"])


def penalty_only_grads(groups: Sequence[Mapping[str, Any]], impls: Sequence[str], records: ParamRecords,
                       state: Mapping[Tensor, Any]) -> list[Tensor]:
    """Give a zero task gradient to every penalised parameter whose gradient is None but which
    has W0 (it stepped before): on the explicit loss L_task + λ‖R(ΔW)‖² its gradient is the
    penalty's, whatever the task did (an unused branch, an MoE expert, `zero_grad()`'s None).
    λ = 0 groups, parameters without a direction and frozen ones keep torch's rule (no
    gradient, no step). Returns the parameters given a gradient (set back to None after the step).
    """
    filled = []
    for group, impl in zip(groups, impls):
        if impl == "zero" or group["asft_lambda"] == 0 or not any(map(operator.is_, map(_GRAD, group["params"]),
                                                                   itertools.repeat(None))):
            continue  # (a cheap first look: most steps every parameter has a gradient)
        for name, p in zip(group["param_names"], group["params"]):
            if p.grad is not None or not p.requires_grad:
                continue
            st = state.get(p)
            if records.anchored(name) and st and "w0" in st:
                p.grad = torch.zeros_like(p)
                filled.append(p)
    return filled


def torch_group_step(group: Mapping[str, Any], impl: str, t: StepTensors, records: ParamRecords,
                     state: Mapping[Tensor, Any], lora_grads: Mapping[str, Tensor],
                     shard_dots: Mapping[str, Tensor]) -> None:
    """impl="torch"/"native"/"reference" for one group's tensors `t` (named; W0, directions and dots are
    filled here): anchored dense/shard tensors through `functional.asft_adamw`, the rest (LoRA
    adapters with their penalty gradient `lora_grads`, plain) through torch's `adam`."""
    kwargs = adam_kwargs(group)
    bindings = records.bindings
    lam = group["asft_lambda"]
    take = [lam > 0 and bindings[n].kind in (Kind.DENSE, Kind.SHARD) for n in t.names]
    if any(take):
        _penalised_step(group, impl, t.select([i for i, k in enumerate(take) if k]), records, state, kwargs,
                        shard_dots)
    rest = t.select([i for i, k in enumerate(take) if not k])
    if not rest.params:
        return
    grads = list(rest.grads)
    for i, name in enumerate(rest.names):
        extra = lora_grads.get(name)
        if extra is not None:
            grads[i] = (grads[i].to(extra.dtype) + extra).to(grads[i].dtype)
    adam(rest.params, grads, rest.exp_avgs, rest.exp_avg_sqs, rest.max_exp_avg_sqs, rest.state_steps, **kwargs)


def _penalised_step(group: Mapping[str, Any], impl: str, t: StepTensors, records: ParamRecords,
                    state: Mapping[Tensor, Any], kwargs: dict[str, Any], shard_dots: Mapping[str, Tensor]) -> None:
    """`functional.asft_adamw` on anchored dense/shard tensors: their W0, directions and carried dots
    (a shard's: its global dot of this step) filled in, the new dots put back."""
    names, params, state_steps = t.names, t.params, t.state_steps
    bindings = [records.bindings[n] for n in names]
    cache = records.dots
    if any(b.kind is Kind.SHARD for b in bindings):
        locals_ = [_dist.local(p) for p in params]
        dots: list[Tensor | None] = []
        for n, p, q, s in zip(names, params, locals_, state_steps):
            dots.append(shard_dots.get(n, torch.zeros((), device=q.device)) if _dist.is_dtensor(p)
                        else cache.get(n, p, s) if impl != "reference" else None)
        tensors = StepTensors(locals_, [_dist.local(g) for g in t.grads], [_dist.local(x) for x in t.exp_avgs],
                              [_dist.local(x) for x in t.exp_avg_sqs], [_dist.local(x) for x in t.max_exp_avg_sqs],
                              state_steps, [_dist.local(state[p]["w0"]) for p in params],
                              [b.direction_on(q.device) for b, q in zip(bindings, locals_)], dots, names)
    else:  # plain tensors (the common case, kept cheap per tensor)
        carried: list[Tensor | None] | Tensor | None = (
            cache.get_vector(names, params, state_steps) if impl != "reference" and params[0].device.type == "cpu"
            else None)
        if carried is None:
            carried = ([cache.get(n, p, s) for n, p, s in zip(names, params, state_steps)] if impl != "reference"
                       else [None] * len(params))
        tensors = t._replace(w0s=[state[p]["w0"] for p in params],
                             directions=[b.direction_on(p.device) for b, p in zip(bindings, params)], dots=carried)
    new = asft_adamw(tensors, coef=penalty_coef(group["asft_lambda"], group["maximize"]), penalty=group["penalty"],
                     impl=impl, **kwargs)
    if isinstance(new, Tensor):  # the native kernel stepped them all: one float64 vector
        cache.put_vector(names, params, state_steps, new)
    elif new is not None:  # (a DTensor's dot is not carried: `put` drops it)
        for n, p, s, d in zip(names, params, state_steps, new):
            if d is None:
                cache.drop(n)
            else:
                cache.put(n, p, s, d)


def global_shard_dots(groups: list[dict[str, Any]], impls: Sequence[str], records: ParamRecords,
               state: Mapping[Tensor, Any], triton: TritonCache) -> dict[str, Tensor]:
    """Global ⟨v, ΔW⟩ of every DTensor parameter the torch paths penalise this step
    (`distributed.shard_dots`: exact from the local shards at every step, a DTensor's dot is
    never carried, see `dot_cache`), in one all-reduce with the Triton path's shard c partials
    (`TritonCache.shard_partials`, whose slots get the summed c). None at a shard's first step (no W0
    yet: ΔW = 0 on every shard) nor for a zero direction (c = 0)."""
    bindings = records.bindings
    if Kind.SHARD not in map(_KIND, bindings.values()):  # (a C loop: this runs at every step)
        return {}  # no DTensor parameters
    shards = []
    for group, impl in zip(groups, impls):
        if group["asft_lambda"] == 0 or group["penalty"] == "full" or impl == "triton":
            continue
        for name, p in zip(group["param_names"], group["params"]):
            b = bindings.get(name)
            st = state.get(p)
            if p.grad is None or b is None or b.kind is not Kind.SHARD or not st or "w0" not in st:
                continue
            bound = b.direction_on(_dist.local(p).device)
            if not bound.is_null:  # (c = 0: no dot needed)
                shards.append((name, p, st["w0"], bound))
    partials = triton.shard_partials(groups, bindings, state)
    dots, summed = _dist.shard_dots(shards, [(p, c) for _, p, c in partials])
    triton.set_shard_c(partials, summed)
    return dots
