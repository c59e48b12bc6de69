"""What AsFT knows about each parameter beyond the optimizer's `state[p]`: one `Binding` per name
(kept by `records.ParamRecords`, for `AsFTAdamW` and `attach` alike), and how a model's parameters
are named and grouped for it (`model_param_groups`, `check_unique_names`).

A binding is made when the parameter's group is added (`bind_group`) and read by every path
(torch, reference, Triton, shards, LoRA, resume, drift). It records the parameter's kind, the
normalised anchors key of its direction, the bound direction and, for LoRA adapters, the pair.
Bindings are keyed by the name the group was built with, never by `id(param)`: accelerate and
FSDP2 swap parameter objects after the optimizer is built.
"""

from __future__ import annotations

import enum
import warnings
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, cast

import torch
from torch import Tensor, nn

from . import distributed as _dist
from .anchors import Anchors, normalize_name
from .functional import BoundDirection, bind_direction
from .lora import LoraLayout, LoraPair, bind_lora_direction, is_lora_name, lora_layout
from .zero import lora_refusal, original_shape

if TYPE_CHECKING:
    from torch.distributed.tensor import DTensor

__all__ = ["Kind", "Binding", "bind_group", "anchor_key", "zero_binding", "changed_since_binding",
           "model_param_groups", "check_unique_names"]


class Kind(str, enum.Enum):
    """How a parameter is penalised."""
    DENSE = "dense"      # a whole tensor with its own direction
    SHARD = "shard"      # a DTensor (FSDP2) shard bound to its block of the direction
    LORA_A = "lora_a"    # peft lora_A: penalty on s·(B·A − B0·A0) against the base weight's d
    LORA_B = "lora_b"
    ZERO = "zero"        # DeepSpeed ZeRO: pieces of the tensor live in flat partitions (`asft_optim.zero`)
    PLAIN = "plain"      # no direction (allow_unanchored, or λ = 0): plain AdamW steps


@dataclass
class Binding:
    """One parameter's AsFT record.

    Attributes:
        name: the name in its param group.
        kind: see `Kind`.
        key: the normalised anchors key of the direction (the base weight's for LoRA), or None.
        direction: the bound direction (for a shard: its block; for LoRA: the base weight's, shared
            by A and B), or None (ZERO: the direction slices live with each flat partition).
        pair: the LoRA pair of a LORA_A/LORA_B parameter.
    """
    name: str
    kind: Kind
    key: str | None = None
    direction: BoundDirection | None = None
    pair: LoraPair | None = None

    @property
    def anchored(self) -> bool:
        return self.kind is not Kind.PLAIN

    def direction_on(self, device: torch.device) -> BoundDirection:
        """The bound direction, moved to `device` on first use there (a dense/LoRA direction follows
        its parameter when the parameter moves)."""
        assert self.direction is not None, self.name
        if self.direction.v.device != device:
            self.direction.v = self.direction.v.to(device)
        return self.direction


def anchor_key(name: str, lora: LoraLayout | None) -> str:
    """The anchors key of a full parameter: its normalised name, or the original module's for a
    peft `modules_to_save` copy."""
    if lora is not None and name in lora.aliases:
        return lora.aliases[name]
    return normalize_name(name)


def bind_group(named: Iterable[tuple[str, Tensor]], anchors: Anchors, lora: LoraLayout | None,
               lora_bound: dict[str, BoundDirection], *, projection: str, penalised: bool,
               penalty: str = "orthogonal") -> dict[str, Binding]:
    """Bind every trainable parameter of a group; frozen ones are left out.

    Collective when the group holds DTensors (every rank adds the same groups). `lora_bound` caches
    each LoRA pair's base direction by `LoraPair.key` (A and B share one). `penalised`: the group
    has λ > 0 (only then is projection="reference" on a full parameter an error). `penalty`: the
    group's, named in the warning about zero directions (`ZERO_DIRECTION`).

    Raises:
        ValueError naming the parameter: complex dtype, a LoRA name without a layout (points to
        `from_model`), a LoRA name missing from the layout, projection="reference" on a full
        parameter, a direction whose shape or dtype does not fit.
    """
    out: dict[str, Binding] = {}
    shards: list[tuple[str, Tensor]] = []
    null: list[str] = []  # tensors whose direction is all zero
    for name, p in named:
        if p.is_complex():
            raise ValueError(f"AsFTAdamW does not support complex parameters: '{name}' is {p.dtype}")
        if not p.requires_grad:
            continue
        in_layout = lora is not None and name in lora.by_param
        if hasattr(p, "ds_id"):  # partitioned by ZeRO-3 already (zero.Init): bound with its partition
            if in_layout or is_lora_name(name):
                raise NotImplementedError(lora_refusal(3))
            out[name] = zero_binding(name, anchor_key(name, lora), p, anchors)
            continue
        if is_lora_name(name) and not in_layout:
            if lora is None:
                raise ValueError(
                    f"'{name}' is a peft LoRA parameter: its penalty lives on the product s·B·A, whose "
                    "scaling and layout the names alone do not give. Build the optimizer with "
                    "AsFTAdamW.from_model(model, anchors=..., **adamw_kwargs)")
            raise ValueError(f"LoRA parameter '{name}' is not in the LoRA layout given to AsFTAdamW; "
                             "build the optimizer with AsFTAdamW.from_model(model, ...) on this model")
        if lora is not None and in_layout:
            pair, which = lora.by_param[name]
            if _dist.is_dtensor(p):
                raise NotImplementedError(f"LoRA parameter '{name}' is a DTensor: AsFTAdamW supports "
                                          "sharded (FSDP2) parameters for full fine-tuning only")
            bound = lora_bound.get(pair.key)
            if bound is None:
                bound = lora_bound[pair.key] = bind_lora_direction(anchors, pair, p.device)
                if bound.is_null:
                    null.append(f"{pair.module} (LoRA)")
            out[name] = Binding(name, Kind.LORA_A if which == "A" else Kind.LORA_B, pair.direction, bound, pair)
            continue
        key = anchor_key(name, lora)
        if key not in anchors:
            out[name] = Binding(name, Kind.PLAIN)
            continue
        if projection == "reference" and penalised:
            raise ValueError(f"projection='reference' (C = d·dᵀ/‖d‖_F on B·A) is defined for LoRA "
                             f"adapters only; '{name}' is a full parameter with a direction: put it in "
                             "a param group with projection='vector'")
        if _dist.is_dtensor(p):
            shards.append((name, p))
            continue
        bound = bind_direction(anchors[key], p, key)
        anchors.adopt(key, bound)  # the bound copy becomes the mapping's only copy of d
        out[name] = Binding(name, Kind.DENSE, key, bound)
        if bound.is_null:
            null.append(name)
    sharded = bind_shards(shards, anchors, lora)
    null += [n for n, b in sharded.items() if b.direction is not None and b.direction.is_null]
    out.update(sharded)
    if null:
        warnings.warn(f"AsFT: the direction is zero for {len(null)} tensor(s): {', '.join(null[:20])}"
                      f"{' …' if len(null) > 20 else ''}; {ZERO_DIRECTION[penalty]}", stacklevel=4)
    return out


# What the penalty does on a tensor whose direction is zero (C_aligned = 0, the pseudo-inverse's).
ZERO_DIRECTION = {
    "orthogonal": "with penalty='orthogonal' their penalty is a plain L2 pull towards W0 (C⊥ΔW = ΔW)",
    "full": "with penalty='full' their penalty is the L2 pull towards W0 that every tensor gets",
    "parallel": "with penalty='parallel' they get no penalty at all (C_aligned ΔW = 0): plain AdamW steps",
}


def zero_binding(name: str, key: str, p: Tensor, anchors: Anchors) -> Binding:
    """The ZERO binding of a DeepSpeed-managed parameter (PLAIN without a direction); its direction
    is read slice by slice when its partitions are first stepped (`zero.ZeroTensors.partition`)."""
    if key not in anchors:
        return Binding(name, Kind.PLAIN)
    shape = original_shape(p)
    if tuple(anchors.shape(key)) != tuple(shape):
        raise ValueError(f"direction for '{name}' has shape {tuple(anchors.shape(key))} but the parameter "
                         f"has shape {tuple(shape)}")
    return Binding(name, Kind.ZERO, key)


def bind_shards(named: list[tuple[str, Tensor]], anchors: Anchors, lora: LoraLayout | None
                ) -> dict[str, Binding]:
    """SHARD bindings of DTensor parameters that have directions (collective; see
    `distributed.bind_sharded`)."""
    keys = [anchor_key(n, lora) for n, _ in named]
    bounds = _dist.bind_sharded(anchors, [(k, cast("DTensor", p)) for k, (_, p) in zip(keys, named)])
    return {name: Binding(name, Kind.SHARD, key, bound) for (name, _), key, bound in zip(named, keys, bounds)}


def changed_since_binding(bindings: Mapping[str, Binding], names: Iterable[str], params: Iterable[Tensor]
                          ) -> tuple[list[tuple[str, Tensor]], list[tuple[str, Tensor]]]:
    """What a param group's (names, params) need re-bound: (parameters without a binding that now have a
    gradient, dense or shard parameters whose DTensor-ness changed: FSDP2 or accelerate swapped them)."""
    new, moved = [], []
    for name, p in zip(names, params):
        b = bindings.get(name)
        if b is None:
            if p.grad is not None:
                new.append((name, p))
        elif b.kind in (Kind.DENSE, Kind.SHARD) and (b.kind is Kind.SHARD) != _dist.is_dtensor(p):
            moved.append((name, p))
    return new, moved


def model_param_groups(model: nn.Module, anchors: Anchors, no_weight_decay: Iterable[str] = ()
                       ) -> tuple[list[dict[str, Any]], LoraLayout | None]:
    """`AsFTAdamW.from_model`'s param groups of a model's trainable parameters (see its parameter
    policy) and its LoRA layout (None without LoRA pairs or `modules_to_save` copies).

    Up to four groups, keyed by (in `no_weight_decay`: weight_decay=0, a bias without a direction:
    asft_lambda=0), each of (name, parameter) pairs. Raises ValueError when nothing is trainable or
    no trainable parameter has a direction.
    """
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
    return param_groups, (layout if (layout.pairs or layout.aliases) else None)


def check_unique_names(groups: list[dict[str, Any]]) -> None:
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
