"""DTensor (FSDP2) parameters in `AsFTAdamW`: binding each shard to its slice of d, the one
all-reduce of per-tensor partial dots per step, and drift sums over shards. The collectives and
sliced reads themselves live in `asft_optim.distributed`."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from . import distributed as _dist
from .functional import BoundDirection, partial_dots
from .lora import is_lora_name
from .metrics import sums

__all__ = ["ShardedParams"]


class ShardedParams:
    """The DTensor part of `AsFTAdamW` (a mixin; state lives on the optimizer)."""

    def _bind_sharded_group(self, group: dict[str, Any]) -> None:
        """Bind a group's DTensor (FSDP2) parameters in one go.

        Collective when the group holds DTensors: every rank adds the same groups.
        """
        self._bind_sharded([(n, p) for n, p in zip(group["param_names"], group["params"])
                            if _dist.is_dtensor(p) and n not in self._sharded])

    def _bind_sharded(self, named: list[tuple[str, Tensor]]) -> None:
        """Bind sharded parameters (collective); names without a direction are cached as None."""
        lora = [n for n, _ in named if is_lora_name(n)]
        if lora:
            raise NotImplementedError(f"LoRA parameter '{lora[0]}' is a DTensor: AsFTAdamW supports "
                                      "sharded (FSDP2) parameters for full fine-tuning only")
        anchored = [(n, p) for n, p in named if self._anchor_key(n) in self.anchors]
        bounds = _dist.bind_sharded(self.anchors, [(self._anchor_key(n), p) for n, p in anchored])
        for name, _ in named:
            self._bound[name] = None
            self._sharded.add(name)
        for (name, _), bound in zip(anchored, bounds):
            self._bound[name] = bound

    def _sharded_direction(self, name: str, p: Tensor, bound: Any) -> BoundDirection | None:
        """`_direction` for a DTensor, or for a name bound as one whose parameter was swapped.

        A parameter object may change kind after the optimizer is built (accelerate swaps the
        optimizer's tensors for FSDP2 DTensors): then the name is bound again (collectively).
        """
        if _dist.is_dtensor(p) and name in self._sharded:
            return bound
        if _dist.is_dtensor(p):
            self._bind_sharded([(name, p)])
        else:
            self._sharded.discard(name)
            self._bound.pop(name, None)
        return self._direction(name, p)

    def _sharded_dots(self) -> dict[str, Tensor]:
        """Global ⟨v, ΔW⟩ (0-d fp32) of every sharded parameter the torch paths penalise this step.

        One all-reduce of one fp32 per such tensor for the whole step, whatever the number of param
        groups (it also sums the Triton path's c); none when no parameter is a DTensor, nor at the
        first step (no W0 yet: ΔW = 0 on every shard, so the local dot is the global one). Also
        checks that no group's parameters were flattened (DeepSpeed ZeRO).
        """
        names, params, locs, w0s, bounds = [], [], [], [], []
        swapped = []  # parameters that became DTensors after the optimizer was built (accelerate)
        for index, group in enumerate(self.param_groups):
            if self._zero_group(group):
                continue
            _dist.check_not_flattened(group, index)
            swapped += [(n, p) for n, p in zip(group["param_names"], group["params"])
                        if _dist.is_dtensor(p) and n not in self._sharded]
        if swapped:
            self._bind_sharded(swapped)
        cs = self.__dict__.get("_triton_c")
        triton_stale = []  # (name, p): Triton c to recompute exactly (after resync/load), here
        for group in self.param_groups:
            if self._zero_group(group):
                continue
            if not self._sharded or group["asft_lambda"] == 0 or group["penalty"] == "full":
                continue
            triton = self._resolve_impl(group) == "triton"
            if triton and cs is None:  # its first step: fresh, or exact_c_ + _reduce_c_slots
                continue
            for name, p in zip(group["param_names"], group["params"]):
                if p.grad is None or not _dist.is_dtensor(p) or (triton and name in cs.valid):
                    continue
                bound = self._direction(name, p)
                st = self.state.get(p)
                if bound is None or not st or "w0" not in st:
                    continue
                if triton:
                    triton_stale.append((name, p))
                if bound.is_zero:  # c = 0
                    continue
                names.append(name)
                params.append(p)
                locs.append(_dist.local(p))
                w0s.append(_dist.local(st["w0"]))
                bounds.append(bound)
        # The Triton path's c of sharded parameters: local parts, folded by their last update.
        pending = [(n, p) for n, p in self.__dict__.get("_triton_pending", ())
                   if n in cs.valid and not self._bound[n].is_zero]
        self.__dict__["_triton_pending"] = []
        if not names and not pending and not triton_stale:
            return {}
        dots = partial_dots(locs, w0s, bounds)
        if pending:
            dots = torch.cat([dots, self._c_slots(pending).to(dots.device)])
        dots = _dist.all_reduce_dots(params + [p for _, p in pending], dots)
        if pending:
            self._set_c_slots(pending, dots[len(names):])
        out = dict(zip(names, dots[:len(names)].unbind()))
        if triton_stale:
            for name, p in triton_stale:
                cs.slots([name], _dist.local(p).device)
            zero = torch.zeros((), device=dots.device)
            self._set_c_slots(triton_stale, torch.stack([out.pop(n, zero) * self._bound[n].inv_nv2
                                                         for n, _ in triton_stale]))
            cs.valid.update(n for n, _ in triton_stale)
        return out

    def _c_slots(self, named: list[tuple[str, Tensor]]) -> Tensor:
        """The Triton path's c slots of `named` (parameters on one device) as an fp32 vector; 0 for
        an empty local shard (no kernel writes its slot)."""
        cs = self._triton_c
        return torch.stack([cs.buffers[_dist.local(p).device][cs.slot[n]] if _dist.local(p).numel()
                            else torch.zeros((), device=_dist.local(p).device) for n, p in named])

    def _set_c_slots(self, named: list[tuple[str, Tensor]], values: Tensor) -> None:
        cs = self._triton_c
        for (n, p), value in zip(named, values.unbind()):
            cs.buffers[_dist.local(p).device][cs.slot[n]] = value

    @torch.no_grad()
    def _sharded_drift_sums(self) -> dict[str, tuple[float, float, float, int]]:
        """`drift_sums` of the sharded parameters: sums over local shards, then one all-reduce of
        three fp64 per tensor (collective when any parameter is a DTensor)."""
        named, local_sums = [], []
        for group in self.param_groups:
            for name, p in zip(group["param_names"], group["params"]):
                st = self.state.get(p)
                bound = self._bound.get(name)
                if st and "w0" in st and bound is not None and _dist.is_dtensor(p):
                    xx, uu, xu, _ = sums(_dist.local(p).double() - _dist.local(st["w0"]).double(), bound.v)
                    named.append((name, p, bound.scale))
                    local_sums.append([xx, uu, xu])
        if not named:
            return {}
        total = torch.tensor(local_sums, dtype=torch.float64, device=_dist.local(named[0][1]).device)
        total = _dist.all_reduce_dots([p for _, p, _ in named], total).tolist()
        return {name: (xx, uu * scale ** 2, xu * scale, p.numel())
                for (name, p, scale), (xx, uu, xu) in zip(named, total)}

    def _reduce_c_slots(self, named: list[tuple[str, Tensor]]) -> None:
        """Sum over the shards the c slots that `exact_c_` just filled for sharded parameters."""
        sharded = [(n, p) for n, p in named if _dist.is_dtensor(p)]
        if sharded:
            self._set_c_slots(sharded, _dist.all_reduce_dots([p for _, p in sharded], self._c_slots(sharded)))
