"""The carried ⟨v, p − W0⟩ between steps, with one validity rule for every implementation.

Each step's update produces the next step's dot while the new p is in cache (torch path) or in
registers (Triton, which keeps the value in its own c slots). The rule:

    a carried dot is used only while the parameter's version counter and its state's "step"
    tensor (the same object, at the same version) are what they were right after the update that
    wrote the dot, and no load or `resync()` happened since; else it is recomputed exactly.

So every path that moves a parameter either writes its new dot or drops the old one, without
having to say so: the paths that write no dot (torch's fused / foreach / for-loop AdamW at any λ
including 0, the reference impl, Triton launches, ZeRO partitions) advance the "step" tensor with a
version-counted op (`add_`, `_foreach_add_`, `index_add_`), which bumps its version even where the
kernel writes p without bumping p's (torch's fused AdamW, Triton); the native kernel, which writes p
and the step through raw pointers, writes the new dot every time. Writes outside the optimizer
through the parameter (`p.mul_`, `p.copy_`, `model.load_state_dict`, torch's foreach ops on plain
tensors) bump its version counter. Writes through `.data` bump none: call `resync()`.

A DTensor (FSDP2) parameter's dot is never carried: torch's foreach ops (`torch._foreach_mul_`,
torch's foreach and fused AdamW) write a DTensor without bumping its version counter or its local
shard's (measured, torch 2.13), so no counter can vouch for it; its dot is recomputed exactly at
every step (one read of the local p, W0 and v, summed over ranks in the step's one all-reduce).
"""

from __future__ import annotations

import operator
from itertools import count, repeat

from torch import Tensor
from torch.distributed.tensor import DTensor

__all__ = ["DotCache"]

_VERSION = operator.attrgetter("_version")


class DotCache:
    """Name → (dot or None, the version stamps of the parameter and its step tensor after the update).

    `p` is always the parameter as the optimizer's param group holds it (never a DTensor's local
    shard) and `step` its `state["step"]` tensor. A None value means "valid, but held elsewhere"
    (the Triton path's c slots). The native CPU kernel returns one float64 vector per group;
    `put_vector` keeps it whole, so that the next step gets it back with `get_vector` without
    splitting and restacking T tensors.
    """

    def __init__(self) -> None:
        # name → (a 0-d dot, or a vector holding it; its index in the vector, -1 for a 0-d dot;
        #         p's version; the step tensor; its version)
        self._entries: dict[str, tuple[Tensor | None, int, int, Tensor, int]] = {}
        self.epoch = 0

    def put(self, name: str, p: Tensor, step: Tensor, dot: Tensor | None) -> None:
        """Record the dot of `p` as it is now (call after the update wrote p and advanced `step`)."""
        if isinstance(p, DTensor):
            self._entries.pop(name, None)
        else:
            self._entries[name] = (dot, -1, p._version, step, step._version)

    def put_vector(self, names: list[str], params: list[Tensor], steps: list[Tensor], dots: Tensor) -> None:
        """Record dots[i] for names[i] (a vector of len(names) dots, right after the update)."""
        if not len(names) == len(params) == len(steps) == len(dots):
            raise ValueError(f"put_vector: {len(names)} names, {len(params)} parameters, {len(steps)} steps, "
                             f"{len(dots)} dots")
        if any(issubclass(t, DTensor) for t in set(map(type, params))):
            for i, (name, p, s) in enumerate(zip(names, params, steps)):
                self.put(name, p, s, dots[i])
            return
        # (built in C loops: this runs at every native step, for every tensor)
        self._entries.update(zip(names, zip(repeat(dots), count(), map(_VERSION, params), steps, map(_VERSION, steps))))

    def put_held(self, names: list[str], params: list[Tensor], steps: list[Tensor],
                 versions: tuple[int, ...] | None = None, step_version: int | None = None) -> None:
        """`put(names[i], params[i], steps[i], None)` for every i (the Triton path's c slots hold
        them), in C loops: this runs at every Triton step, for every tensor. versions: the params'
        version counters, where the caller read them after the last write to any of them;
        step_version: the version of every step tensor, where they share one counter (views of one
        tensor); each is read here when not given."""
        if any(issubclass(t, DTensor) for t in set(map(type, params))):
            for name, p, s in zip(names, params, steps):
                self.put(name, p, s, None)
            return
        self._entries.update(zip(names, zip(repeat(None), repeat(-1),
                                            map(_VERSION, params) if versions is None else versions, steps,
                                            map(_VERSION, steps) if step_version is None else repeat(step_version))))

    def all_held(self, names: list[str], params: list[Tensor], steps: list[Tensor],
                 step_version: int | None = None) -> tuple[int, ...] | None:
        """The version counters of `params` if `held(n, p, s)` for every (n, p, s) of the zipped
        lists, else None; in C loops. step_version: as for `put_held`."""
        entries = list(map(self._entries.get, names))
        if None in entries:
            return None
        versions = tuple(map(_VERSION, params))
        if not entries:
            return versions
        dots, _, put_versions, stamped, step_versions = zip(*entries)
        held = (all(map(operator.is_, dots, repeat(None))) and put_versions == versions
                and all(map(operator.is_, stamped, steps))
                and (step_versions == tuple(map(_VERSION, steps)) if step_version is None
                     else step_versions.count(step_version) == len(step_versions))
                and not any(issubclass(t, DTensor) for t in set(map(type, params))))
        return versions if held else None

    def valid(self, name: str, p: Tensor, step: Tensor) -> bool:
        """Whether the carried dot (or the slot held elsewhere) of `p` may be used."""
        e = self._entries.get(name)
        return (e is not None and e[2] == p._version and e[3] is step and e[4] == step._version
                and not isinstance(p, DTensor))

    def held(self, name: str, p: Tensor, step: Tensor) -> bool:
        """Whether `p`'s current dot is valid and held elsewhere (put with None: a Triton c slot)."""
        return self.valid(name, p, step) and self._entries[name][0] is None

    def get(self, name: str, p: Tensor, step: Tensor) -> Tensor | None:
        """The carried dot of `p` (0-d, on p's device), or None when it must be recomputed."""
        e = self._entries.get(name)
        if (e is None or e[0] is None or e[2] != p._version or e[3] is not step or e[4] != step._version
                or isinstance(p, DTensor) or e[0].device != p.device):
            return None
        return e[0] if e[1] < 0 else e[0][e[1]]

    def get_vector(self, names: list[str], params: list[Tensor], steps: list[Tensor]) -> Tensor | None:
        """The vector given to `put_vector` if it holds exactly these names in this order, all still
        valid (the checks of `valid`; a DTensor is never in a vector entry); else None (ask `get`
        per name)."""
        first = self._entries.get(names[0]) if names else None
        if first is None or first[1] != 0 or first[0] is None or first[0].dim() != 1 or len(first[0]) != len(names):
            return None
        vec = first[0]
        get = self._entries.get
        for i, (name, p, s) in enumerate(zip(names, params, steps)):
            e = get(name)
            if e is None or e[0] is not vec or e[1] != i or e[2] != p._version or e[3] is not s or e[4] != s._version:
                return None
        return vec

    def drop(self, name: str) -> None:
        self._entries.pop(name, None)

    def invalidate(self) -> None:
        """Forget every carried dot (a load, `resync()`)."""
        self._entries.clear()
        self.epoch += 1
