"""The carried ⟨v, p − W0⟩ between steps, with one validity rule for every implementation.

Each step's update produces the next step's dot while the new p is in cache (torch path) or in
registers (Triton, which keeps the value in its own c slots). The value is trusted at the next
step only while

    - the parameter's version counter is what it was right after our update (no outside write:
      `model.load_state_dict`, an EMA swap, `p.data.copy_` through a version-counted view), and
    - the cache's epoch is unchanged (`AsFTAdamW.load_state_dict` and `resync()` bump it),

else the dot is recomputed exactly. Writes through `.data` bypass the version counter: call
`resync()` after those.
"""

from __future__ import annotations

from torch import Tensor

__all__ = ["DotCache"]


class DotCache:
    """Name → (dot or None, the parameter's version after the update that produced it).

    A None value means "valid, but held elsewhere" (the Triton path's c slots). The native CPU kernel
    returns one float64 vector per group; `put_vector` keeps it whole, so that the next step gets it
    back with `get_vector` without splitting and restacking T tensors.
    """

    def __init__(self) -> None:
        # name → (a 0-d dot, or a vector holding it; its index in the vector, -1 for a 0-d dot; version)
        self._entries: dict[str, tuple[Tensor | None, int, int]] = {}
        self.epoch = 0

    def put(self, name: str, p: Tensor, dot: Tensor | None) -> None:
        """Record the dot of `p` as it is now (call right after the update wrote p)."""
        self._entries[name] = (dot, -1, p._version)

    def put_vector(self, names: list[str], params: list[Tensor], dots: Tensor) -> None:
        """Record dots[i] for names[i] (a vector of len(names) dots, right after the update)."""
        entries = self._entries
        for i, (name, p) in enumerate(zip(names, params, strict=True)):
            entries[name] = (dots, i, p._version)

    def valid(self, name: str, p: Tensor) -> bool:
        entry = self._entries.get(name)
        return entry is not None and entry[2] == p._version

    def get(self, name: str, p: Tensor) -> Tensor | None:
        """The carried dot of `p` (0-d, on p's device), or None when it must be recomputed."""
        entry = self._entries.get(name)
        if entry is None or entry[2] != p._version or entry[0] is None or entry[0].device != p.device:
            return None
        return entry[0] if entry[1] < 0 else entry[0][entry[1]]

    def get_vector(self, names: list[str], params: list[Tensor]) -> Tensor | None:
        """The vector given to `put_vector` if it holds exactly these names in this order, all still
        valid; else None (ask `get` per name)."""
        first = self._entries.get(names[0]) if names else None
        if first is None or first[1] != 0 or first[0] is None or first[0].dim() != 1 or len(first[0]) != len(names):
            return None
        vec = first[0]
        entries = self._entries
        for i, (name, p) in enumerate(zip(names, params)):
            e = entries.get(name)
            if e is None or e[0] is not vec or e[1] != i or e[2] != p._version:
                return None
        return vec

    def drop(self, name: str) -> None:
        self._entries.pop(name, None)

    def invalidate(self) -> None:
        """Forget every carried dot (a load, `resync()`)."""
        self._entries.clear()
        self.epoch += 1
