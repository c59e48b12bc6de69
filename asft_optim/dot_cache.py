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

import enum
import operator
from collections.abc import Sequence
from itertools import count, repeat
from typing import NamedTuple

from torch import Tensor
from torch.distributed.tensor import DTensor

__all__ = ["DotCache", "Held", "Stamp"]

_VERSION = operator.attrgetter("_version")


class Held(enum.Enum):
    """What a `DotCache` entry holds (each entry has exactly one meaning)."""
    DOT = "dot"                    # ⟨v, p − W0⟩ of a whole tensor, 0-d (the torch path's; `put`)
    VECTOR = "vector"              # entry i of the native kernel's float64 vector of dots (`put_vector`)
    TRITON_SLOT = "triton_slot"    # c is valid in the Triton path's c slot, not here (`put_slot`)
    ZERO_PARTIAL = "zero_partial"  # this rank's partial dot of a ZeRO segment, summed over ranks (`put_partial`)


# An entry: (what it holds, the dot or vector or None, the index in the vector (-1 otherwise), p's version,
# the step tensor, its version), a plain tuple: `put_vector` builds T of them in C loops at every native step.
_Entry = tuple[Held, Tensor | None, int, int, Tensor, int]


class Stamp(NamedTuple):
    """The module's rule for a value carried outside the cache (a ZeRO partition's global dots): what
    it was made for. Made by `DotCache.stamp`, checked by `DotCache.holds`."""
    version: int   # the tensor's version counter
    step: Tensor   # its state "step" tensor
    step_version: int
    epoch: int     # the cache's load/resync epoch


class DotCache:
    """Name → a carried dot (`Held` says which kind) and the version stamps of its parameter and step
    tensor right after the update that made it.

    `p` is always the parameter as the optimizer's param group holds it (never a DTensor's local
    shard; a ZeRO segment's flat partition) and `step` its `state["step"]` tensor. The native CPU kernel
    returns one float64 vector per group; `put_vector` keeps it whole, so that the next step gets it
    back with `get_vector` without splitting and restacking T tensors. Each getter returns only its
    own kind: `get` whole-tensor dots (`DOT`, `VECTOR`), `held` Triton slots, `get_partial` ZeRO
    partials.
    """

    def __init__(self) -> None:
        self._entries: dict[str, _Entry] = {}
        self.epoch = 0

    def stamp(self, p: Tensor, step: Tensor) -> Stamp:
        """The stamp of a value made for `p` and `step` as they are now (right after the update)."""
        return Stamp(p._version, step, step._version, self.epoch)

    def holds(self, stamp: Stamp | None, p: Tensor, step: Tensor) -> bool:
        """Whether a value stamped `stamp` is still valid for `p` and `step` (the module's rule)."""
        return (stamp is not None and stamp.version == p._version and stamp.step is step
                and stamp.step_version == step._version and stamp.epoch == self.epoch and not isinstance(p, DTensor))

    def _stamped(self, name: str, p: Tensor, step: Tensor) -> _Entry | None:
        """The entry of `name` if it is valid for `p` and `step` now (the module's rule), else None."""
        e = self._entries.get(name)
        if e is None or e[3] != p._version or e[4] is not step or e[5] != step._version or isinstance(p, DTensor):
            return None
        return e

    def put(self, name: str, p: Tensor, step: Tensor, dot: Tensor) -> None:
        """Record the 0-d dot of `p` as it is now (call after the update wrote p and advanced `step`);
        a DTensor's is dropped instead."""
        self._put(name, p, step, Held.DOT, dot)

    def put_slot(self, name: str, p: Tensor, step: Tensor) -> None:
        """Record that `p`'s current c is in the Triton path's c slot (right after the update)."""
        self._put(name, p, step, Held.TRITON_SLOT, None)

    def put_partial(self, name: str, flat: Tensor, step: Tensor, dot: Tensor) -> None:
        """Record this rank's partial dot (0-d) of the ZeRO segment of tensor `name` in the partition
        `flat` (right after the update)."""
        self._put(name, flat, step, Held.ZERO_PARTIAL, dot)

    def _put(self, name: str, p: Tensor, step: Tensor, held: Held, dot: Tensor | None) -> None:
        if isinstance(p, DTensor):
            self._entries.pop(name, None)
        else:
            self._entries[name] = (held, dot, -1, p._version, step, step._version)

    def put_vector(self, names: Sequence[str], params: Sequence[Tensor], steps: Sequence[Tensor], dots: Tensor
                   ) -> None:
        """Record dots[i] for names[i] (a vector of len(names) dots, right after the update)."""
        if not len(names) == len(params) == len(steps) == len(dots):
            raise ValueError(f"put_vector: {len(names)} names, {len(params)} parameters, {len(steps)} steps, "
                             f"{len(dots)} dots")
        if any(issubclass(t, DTensor) for t in set(map(type, params))):
            for i, (name, p, s) in enumerate(zip(names, params, steps)):
                self.put(name, p, s, dots[i])
            return
        # (built in C loops: this runs at every native step, for every tensor)
        self._entries.update(zip(names, zip(repeat(Held.VECTOR), repeat(dots), count(), map(_VERSION, params), steps,
                                            map(_VERSION, steps))))

    def put_slots(self, names: Sequence[str], params: Sequence[Tensor], steps: Sequence[Tensor],
                  versions: Sequence[int] | None = None, step_version: int | None = None) -> None:
        """`put_slot(names[i], params[i], steps[i])` for every i, in C loops: this runs at every
        Triton step, for every tensor. versions: the params' version counters, where the caller read
        them after the last write to any of them; step_version: the version of every step tensor,
        where they share one counter (views of one tensor); each is read here when not given."""
        if any(issubclass(t, DTensor) for t in set(map(type, params))):
            for name, p, s in zip(names, params, steps):
                self.put_slot(name, p, s)
            return
        self._entries.update(zip(names, zip(repeat(Held.TRITON_SLOT), repeat(None), repeat(-1),
                                            map(_VERSION, params) if versions is None else versions, steps,
                                            map(_VERSION, steps) if step_version is None else repeat(step_version))))

    def all_held(self, names: Sequence[str], params: Sequence[Tensor], steps: Sequence[Tensor],
                 step_version: int | None = None) -> tuple[int, ...] | None:
        """The version counters of `params` if `held(n, p, s)` for every (n, p, s) of the zipped
        lists, else None; in C loops. step_version: as for `put_slots`."""
        entries = list(map(self._entries.get, names))
        if None in entries:
            return None
        versions = tuple(map(_VERSION, params))
        if not entries:
            return versions
        kinds, _, _, put_versions, stamped, step_versions = zip(*entries)
        held = (kinds.count(Held.TRITON_SLOT) == len(kinds) and put_versions == versions
                and all(map(operator.is_, stamped, steps))
                and (step_versions == tuple(map(_VERSION, steps)) if step_version is None
                     else step_versions.count(step_version) == len(step_versions))
                and not any(issubclass(t, DTensor) for t in set(map(type, params))))
        return versions if held else None

    def held(self, name: str, p: Tensor, step: Tensor) -> bool:
        """Whether `p`'s current c is valid in the Triton path's c slot."""
        e = self._stamped(name, p, step)
        return e is not None and e[0] is Held.TRITON_SLOT

    def get(self, name: str, p: Tensor, step: Tensor) -> Tensor | None:
        """The carried dot of the whole tensor `p` (0-d, on p's device), or None when it must be
        recomputed."""
        e = self._stamped(name, p, step)
        if e is None or e[0] is Held.TRITON_SLOT or e[0] is Held.ZERO_PARTIAL:
            return None
        dot = e[1]
        assert dot is not None  # DOT and VECTOR entries hold a tensor
        if dot.device != p.device:
            return None
        return dot if e[0] is Held.DOT else dot[e[2]]

    def get_partial(self, name: str, flat: Tensor, step: Tensor) -> Tensor | None:
        """This rank's carried partial dot of tensor `name`'s segment in the partition `flat`, or None."""
        e = self._stamped(name, flat, step)
        return e[1] if e is not None and e[0] is Held.ZERO_PARTIAL else None

    def get_vector(self, names: Sequence[str], params: Sequence[Tensor], steps: Sequence[Tensor]) -> Tensor | None:
        """The vector given to `put_vector` if it holds exactly these names in this order, all still
        valid (the checks of `get`; a DTensor is never in a vector entry); else None (ask `get`
        per name)."""
        first = self._entries.get(names[0]) if names else None
        if first is None or first[0] is not Held.VECTOR or first[2] != 0:
            return None
        vec = first[1]
        if vec is None or len(vec) != len(names):
            return None
        get = self._entries.get
        for i, (name, p, s) in enumerate(zip(names, params, steps)):
            e = get(name)
            if e is None or e[1] is not vec or e[2] != i or e[3] != p._version or e[4] is not s or e[5] != s._version:
                return None
        return vec

    def drop(self, name: str) -> None:
        self._entries.pop(name, None)

    def invalidate(self) -> None:
        """Forget every carried dot (a load, `resync()`)."""
        self._entries.clear()
        self.epoch += 1
