"""What AsFT knows about the parameters of one optimizer beyond its `state[p]`: `ParamRecords`.

One owner, held by both users of the penalty: `AsFTAdamW` (the penalty fused into its AdamW
update) and `AsFTPenalty` (`attach`: the penalty added to any optimizer's gradients). It holds

- `bindings`: one `binding.Binding` per parameter name (kind, direction key, bound direction, LoRA
  pair), made when a group is bound and remade when a parameter gains a gradient or is swapped for
  a DTensor (`rebind_changed`, `rebind_moved`; `refresh` does both for every group of AsFTAdamW);
- the LoRA pairs (`lora`, `lora_pairs`) and their bound base-weight directions (A and B share one);
- `dots`: the carried ⟨v, ΔW⟩ with their one validity rule (`dot_cache`);
- `zero`: DeepSpeed ZeRO's flat partitions of ZERO parameters and their global dots (`zero`);

and does what both users do with them: W0 snapshots (`take_w0`, `take_missing_w0`; W0 lives in the host
optimizer's `state[p][keys.w0]`, saved by its `state_dict`), the resume checks (`check_resume`:
other anchors, λ, penalty, projection or names are refused), W0's storage dtype after a load
(`restore_w0`) and the drift sums (`drift_sums`). The two users name their group keys differently
(`GroupKeys`): AsFTAdamW's are its own options, attach's are prefixed so they cannot clash with the
host optimizer's.
"""

from __future__ import annotations

import operator
import warnings
import weakref
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any, NamedTuple, cast

import torch
from torch import Tensor

from . import distributed as _dist
from .anchors import Anchors, normalize_name
from .binding import Binding, Kind, bind_group, bind_shards, changed_since_binding
from .dot_cache import DotCache
from .functional import BoundDirection, storage_w0
from .lora import LoraLayout, LoraPair, pairs_drift_sums
from .metrics import DriftSums, sums
from .zero import ZeroTensors, partition_w0s

if TYPE_CHECKING:
    from torch.distributed.tensor import DTensor

__all__ = ["GroupKeys", "ParamRecords", "RecordsView", "take_w0", "stepped_drift_sums"]


class _GroupSeen(NamedTuple):
    """What `ParamRecords.refresh` saw in a group at its last full check: its group dict, its
    parameters (weak: a swapped-out parameter is not kept alive), a copy of its names, and the
    indices of its parameters without a binding."""
    group: Mapping[str, Any]
    params: list[weakref.ref]
    names: list[str]
    unbound: list[int]


class GroupKeys(NamedTuple):
    """Where a user of `ParamRecords` keeps AsFT's options in its param groups, and W0 in its state.

    names: the parameter names (bind the directions); penalty, projection: the group's options;
    w0: the state key of W0. λ is "asft_lambda" and the anchors fingerprint "asft_anchors" for both.
    """
    names: str
    penalty: str
    projection: str
    w0: str


LAMBDA_KEY = "asft_lambda"
_PLAIN_STEPS = "to give these parameters plain AdamW steps"  # what allow_unanchored=True does (AsFTAdamW)
ANCHORS_KEY = "asft_anchors"


def take_w0(p: Tensor) -> Tensor:
    """W0 of `p` as it is now: a copy in bf16 where exact (`functional.storage_w0`), or for a DTensor
    a copy of its local shard sharded like p."""
    if _dist.is_dtensor(p):
        return _dist.snapshot_w0(cast("DTensor", p))
    return storage_w0(p.detach().clone(memory_format=torch.preserve_format))


class ParamRecords:
    """The per-parameter records of one optimizer (see the module docstring).

    Attributes:
        anchors: the directions.
        lora: the model's LoRA layout (pairs, `modules_to_save` aliases), or None.
        allow_unanchored: trainable parameters without a direction may step without a penalty.
        keys: the group and state keys of the user (`GroupKeys`).
        bindings: parameter name → `Binding`.
        dots: the carried dots (`dot_cache.DotCache`).
        zero: the ZeRO partitions (`zero.ZeroTensors`).
    """

    def __init__(self, anchors: Anchors, lora: LoraLayout | None, *, allow_unanchored: bool,
                 keys: GroupKeys) -> None:
        self.anchors = anchors
        self.lora = lora
        self.allow_unanchored = allow_unanchored
        self.keys = keys
        self.bindings: dict[str, Binding] = {}
        self.lora_bound: dict[str, BoundDirection] = {}  # LoraPair.key → the base weight's direction
        self.dots = DotCache()
        self.zero = ZeroTensors()
        self._refresh_seen: dict[int, _GroupSeen] = {}  # group index → its last full check by `refresh`
        # id(group) → (group, its state "step" tensors when every anchored one was seen to hold W0)
        self._w0_seen: dict[int, tuple[Mapping[str, Any], list[Tensor]]] = {}

    def __getstate__(self) -> dict[str, Any]:
        """Pickled without the per-step caches (carried dots, ZeRO partitions, refresh checks)."""
        return {k: v for k, v in self.__dict__.items() if k not in ("dots", "zero", "_refresh_seen", "_w0_seen")}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self.dots, self.zero, self._refresh_seen, self._w0_seen = DotCache(), ZeroTensors(), {}, {}

    def binding(self, name: str) -> Binding | None:
        """The binding of the parameter named `name`, or None (frozen, or not in a group)."""
        return self.bindings.get(name)

    def anchored(self, name: str) -> bool:
        """Whether the parameter named `name` has a direction (and so a penalty where λ > 0)."""
        b = self.bindings.get(name)
        return b is not None and b.anchored

    # ------------------------------------------------------------------------------- binding
    def bind(self, group: Mapping[str, Any], named: Iterable[tuple[str, Tensor]], *, where: str = "",
             when: str = "", instead: str = _PLAIN_STEPS,
             check: Callable[[Mapping[str, Binding]], None] | None = None) -> dict[str, Binding]:
        """Bind the trainable parameters `named` of `group` (`binding.bind_group`; collective for
        DTensors) and keep their bindings.

        where, when: words naming the group and the moment in the error; instead: what
        allow_unanchored=True does. check: called with the new bindings before they are kept.

        Raises:
            ValueError: a trainable parameter without a direction in a penalised group, unless
                `allow_unanchored` (and every error of `bind_group`).
        """
        bound = bind_group(named, self.anchors, self.lora, self.lora_bound, projection=group[self.keys.projection],
                           penalised=group[LAMBDA_KEY] > 0, penalty=group[self.keys.penalty])
        missing = [b.name for b in bound.values() if b.kind is Kind.PLAIN]
        if missing and not self.allow_unanchored and group[LAMBDA_KEY] > 0:
            shown = ", ".join(f"'{n}'" for n in missing[:20])
            more = f" and {len(missing) - 20} more" if len(missing) > 20 else ""
            known = ", ".join(f"'{n}'" for n in list(self.anchors)[:3])
            raise ValueError(
                f"no direction for {len(missing)} trainable parameter(s){where}{when}: {shown}{more}. The anchors "
                f"hold {len(self.anchors)} tensors (e.g. {known}). Check the names, or pass "
                f"allow_unanchored=True {instead}")
        if check is not None:
            check(bound)
        self.bindings.update(bound)
        return bound

    def lora_pairs(self, groups: Iterable[Mapping[str, Any]], also: tuple[str, ...] = ()
                   ) -> list[tuple[LoraPair, Mapping[str, Any], Tensor, Tensor]]:
        """(pair, its group, A, B) of every LoRA pair of the layout whose adapters are in `groups`.

        Raises ValueError naming the module when only one of A and B is in the groups, or when they
        are in groups with different λ, penalty, projection, maximize or `also` options.
        """
        if self.lora is None or not self.lora.pairs:
            return []
        where = {}
        for g in groups:
            for n, p in zip(g.get(self.keys.names, ()), g["params"]):
                b = self.bindings.get(n)
                if b is not None and b.pair is not None:
                    where[n] = (g, p)
        out = []
        for pair in self.lora.pairs:
            wa, wb = where.get(pair.a_name), where.get(pair.b_name)
            if wa is None and wb is None:
                continue
            if wa is None or wb is None:
                raise ValueError(f"LoRA module '{pair.module}' (adapter '{pair.adapter}'): only lora_"
                                 f"{'A' if wb is None else 'B'} is in this optimizer; AsFT needs both")
            (group, a), (group_b, b) = wa, wb
            for key in (LAMBDA_KEY, self.keys.penalty, self.keys.projection, "maximize", *also):
                if group.get(key) != group_b.get(key):
                    raise ValueError(f"LoRA module '{pair.module}': lora_A and lora_B are in param groups with "
                                     f"different {key} ({group.get(key)!r} and {group_b.get(key)!r})")
            out.append((pair, group, a, b))
        return out

    def has_lora(self, names: Iterable[str]) -> bool:
        """Whether any of the parameters named `names` is a LoRA adapter."""
        if self.lora is None:  # (LoRA bindings need a layout: no scan at every step without one)
            return False
        bindings = self.bindings
        return any((b := bindings.get(n)) is not None and b.kind in (Kind.LORA_A, Kind.LORA_B) for n in names)

    def check_any_anchored(self, who: str, advice: str) -> None:
        """Refuse an owner none of whose trainable parameters has a direction (AsFT would do nothing):
        the message starts with `who`, names a parameter and a few of the anchors' keys, and ends
        with `advice`."""
        bindings = self.bindings
        if any(b.anchored for b in bindings.values()):
            return
        known = ", ".join(f"'{n}'" for n in list(self.anchors)[:3])
        raise ValueError(f"{who}none of the optimizer's {len(bindings)} trainable parameter(s) has a direction "
                         f"(e.g. '{next(iter(bindings), '')}'; the anchors hold {len(self.anchors)} tensors, e.g. "
                         f"{known}){advice}")

    def refresh(self, groups: Sequence[Mapping[str, Any]]) -> list[bool]:
        """Bind parameters that became trainable after their group was bound, and rebind those whose
        kind changed (accelerate swaps a dense parameter for an FSDP2 DTensor after the optimizer is
        built; collective then, as every rank steps the same groups: one binding for all groups).

        Returns whether DeepSpeed ZeRO owns each group (`zero.ZeroTensors.owns`). A group whose names
        and parameter objects are those of its last full check, which then held one of its original
        parameters (so ZeRO did not own it) and whose unbound parameters still have no gradient, is
        skipped: nothing above can differ.
        """
        reshard = []
        owned = []
        names_key = self.keys.names
        for index, group in enumerate(groups):
            params, names = group["params"], group[names_key]
            seen = self._refresh_seen.get(index)
            if (seen is not None and seen.group is group and len(seen.params) == len(params)
                    and all(map(operator.is_, map(weakref.ref.__call__, seen.params), params))
                    and seen.names == names and all(params[i].grad is None for i in seen.unbound)):
                owned.append(False)
                continue
            self._refresh_seen.pop(index, None)
            owned.append(self.zero.owns(group))
            if owned[-1]:
                continue
            _dist.check_not_flattened(group, index)
            reshard += self.rebind_changed(group, when=" (they gained gradients after the optimizer was built)")
            if any(p is self.zero.param(n) for n, p in zip(names, params)):
                self._refresh_seen[index] = _GroupSeen(group, [weakref.ref(p) for p in params], list(names),
                                                [i for i, n in enumerate(names) if n not in self.bindings])
        if reshard:
            self._refresh_seen.clear()  # checked again next step, with the new bindings
            self.rebind_moved(reshard)
        return owned

    def forget_checks(self) -> None:
        """Check every group in full at the next `refresh` and `take_missing_w0` (its group dicts were
        replaced: a load)."""
        self._refresh_seen.clear()
        self._w0_seen.clear()

    def take_missing_w0(self, group: Mapping[str, Any], state: Mapping[Tensor, Any], state_steps: list[Tensor]
                        ) -> None:
        """Snapshot W0 (`take_w0`) into `state[p][keys.w0]` for every anchored parameter of `group` that
        has a gradient and no W0 yet (its first step). Skipped while `state_steps` (the group's "step"
        tensors, after the host's lazy state init) are those of the last call: the same state dicts,
        which held W0 then."""
        seen = self._w0_seen.get(id(group))
        if (seen is not None and seen[0] is group and len(seen[1]) == len(state_steps)
                and all(map(operator.is_, seen[1], state_steps))):
            return
        key = self.keys.w0
        for name, p in zip(group[self.keys.names], group["params"]):
            if p.grad is not None and self.anchored(name) and key not in state[p]:
                state[p][key] = take_w0(p)
        self._w0_seen[id(group)] = (group, list(state_steps))

    def rebind_changed(self, group: Mapping[str, Any], *, where: str = "", when: str,
                       instead: str = _PLAIN_STEPS) -> list[tuple[str, Tensor]]:
        """Bind the group's parameters that gained a gradient since it was bound (`bind`, with its
        wording); return its dense or shard parameters whose DTensor-ness changed (for
        `rebind_moved`, once for all groups)."""
        new, moved = changed_since_binding(self.bindings, group[self.keys.names], group["params"])
        if new:
            self.bind(group, new, where=where, when=when, instead=instead)
        return moved

    def rebind_moved(self, moved: Sequence[tuple[str, Tensor]]) -> None:
        """Rebind parameters that FSDP2 or accelerate swapped for DTensors or back (collective: every
        rank passes the same ones); their carried dots are dropped."""
        for name, _ in moved:
            self.dots.drop(name)
        self.bindings.update(bind_shards([(n, p) for n, p in moved if _dist.is_dtensor(p)], self.anchors, self.lora))
        self.bindings.update(bind_group([(n, p) for n, p in moved if not _dist.is_dtensor(p)], self.anchors,
                                        self.lora, self.lora_bound, projection="vector", penalised=False))

    def rebind_as_zero(self, names: Iterable[str]) -> None:
        """Rebind the dense parameters `names` as ZERO: DeepSpeed ZeRO replaced their group's tensors by
        flat partitions, which hold their direction slices and dots from now on."""
        for name in names:
            b = self.bindings.get(name)
            if b is not None and b.kind is Kind.DENSE:
                self.bindings[name] = Binding(name, Kind.ZERO, b.key)
                self.dots.drop(name)

    # ------------------------------------------------------------------------------- resume
    def check_resume(self, ours: Sequence[Mapping[str, Any]], saved: Sequence[Mapping[str, Any]]) -> None:
        """Refuse saved param groups made with other anchors, λ, penalty or projection than `ours`,
        or that name other parameters (after removing wrapper prefixes such as `module.`)."""
        k = self.keys
        checked = ((ANCHORS_KEY, "anchors (fingerprint)"), (LAMBDA_KEY, "asft_lambda"), (k.penalty, "penalty"),
                   (k.projection, "projection"))
        for i, (group, sg) in enumerate(zip(ours, saved)):
            for key, what in checked:
                if key in sg and sg[key] != group[key]:
                    raise ValueError(f"cannot resume: param group {i} of the checkpoint was made with {what} "
                                     f"{sg[key]!r}, this optimizer has {group[key]!r}")
            theirs = sg.get(k.names)
            if theirs is not None and len(theirs) == len(group[k.names]):
                for mine, other in zip(group[k.names], theirs):
                    if normalize_name(mine) != normalize_name(other):
                        raise ValueError(f"cannot resume: param group {i} of the checkpoint names a parameter "
                                         f"'{other}' where this optimizer has '{mine}'")

    def restore_w0(self, groups: Sequence[Mapping[str, Any]], state: Mapping[Tensor, Any], *,
                   penalised_only: bool, hint: str, stacklevel: int) -> None:
        """After a load: put W0 back in its storage dtype (the load cast it to the parameter's), and
        warn about anchored parameters that have state but no W0 (`penalised_only`: in λ > 0 groups
        only; `hint`: the likely cause, in the warning)."""
        key = self.keys.w0
        no_w0 = []
        for group in groups:
            for name, p in zip(group[self.keys.names], group["params"]):
                st = state.get(p)
                if not st:
                    continue
                if key in st:
                    if not _dist.is_dtensor(st[key]):
                        st[key] = storage_w0(st[key])
                elif self.anchored(name) and (group[LAMBDA_KEY] > 0 or not penalised_only):
                    no_w0.append(name)
        if no_w0:
            warnings.warn(f"AsFT: the checkpoint holds optimizer state but no W0 for {len(no_w0)} anchored "
                          f"parameter(s) (e.g. '{no_w0[0]}'; {hint}): W0 is taken at their first step after "
                          "this load, so ΔW counts from there", stacklevel=stacklevel + 1)

    def invalidate(self) -> None:
        """Forget every carried dot (after a load, `resync()`)."""
        self.dots.invalidate()

    # ------------------------------------------------------------------------------- drift
    def stepped(self, groups: Iterable[Mapping[str, Any]], state: Mapping[Tensor, Any]
                ) -> Iterator[tuple[Binding, Tensor, Tensor]]:
        """(binding, parameter, W0) of every anchored whole, shard or LoRA parameter that has a W0."""
        for group in groups:
            for name, p in zip(group.get(self.keys.names, ()), group["params"]):
                b = self.bindings.get(name)
                st = state.get(p)
                if b is not None and b.anchored and b.kind is not Kind.ZERO and st and self.keys.w0 in st:
                    yield b, p, st[self.keys.w0]

    @torch.no_grad()
    def drift_sums(self, groups: Sequence[Mapping[str, Any]], state: Mapping[Tensor, Any], by: str
                   ) -> dict[str, DriftSums]:
        """`stepped_drift_sums` of the stepped parameters of `groups`, then those of the ZeRO
        partitions; keyed by direction key (by="key") or parameter name (by="name"). Collective
        under FSDP2 and DeepSpeed ZeRO."""
        where = {n: p for g in groups for n, p in zip(g.get(self.keys.names, ()), g["params"])}
        out = stepped_drift_sums(self.stepped(groups, state), self.bindings, self.lora, where, by)
        if self.zero.partitions:  # collective once any partition is bound
            zero = self.zero.drift_sums(partition_w0s(self.zero, state))
            out.update({(n if by == "name" else _key(self.bindings[n])): s for n, s in zero.items()})
        return out


@torch.no_grad()
def stepped_drift_sums(stepped: Iterable[tuple[Binding, Tensor, Tensor]], bindings: Mapping[str, Binding],
                       lora: LoraLayout | None, where: Mapping[str, Tensor], by: str) -> dict[str, DriftSums]:
    """Drift sums of stepped anchored parameters.

    stepped: (binding, parameter, W0) per parameter that has a W0: whole tensors directly, DTensor
    shards summed over ranks (`distributed.shard_drift_sums`; collective when any is a DTensor),
    LoRA adapters as their pair's effective update (`lora.pairs_drift_sums`; `bindings` and
    `where`: every parameter's binding and tensor by name). Keyed by the direction's key (by="key")
    or the parameter name (by="name"); LoRA pairs by their base weight either way.
    """
    out: dict[str, DriftSums] = {}
    shards: list[tuple[Binding, Tensor, Tensor]] = []
    lora_w0: dict[str, Tensor] = {}
    for b, p, w0 in stepped:
        if b.kind in (Kind.LORA_A, Kind.LORA_B):
            lora_w0[b.name] = w0
        elif b.kind is Kind.SHARD:
            shards.append((b, p, w0))
        else:
            bound = b.direction_on(p.device)
            xx, uu, xu, n = sums(p.detach().double() - w0.double(), bound.v)
            out[b.name if by == "name" else _key(b)] = DriftSums(xx, uu * bound.scale ** 2, xu * bound.scale, n)
    summed = _dist.shard_drift_sums([(p, w0, b.direction_on(_dist.local(p).device)) for b, p, w0 in shards])
    out.update({(b.name if by == "name" else _key(b)): s for (b, _, _), s in zip(shards, summed)})
    out.update(pairs_drift_sums(lora, where, lora_w0, bindings))
    return out


def _key(b: Binding) -> str:
    assert b.key is not None, b.name  # an anchored binding has its direction's key
    return b.key


class RecordsView:
    """What `AsFTAdamW` and `AsFTPenalty` show of their `records` as attributes."""

    records: ParamRecords

    @property
    def anchors(self) -> Anchors:
        """The directions (`Anchors`)."""
        return self.records.anchors

    @property
    def allow_unanchored(self) -> bool:
        """Whether trainable parameters without a direction step without a penalty (plain steps of the
        optimizer) instead of raising."""
        return self.records.allow_unanchored

    @allow_unanchored.setter
    def allow_unanchored(self, value: bool) -> None:
        self.records.allow_unanchored = value
