"""`AsFTAdamW`: torch.optim.AdamW plus the AsFT penalty gradient 2λ·C⊥ΔW, added before the moments.

AdamW on g̃ = g + 2λ·R(ΔW) follows exactly the trajectory of AdamW on L_task + λ‖R(ΔW)‖², where
ΔW = W - W0, W0 is the parameter at its first step and R is chosen by `penalty` (see
`asft_optim.functional`).

Where the state lives (data flow: anchors → bindings → optimizer state → implementation):

- `self.state[p]`: torch's AdamW state plus "w0" (saved in `state_dict`).
- `self._bindings`: one `binding.Binding` per parameter name, made when its group is added: kind
  (dense / DTensor shard / LoRA A / LoRA B / plain), direction key, bound direction, LoRA pair.
- `self._dots`: the carried ⟨v, ΔW⟩ (`dot_cache.DotCache`), one validity rule for every impl.
- `self._triton`: the Triton launch cache (`triton_step.TritonCache`: c slots, tables, plans).
- `self._zero`: DeepSpeed ZeRO's flat partitions of ZERO parameters (`zero.ZeroTensors`): their
  segments, direction slices and reduced dots; W0 in `self.state[partition]["w0"]`.
- Param groups: torch's options plus asft_lambda, penalty, projection, impl and the anchors
  fingerprint. These are the optimizer's own: a checkpoint never changes them.
"""

from __future__ import annotations

import functools
import itertools
import math
import operator
import os
import warnings
import weakref
from collections.abc import Iterable, Mapping
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn
from torch.optim.adam import adam

from . import distributed as _dist
from .anchors import Anchors, as_anchors, normalize_name
from .binding import Binding, Kind, anchor_key, bind_group, bind_shards, changed_since_binding
from .dot_cache import DotCache
from .functional import PENALTIES, BoundDirection, GroupTensors, StepTensors, asft_adamw, storage_w0
from .lora import PROJECTIONS, LoraLayout, lora_layout, pairs_penalty_grads
from .metrics import Drift, DriftSums, drift_from_sums
from .penalty import stepped_drift_sums
from .triton_step import TritonCache, resolve_impl, triton_group_step
from .zero import ZeroTensors, lora_refusal, partition_w0s, step_zero_group

__all__ = ["AsFTAdamW", "IMPLS"]

IMPLS: tuple[str, ...] = ("torch", "reference", "triton")
# The optimizer's own options per param group: kept across load_state_dict, never taken from it.
ASFT_KEYS: tuple[str, ...] = ("asft_lambda", "penalty", "projection", "impl", "asft_anchors")
_CHECKED_ON_RESUME = (("asft_anchors", "anchors (fingerprint)"), ("asft_lambda", "asft_lambda"),
                      ("penalty", "penalty"), ("projection", "projection"))


def _check_number(value: Any, wording: str, tensor_name: str | None = None) -> None:
    """Raise ValueError(f"{wording}: {value}") unless value is a finite number ≥ 0 (torch's wording;
    a Tensor must have one element: "Tensor {tensor_name} must be 1-element")."""
    if isinstance(value, Tensor):
        if value.numel() != 1:
            raise ValueError(f"Tensor {tensor_name or 'value'} must be 1-element")
        value = float(value)
    if not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise ValueError(f"{wording}: {value}")


class _Checked(NamedTuple):
    """What `_refresh_bindings` saw in a group at its last full check: its group dict, its parameters
    (weak: a swapped-out parameter is not kept alive), a copy of its names, and the indices of its
    parameters without a binding."""
    group: dict[str, Any]
    params: list[weakref.ref]
    names: list[str]
    unbound: list[int]


class AsFTAdamW(torch.optim.AdamW):
    r"""AdamW with the AsFT regulariser λ‖C⊥(W - W0)‖² folded into its gradient.

    All `torch.optim.AdamW` arguments keep their meaning and defaults. AsFT options (keyword-only):

    Args:
        params: `model.named_parameters()`, a list of `(name, tensor)` pairs, or param groups of
            them (`{"params": named, "asft_lambda": 0.0}`). Names bind the directions.
        anchors: `Anchors` (or a `{name: d}` mapping, or a directions file path) with
            d = W_aligned - W_base per parameter.
        asft_lambda: λ ≥ 0, per group; 0 turns the penalty off for the group.
        penalty: "orthogonal" (AsFT, penalises C⊥ΔW), "parallel" (penalises the part along d: the
            paper's ablation, and AsFT_Alt when d is a harmful direction) or "full" (L2-SP).
        impl: "torch" (fast PyTorch path; `foreach`/`fused` pick torch's AdamW kernel), "reference"
            (slow, obvious; the tests' oracle twin), "triton" (fused kernels on CUDA), or None (triton
            on CUDA when available, else torch).
        allow_unanchored: let trainable parameters without a direction take plain AdamW steps
            instead of raising (at least one parameter must still have a direction).
        projection: "vector" (the paper's Eq. 3, d flattened; the default) or "reference" (the
            paper's released code: C = d·dᵀ/‖d‖_F on the LoRA product B·A; LoRA adapters only).
            Per group.
        lora: the model's `LoraLayout` (pairs lora_A/lora_B with the base weight's direction and
            reads the LoRA scaling). Filled in by `AsFTAdamW.from_model`, which is the way to build
            the optimizer for a peft model; named LoRA parameters without it are an error.

    Notes:
        W0 is each parameter's value at its first step, kept in the optimizer state (bf16 where
        exact). The penalty gradient is added inside `step()`: gradient clipping done before it does
        not see the penalty. A penalised parameter whose gradient is None at a step takes its penalty
        step with a zero task gradient once it has W0 (the explicit loss's gradient; λ = 0 groups
        skip it as torch does). `differentiable=True` is not supported. With a `GradScaler` the
        optimizer always lets the scaler unscale and skip inf steps (it never takes `grad_scale`).
        `load_state_dict` keeps this optimizer's AsFT options and parameter names and refuses a
        checkpoint made with other anchors, λ, penalty or projection.
    """

    def __init__(
        self,
        params: Iterable[Any],
        lr: float | Tensor = 1e-3,
        betas: tuple[float | Tensor, float | Tensor] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        amsgrad: bool = False,
        *,
        maximize: bool = False,
        foreach: bool | None = None,
        capturable: bool = False,
        differentiable: bool = False,
        fused: bool | None = None,
        anchors: Anchors | Mapping[str, Tensor] | str | os.PathLike,
        asft_lambda: float = 1.0,
        penalty: str = "orthogonal",
        impl: str | None = None,
        allow_unanchored: bool = False,
        projection: str = "vector",
        lora: LoraLayout | None = None,
    ) -> None:
        _check_number(lr, "Invalid learning rate", "lr")
        _check_number(eps, "Invalid epsilon value")
        _check_number(weight_decay, "Invalid weight_decay value")
        if differentiable:
            raise ValueError("AsFTAdamW does not support differentiable=True")
        anchors = as_anchors(anchors)
        self.anchors = anchors
        self.allow_unanchored = allow_unanchored
        self._asft_defaults = {"asft_lambda": asft_lambda, "penalty": penalty, "impl": impl,
                               "projection": projection}
        self._lora = lora
        self._bindings: dict[str, Binding] = {}
        self._lora_bound: dict[str, BoundDirection] = {}  # LoraPair.key → the base weight's direction
        self._dots = DotCache()
        self._triton = TritonCache()
        self._zero = ZeroTensors()
        self._checked: dict[int, _Checked] = {}  # group index → its last full binding check
        # id(group) → (group, its state "step" tensors when every anchored one was seen to hold W0)
        self._w0_checked: dict[int, tuple[dict[str, Any], list[Tensor]]] = {}
        super().__init__(params, lr, betas, eps, weight_decay, amsgrad, maximize=maximize,
                         foreach=foreach, capturable=capturable, differentiable=differentiable,
                         fused=fused)
        self.defaults.update(self._asft_defaults)
        # The penalty must be added to unscaled gradients: GradScaler unscales and skips for us.
        self._step_supports_amp_scaling = False
        if not any(b.anchored for b in self._bindings.values()):
            known = ", ".join(f"'{n}'" for n in list(anchors)[:3])
            raise ValueError(
                f"none of the optimizer's {len(self._bindings)} trainable parameter(s) has a direction "
                f"(e.g. '{next(iter(self._bindings), '')}'; the anchors hold {len(anchors)} tensors, e.g. "
                f"{known}): AsFT would be plain AdamW. Check the names, or use torch.optim.AdamW")

    # ------------------------------------------------------------------------------- groups
    def add_param_group(self, param_group: dict[str, Any]) -> None:
        for key, value in self._asft_defaults.items():
            param_group.setdefault(key, value)
        lam = param_group["asft_lambda"]
        _check_number(lam, "Invalid asft_lambda value", "asft_lambda")
        param_group["asft_lambda"] = float(lam)
        if param_group["penalty"] not in PENALTIES:
            raise ValueError(f"Invalid penalty: {param_group['penalty']!r}; expected one of {PENALTIES}")
        if param_group["projection"] not in PROJECTIONS:
            raise ValueError(f"Invalid projection: {param_group['projection']!r}; expected one of {PROJECTIONS}")
        if param_group["impl"] is not None and param_group["impl"] not in IMPLS:
            raise ValueError(f"Invalid impl: {param_group['impl']!r}; expected one of {IMPLS} or None")
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        if "param_names" not in group:
            raise ValueError("AsFTAdamW binds directions to parameters by name: pass "
                             "model.named_parameters() or (name, tensor) pairs, not bare tensors "
                             "(with the transformers Trainer, use asft_optim.integrations.AsFTTrainer, or "
                             "build the optimizer with AsFTAdamW.from_model(model, anchors=...) and pass "
                             "optimizers=(optimizer, None))")
        _check_unique_names(self.param_groups)
        group["asft_anchors"] = self.anchors.fingerprint
        bindings = bind_group(zip(group["param_names"], group["params"]), self.anchors, self._lora,
                              self._lora_bound, projection=group["projection"],
                              penalised=group["asft_lambda"] > 0, penalty=group["penalty"])
        self._check_anchored(group, bindings.values(), "")
        if group["impl"] == "triton":
            _check_triton_dtypes(bindings.values(), group)
        self._bindings.update(bindings)
        for name, p in zip(group["param_names"], group["params"]):
            b = bindings.get(name)
            if b is not None:  # ZeRO may later replace the group's tensors: keep the originals by name
                self._zero.add(name, b.key if b.kind in (Kind.DENSE, Kind.ZERO) else None, p)

    def _check_anchored(self, group: dict[str, Any], bindings: Iterable[Binding], when: str) -> None:
        """Refuse trainable parameters without a direction in a penalised group (unless allowed)."""
        missing = [b.name for b in bindings if b.kind is Kind.PLAIN]
        if missing and not self.allow_unanchored and group["asft_lambda"] > 0:
            shown = ", ".join(f"'{n}'" for n in missing[:20])
            more = f" and {len(missing) - 20} more" if len(missing) > 20 else ""
            known = ", ".join(f"'{n}'" for n in list(self.anchors)[:3])
            raise ValueError(
                f"no direction for {len(missing)} trainable parameter(s){when}: {shown}{more}. The anchors "
                f"hold {len(self.anchors)} tensors (e.g. {known}). Check the names, or pass "
                "allow_unanchored=True to give these parameters plain AdamW steps")

    def _refresh_bindings(self) -> list[bool]:
        """Bind parameters that became trainable after their group was added, and rebind those whose
        kind changed (accelerate swaps a dense parameter for an FSDP2 DTensor after the optimizer is
        built; collective then, as every rank steps the same groups: one binding for all groups).

        Returns whether ZeRO owns each group. A group whose names and parameter objects are those of
        its last full check, which then held one of its original parameters (so ZeRO did not own it)
        and whose unbound parameters still have no gradient, is skipped: nothing above can differ.
        """
        reshard = []
        owned = []
        for index, group in enumerate(self.param_groups):
            params, names = group["params"], group["param_names"]
            seen = self._checked.get(index)
            if (seen is not None and seen.group is group and len(seen.params) == len(params)
                    and all(map(operator.is_, map(weakref.ref.__call__, seen.params), params))
                    and seen.names == names and all(params[i].grad is None for i in seen.unbound)):
                owned.append(False)
                continue
            self._checked.pop(index, None)
            owned.append(self._zero.owns(group))
            if owned[-1]:
                continue
            _dist.check_not_flattened(group, index)
            new, moved = changed_since_binding(self._bindings, names, params)
            reshard += moved
            if new:
                bound = bind_group(new, self.anchors, self._lora, self._lora_bound, projection=group["projection"],
                                   penalised=group["asft_lambda"] > 0, penalty=group["penalty"])
                self._check_anchored(group, bound.values(), " (they gained gradients after the optimizer "
                                     "was built)")
                self._bindings.update(bound)
            if any(p is self._zero.param(n) for n, p in zip(names, params)):
                self._checked[index] = _Checked(group, [weakref.ref(p) for p in params], list(names),
                                                [i for i, n in enumerate(names) if n not in self._bindings])
        if reshard:
            self._checked.clear()  # checked again next step, with the new bindings
            for name, _ in reshard:
                self._dots.drop(name)
            self._bindings.update(bind_shards([(n, p) for n, p in reshard if _dist.is_dtensor(p)],
                                              self.anchors, self._lora))
            self._bindings.update(bind_group([(n, p) for n, p in reshard if not _dist.is_dtensor(p)],
                                             self.anchors, self._lora, self._lora_bound,
                                             projection="vector", penalised=False))
        return owned

    # ------------------------------------------------------------------------------- step
    def _init_group(self, group, params_with_grad, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs,
                    state_steps):
        for name, p in zip(group["param_names"], group["params"]):
            if p.grad is not None and p.grad.is_sparse:
                raise RuntimeError(f"AsFTAdamW does not support sparse gradients (parameter '{name}'), "
                                   "please consider SparseAdam instead")
        has_complex = super()._init_group(group, params_with_grad, grads, exp_avgs, exp_avg_sqs,
                                          max_exp_avg_sqs, state_steps)
        # The same "step" tensors as at the last check: the same state dicts, which held W0 then.
        seen = self._w0_checked.get(id(group))
        if (seen is not None and seen[0] is group and len(seen[1]) == len(state_steps)
                and all(map(operator.is_, seen[1], state_steps))):
            return has_complex
        for name, p in zip(group["param_names"], group["params"]):
            b = self._bindings.get(name)
            if p.grad is not None and b is not None and b.anchored and "w0" not in self.state[p]:
                self.state[p]["w0"] = (_dist.snapshot_w0(p) if _dist.is_dtensor(p) else
                                       storage_w0(p.detach().clone(memory_format=torch.preserve_format)))
        self._w0_checked[id(group)] = (group, list(state_steps))
        return has_complex

    def _gather(self, group: dict[str, Any]) -> GroupTensors:
        names = [n for n, p in zip(group["param_names"], group["params"]) if p.grad is not None]
        lists: list[list[Tensor]] = [[], [], [], [], [], []]
        has_complex = self._init_group(group, *lists)
        return GroupTensors(names, *lists, has_complex)

    @torch.no_grad()
    def step(self, closure=None):
        """Perform a single optimization step (penalty gradient, then the AdamW update).

        Args:
            closure (Callable, optional): A closure that reevaluates the model and returns the loss.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        owned = self._refresh_bindings()
        impls = ["zero" if own else resolve_impl(g, self._lora_in_group(g))
                 for g, own in zip(self.param_groups, owned)]
        for group, impl in zip(self.param_groups, impls):
            if impl == "zero" and self._lora_in_group(group):
                raise NotImplementedError(lora_refusal("1/2"))
        self._check_one_adapter_per_module()
        filled = self._penalty_only_grads(impls)
        try:
            lora_grads = pairs_penalty_grads(self._lora, self.param_groups, self._bindings, self.state)
            shard_dots = self._shard_dots(impls)
            for index, (group, impl) in enumerate(zip(self.param_groups, impls)):
                if impl == "zero":
                    self._zero_group_step(group)
                    continue
                if impl == "triton":
                    triton_group_step(index, group, self._triton, state=self.state, bindings=self._bindings,
                                      dots=self._dots, gather=functools.partial(self._gather, group),
                                      torch_step=functools.partial(self._torch_group_step, group, "torch",
                                                                   lora_grads={}, shard_dots={}))
                    continue
                t = self._gather(group)
                if t.params:
                    self._torch_group_step(group, impl, t, lora_grads, shard_dots)
        finally:
            for p in filled:
                p.grad = None
        return loss

    def _penalty_only_grads(self, impls: list[str]) -> list[Tensor]:
        """Give a zero task gradient to every penalised parameter whose gradient is None but which
        has W0 (it stepped before): on the explicit loss L_task + λ‖R(ΔW)‖² its gradient is the
        penalty's, whatever the task did (an unused branch, an MoE expert, `zero_grad()`'s None).
        λ = 0 groups, parameters without a direction and frozen ones keep torch's rule (no
        gradient, no step). Returns the parameters given a gradient (set back to None after the step).
        """
        filled = []
        for group, impl in zip(self.param_groups, impls):
            if impl == "zero" or group["asft_lambda"] == 0 or not any(map(operator.is_, map(_GRAD, group["params"]),
                                                                       itertools.repeat(None))):
                continue  # (a cheap first look: most steps every parameter has a gradient)
            for name, p in zip(group["param_names"], group["params"]):
                if p.grad is not None or not p.requires_grad:
                    continue
                b = self._bindings.get(name)
                st = self.state.get(p)
                if b is not None and b.anchored and st and "w0" in st:
                    p.grad = torch.zeros_like(p)
                    filled.append(p)
        return filled

    def _torch_group_step(self, group: dict[str, Any], impl: str, t: GroupTensors,
                          lora_grads: Mapping[str, Tensor], shard_dots: Mapping[str, Tensor]) -> None:
        """impl="torch"/"reference" for one group: anchored dense/shard tensors through
        `functional.asft_adamw`, the rest (LoRA adapters with their penalty gradient, plain) through
        torch's `adam`."""
        kwargs = adam_kwargs(group, t.has_complex)
        lam = group["asft_lambda"]
        take = [lam > 0 and self._bindings[n].kind in (Kind.DENSE, Kind.SHARD) for n in t.names]
        if any(take):
            self._penalised_step(group, impl, [x for x, k in zip(t.names, take) if k],
                                 [[x for x, k in zip(xs, take) if k] for xs in t[1:7]], kwargs, shard_dots)
        rest = [[x for x, k in zip(xs, take) if not k] for xs in t[:7]]
        if not rest[1]:
            return
        names, params, grads = rest[0], rest[1], list(rest[2])
        for i, name in enumerate(names):
            extra = lora_grads.get(name)
            if extra is not None:
                grads[i] = (grads[i].to(extra.dtype) + extra).to(grads[i].dtype)
        adam(params, grads, *rest[3:7], **kwargs)

    def _penalised_step(self, group: dict[str, Any], impl: str, names: list[str], lists: list[list[Tensor]],
                        kwargs: dict[str, Any], shard_dots: Mapping[str, Tensor]) -> None:
        params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps = lists
        bindings = [self._bindings[n] for n in names]
        state = self.state
        if any(b.kind is Kind.SHARD for b in bindings):
            locals_ = [_dist.local(p) for p in params]
            dirs = [b.direction_on(q.device) for b, q in zip(bindings, locals_)]
            w0s = [_dist.local(state[p]["w0"]) for p in params]
            dots: list[Tensor | None] = []
            for n, p, q, s in zip(names, params, locals_, state_steps):
                dots.append(shard_dots.get(n, torch.zeros((), device=q.device)) if _dist.is_dtensor(p)
                            else self._dots.get(n, p, s) if impl == "torch" else None)
            tensors = StepTensors(locals_, [_dist.local(g) for g in grads], [_dist.local(x) for x in exp_avgs],
                                  [_dist.local(x) for x in exp_avg_sqs], [_dist.local(x) for x in max_exp_avg_sqs],
                                  state_steps, w0s, dirs, dots)
        else:  # plain tensors (the common case, kept cheap per tensor)
            locals_ = params
            dirs = [b.direction_on(p.device) for b, p in zip(bindings, params)]
            cache = self._dots
            dots = (cache.get_vector(names, params, state_steps) if impl == "torch" and params[0].device.type == "cpu"
                    else None)
            if dots is None:
                dots = ([cache.get(n, p, s) for n, p, s in zip(names, params, state_steps)] if impl == "torch"
                        else [None] * len(params))
            tensors = StepTensors(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps,
                                  [state[p]["w0"] for p in params], dirs, dots)
        coef = (-2.0 if group["maximize"] else 2.0) * group["asft_lambda"]
        new = asft_adamw(tensors, coef=coef, penalty=group["penalty"], impl=impl, **kwargs)
        if isinstance(new, Tensor):  # the native kernel stepped them all: one float64 vector
            self._dots.put_vector(names, params, state_steps, new)
        elif new is not None:  # (a DTensor's dot is not carried: `put` drops it)
            for n, p, s, d in zip(names, params, state_steps, new):
                self._dots.put(n, p, s, d)

    def _shard_dots(self, impls: list[str]) -> dict[str, Tensor]:
        """Global ⟨v, ΔW⟩ of every DTensor parameter the torch paths penalise this step
        (`distributed.shard_dots`: exact from the local shards at every step, a DTensor's dot is
        never carried, see `dot_cache`), in one all-reduce with the Triton path's shard c partials
        (`TritonCache.shard_partials`). None at a shard's first step (no W0 yet: ΔW = 0 on every
        shard) nor for a zero direction (c = 0)."""
        if Kind.SHARD not in map(_KIND, self._bindings.values()):  # (a C loop: this runs at every step)
            return {}  # no DTensor parameters
        shards = []
        for group, impl in zip(self.param_groups, impls):
            if group["asft_lambda"] == 0 or group["penalty"] == "full" or impl == "triton":
                continue
            for name, p in zip(group["param_names"], group["params"]):
                b = self._bindings.get(name)
                st = self.state.get(p)
                if (p.grad is None or b is None or b.kind is not Kind.SHARD or not st or "w0" not in st
                        or b.direction.is_zero):  # c = 0: no dot needed
                    continue
                shards.append((name, p, st["w0"], b.direction_on(_dist.local(p).device)))
        triton = self._triton.shard_partials(self.param_groups, self._bindings, self.state)
        dots, summed = _dist.shard_dots(shards, [(p, c) for _, p, c in triton])
        self._triton.set_shard_c(triton, summed)
        return dots

    # ------------------------------------------------------------------------------- ZeRO
    def _zero_group_step(self, group: dict[str, Any]) -> None:
        """Step a group whose tensors DeepSpeed ZeRO replaced by flat fp32 partitions
        (`zero.step_zero_group`), after rebinding its dense tensors as ZERO."""
        if group["impl"] == "triton":
            raise ValueError("impl='triton' does not step DeepSpeed ZeRO partitions: build the optimizer "
                             "with impl=None or impl='torch'")
        for name in group["param_names"]:  # their direction slices live with the partitions now
            b = self._bindings.get(name)
            if b is not None and b.kind is Kind.DENSE:
                self._bindings[name] = Binding(name, Kind.ZERO, b.key)
                self._dots.drop(name)
        step_zero_group(group, self._zero, self.state, self._dots, self.anchors,
                        functools.partial(torch.optim.Adam._init_group, self), adam_kwargs(group))

    # ------------------------------------------------------------------------------- LoRA
    def _lora_in_group(self, group: dict[str, Any]) -> bool:
        # (LoRA bindings exist only with a LoRA layout: no scan at every step without one)
        return self._lora is not None and any(self._bindings.get(n, _PLAIN).kind in (Kind.LORA_A, Kind.LORA_B)
                                              for n in group["param_names"])

    def _check_one_adapter_per_module(self) -> None:
        """Refuse two LoRA adapters of one module that both have a task gradient in a penalised
        group this step (peft `set_adapter([...])`): the base weight moves by the sum of their
        updates, and the penalty of each adapter's own s·B·A would leave out the cross terms."""
        if self._lora is None or len({p.module for p in self._lora.pairs}) == len(self._lora.pairs):
            return
        where = {n: (g, p) for g in self.param_groups for n, p in zip(g["param_names"], g["params"])}
        training: dict[str, list[str]] = {}
        for pair in self._lora.pairs:
            for name in (pair.a_name, pair.b_name):
                group, p = where.get(name, (None, None))
                if p is not None and p.grad is not None and group["asft_lambda"] > 0:
                    training.setdefault(pair.module, []).append(pair.adapter)
                    break
        for module, adapters in training.items():
            if len(adapters) > 1:
                raise NotImplementedError(
                    f"LoRA module '{module}': adapters {', '.join(repr(a) for a in adapters)} all have gradients "
                    "in this step. The base weight then moves by the sum of their updates, while AsFTAdamW "
                    "penalises each adapter's own s·B·A (the cross terms would be left out). Train one adapter "
                    "per module at a time (peft: model.set_adapter('name')), or put the other adapters in a "
                    "param group with asft_lambda=0")

    @classmethod
    def from_model(cls, model: nn.Module, *, anchors: Anchors | Mapping[str, Tensor] | str | os.PathLike,
                   no_weight_decay: Iterable[str] = (), **kwargs: Any) -> AsFTAdamW:
        """Build the optimizer for a model's trainable parameters: full-parameter or peft LoRA.

        The LoRA pairs, their scaling s (lora_alpha/r, or lora_alpha/√r with rslora) and layout
        (`fan_in_fan_out` for GPT-2 `Conv1D`) are read from the model's peft layers now.

        Parameter policy:
            - LoRA adapters (lora_A/lora_B of the trained adapters): penalty on the effective update
              s·(B·A − B0·A0) of the base weight, against the base weight's direction. An adapter
              whose base weight has no direction is an error naming the module.
            - Other trainable parameters with a direction (full-parameter training; peft
              `modules_to_save` copies, anchored to the original module's direction): the
              full-parameter penalty.
            - Biases (names ending in `.bias`) without a direction: plain AdamW steps, in a param
              group of their own with asft_lambda=0.
            - Any other trainable parameter without a direction: an error, unless
              `allow_unanchored=True` gives it plain AdamW steps.
            - Not supported (a clear error): DoRA and other LoRA variants, embedding and Conv2d
              adapters, peft's `lora_bias`, and a pair with only one of lora_A/lora_B trainable.

        Args:
            model: the module to train (a peft `PeftModel`, a transformers model, or any
                `nn.Module`); frozen parameters are left out.
            anchors: directions keyed by the base model's tensor names.
            no_weight_decay: parameter names that get weight_decay=0 (e.g. the complement of
                `Trainer.get_decay_parameter_names`).
            **kwargs: any `AsFTAdamW` argument (lr, betas, weight_decay, asft_lambda, penalty,
                projection, impl, allow_unanchored, ...).

        Returns:
            An `AsFTAdamW` over up to four param groups (decay or not × anchored or unanchored
            biases); parameters are bound by name, so wrappers that swap parameter objects later
            (accelerate) keep working. Groups that hold LoRA adapters take the PyTorch path (the
            adapters are small); `impl="triton"` applies to the other groups. LoRA on DTensor
            (FSDP2-sharded) adapters is not supported.
        """
        if "lora" in kwargs or "params" in kwargs:
            raise TypeError("from_model reads the parameters and the LoRA layout from the model; do not "
                            "pass params= or lora=")
        anchors = as_anchors(anchors)
        layout = lora_layout(model)
        no_decay = set(no_weight_decay)
        groups: dict[tuple[bool, bool], list[tuple[str, Tensor]]] = {}
        anchored = 0
        for name, p in model.named_parameters():
            if not p.requires_grad:
                continue
            has_dir = name in layout.by_param or anchor_key(name, layout) in anchors
            anchored += has_dir
            plain_bias = name.endswith(".bias") and not has_dir
            groups.setdefault((name in no_decay, plain_bias), []).append((name, p))
        if not groups:
            raise ValueError("from_model: the model has no trainable parameters")
        if not anchored:
            raise ValueError(f"from_model: none of the model's trainable parameters has a direction in "
                             f"{anchors!r} (e.g. '{next(iter(groups.values()))[0][0]}'); check that the "
                             "directions were computed for this model")
        param_groups = []
        for (nd, plain_bias), named in sorted(groups.items()):
            group: dict[str, Any] = {"params": named}
            if nd:
                group["weight_decay"] = 0.0
            if plain_bias:
                group["asft_lambda"] = 0.0
            param_groups.append(group)
        lora = layout if (layout.pairs or layout.aliases) else None
        return cls(param_groups, anchors=anchors, lora=lora, **kwargs)

    # ------------------------------------------------------------------------------- state
    def resync(self) -> None:
        """Recompute c = ⟨v, p - W0⟩/‖v‖² exactly at the next step, on every implementation.

        Call after writing to the parameters outside `step()` through `.data` (which bypasses the
        version counter) or after replacing optimizer state tensors by hand. In-place writes that go
        through the version counter (`model.load_state_dict`, `p.copy_`, `torch._foreach_mul_`) are
        noticed without it, and DTensor (FSDP2) parameters recompute c at every step anyway (see
        `dot_cache`). `load_state_dict` calls it.
        """
        self._dots.invalidate()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load state saved by `state_dict()` (ours, or a `torch.optim.AdamW` one).

        The AsFT options (asft_lambda, penalty, projection, impl, anchors) and the parameter names
        stay this optimizer's. Refuses a checkpoint made with other anchors, λ, penalty or
        projection, or whose parameter names differ (after removing wrapper prefixes such as
        `module.` and `_orig_mod.`). A checkpoint without W0 (e.g. from `torch.optim.AdamW`)
        anchors at the first step after the load, with a warning.
        """
        saved = state_dict["param_groups"]
        for i, (group, sg) in enumerate(zip(self.param_groups, saved)):
            for key, what in _CHECKED_ON_RESUME:
                if key in sg and sg[key] != group[key]:
                    raise ValueError(
                        f"cannot resume: param group {i} of the checkpoint was made with {what} "
                        f"{sg[key]!r}, this optimizer has {group[key]!r}")
            theirs = sg.get("param_names")
            if theirs is not None and len(theirs) == len(group["param_names"]):
                for ours, other in zip(group["param_names"], theirs):
                    if normalize_name(ours) != normalize_name(other):
                        raise ValueError(
                            f"cannot resume: param group {i} of the checkpoint names a parameter '{other}' "
                            f"where this optimizer has '{ours}'")
        own = [{k: g[k] for k in ASFT_KEYS + ("param_names",)} for g in self.param_groups]
        super().load_state_dict(state_dict)
        self._checked.clear()  # new group dicts: the records of the old ones would only hold them
        self._w0_checked.clear()
        no_w0 = []
        for group, keep in zip(self.param_groups, own):
            group.update(keep)
            for name, p in zip(group["param_names"], group["params"]):
                st = self.state.get(p)
                if not st:
                    continue
                if "w0" in st and not _dist.is_dtensor(st["w0"]):  # cast to the param dtype: restore its storage
                    st["w0"] = storage_w0(st["w0"])
                elif "w0" not in st and self._bindings.get(name, _PLAIN).anchored:
                    no_w0.append(name)
        if no_w0:
            warnings.warn(f"AsFT: the checkpoint holds optimizer state but no W0 for {len(no_w0)} anchored "
                          f"parameter(s) (e.g. '{no_w0[0]}'; a torch.optim.AdamW checkpoint?): W0 is taken "
                          "at their first step after this load, so ΔW counts from there", stacklevel=2)
        self.resync()

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self.__dict__.setdefault("allow_unanchored", False)
        self.__dict__.setdefault("_lora", None)
        self.__dict__.setdefault("_bindings", {})
        self.__dict__.setdefault("_lora_bound", {})
        self.__dict__.setdefault("_dots", DotCache())
        self.__dict__.setdefault("_triton", TritonCache())
        self.__dict__.setdefault("_zero", ZeroTensors())
        self.__dict__.setdefault("_checked", {})
        self.__dict__.setdefault("_w0_checked", {})
        for group in self.param_groups:
            group.setdefault("asft_lambda", 1.0)
            group.setdefault("penalty", "orthogonal")
            group.setdefault("impl", None)
            group.setdefault("projection", "vector")

    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__()
        state.update(anchors=self.anchors, allow_unanchored=self.allow_unanchored, _lora=self._lora,
                     _asft_defaults=self._asft_defaults, _bindings=self._bindings,
                     _lora_bound=self._lora_bound)
        return state

    # ------------------------------------------------------------------------------- metrics
    def _stepped(self, kinds: tuple[Kind, ...]) -> Iterable[tuple[Binding, Tensor, Tensor]]:
        """(binding, parameter, W0) of every parameter of the given kinds that has a W0."""
        for group in self.param_groups:
            for name, p in zip(group["param_names"], group["params"]):
                b = self._bindings.get(name)
                st = self.state.get(p)
                if b is not None and b.kind in kinds and st and "w0" in st:
                    yield b, p, st["w0"]

    @torch.no_grad()
    def drift(self) -> dict[str, Drift]:
        """Per-tensor drift (‖ΔW‖, cos(ΔW, d), ‖C⊥ΔW‖/‖ΔW‖) of every anchored parameter that has
        stepped, by parameter name (LoRA pairs by their base weight's name). Collective under FSDP2
        and DeepSpeed ZeRO (every rank gets the global numbers)."""
        return {name: drift_from_sums(*s) for name, s in self._drift_sums(by="name").items()}

    @torch.no_grad()
    def drift_sums(self) -> dict[str, DriftSums]:
        """(‖ΔW‖², ‖d‖², ⟨ΔW, d⟩, numel) in float64 per anchored tensor that has stepped, keyed by its
        direction's (normalised) name: LoRA adapters appear as their base weight, `modules_to_save`
        copies as the original module, FSDP2 shards as the whole tensor. Feed to
        `metrics.per_layer`. Collective under FSDP2 and DeepSpeed ZeRO."""
        return self._drift_sums(by="key")

    def _drift_sums(self, by: str) -> dict[str, DriftSums]:
        """`penalty.stepped_drift_sums` of the dense, shard and LoRA tensors, then the ZeRO ones."""
        where = {n: p for g in self.param_groups for n, p in zip(g["param_names"], g["params"])}
        out = stepped_drift_sums(self._stepped((Kind.DENSE, Kind.SHARD, Kind.LORA_A, Kind.LORA_B)),
                                 self._bindings, self._lora, where, by)
        if self._zero.partitions:  # collective once any partition is bound
            zero = self._zero.drift_sums(partition_w0s(self._zero, self.state))
            out.update({(n if by == "name" else self._bindings[n].key): s for n, s in zero.items()})
        return out


_PLAIN = Binding("", Kind.PLAIN)
_GRAD = operator.attrgetter("grad")
_KIND = operator.attrgetter("kind")


def _check_unique_names(groups: list[dict[str, Any]]) -> None:
    """Refuse a parameter name that the last group repeats (within it or from an earlier group),
    removing that group: bindings, W0 checks and carried dots are keyed by name."""
    seen = {n for g in groups[:-1] for n in g["param_names"]}
    for name in groups[-1]["param_names"]:
        if name in seen:
            groups.pop()
            raise ValueError(
                f"the parameter name '{name}' appears twice in AsFTAdamW's param groups (two models' "
                "named_parameters() in one optimizer, or groups built from submodules' named_parameters()?): "
                "directions, W0 checks and carried dots are keyed by name; give every parameter a unique "
                "name, e.g. prefix each model's or submodule's names")
        seen.add(name)


def adam_kwargs(group: dict[str, Any], has_complex: bool = False) -> dict[str, Any]:
    """Keyword arguments of torch's functional `adam` for one group (decoupled decay: AdamW)."""
    beta1, beta2 = group["betas"]
    return dict(foreach=group["foreach"], capturable=group["capturable"], differentiable=False,
                fused=group["fused"], grad_scale=None, found_inf=None, has_complex=has_complex,
                decoupled_weight_decay=True, amsgrad=group["amsgrad"], beta1=beta1, beta2=beta2,
                lr=group["lr"], weight_decay=group["weight_decay"], eps=group["eps"],
                maximize=group["maximize"])


def _check_triton_dtypes(bindings: Iterable[Binding], group: dict[str, Any]) -> None:
    """impl="triton" takes fp32/bf16/fp16 parameters: refuse others when the group is added."""
    where = dict(zip(group["param_names"], group["params"]))
    for b in bindings:
        p = where[b.name]
        if p.dtype not in (torch.float32, torch.bfloat16, torch.float16):
            raise ValueError(f"impl='triton' supports float32, bfloat16 and float16 parameters; "
                             f"'{b.name}' is {p.dtype} (use impl='torch')")
