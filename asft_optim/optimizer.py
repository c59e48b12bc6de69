"""`AsFTAdamW`: torch.optim.AdamW plus the AsFT penalty gradient 2λ·C⊥ΔW, added before the moments.

AdamW on g̃ = g + 2λ·R(ΔW) follows exactly the trajectory of AdamW on L_task + λ‖R(ΔW)‖², where
ΔW = W - W0, W0 is the parameter at its first step and R is chosen by `penalty` (see
`asft_optim.functional`). Directions are bound to parameters by name, never by object identity.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import Tensor
from torch.optim.adam import adam

from . import distributed as _dist
from .anchors import Anchors, normalize_name
from .functional import (PENALTIES, BoundDirection, asft_adamw_, bind_direction, partial_dots,
                         penalised_grads_reference, storage_w0)
from .lora import PROJECTIONS, LoraLayout
from .metrics import Drift, drift, drift_from_sums, sums
from .step_lora import LoraParams
from .step_sharded import ShardedParams
from .step_triton import TritonStep
from .zero import ZeroTensors, is_zero_param, lora_refusal, original_shape, step_partition

__all__ = ["AsFTAdamW", "IMPLS"]

IMPLS: tuple[str, ...] = ("torch", "reference", "triton")
_MISSING = object()


def _check_number(value: Any, wording: str) -> None:
    if isinstance(value, Tensor):
        value = float(value)
    if not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise ValueError(f"{wording}: {value}")


class AsFTAdamW(LoraParams, ShardedParams, TritonStep, torch.optim.AdamW):
    r"""AdamW with the AsFT regulariser λ‖C⊥(W - W0)‖² folded into its gradient.

    All `torch.optim.AdamW` arguments keep their meaning and defaults. AsFT options (keyword-only):

    Args:
        params: `model.named_parameters()`, a list of `(name, tensor)` pairs, or param groups of
            them (`{"params": named, "asft_lambda": 0.0}`). Names bind the directions.
        anchors: `Anchors` (or a `{name: d}` mapping) with d = W_aligned - W_base per parameter.
        asft_lambda: λ ≥ 0, per group; 0 turns the penalty off for the group.
        penalty: "orthogonal" (AsFT, penalises C⊥ΔW), "parallel" (penalises the part along d: the
            paper's ablation, and AsFT_Alt when d is a harmful direction) or "full" (L2-SP).
        impl: "torch" (fast PyTorch path; `foreach`/`fused` pick torch's AdamW kernel), "reference"
            (slow, obvious; the tests' oracle twin), "triton" (fused kernels on CUDA), or None (triton
            on CUDA when available, else torch).
        allow_unanchored: let trainable parameters without a direction take plain AdamW steps
            instead of raising.
        projection: "vector" (the paper's Eq. 3, d flattened; the default) or "reference" (the
            paper's released code: C = d·dᵀ/‖d‖_F on the LoRA product B·A; LoRA adapters only).
            Per group.
        lora: the model's `LoraLayout` (pairs lora_A/lora_B with the base weight's direction and
            reads the LoRA scaling). Filled in by `AsFTAdamW.from_model`, which is the way to build
            the optimizer for a peft model; named LoRA parameters without it are an error.

    Notes:
        W0 is each parameter's value at its first step, kept in the optimizer state (bf16 where
        exact). The penalty gradient is added inside `step()`: gradient clipping done before it does
        not see the penalty. `differentiable=True` is not supported. With a `GradScaler` the
        optimizer always lets the scaler unscale and skip inf steps (it never takes `grad_scale`).
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
        anchors: Anchors | Mapping[str, Tensor],
        asft_lambda: float = 1.0,
        penalty: str = "orthogonal",
        impl: str | None = None,
        allow_unanchored: bool = False,
        projection: str = "vector",
        lora: LoraLayout | None = None,
    ) -> None:
        _check_number(lr, "Invalid learning rate")
        _check_number(eps, "Invalid epsilon value")
        _check_number(weight_decay, "Invalid weight_decay value")
        if differentiable:
            raise ValueError("AsFTAdamW does not support differentiable=True")
        if isinstance(anchors, Mapping) and not isinstance(anchors, Anchors):
            anchors = Anchors.from_tensors(anchors)
        if not isinstance(anchors, Anchors):
            raise TypeError(f"anchors must be an Anchors or a mapping of name to tensor, got {type(anchors).__name__}")
        self.anchors = anchors
        self.allow_unanchored = allow_unanchored
        self._asft_defaults = {"asft_lambda": asft_lambda, "penalty": penalty, "impl": impl,
                               "projection": projection}
        self._lora = lora
        self._lora_bound: dict[str, BoundDirection] = {}
        self._lora_pending: dict[str, Tensor] = {}
        self._bound: dict[str, BoundDirection | None] = {}
        self._dots: dict[str, tuple[Tensor, int]] = {}  # name -> (⟨v, p - W0⟩, p._version) after the last step
        self._sharded: set[str] = set()  # names bound as DTensor shards
        self._zero = ZeroTensors()  # DeepSpeed ZeRO partitions (see asft_optim.zero)
        super().__init__(params, lr, betas, eps, weight_decay, amsgrad, maximize=maximize,
                         foreach=foreach, capturable=capturable, differentiable=differentiable,
                         fused=fused)
        self.defaults.update(self._asft_defaults)
        # The penalty must be added to unscaled gradients: GradScaler unscales and skips for us.
        self._step_supports_amp_scaling = False

    # ------------------------------------------------------------------------------- groups
    def add_param_group(self, param_group: dict[str, Any]) -> None:
        for key, value in self._asft_defaults.items():
            param_group.setdefault(key, value)
        lam = param_group["asft_lambda"]
        _check_number(lam, "Invalid asft_lambda value")
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
                             "model.named_parameters() or (name, tensor) pairs, not bare tensors")
        group["asft_anchors"] = self.anchors.fingerprint
        self._bind_group(group)
        for name, p in zip(group["param_names"], group["params"]):
            if p.requires_grad:
                key = self._anchor_key(name)
                self._zero.add(name, key if key in self.anchors and not self._is_lora_param(name) else None, p)

    def _bind_group(self, group: dict[str, Any]) -> None:
        """Bind the directions of a group's trainable parameters; raise for missing ones."""
        missing, zero = [], []
        self._bind_sharded_group(group)
        lora_names = self._bind_lora_group(group)
        for name, p in zip(group["param_names"], group["params"]):
            if p.is_complex():
                raise ValueError(f"AsFTAdamW does not support complex parameters: '{name}' is {p.dtype}")
            if not p.requires_grad or name in lora_names:
                continue
            if hasattr(p, "ds_id"):  # partitioned by ZeRO-3 already (zero.Init): bound at its first step
                key = self._anchor_key(name)
                if key not in self.anchors:
                    missing.append(name)
                elif tuple(self.anchors.shape(key)) != tuple(original_shape(p)):
                    raise ValueError(f"direction for '{name}' has shape {tuple(self.anchors.shape(key))} "
                                     f"but the parameter has shape {tuple(original_shape(p))}")
                continue
            bound = self._direction(name, p)
            if bound is None:
                missing.append(name)
            elif bound.is_zero:
                zero.append(name)
        if missing and not self.allow_unanchored and group["asft_lambda"] > 0:
            shown = ", ".join(f"'{n}'" for n in missing[:20])
            more = f" and {len(missing) - 20} more" if len(missing) > 20 else ""
            known = ", ".join(f"'{n}'" for n in list(self.anchors)[:3])
            raise ValueError(
                f"no direction for {len(missing)} trainable parameter(s): {shown}{more}. The anchors "
                f"hold {len(self.anchors)} tensors (e.g. {known}). Check the names, or pass "
                "allow_unanchored=True to give these parameters plain AdamW steps")
        if zero:
            warnings.warn(f"AsFT: the direction is zero for {len(zero)} tensor(s): "
                          f"{', '.join(zero[:20])}{' …' if len(zero) > 20 else ''}; their penalty is a "
                          "plain L2 pull towards W0", stacklevel=3)

    def _direction(self, name: str, p: Tensor) -> BoundDirection | None:
        """The bound direction of parameter `name` on p's device (cached by name), or None."""
        bound = self._bound.get(name, _MISSING)
        if _dist.is_dtensor(p) or name in self._sharded:
            return self._sharded_direction(name, p, bound)
        if bound is _MISSING:
            key = self._anchor_key(name)
            bound = bind_direction(self.anchors[key], p, key) if key in self.anchors else None
            self._bound[name] = bound
        elif bound is not None and bound.v.device != p.device:
            bound.v = bound.v.to(p.device)
        return bound  # type: ignore[return-value]

    # ------------------------------------------------------------------------------- step
    def _init_group(self, group, params_with_grad, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs,
                    state_steps):
        for name, p in zip(group["param_names"], group["params"]):
            if p.grad is not None and p.grad.is_sparse:
                raise RuntimeError(f"AsFTAdamW does not support sparse gradients (parameter '{name}'), "
                                   "please consider SparseAdam instead")
        has_complex = super()._init_group(group, params_with_grad, grads, exp_avgs, exp_avg_sqs,
                                          max_exp_avg_sqs, state_steps)
        for name, p in zip(group["param_names"], group["params"]):
            if p.grad is not None and "w0" not in self.state[p] and (
                    self._direction(name, p) is not None or self._is_lora_param(name)):
                self.state[p]["w0"] = (_dist.snapshot_w0(p) if _dist.is_dtensor(p) else
                                       storage_w0(p.detach().clone(memory_format=torch.preserve_format)))
        return has_complex

    @torch.no_grad()
    def step(self, closure=None):
        """Perform a single optimization step (penalty gradient, then torch's AdamW update).

        Args:
            closure (Callable, optional): A closure that reevaluates the model and returns the loss.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        zero = [self._zero_group(g) for g in self.param_groups]
        for group, is_zero in zip(self.param_groups, zero):
            if is_zero:
                self._step_zero(group)
        if all(zero):
            return loss
        self._lora_pending = self._lora_step_grads()
        dots = self._sharded_dots()
        for group_index, group in enumerate(self.param_groups):
            if zero[group_index]:
                continue
            if self._resolve_impl(group) == "triton" and not self._lora_in_group(group):
                self._step_triton(group_index, group)
                continue
            (names, params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps,
             has_complex) = self._gather(group)
            if not params:
                continue
            self._check_missing(group, names)
            if group["impl"] != "reference":
                names, params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps = \
                    self._step_torch_fused(group, names, params, grads, exp_avgs, exp_avg_sqs,
                                           max_exp_avg_sqs, state_steps, dots)
                if not params:
                    continue
            grads = self._penalised_grads(group, names, params, grads, dots)
            adam(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps,
                 **self._adam_kwargs(group, has_complex))
        self._lora_pending = {}
        return loss

    def _zero_group(self, group: dict[str, Any]) -> bool:
        """Whether DeepSpeed ZeRO replaced the group's parameters by flat partitions."""
        originals = [self._zero.params.get(n) for n in group["param_names"]]
        return (any(p is not None and is_zero_param(p) for p in originals)
                and not any(p is q for p in group["params"] for q in originals))

    def _step_zero(self, group: dict[str, Any]) -> None:
        """Step a group's flat ZeRO partitions (see `asft_optim.zero`): the penalty per segment with
        its tensor's global ⟨v, ΔW⟩, W0 snapshot from the fp32 master partition at its first step."""
        lam = group["asft_lambda"]
        if self._lora_in_group(group):
            raise NotImplementedError(lora_refusal("1-3"))
        for flat in group["params"]:
            if flat.grad is None:
                continue
            lists: list[list[Tensor]] = [[], [], [], [], [], []]
            torch.optim.Adam._init_group(self, {**group, "params": [flat]}, *lists)
            kwargs = self._adam_kwargs(group)
            if lam == 0:
                adam(*lists, **kwargs)
                continue
            st = self.state[flat]
            part = self._zero.partition(flat, group["param_names"], self.anchors, st.get("w0"))
            first = "w0" not in st
            if first:
                st["w0"] = storage_w0(flat.detach().clone())
            if first or group["penalty"] == "full" or not part.segments:
                dots = torch.zeros(len(part.segments), device=flat.device)
            else:
                dots = self._zero.global_dots(part, self._zero_w0s())
            new = step_partition(part, flat.grad, st["exp_avg"], st["exp_avg_sq"], st.get("max_exp_avg_sq"),
                                 st["step"], st["w0"], dots, coef=(-2.0 if group["maximize"] else 2.0) * lam,
                                 penalty=group["penalty"], **kwargs)
            self._zero.carry(part, new)

    def _zero_w0s(self) -> dict[int, Tensor]:
        """W0 of each ZeRO partition that has one, by its position in `self._zero.partitions`."""
        out = {}
        for i, part in enumerate(self._zero.partitions):
            st = self.state.get(part.flat)
            if st and "w0" in st:
                out[i] = st["w0"]
        return out

    def _gather(self, group: dict[str, Any]) -> tuple:
        """(names, params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps, has_complex)
        of a group's parameters that have gradients, with lazy state (and W0) created."""
        names = [n for n, p in zip(group["param_names"], group["params"]) if p.grad is not None]
        lists: list[list[Tensor]] = [[], [], [], [], [], []]
        has_complex = self._init_group(group, *lists)
        return (names, *lists, has_complex)

    @staticmethod
    def _adam_kwargs(group: dict[str, Any], has_complex: bool = False) -> dict[str, Any]:
        """Keyword arguments of torch's functional `adam` for one group (decoupled decay: AdamW)."""
        beta1, beta2 = group["betas"]
        return dict(foreach=group["foreach"], capturable=group["capturable"], differentiable=False,
                    fused=group["fused"], grad_scale=None, found_inf=None, has_complex=has_complex,
                    decoupled_weight_decay=True, amsgrad=group["amsgrad"], beta1=beta1, beta2=beta2,
                    lr=group["lr"], weight_decay=group["weight_decay"], eps=group["eps"],
                    maximize=group["maximize"])

    def _step_torch_fused(self, group, names, params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs,
                          state_steps, sharded_dots: Mapping[str, Tensor]):
        """Step the anchored tensors of a λ > 0 group with `asft_adamw_` (penalty and torch's AdamW
        fused chunk by chunk) and return the lists of the remaining tensors.

        c carries over between steps: ⟨v, p - W0⟩ is folded while the new p is in cache, and
        trusted at the next step only if the parameter's version counter shows no write since
        (else, and after `resync()`/`load_state_dict`, it is recomputed exactly). Sharded (DTensor)
        parameters are stepped as their local shards with the global dot of `sharded_dots`
        (`_sharded_dots`; absent means 0: no W0 yet, or c unused).
        """
        lam = group["asft_lambda"]
        take = [lam > 0 and self._direction(n, p) is not None for n, p in zip(names, params)]
        if not any(take):
            return names, params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps
        lists = (names, params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps)
        sel = [[x for x, t in zip(xs, take) if t] for xs in lists]  # max_exp_avg_sqs is [] without amsgrad
        rest = [[x for x, t in zip(xs, take) if not t] for xs in lists]
        sub_names, sub_p = sel[0], sel[1]
        w0s = [_dist.local(self.state[p]["w0"]) for p in sub_p]
        bounds = [self._bound[n] for n in sub_names]
        dots: list[Tensor | None] = []
        for n, p in zip(sub_names, sub_p):
            if _dist.is_dtensor(p):
                dots.append(sharded_dots.get(n, torch.zeros((), device=_dist.local(p).device)))
                continue
            cached = self._dots.get(n)
            dots.append(cached[0] if cached is not None and cached[1] == p._version
                        and cached[0].device == p.device else None)
        stale = [j for j, d in enumerate(dots) if d is None]
        if stale:
            fresh = partial_dots([sub_p[j] for j in stale], [w0s[j] for j in stale], [bounds[j] for j in stale])
            for k, j in enumerate(stale):
                dots[j] = fresh[k]
        local = [[_dist.local(x) for x in xs] for xs in sel[1:6]]
        new = asft_adamw_(*local, sel[6], w0s, bounds, dots, coef=(-2.0 if group["maximize"] else 2.0) * lam,
                          penalty=group["penalty"], **self._adam_kwargs(group))
        for n, p, d in zip(sub_names, sub_p, new):
            if not _dist.is_dtensor(p):  # a shard's fold is partial: `_sharded_dots` sums it next step
                self._dots[n] = (d, p._version)
        return tuple(rest)

    def _check_missing(self, group: dict[str, Any], names: list[str]) -> None:
        if group["asft_lambda"] > 0 and not self.allow_unanchored:
            missing = [n for n in names if self._bound.get(n) is None and self._anchor_key(n) not in self.anchors
                       and not (self._lora and n in self._lora.by_param)]
            if missing:
                raise ValueError(f"no direction for parameter(s) {missing} (they gained gradients after "
                                 "the optimizer was built); pass allow_unanchored=True to step them plainly")

    def _penalised_grads(self, group: dict[str, Any], names: list[str], params: list[Tensor],
                         grads: list[Tensor], dots: Mapping[str, Tensor]) -> list[Tensor]:
        """Gradients with the LoRA penalty terms and, for impl="reference", 2λ·R of every anchored
        parameter added (with impl="torch" those were stepped by `_step_torch_fused`); the user's
        `.grad` is untouched.

        dots: global ⟨v, ΔW⟩ of sharded parameters by name (`_sharded_dots`); sharded tensors are
        processed as their local shards and their new gradients wrapped back as DTensors.
        """
        if self._lora_pending:
            grads = self._add_lora_grads(names, grads)
        lam = group["asft_lambda"]
        if lam == 0 or group["impl"] != "reference":
            return grads
        coef = (-2.0 if group["maximize"] else 2.0) * lam
        idx = [i for i, (n, p) in enumerate(zip(names, params)) if self._direction(n, p) is not None]
        if not idx:
            return grads
        sub_p = [_dist.local(params[i]) for i in idx]
        sub_g = [_dist.local(grads[i]) for i in idx]
        w0s = [_dist.local(self.state[params[i]]["w0"]) for i in idx]
        bounds = [self._bound[names[i]] for i in idx]
        sub_dots = [dots.get(names[i]) for i in idx]
        new = penalised_grads_reference(sub_g, sub_p, w0s, bounds, coef, group["penalty"], sub_dots)
        grads = list(grads)
        for j, i in enumerate(idx):
            grads[i] = _dist.like(new[j], params[i]) if _dist.is_dtensor(params[i]) else new[j]
        return grads

    def resync(self) -> None:
        """Recompute c = ⟨v, p - W0⟩/‖v‖² exactly at the next step (impl="triton" carries it over).

        Call after writing to the parameters outside `step()` (loading weights, an EMA swap, …)
        or replacing optimizer state tensors by hand. `load_state_dict` calls it. The torch path
        also notices in-place writes through the parameter's version counter; writes through
        `.data` bypass that counter.
        """
        self._dots.clear()
        self._zero.invalidate()
        slots = self.__dict__.get("_triton_c")
        if slots is not None:
            slots.clear()

    # ------------------------------------------------------------------------------- state
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load state saved by `state_dict()`; refuses a checkpoint made with other anchors, λ or penalty."""
        saved = state_dict["param_groups"]
        for i, (group, sg) in enumerate(zip(self.param_groups, saved)):
            for key, what in (("asft_anchors", "anchors (fingerprint)"), ("asft_lambda", "asft_lambda"),
                              ("penalty", "penalty"), ("projection", "projection")):
                if key in sg and sg[key] != group[key]:
                    raise ValueError(
                        f"cannot resume: param group {i} of the checkpoint was made with {what} "
                        f"{sg[key]!r}, this optimizer has {group[key]!r}")
        impls = [g["impl"] for g in self.param_groups]
        super().load_state_dict(state_dict)
        for group, impl in zip(self.param_groups, impls):
            group["impl"] = impl  # the implementation is a property of this process, not the checkpoint
            for p in group["params"]:
                st = self.state.get(p)
                if st and "w0" in st and not _dist.is_dtensor(st["w0"]):  # cast to the param dtype: restore its storage
                    st["w0"] = storage_w0(st["w0"])
        self.resync()

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self.__dict__.setdefault("_bound", {})
        self.__dict__.setdefault("_dots", {})
        self.__dict__.setdefault("_sharded", set())
        self.__dict__.setdefault("_zero", ZeroTensors())
        self.__dict__.setdefault("allow_unanchored", False)
        self.__dict__.setdefault("_lora", None)
        self.__dict__.setdefault("_lora_bound", {})
        self.__dict__.setdefault("_lora_pending", {})
        for group in self.param_groups:
            group.setdefault("asft_lambda", 1.0)
            group.setdefault("penalty", "orthogonal")
            group.setdefault("impl", None)
            group.setdefault("projection", "vector")

    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__()
        state.update(anchors=self.anchors, allow_unanchored=self.allow_unanchored, _lora=self._lora,
                     _asft_defaults=self._asft_defaults)
        return state

    # ------------------------------------------------------------------------------- metrics
    @torch.no_grad()
    def drift(self) -> dict[str, Drift]:
        """Per-tensor drift (‖ΔW‖, cos(ΔW, d), ‖C⊥ΔW‖/‖ΔW‖) of every anchored parameter that has stepped."""
        out: dict[str, Drift] = {}
        for group in self.param_groups:
            if self._zero_group(group):
                continue
            for name, p in zip(group["param_names"], group["params"]):
                st = self.state.get(p)
                bound = self._bound.get(name)
                if st and "w0" in st and bound is not None and not _dist.is_dtensor(p):
                    out[name] = drift(p.detach().double() - st["w0"].double(), bound.v)
        out.update({name: drift_from_sums(*s) for name, s in self._lora_drift_sums().items()})
        out.update({name: drift_from_sums(*s) for name, s in self._sharded_drift_sums().items()})
        if self._zero.partitions:
            out.update({name: drift_from_sums(*s) for name, s in self._zero.drift_sums(self._zero_w0s()).items()})
        return out

    @torch.no_grad()
    def drift_sums(self) -> dict[str, tuple[float, float, float, int]]:
        """(‖ΔW‖², ‖d‖², ⟨ΔW, d⟩, numel) in float64 per anchored tensor that has stepped, keyed by its
        direction's (normalised) name: LoRA adapters appear as their base weight, `modules_to_save`
        copies as the original module. Feed to `metrics.per_layer`."""
        out: dict[str, tuple[float, float, float, int]] = {}
        for group in self.param_groups:
            if self._zero_group(group):
                continue
            for name, p in zip(group["param_names"], group["params"]):
                st = self.state.get(p)
                bound = self._bound.get(name)
                if st and "w0" in st and bound is not None and not _dist.is_dtensor(p):
                    xx, uu, xu, n = sums(p.detach().double() - st["w0"].double(), bound.v)
                    out[normalize_name(self._anchor_key(name))] = (xx, uu * bound.scale ** 2, xu * bound.scale, n)
        out.update(self._lora_drift_sums())
        out.update(self._sharded_drift_sums())
        if self._zero.partitions:
            out.update({normalize_name(self._anchor_key(n)): s
                        for n, s in self._zero.drift_sums(self._zero_w0s()).items()})
        return out


