"""`attach`: the AsFT penalty on any `torch.optim.Optimizer`, added to `.grad` before each of its steps.

Any optimizer that steps on g̃ = g + 2λ·R(ΔW) follows its own trajectory on the explicit loss
L_task + λ‖R(ΔW)‖² (R = C⊥ΔW by default; see `asft_optim.functional`). `attach` registers a step
pre-hook that adds 2λ·R to the gradients of the parameters the optimizer holds, so torch's
optimizers, transformers' Adafactor, bitsandbytes' 8-bit and paged optimizers, torchao's low-bit
AdamW, schedule-free and Lion keep their class, state and update rule.

Where the state lives (the same places as for `AsFTAdamW`, inside the host optimizer):

- `optimizer.state[p]["asft_w0"]`: W0, the parameter before its first step (bf16 where exact;
  a DTensor sharded like p under FSDP2). Saved by the optimizer's own `state_dict()`.
- param group keys `asft_lambda`, `asft_penalty`, `asft_projection` (per group; set them in the
  group dicts before `attach` to differ per group), `asft_anchors` (the anchors fingerprint) and
  `asft_param_names` (the names that bind directions, from `model`). Saved with the groups; a
  checkpoint made with other anchors, λ, penalty, projection or names is refused.
- the `AsFTPenalty` handle's `records` (`records.ParamRecords`, the same owner `AsFTAdamW` holds):
  one `binding.Binding` per name (kind, direction key, bound direction, LoRA pair). ⟨v, ΔW⟩ is
  computed exactly at every step (one read of p, W0 and v per tensor), so no dot is carried.

bitsandbytes' optimizers override `load_state_dict` without torch's hooks: a load is noticed at
the next step (the optimizer's `state` dict is a new object after any `load_state_dict`), and the
resume checks run then.
"""

from __future__ import annotations

import os
import weakref
from collections.abc import Mapping
from typing import Any, cast

import torch
from torch import Tensor, nn

from . import distributed as _dist
from .anchors import Anchors, as_anchors
from .binding import Binding, Kind
from .functional import (
    PENALTIES,
    BoundDirection,
    Penalty,
    _penalised_piece,
    dense_flat,
    exact_dots,
    penalty_coef,
    penalty_reference,
)
from .lora import PROJECTIONS, lora_layout, lora_penalty_grads
from .metrics import Drift, DriftSums, drift_from_sums
from .records import ANCHORS_KEY, GroupKeys, ParamRecords, RecordsView, take_w0

__all__ = ["AsFTPenalty", "attach", "attached", "W0_KEY"]

W0_KEY = "asft_w0"
NAMES_KEY = "asft_param_names"
# attach's keys: prefixed, so that they cannot clash with the host optimizer's own
KEYS = GroupKeys(names=NAMES_KEY, penalty="asft_penalty", projection="asft_projection", w0=W0_KEY)
# per group option → the attach() argument that gives its default
OPTION_KEYS: dict[str, str] = {"asft_lambda": "asft_lambda", "asft_penalty": "penalty",
                               "asft_projection": "projection"}
_UNANCHORED = "to step these parameters without a penalty"
_PIECE = 1 << 19  # elements per piece of the gradient update: pieces stay in cache
_REGISTRY: weakref.WeakKeyDictionary[torch.optim.Optimizer, AsFTPenalty] = weakref.WeakKeyDictionary()


def attach(optimizer: torch.optim.Optimizer, model: nn.Module, *,
           anchors: Anchors | Mapping[str, Tensor] | str | os.PathLike, asft_lambda: float = 1.0,
           penalty: str = "orthogonal", projection: str = "vector", allow_unanchored: bool = False
           ) -> AsFTPenalty:
    """Add the AsFT penalty gradient to `optimizer`'s gradients before each of its steps.

    Args:
        optimizer: any `torch.optim.Optimizer` over (some of) `model`'s parameters (wrappers such as
            accelerate's `AcceleratedOptimizer` are followed to the optimizer inside). Build it, and
            attach, before `accelerator.prepare`/FSDP2 swap parameter objects: groups keep the names.
        model: the module whose `named_parameters()` name the optimizer's parameters (and whose
            peft LoRA layers give the LoRA pairs, scaling and layout; QLoRA bases included).
        anchors: `Anchors`, a `{name: d}` mapping or a directions file path.
        asft_lambda: λ ≥ 0; the default of every param group without an `asft_lambda` key.
        penalty: "orthogonal" (AsFT), "parallel" or "full" (L2-SP); group key `asft_penalty`.
        projection: "vector" or "reference" (LoRA only); group key `asft_projection`.
        allow_unanchored: trainable parameters without a direction step without a penalty instead of
            raising.

    Returns:
        The `AsFTPenalty` handle: `drift()`, `drift_sums()`, `resync()`, `detach()`.

    Raises:
        ValueError: an option out of range, a parameter the model does not name, a trainable
            parameter without a direction (unless allowed), no parameter with a direction at all, an
            optimizer that already has a penalty (an `AsFTAdamW`, or attached before).
    """
    inner = innermost(optimizer)
    if "asft_lambda" in inner.defaults:  # AsFTAdamW (the optimizer module is above this one)
        raise TypeError(f"attach: the optimizer is an {type(inner).__name__}, which adds the AsFT penalty itself")
    if inner in _REGISTRY:
        raise ValueError("attach: this optimizer already has an AsFT penalty attached (detach() it first)")
    return AsFTPenalty(inner, model, as_anchors(anchors), defaults={"asft_lambda": asft_lambda, "asft_penalty":
                       penalty, "asft_projection": projection}, allow_unanchored=allow_unanchored)


def innermost(optimizer: Any) -> torch.optim.Optimizer:
    """The optimizer inside wrappers that hold it as `.optimizer` (accelerate, DeepSpeed engines)."""
    for _ in range(8):
        inner = getattr(optimizer, "optimizer", None)
        if not isinstance(inner, torch.optim.Optimizer):
            break
        optimizer = inner
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(f"attach: expected a torch.optim.Optimizer, got {type(optimizer).__name__}")
    return optimizer


def attached(optimizer: Any) -> AsFTPenalty | None:
    """The `AsFTPenalty` attached to `optimizer` (or to the optimizer inside its wrappers), or None."""
    for _ in range(8):
        if optimizer is None:
            return None
        try:
            found = _REGISTRY.get(optimizer)
        except TypeError:  # not weak-referenceable
            found = None
        if found is not None:
            return found
        optimizer = getattr(optimizer, "optimizer", None)
    return None


def _check_options(group: Mapping[str, Any], index: int) -> None:
    lam = group["asft_lambda"]
    if isinstance(lam, Tensor):
        lam = float(lam)
    if not isinstance(lam, (int, float)) or not lam >= 0 or lam == float("inf"):
        raise ValueError(f"Invalid asft_lambda value: {group['asft_lambda']} (param group {index})")
    if group["asft_penalty"] not in PENALTIES:
        raise ValueError(f"Invalid penalty: {group['asft_penalty']!r} (param group {index}); expected one of "
                         f"{PENALTIES}")
    if group["asft_projection"] not in PROJECTIONS:
        raise ValueError(f"Invalid projection: {group['asft_projection']!r} (param group {index}); expected "
                         f"one of {PROJECTIONS}")


class AsFTPenalty(RecordsView):
    """What AsFT knows about the parameters of one optimizer, and the hooks that apply it.

    Made by `attach`. Attributes:
        optimizer: the host optimizer (its class unchanged).
        records: what AsFT knows per parameter (`records.ParamRecords`: bindings, LoRA pairs).
        lambda_scale: multiplies every group's λ at the next steps (1.0; the Trainer's
            `lambda_per_micro_batch` sets it around a step without touching the saved λ).
    """

    def __init__(self, optimizer: torch.optim.Optimizer, model: nn.Module, anchors: Anchors, *,
                 defaults: dict[str, Any], allow_unanchored: bool) -> None:
        self.optimizer = optimizer
        self.lambda_scale = 1.0
        self._defaults = defaults
        self._model = weakref.ref(model)
        layout = lora_layout(model)
        self.records = ParamRecords(anchors, layout if (layout.pairs or layout.aliases) else None,
                                    allow_unanchored=allow_unanchored, keys=KEYS)
        self._pending: dict[str, tuple[Tensor, Tensor]] = {}  # name → (param, W0) until its state exists
        self._record: list[dict[str, Any]] = []  # each group's own keys, as of the last step
        try:
            for index, group in enumerate(optimizer.param_groups):
                self._adopt(group, index)
            self.records.check_any_anchored("attach: ", ". Check the names, or do not attach")
        except Exception:
            self._strip_groups()  # a failed attach leaves the optimizer as it was
            raise
        self._state_ref = optimizer.state
        self._record_groups()
        # The penalty must be added to unscaled gradients: let GradScaler unscale before step().
        self._amp_scaling = getattr(optimizer, "_step_supports_amp_scaling", False)
        if self._amp_scaling:
            optimizer._step_supports_amp_scaling = False  # type: ignore[attr-defined]
        self._hooks = [optimizer.register_step_pre_hook(self._pre_step),
                       optimizer.register_step_post_hook(self._post_step),
                       optimizer.register_load_state_dict_pre_hook(self._pre_load),
                       optimizer.register_load_state_dict_post_hook(self._post_load)]
        _REGISTRY[optimizer] = self

    # ------------------------------------------------------------------------------- groups
    def _adopt(self, group: dict[str, Any], index: int) -> None:
        """Give a param group its AsFT keys and names, and bind its parameters."""
        for key, value in self._defaults.items():
            group.setdefault(key, value)
        _check_options(group, index)
        group["asft_lambda"] = float(group["asft_lambda"])
        group[ANCHORS_KEY] = self.anchors.fingerprint
        model = self._model()
        if model is None:
            raise RuntimeError(f"AsFT: param group {index} has no parameter names and the model given to attach "
                               "no longer exists")
        names = {id(p): n for n, p in model.named_parameters()}  # tied weights: the first name, as from_model
        group_names = []
        for p in group["params"]:
            name = names.get(id(p))
            if name is None:
                raise ValueError(f"attach: param group {index} holds a parameter of shape {tuple(p.shape)} that the "
                                 "model does not have (attach with the model the optimizer was built on, before "
                                 "wrappers replace its parameters)")
            group_names.append(name)
        group[NAMES_KEY] = group_names
        self.records.bind(group, zip(group_names, group["params"]), where=f" of param group {index}",
                          instead=_UNANCHORED)

    def _refresh(self) -> None:
        """Adopt groups added after attach; bind parameters that became trainable; rebind parameters
        that accelerate/FSDP2 swapped for DTensors (or back). Collective when DTensors are rebound."""
        reshard: list[tuple[str, Tensor]] = []
        for index, group in enumerate(self.optimizer.param_groups):
            if NAMES_KEY not in group:
                self._adopt(group, index)
                continue
            names, params = group[NAMES_KEY], group["params"]
            if len(names) != len(params):
                raise RuntimeError(
                    f"AsFT: param group {index} holds {len(params)} tensor(s) but {len(names)} parameter name(s): "
                    "its parameters were replaced after attach (DeepSpeed ZeRO flattens them into partitions, which "
                    "attach does not follow: use AsFTAdamW as ZeRO's client optimizer)")
            reshard += self.records.rebind_changed(group, where=f" of param group {index}",
                                                   when=" (they gained gradients after attach)", instead=_UNANCHORED)
        if reshard:
            self.records.rebind_moved(reshard)

    def _record_groups(self) -> None:
        self._record = [{k: g[k] for k in (*OPTION_KEYS, ANCHORS_KEY, NAMES_KEY)} for g in self.optimizer.param_groups]

    # ------------------------------------------------------------------------------- resume
    def _check_saved_groups(self, saved: list[dict[str, Any]]) -> None:
        """Refuse groups of a checkpoint made with other anchors, λ, penalty, projection or names."""
        self.records.check_resume(self._record, saved)

    def _pre_load(self, optimizer: torch.optim.Optimizer, state_dict: dict[str, Any]) -> None:
        self._record_groups()
        self._check_saved_groups(state_dict["param_groups"])

    def _post_load(self, optimizer: torch.optim.Optimizer) -> None:
        self._after_load()

    def _after_load(self) -> None:
        """After any `load_state_dict` (seen by torch's hook, or at the next step): check the loaded
        groups, put back this optimizer's AsFT keys, restore W0's storage dtype."""
        groups = self.optimizer.param_groups
        self._check_saved_groups(groups)
        for group, own in zip(groups, self._record):
            group.update(own)
        self._pending.clear()
        self.records.restore_w0(groups, self.optimizer.state, penalised_only=True, hint="saved without attach?",
                                stacklevel=3)
        self._state_ref = self.optimizer.state

    def resync(self) -> None:
        """Re-read what the optimizer holds before the next step: re-run the resume checks and W0
        restoring of a load (call after replacing `optimizer.state` or param groups by hand) and
        rebind swapped parameters. The dots are exact at every step: nothing else is carried."""
        self._state_ref = None  # type: ignore[assignment]

    def detach(self) -> None:
        """Remove the hooks, the AsFT group keys and W0 from the optimizer: it is bare again."""
        for h in self._hooks:
            h.remove()
        self._hooks = []
        self._strip_groups()
        for group in self.optimizer.param_groups:
            for p in group["params"]:
                st = self.optimizer.state.get(p)
                if st:
                    st.pop(W0_KEY, None)
        self._pending.clear()
        if self._amp_scaling:
            self.optimizer._step_supports_amp_scaling = True  # type: ignore[attr-defined]
        _REGISTRY.pop(self.optimizer, None)

    def _strip_groups(self) -> None:
        for group in self.optimizer.param_groups:
            for key in (*OPTION_KEYS, ANCHORS_KEY, NAMES_KEY):
                group.pop(key, None)

    # ------------------------------------------------------------------------------- step
    def _pre_step(self, optimizer: torch.optim.Optimizer, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        """Step pre-hook. `args` are the arguments of `step` with the optimizer first; a closure is
        wrapped so that every evaluation adds the penalty at the parameters it was evaluated at."""
        closure = kwargs.get("closure", args[1] if len(args) > 1 else None)
        if closure is None:
            self.add_penalty_grads()
            return None
        first = [True]

        def penalised_closure() -> Any:
            loss = closure()
            self.add_penalty_grads(snapshot=first[0])
            first[0] = False
            return loss

        if len(args) > 1:
            return (args[0], penalised_closure, *args[2:]), kwargs
        return args, {**kwargs, "closure": penalised_closure}

    def _post_step(self, optimizer: torch.optim.Optimizer, args: tuple, kwargs: dict) -> None:
        for p, w0 in self._pending.values():  # the optimizer has made its state for p now
            self.optimizer.state[p][W0_KEY] = w0
        self._pending.clear()
        self._record_groups()

    @torch.no_grad()
    def add_penalty_grads(self, snapshot: bool = True) -> None:
        """grad += 2λ·R(ΔW) for every penalised parameter of the optimizer (what the step pre-hook
        does). A penalised parameter with W0 and no gradient gets the penalty alone (its task
        gradient is 0 on the explicit loss). `snapshot`: take W0 of parameters stepping first now."""
        opt = self.optimizer
        if opt.state is not self._state_ref:
            self._after_load()
        self._refresh()
        dense: list[tuple[str, Tensor, Tensor, Binding, float, Penalty]] = []
        lora: dict[str, Tensor | None] = {}  # LoRA adapter → its W0
        for index, group in enumerate(opt.param_groups):
            _check_options(group, index)
            lam = group["asft_lambda"] * self.lambda_scale
            coef = penalty_coef(lam, group.get("maximize", False))
            for name, p in zip(group[NAMES_KEY], group["params"]):
                b = self.records.binding(name)
                if b is None or not b.anchored:
                    continue
                w0 = self._w0(name, p, snapshot)
                if b.kind in (Kind.LORA_A, Kind.LORA_B):
                    lora[name] = w0
                    continue
                if w0 is None or lam == 0:
                    continue  # first step: ΔW = 0
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
                dense.append((name, p, w0, b, coef, group["asft_penalty"]))
        if dense:
            self._dense_grads(dense)
        if lora:
            self._lora_grads(lora)

    def _w0(self, name: str, p: Tensor, snapshot: bool) -> Tensor | None:
        """W0 of p: from its state, pending, or (with a gradient, `snapshot`) taken now."""
        st = self.optimizer.state.get(p)
        if st and W0_KEY in st:
            return st[W0_KEY]
        pending = self._pending.get(name)
        if pending is not None and pending[0] is p:
            return pending[1]
        if p.grad is None or not snapshot:
            return None
        w0 = take_w0(p)
        if st:  # the optimizer has state for p already (attached mid-run): W0 goes in now
            st[W0_KEY] = w0
        else:
            self._pending[name] = (p, w0)
        return None  # ΔW = 0 at this step

    def _dense_grads(self, rows: list[tuple[str, Tensor, Tensor, Binding, float, Penalty]]) -> None:
        """Dense tensors and FSDP2 shards: exact ⟨v, ΔW⟩ (one all-reduce of the shards' partial dots),
        then grad += coef·R: small fp32 CPU tensors together with foreach ops, the rest piece by piece."""
        locals_ = [_dist.local(p) for _, p, _, _, _, _ in rows]
        w0s = [_dist.local(w0) for _, _, w0, _, _, _ in rows]
        dirs = [b.direction_on(q.device) for (_, _, _, b, _, _), q in zip(rows, locals_)]
        grads = [_dist.local(cast(Tensor, p.grad)) for _, p, _, _, _, _ in rows]  # (every row has a gradient)
        need = [i for i, (_, _, _, _, _, pen) in enumerate(rows) if pen != "full" and not dirs[i].is_null]
        dots: dict[int, Tensor] = {}
        if need:
            by_device: dict[torch.device, list[int]] = {}
            for i in need:
                by_device.setdefault(locals_[i].device, []).append(i)
            for idx in by_device.values():
                vec = exact_dots([locals_[i] for i in idx], [w0s[i] for i in idx], [dirs[i] for i in idx])
                vec = _dist.all_reduce_dots([rows[i][1] for i in idx], vec)
                dots.update(zip(idx, vec.unbind()))
        batched: dict[tuple[float, Penalty], list[int]] = {}
        for i, (_, _, _, _, coef, pen) in enumerate(rows):
            if _foreach_ok(grads[i], locals_[i], w0s[i], dirs[i].v):
                batched.setdefault((coef, pen), []).append(i)
            else:
                add_penalty_(grads[i], locals_[i], w0s[i], dirs[i], dots.get(i), coef, pen)
        for (coef, pen), idx in batched.items():
            cs = [0.0 if i not in dots else float(dots[i]) * dirs[i].inv_nv2 for i in idx]
            add_penalty_foreach_([grads[i] for i in idx], [locals_[i] for i in idx], [w0s[i] for i in idx],
                                 [dirs[i].v for i in idx], cs, coef, pen)

    def _lora_grads(self, w0s: dict[str, Tensor | None]) -> None:
        """Each LoRA pair's penalty gradients from the pre-step A and B (A0, B0 = W0: `w0s` by name,
        None before their first step, when they are the current values)."""
        for pair, group, a, b in self.records.lora_pairs(self.optimizer.param_groups):
            a0, b0 = w0s[pair.a_name], w0s[pair.b_name]
            lam = group["asft_lambda"] * self.lambda_scale
            if lam == 0 or (a0 is None and b0 is None):
                continue  # ΔW = 0 before the pair's first step
            coef = penalty_coef(lam, group.get("maximize", False))
            g_a, g_b = lora_penalty_grads(a.detach(), b.detach(), a if a0 is None else a0, b if b0 is None else b0,
                                          self.records.bindings[pair.a_name].direction_on(a.device), pair, coef,
                                          group["asft_penalty"], group["asft_projection"])
            for p, g in ((a, g_a), (b, g_b)):
                if p.grad is None:
                    p.grad = g.to(p.dtype)
                else:
                    p.grad.add_(g)

    # ------------------------------------------------------------------------------- drift
    @torch.no_grad()
    def drift_sums(self) -> dict[str, DriftSums]:
        """(‖ΔW‖², ‖d‖², ⟨ΔW, d⟩, numel) in float64 per anchored tensor that has stepped, keyed by its
        direction's name (LoRA pairs as their base weight, `name@adapter` when several adapters of
        one module train). Collective under FSDP2."""
        return self.records.drift_sums(self.optimizer.param_groups, self.optimizer.state, by="key")

    @torch.no_grad()
    def drift(self) -> dict[str, Drift]:
        """Per-tensor drift (‖ΔW‖, cos(ΔW, d), ‖C⊥ΔW‖/‖ΔW‖) by parameter name (LoRA pairs by their base
        weight's name). Collective under FSDP2."""
        by_name = self.records.drift_sums(self.optimizer.param_groups, self.optimizer.state, by="name")
        return {name: drift_from_sums(*s) for name, s in by_name.items()}


_FOREACH_MAX = 1 << 13  # elements: smaller fp32 CPU tensors take `add_penalty_foreach_` together


def _foreach_ok(grad: Tensor, p: Tensor, w0: Tensor, v: Tensor) -> bool:
    """Small fp32 CPU tensors, all four of one dtype: their temporaries are small, their count large."""
    return (p.device.type == "cpu" and p.numel() <= _FOREACH_MAX and p.dtype == torch.float32
            and grad.dtype == w0.dtype == v.dtype == torch.float32 and grad.shape == p.shape)


@torch.no_grad()
def add_penalty_foreach_(grads: list[Tensor], params: list[Tensor], w0s: list[Tensor], vs: list[Tensor],
                         cs: list[float], coef: float, penalty: str) -> None:
    """grads[i] += coef·R_i with foreach ops (whole-tensor fp32 temporaries: for small tensors).

    cs: c_i = ⟨v, ΔW⟩/‖v‖² per tensor as Python floats (0.0 where R does not need it).
    """
    if penalty == "parallel":
        r = torch._foreach_mul(vs, cs)
    else:
        r = torch._foreach_sub(params, w0s)
        if penalty == "orthogonal":
            torch._foreach_add_(r, torch._foreach_mul(vs, [-c for c in cs]))
    torch._foreach_add_(grads, r, alpha=coef)


@torch.no_grad()
def add_penalty_(grad: Tensor, p: Tensor, w0: Tensor, bound: BoundDirection, dot: Tensor | None, coef: float,
                 penalty: Penalty, piece: int = _PIECE) -> None:
    """grad ← grad + coef·R in place (see `functional`), in fp32 per piece of `piece` elements (no
    whole-tensor temporary) when grad, p, W0 and v share one dense layout, else with whole-tensor
    fp32 temporaries.

    dot: ⟨v, ΔW⟩ (0-d fp32; for a shard the global one), or None where R does not need it (penalty
    "full", a zero direction).
    """
    c = None if dot is None or penalty == "full" or bound.is_null else dot * bound.inv_nv2
    flats = [dense_flat(x) for x in (grad, p, w0, bound.v)]
    if any(f is None for f in flats) or not all(x.stride() == p.stride() for x in (grad, w0, bound.v)):
        r = penalty_reference(p, w0, bound, penalty, dot if dot is not None else torch.zeros((), device=p.device))
        grad.copy_((grad.float() + coef * r).to(grad.dtype))
        return
    fg, fp, fw0, fv = cast(list[Tensor], flats)
    n = fp.numel()
    t = torch.empty(min(n, piece), device=p.device, dtype=torch.float32)
    for lo in range(0, n, piece):
        hi = min(n, lo + piece)
        g = fg[lo:hi]
        _penalised_piece(g, g, fp[lo:hi], fw0[lo:hi], fv[lo:hi], t[: hi - lo], c, coef, penalty)

