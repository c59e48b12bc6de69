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

    A None value means "valid, but held elsewhere" (the Triton path's c slots).
    """

    def __init__(self) -> None:
        self._entries: dict[str, tuple[Tensor | None, int]] = {}
        self.epoch = 0

    def put(self, name: str, p: Tensor, dot: Tensor | None) -> None:
        """Record the dot of `p` as it is now (call right after the update wrote p)."""
        self._entries[name] = (dot, p._version)

    def valid(self, name: str, p: Tensor) -> bool:
        entry = self._entries.get(name)
        return entry is not None and entry[1] == p._version

    def get(self, name: str, p: Tensor) -> Tensor | None:
        """The carried dot of `p` (on p's device), or None when it must be recomputed."""
        entry = self._entries.get(name)
        if entry is None or entry[1] != p._version or entry[0] is None or entry[0].device != p.device:
            return None
        return entry[0]

    def drop(self, name: str) -> None:
        self._entries.pop(name, None)

    def invalidate(self) -> None:
        """Forget every carried dot (a load, `resync()`)."""
        self._entries.clear()
        self.epoch += 1
