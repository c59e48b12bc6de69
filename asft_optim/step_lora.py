"""peft LoRA adapters in `AsFTAdamW`: `from_model`, binding lora_A/lora_B pairs to the base
weight's direction, and their penalty gradients and drift (math in `asft_optim.lora`)."""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from .anchors import Anchors
from .functional import BoundDirection
from .lora import (LoraPair, bind_lora_direction, is_lora_name, lora_drift_sums, lora_layout,
                   lora_penalty_grads, lora_penalty_grads_reference)

if TYPE_CHECKING:
    from .optimizer import AsFTAdamW

__all__ = ["LoraParams"]


class LoraParams:
    """The peft LoRA part of `AsFTAdamW` (a mixin; state lives on the optimizer)."""

    @classmethod
    def from_model(cls, model: nn.Module, *, anchors: Anchors | Mapping[str, Tensor],
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
        if isinstance(anchors, Mapping) and not isinstance(anchors, Anchors):
            anchors = Anchors.from_tensors(anchors)
        layout = lora_layout(model)
        no_decay = set(no_weight_decay)
        groups: dict[tuple[bool, bool], list[tuple[str, Tensor]]] = {}
        anchored = 0
        for name, p in model.named_parameters():
            if not p.requires_grad:
                continue
            is_lora = name in layout.by_param
            has_dir = is_lora or layout.aliases.get(name, name) in anchors
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

    def _is_lora_param(self, name: str) -> bool:
        return self._lora is not None and name in self._lora.by_param

    def _anchor_key(self, name: str) -> str:
        """The anchors key of a full parameter: its name, or the original module's for a
        `modules_to_save` copy."""
        return self._lora.aliases.get(name, name) if self._lora is not None else name

    def _lora_in_group(self, group: dict[str, Any]) -> bool:
        return self._lora is not None and any(n in self._lora.by_param for n in group["param_names"])

    def _bind_lora_group(self, group: dict[str, Any]) -> set[str]:
        """Bind the directions of the LoRA adapters in a group (errors name the module); return the
        names of their parameters. Without a layout, LoRA names are an error pointing to from_model."""
        names = [n for n, p in zip(group["param_names"], group["params"]) if p.requires_grad]
        if self._lora is None:
            lora = [n for n in names if is_lora_name(n)]
            if lora:
                raise ValueError(
                    f"'{lora[0]}' is a peft LoRA parameter: its penalty lives on the product s·B·A, whose "
                    "scaling and layout the names alone do not give. Build the optimizer with "
                    "AsFTAdamW.from_model(model, anchors=..., **adamw_kwargs)")
            return set()
        found = {n for n in names if n in self._lora.by_param}
        stray = [n for n in names if is_lora_name(n) and n not in found]
        if stray:
            raise ValueError(f"LoRA parameter '{stray[0]}' is not in the LoRA layout given to AsFTAdamW; "
                             "build the optimizer with AsFTAdamW.from_model(model, ...) on this model")
        if group["projection"] == "reference" and group["asft_lambda"] > 0:
            full = [n for n in names if n not in found and self._anchor_key(n) in self.anchors]
            if full:
                raise ValueError(f"projection='reference' (C = d·dᵀ/‖d‖_F on B·A) is defined for LoRA "
                                 f"adapters only; '{full[0]}' is a full parameter with a direction: put it in "
                                 "a param group with projection='vector'")
        zero = []
        devices = {n: p.device for n, p in zip(group["param_names"], group["params"])}
        for name in sorted(found):
            pair, _ = self._lora.by_param[name]
            if self._lora_direction(pair, devices[name]).is_zero and name == pair.a_name:
                zero.append(pair.module)
        if zero:
            warnings.warn(f"AsFT: the direction is zero for the base weight of LoRA module(s) "
                          f"{', '.join(zero[:20])}; their penalty is a plain L2 pull of the effective "
                          "update towards zero", stacklevel=4)
        return found

    def _lora_direction(self, pair: LoraPair, device: torch.device) -> BoundDirection:
        """The bound base-weight direction of a LoRA pair on `device` (cached by module and adapter)."""
        bound = self._lora_bound.get(pair.key)
        if bound is None:
            bound = bind_lora_direction(self.anchors, pair, device)
            self._lora_bound[pair.key] = bound
        elif bound.v.device != device:
            bound.v = bound.v.to(device)
        return bound

    def _lora_params(self) -> dict[str, tuple[dict[str, Any], Tensor]]:
        """LoRA parameter name → (its group, the current parameter object), looked up by name."""
        assert self._lora is not None
        return {n: (g, p) for g in self.param_groups for n, p in zip(g["param_names"], g["params"])
                if n in self._lora.by_param}

    def _lora_step_grads(self) -> dict[str, Tensor]:
        """Penalty gradients of every LoRA pair with a gradient, from the pre-step A and B.

        A0/B0 are each parameter's W0 (snapshot in `_init_group` at its first step); before that the
        parameter has not moved, so its current value is its W0.
        """
        if self._lora is None or not self._lora.pairs:
            return {}
        where = self._lora_params()
        pending: dict[str, Tensor] = {}
        for pair in self._lora.pairs:
            wa, wb = where.get(pair.a_name), where.get(pair.b_name)
            if wa is None and wb is None:
                continue
            if wa is None or wb is None:
                raise ValueError(f"LoRA module '{pair.module}' (adapter '{pair.adapter}'): only lora_"
                                 f"{'A' if wb is None else 'B'} is in this optimizer; AsFT needs both")
            (group, a), (group_b, b) = wa, wb
            if a.grad is None and b.grad is None:
                continue
            for key in ("asft_lambda", "penalty", "projection", "maximize", "impl"):
                if group[key] != group_b[key]:
                    raise ValueError(f"LoRA module '{pair.module}': lora_A and lora_B are in param groups with "
                                     f"different {key} ({group[key]!r} and {group_b[key]!r})")
            if group["asft_lambda"] == 0:
                continue
            coef = (-2.0 if group["maximize"] else 2.0) * group["asft_lambda"]
            fn = lora_penalty_grads_reference if group["impl"] == "reference" else lora_penalty_grads
            a0 = self.state[a]["w0"] if "w0" in self.state.get(a, {}) else a
            b0 = self.state[b]["w0"] if "w0" in self.state.get(b, {}) else b
            g_a, g_b = fn(a.detach(), b.detach(), a0, b0, self._lora_direction(pair, a.device), pair, coef,
                          group["penalty"], group["projection"])
            if a.grad is not None:
                pending[pair.a_name] = g_a
            if b.grad is not None:
                pending[pair.b_name] = g_b
        return pending

    def _add_lora_grads(self, names: list[str], grads: list[Tensor]) -> list[Tensor]:
        """g̃ = g + the pending LoRA penalty gradient, in the gradient's dtype (new tensors)."""
        out = list(grads)
        for i, name in enumerate(names):
            extra = self._lora_pending.get(name)
            if extra is not None:
                out[i] = (grads[i].to(extra.dtype) + extra).to(grads[i].dtype)
        return out

    @torch.no_grad()
    def _lora_drift_sums(self) -> dict[str, tuple[float, float, float, int]]:
        """Drift sums of each stepped LoRA pair's effective update, keyed by the base weight's name
        (`name@adapter` when several adapters on one module train)."""
        if self._lora is None:
            return {}
        where = self._lora_params()
        per_module: dict[str, int] = {}
        for pair in self._lora.pairs:
            per_module[pair.direction] = per_module.get(pair.direction, 0) + 1
        out = {}
        for pair in self._lora.pairs:
            if pair.a_name not in where or pair.b_name not in where:
                continue
            a, b = where[pair.a_name][1], where[pair.b_name][1]
            sa, sb = self.state.get(a, {}), self.state.get(b, {})
            if "w0" not in sa and "w0" not in sb:
                continue
            key = pair.direction if per_module[pair.direction] == 1 else f"{pair.direction}@{pair.adapter}"
            out[key] = lora_drift_sums(a, b, sa.get("w0", a), sb.get("w0", b),
                                       self._lora_direction(pair, a.device), pair)
        return out
