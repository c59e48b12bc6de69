"""`AsFTAdamW`: torch.optim.AdamW plus the AsFT penalty gradient 2λ·C⊥ΔW, added before the moments.

AdamW on g̃ = g + 2λ·R(ΔW) follows exactly the trajectory of AdamW on L_task + λ‖R(ΔW)‖², where
ΔW = W - W0, W0 is the parameter at its first step and R is chosen by `penalty` (see
`asft_optim.functional`).

Where the state lives (data flow: anchors → bindings → optimizer state → implementation):

- `self.state[p]`: torch's AdamW state plus "w0" (saved in `state_dict`).
- `self.records` (`records.ParamRecords`, the owner `attach`'s `AsFTPenalty` holds too): one
  `binding.Binding` per parameter name, made when its group is added (kind, direction key, bound
  direction, LoRA pair); the carried ⟨v, ΔW⟩ (`dot_cache.DotCache`, one validity rule for every
  impl); DeepSpeed ZeRO's flat partitions (`zero.ZeroTensors`; W0 in `self.state[partition]["w0"]`).
- `self.triton_cache`: the Triton launch cache (`triton_step.TritonCache`: c slots, tables, plans).
- The step: `records.refresh` binds what changed, then per group one implementation over a
  `functional.StepTensors`: `torch_step.torch_group_step` (native kernel / chunked torch /
  reference), `triton_step.triton_group_step`, or `zero.step_zero_group` for ZeRO partitions.
- Param groups: torch's options plus asft_lambda, penalty, projection, impl and the anchors
  fingerprint. These are the optimizer's own: a checkpoint never changes them.
"""

from __future__ import annotations

import functools
import math
import os
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from . import native
from .anchors import Anchors, as_anchors
from .binding import Binding, Kind, check_unique_names, model_param_groups
from .functional import PENALTIES, StepTensors
from .lora import PROJECTIONS, LoraLayout, check_one_adapter_per_module, pairs_penalty_grads
from .metrics import Drift, DriftSums, drift_from_sums
from .records import GroupKeys, ParamRecords, RecordsView
from .torch_step import adam_kwargs, global_shard_dots, penalty_only_grads, torch_group_step
from .triton_step import TritonCache, resolve_impl, triton_group_step
from .zero import TRITON_REFUSAL, lora_refusal, step_zero_group

__all__ = ["AsFTAdamW", "IMPLS"]

IMPLS: tuple[str, ...] = ("torch", "native", "reference", "triton")
# The optimizer's own options per param group: kept across load_state_dict, never taken from it.
ASFT_KEYS: tuple[str, ...] = ("asft_lambda", "penalty", "projection", "impl", "asft_anchors")
KEYS = GroupKeys(names="param_names", penalty="penalty", projection="projection", w0="w0")


def _check_number(value: Any, wording: str, tensor_name: str | None = None) -> None:
    """Raise ValueError(f"{wording}: {value}") unless value is a finite number ≥ 0 (torch's wording;
    a Tensor must have one element: "Tensor {tensor_name} must be 1-element")."""
    if isinstance(value, Tensor):
        if value.numel() != 1:
            raise ValueError(f"Tensor {tensor_name or 'value'} must be 1-element")
        value = float(value)
    if not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise ValueError(f"{wording}: {value}")


class AsFTAdamW(torch.optim.AdamW, RecordsView):
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
        impl: "torch" (on CPU the native kernel where it applies, else the fast PyTorch path, whose
            `foreach`/`fused` pick torch's AdamW kernel), "native" (the native CPU kernel for every
            penalised tensor, as torch's `fused=True` is a promise: a tensor it cannot step is an
            error naming it, as are foreach/fused/capturable/amsgrad and a kernel that does not
            build), "reference" (slow, obvious; the tests' oracle twin), "triton" (fused kernels on
            CUDA), or None (triton on CUDA when available, else torch). Whatever the impl, LoRA
            adapters, λ = 0 groups and parameters without a direction take torch's AdamW.
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
        self._asft_defaults = {"asft_lambda": asft_lambda, "penalty": penalty, "impl": impl,
                               "projection": projection}
        self.records = ParamRecords(anchors, lora, allow_unanchored=allow_unanchored, keys=KEYS)
        self._triton = TritonCache()
        super().__init__(params, lr, betas, eps, weight_decay, amsgrad, maximize=maximize,
                         foreach=foreach, capturable=capturable, differentiable=differentiable,
                         fused=fused)
        self.defaults.update(self._asft_defaults)
        # The penalty must be added to unscaled gradients: GradScaler unscales and skips for us.
        self._step_supports_amp_scaling = False
        self.records.check_any_anchored("", ": AsFT would be plain AdamW. Check the names, or use torch.optim.AdamW")

    @property
    def lora_layout(self) -> LoraLayout | None:
        """The model's LoRA layout (pairs, scaling, `modules_to_save` aliases), or None."""
        return self.records.lora

    @property
    def triton_cache(self) -> TritonCache:
        """What impl="triton" keeps between steps (`triton_step.TritonCache`: c slots, launch tables
        and plans; empty until a Triton step)."""
        return self._triton

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
        if group["impl"] == "native":
            _check_native_group(group)
        if "param_names" not in group:
            raise ValueError("AsFTAdamW binds directions to parameters by name: pass "
                             "model.named_parameters() or (name, tensor) pairs, not bare tensors "
                             "(with the transformers Trainer, use asft_optim.integrations.AsFTTrainer, or "
                             "build the optimizer with AsFTAdamW.from_model(model, anchors=...) and pass "
                             "optimizers=(optimizer, None))")
        check_unique_names(self.param_groups)
        group["asft_anchors"] = self.anchors.fingerprint
        triton = group["impl"] == "triton"
        bindings = self.records.bind(group, zip(group["param_names"], group["params"]),
                                     check=functools.partial(_check_triton_dtypes, group=group) if triton else None)
        for name, p in zip(group["param_names"], group["params"]):
            b = bindings.get(name)
            if b is not None:  # ZeRO may later replace the group's tensors: keep the originals by name
                self.records.zero.add(name, b.key if b.kind in (Kind.DENSE, Kind.ZERO) else None, p)

    # ------------------------------------------------------------------------------- step
    def _init_group(self, group, params_with_grad, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs,
                    state_steps):
        for name, p in zip(group["param_names"], group["params"]):
            if p.grad is not None and p.grad.is_sparse:
                raise RuntimeError(f"AsFTAdamW does not support sparse gradients (parameter '{name}'), "
                                   "please consider SparseAdam instead")
        has_complex = super()._init_group(group, params_with_grad, grads, exp_avgs, exp_avg_sqs,
                                          max_exp_avg_sqs, state_steps)
        self.records.take_missing_w0(group, self.state, state_steps)
        return has_complex

    def _gather(self, group: dict[str, Any]) -> StepTensors:
        """The tensors of a group's parameters that have gradients (lazy state and W0 made now)."""
        names = [n for n, p in zip(group["param_names"], group["params"]) if p.grad is not None]
        t = StepTensors([], [], [], [], [], [], [], [], [], names)
        self._init_group(group, t.params, t.grads, t.exp_avgs, t.exp_avg_sqs, t.max_exp_avg_sqs, t.state_steps)
        return t

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
        records = self.records
        owned = records.refresh(self.param_groups)
        loras = [records.has_lora(g["param_names"]) for g in self.param_groups]
        impls = ["zero" if own else resolve_impl(g, lora) for g, own, lora in zip(self.param_groups, owned, loras)]
        if any(own and lora for own, lora in zip(owned, loras)):
            raise NotImplementedError(lora_refusal("1/2"))
        check_one_adapter_per_module(records.lora, self.param_groups)
        filled = penalty_only_grads(self.param_groups, impls, records, self.state)
        try:
            lora_grads = pairs_penalty_grads(records.lora_pairs(self.param_groups, also=("impl",)), records.bindings,
                                             self.state)
            shard_dots = global_shard_dots(self.param_groups, impls, records, self.state, self._triton)
            for index, (group, impl) in enumerate(zip(self.param_groups, impls)):
                if impl == "zero":
                    self._zero_group_step(group)
                    continue
                if impl == "triton":
                    triton_group_step(index, group, self._triton, state=self.state, bindings=records.bindings,
                                      dots=records.dots, gather=functools.partial(self._gather, group),
                                      torch_step=functools.partial(torch_group_step, group, "torch", records=records,
                                                                   state=self.state, lora_grads={}, shard_dots={}))
                    continue
                t = self._gather(group)
                if t.params:
                    torch_group_step(group, impl, t, records, self.state, lora_grads, shard_dots)
        finally:
            for p in filled:
                p.grad = None
        return loss

    # ------------------------------------------------------------------------------- ZeRO
    def _zero_group_step(self, group: dict[str, Any]) -> None:
        """Step a group whose tensors DeepSpeed ZeRO replaced by flat fp32 partitions
        (`zero.step_zero_group`), after rebinding its dense tensors as ZERO."""
        if group["impl"] == "triton":
            raise ValueError(TRITON_REFUSAL)
        records = self.records
        records.rebind_as_zero(group["param_names"])
        t = StepTensors([], [], [], [], [], [], [], [], [])  # flat partitions: no names, W0 taken by `zero`
        super()._init_group(group, t.params, t.grads, t.exp_avgs, t.exp_avg_sqs, t.max_exp_avg_sqs, t.state_steps)
        step_zero_group(group, t, records.zero, records.dots, records.anchors, self.state, adam_kwargs(group))

    # ------------------------------------------------------------------------------- building
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
        param_groups, lora = model_param_groups(model, anchors, no_weight_decay)
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
        self.records.invalidate()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load state saved by `state_dict()` (ours, or a `torch.optim.AdamW` one).

        The AsFT options (asft_lambda, penalty, projection, impl, anchors) and the parameter names
        stay this optimizer's. Refuses a checkpoint made with other anchors, λ, penalty or
        projection, or whose parameter names differ (after removing wrapper prefixes such as
        `module.` and `_orig_mod.`). A checkpoint without W0 (e.g. from `torch.optim.AdamW`)
        anchors at the first step after the load, with a warning.
        """
        self.records.check_resume(self.param_groups, state_dict["param_groups"])
        own = [{k: g[k] for k in ASFT_KEYS + ("param_names",)} for g in self.param_groups]
        super().load_state_dict(state_dict)
        self.records.forget_checks()  # new group dicts: the records of the old ones would only hold them
        for group, keep in zip(self.param_groups, own):
            group.update(keep)
        self.records.restore_w0(self.param_groups, self.state, penalised_only=False,
                                hint="a torch.optim.AdamW checkpoint?", stacklevel=2)
        self.resync()

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        if "records" not in self.__dict__:  # pickled before `ParamRecords`: its parts were attributes
            d = self.__dict__
            self.records = ParamRecords(d.pop("anchors"), d.pop("_lora", None),
                                        allow_unanchored=d.pop("allow_unanchored", False), keys=KEYS)
            self.records.bindings.update(d.pop("_bindings", {}))
            self.records.lora_bound.update(d.pop("_lora_bound", {}))
        self.__dict__.setdefault("_triton", TritonCache())
        self.__dict__.pop("_w0_checked", None)
        for group in self.param_groups:
            group.setdefault("asft_lambda", 1.0)
            group.setdefault("penalty", "orthogonal")
            group.setdefault("impl", None)
            group.setdefault("projection", "vector")

    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__()
        state.update(records=self.records, _asft_defaults=self._asft_defaults)
        return state

    # ------------------------------------------------------------------------------- metrics
    @torch.no_grad()
    def drift(self) -> dict[str, Drift]:
        """Per-tensor drift (‖ΔW‖, cos(ΔW, d), ‖C⊥ΔW‖/‖ΔW‖) of every anchored parameter that has
        stepped, by parameter name (LoRA pairs by their base weight's name). Collective under FSDP2
        and DeepSpeed ZeRO (every rank gets the global numbers)."""
        by_name = self.records.drift_sums(self.param_groups, self.state, by="name")
        return {name: drift_from_sums(*s) for name, s in by_name.items()}

    @torch.no_grad()
    def drift_sums(self) -> dict[str, DriftSums]:
        """(‖ΔW‖², ‖d‖², ⟨ΔW, d⟩, numel) in float64 per anchored tensor that has stepped, keyed by its
        direction's (normalised) name: LoRA adapters appear as their base weight, `modules_to_save`
        copies as the original module, FSDP2 shards as the whole tensor. Feed to
        `metrics.per_layer`. Collective under FSDP2 and DeepSpeed ZeRO."""
        return self.records.drift_sums(self.param_groups, self.state, by="key")


def _check_triton_dtypes(bindings: Mapping[str, Binding], group: dict[str, Any]) -> None:
    """impl="triton" takes fp32/bf16/fp16 parameters: refuse others when the group is added."""
    where = dict(zip(group["param_names"], group["params"]))
    for b in bindings.values():
        p = where[b.name]
        if p.dtype not in (torch.float32, torch.bfloat16, torch.float16):
            raise ValueError(f"impl='triton' supports float32, bfloat16 and float16 parameters; "
                             f"'{b.name}' is {p.dtype} (use impl='torch')")


def _check_native_group(group: Mapping[str, Any]) -> None:
    """impl="native" promises the native kernel: refuse the options it does not implement, and a
    kernel that cannot be built or loaded here (the tensors are checked at each step)."""
    for key in ("foreach", "fused", "capturable", "amsgrad"):
        if group[key]:
            raise ValueError(f"impl='native' cannot honour {key}=True (the native kernel is its own fused "
                             f"AdamW); pass {key}={None if key in ('foreach', 'fused') else False} or impl='torch'")
    if not native.available():
        raise RuntimeError(f"impl='native': the native CPU kernel is unavailable ({native.reason()}); use "
                           "impl='torch', which then takes the PyTorch path")
