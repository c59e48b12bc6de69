"""`AsFTAdamW`: torch.optim.AdamW plus the AsFT penalty gradient 2λ·C⊥ΔW, added before the moments.

AdamW on g̃ = g + 2λ·R(ΔW) follows exactly the trajectory of AdamW on L_task + λ‖R(ΔW)‖², where
ΔW = W - W0, W0 is the parameter at its first step and R is chosen by `penalty` (see
`asft_optim.functional`). Directions are bound to parameters by name, never by object identity.
"""

from __future__ import annotations

import functools
import importlib.util
import math
import warnings
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import Tensor, nn
from torch.optim.adam import adam

from . import distributed as _dist
from .anchors import Anchors, normalize_name
from .functional import (PENALTIES, BoundDirection, bind_direction, dense_flat, penalised_grads_,
                         penalised_grads_reference)
from .functional import asft_adamw_, partial_dots
from .lora import (PROJECTIONS, LoraLayout, LoraPair, bind_lora_direction, is_lora_name, lora_drift_sums,
                   lora_layout, lora_penalty_grads, lora_penalty_grads_reference)
from .metrics import Drift, drift, drift_from_sums, sums

__all__ = ["AsFTAdamW", "IMPLS"]

IMPLS: tuple[str, ...] = ("torch", "reference", "triton")
_ASFT_KEYS = ("asft_lambda", "penalty", "impl")
_MISSING = object()


def _check_number(value: Any, what: str, wording: str) -> None:
    if isinstance(value, Tensor):
        value = float(value)
    if not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise ValueError(f"{wording}: {value}")


def storage_w0(w: Tensor) -> Tensor:
    """W0 in bf16 when fp32 → bf16 is exact for every element, else unchanged (same strides)."""
    if w.dtype == torch.float32:
        b = w.to(torch.bfloat16)
        if torch.equal(b.float(), w):
            return b
    return w


@functools.cache
def _triton_importable() -> bool:
    return importlib.util.find_spec("triton") is not None


def _triton_signature(group: dict[str, Any]) -> tuple | None:
    """What a cached impl="triton" launch plan depends on: the options that shape it, which
    parameters have gradients, and the addresses and layouts of those parameters and gradients
    (None for a sparse gradient: the full path reports it)."""
    entries = []
    for p in group["params"]:
        g = p.grad
        if g is None:
            entries.append(None)
        elif g.layout != torch.strided:
            return None
        else:
            entries.append((p.data_ptr(), g.data_ptr(), g.stride(), g.dtype))
    return group["asft_lambda"], group["penalty"], group["amsgrad"], tuple(entries)


def _triton_hyper(group: dict[str, Any]) -> dict[str, Any]:
    """A group's hyper-parameters as the fused kernel takes them (read at every step; a tensor lr
    or beta is read with float(), a host sync when it lives on the GPU)."""
    lr, (beta1, beta2) = group["lr"], group["betas"]
    return dict(lr=float(lr), beta1=float(beta1), beta2=float(beta2), eps=group["eps"],
                weight_decay=group["weight_decay"], amsgrad=group["amsgrad"], maximize=group["maximize"],
                coef=(-2.0 if group["maximize"] else 2.0) * group["asft_lambda"])


def _increment_steps(buf: Tensor, positions: Tensor | None) -> list[float]:
    """Add 1 to the step counts at `positions` (all when None) of a group's step buffer; return all."""
    if positions is None:
        buf.add_(1)
    else:
        buf.index_add_(0, positions, torch.ones(positions.numel(), dtype=buf.dtype))
    return buf.tolist()


class AsFTAdamW(torch.optim.AdamW):
    r"""AdamW with the AsFT regulariser λ‖C⊥(W - W0)‖² folded into its gradient.

    All `torch.optim.AdamW` arguments keep their meaning and defaults. AsFT options (keyword-only):

    Args:
        params: `model.named_parameters()`, a list of `(name, tensor)` pairs, or param groups of
            them (`{"params": named, "asft_lambda": 0.0}`). Names bind the directions.
        anchors: `Anchors` (or a `{name: d}` mapping) with d = W_aligned - W_base per parameter.
        asft_lambda: λ ≥ 0, per group; 0 turns the penalty off for the group.
        penalty: "orthogonal" (AsFT, penalises C⊥ΔW), "parallel" (penalises the part along d: the
            paper's ablation, and AsFT_Alt when d is a harmful direction) or "full" (L2-SP).
        impl: "torch" (fast PyTorch path; `foreach`/`fused` pick torch's AdamW kernel), "reference"
            (slow, obvious; the tests' oracle twin), "triton" (fused kernels on CUDA), or None (triton
            on CUDA when available, else torch).
        allow_unanchored: let trainable parameters without a direction take plain AdamW steps
            instead of raising.
        projection: "vector" (the paper's Eq. 3, d flattened; the default) or "reference" (the
            paper's released code: C = d·dᵀ/‖d‖_F on the LoRA product B·A; LoRA adapters only).
            Per group.
        lora: the model's `LoraLayout` (pairs lora_A/lora_B with the base weight's direction and
            reads the LoRA scaling). Filled in by `AsFTAdamW.from_model`, which is the way to build
            the optimizer for a peft model; named LoRA parameters without it are an error.

    Notes:
        W0 is each parameter's value at its first step, kept in the optimizer state (bf16 where
        exact). The penalty gradient is added inside `step()`: gradient clipping done before it does
        not see the penalty. `differentiable=True` is not supported. With a `GradScaler` the
        optimizer always lets the scaler unscale and skip inf steps (it never takes `grad_scale`).
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
        anchors: Anchors | Mapping[str, Tensor],
        asft_lambda: float = 1.0,
        penalty: str = "orthogonal",
        impl: str | None = None,
        allow_unanchored: bool = False,
        projection: str = "vector",
        lora: LoraLayout | None = None,
    ) -> None:
        _check_number(lr, "lr", "Invalid learning rate")
        _check_number(eps, "eps", "Invalid epsilon value")
        _check_number(weight_decay, "weight_decay", "Invalid weight_decay value")
        if differentiable:
            raise ValueError("AsFTAdamW does not support differentiable=True")
        if isinstance(anchors, Mapping) and not isinstance(anchors, Anchors):
            anchors = Anchors.from_tensors(anchors)
        if not isinstance(anchors, Anchors):
            raise TypeError(f"anchors must be an Anchors or a mapping of name to tensor, got {type(anchors).__name__}")
        self.anchors = anchors
        self.allow_unanchored = allow_unanchored
        self._asft_defaults = {"asft_lambda": asft_lambda, "penalty": penalty, "impl": impl,
                               "projection": projection}
        self._lora = lora
        self._lora_bound: dict[str, BoundDirection] = {}
        self._lora_pending: dict[str, Tensor] = {}
        self._bound: dict[str, BoundDirection | None] = {}
        self._dots: dict[str, tuple[Tensor, int]] = {}  # name -> (⟨v, p - W0⟩, p._version) after the last step
        self._workspace: dict[tuple[torch.device, torch.dtype], Tensor] = {}
        self._sharded: set[str] = set()  # names bound as DTensor shards
        super().__init__(params, lr, betas, eps, weight_decay, amsgrad, maximize=maximize,
                         foreach=foreach, capturable=capturable, differentiable=differentiable,
                         fused=fused)
        self.defaults.update(self._asft_defaults)
        # The penalty must be added to unscaled gradients: GradScaler unscales and skips for us.
        self._step_supports_amp_scaling = False

    # ------------------------------------------------------------------------------- groups
    def add_param_group(self, param_group: dict[str, Any]) -> None:
        for key, value in self._asft_defaults.items():
            param_group.setdefault(key, value)
        lam = param_group["asft_lambda"]
        _check_number(lam, "asft_lambda", "Invalid asft_lambda value")
        param_group["asft_lambda"] = float(lam)
        if param_group["penalty"] not in PENALTIES:
            raise ValueError(f"Invalid penalty: {param_group['penalty']!r}; expected one of {PENALTIES}")
        if param_group["projection"] not in PROJECTIONS:
            raise ValueError(f"Invalid projection: {param_group['projection']!r}; expected one of {PROJECTIONS}")
        if param_group["impl"] is not None and param_group["impl"] not in IMPLS:
            raise ValueError(f"Invalid impl: {param_group['impl']!r}; expected one of {IMPLS} or None")
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        if "param_names" not in group:
            raise ValueError("AsFTAdamW binds directions to parameters by name: pass "
                             "model.named_parameters() or (name, tensor) pairs, not bare tensors")
        group["asft_anchors"] = self.anchors.fingerprint
        self._bind_group(group)

    def _bind_group(self, group: dict[str, Any]) -> None:
        """Bind the directions of a group's trainable parameters; raise for missing ones."""
        missing, zero = [], []
        self._bind_sharded_group(group)
        lora_names = self._bind_lora_group(group)
        for name, p in zip(group["param_names"], group["params"]):
            if p.is_complex():
                raise ValueError(f"AsFTAdamW does not support complex parameters: '{name}' is {p.dtype}")
            if not p.requires_grad or name in lora_names:
                continue
            bound = self._direction(name, p)
            if bound is None:
                missing.append(name)
            elif bound.is_zero:
                zero.append(name)
        if missing and not self.allow_unanchored and group["asft_lambda"] > 0:
            shown = ", ".join(f"'{n}'" for n in missing[:20])
            more = f" and {len(missing) - 20} more" if len(missing) > 20 else ""
            known = ", ".join(f"'{n}'" for n in list(self.anchors)[:3])
            raise ValueError(
                f"no direction for {len(missing)} trainable parameter(s): {shown}{more}. The anchors "
                f"hold {len(self.anchors)} tensors (e.g. {known}). Check the names, or pass "
                "allow_unanchored=True to give these parameters plain AdamW steps")
        if zero:
            warnings.warn(f"AsFT: the direction is zero for {len(zero)} tensor(s): "
                          f"{', '.join(zero[:20])}{' …' if len(zero) > 20 else ''}; their penalty is a "
                          "plain L2 pull towards W0", stacklevel=3)

    def _direction(self, name: str, p: Tensor) -> BoundDirection | None:
        """The bound direction of parameter `name` on p's device (cached by name), or None."""
        bound = self._bound.get(name, _MISSING)
        if _dist.is_dtensor(p) or name in self._sharded:
            return self._sharded_direction(name, p, bound)
        if bound is _MISSING:
            key = self._anchor_key(name)
            bound = bind_direction(self.anchors[key], p, key) if key in self.anchors else None
            self._bound[name] = bound
        elif bound is not None and bound.v.device != p.device:
            bound.v = bound.v.to(p.device)
        return bound  # type: ignore[return-value]

    # ------------------------------------------------------------------------------- step
    def _init_group(self, group, params_with_grad, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs,
                    state_steps):
        for name, p in zip(group["param_names"], group["params"]):
            if p.grad is not None and p.grad.is_sparse:
                raise RuntimeError(f"AsFTAdamW does not support sparse gradients (parameter '{name}'), "
                                   "please consider SparseAdam instead")
        has_complex = super()._init_group(group, params_with_grad, grads, exp_avgs, exp_avg_sqs,
                                          max_exp_avg_sqs, state_steps)
        for name, p in zip(group["param_names"], group["params"]):
            if p.grad is not None and "w0" not in self.state[p] and (
                    self._direction(name, p) is not None or self._is_lora_param(name)):
                self.state[p]["w0"] = (_dist.snapshot_w0(p) if _dist.is_dtensor(p) else
                                       storage_w0(p.detach().clone(memory_format=torch.preserve_format)))
        return has_complex

    @torch.no_grad()
    def step(self, closure=None):
        """Perform a single optimization step (penalty gradient, then torch's AdamW update).

        Args:
            closure (Callable, optional): A closure that reevaluates the model and returns the loss.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._lora_pending = self._lora_step_grads()
        dots = self._sharded_dots()
        for group_index, group in enumerate(self.param_groups):
            if self._resolve_impl(group) == "triton" and not self._lora_in_group(group):
                self._step_triton(group_index, group)
                continue
            names = [n for n, p in zip(group["param_names"], group["params"]) if p.grad is not None]
            params: list[Tensor] = []
            grads: list[Tensor] = []
            exp_avgs: list[Tensor] = []
            exp_avg_sqs: list[Tensor] = []
            max_exp_avg_sqs: list[Tensor] = []
            state_steps: list[Tensor] = []
            has_complex = self._init_group(group, params, grads, exp_avgs, exp_avg_sqs,
                                           max_exp_avg_sqs, state_steps)
            if not params:
                continue
            self._check_missing(group, names)
            if group["impl"] != "reference":
                names, params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps = \
                    self._step_torch_fused(group, names, params, grads, exp_avgs, exp_avg_sqs,
                                           max_exp_avg_sqs, state_steps)
                if not params:
                    continue
            grads = self._penalised_grads(group, names, params, grads, dots)
            adam(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps,
                 **self._adam_kwargs(group, has_complex))
        self._lora_pending = {}
        return loss

    @staticmethod
    def _adam_kwargs(group: dict[str, Any], has_complex: bool = False) -> dict[str, Any]:
        """Keyword arguments of torch's functional `adam` for one group (decoupled decay: AdamW)."""
        beta1, beta2 = group["betas"]
        return dict(foreach=group["foreach"], capturable=group["capturable"], differentiable=False,
                    fused=group["fused"], grad_scale=None, found_inf=None, has_complex=has_complex,
                    decoupled_weight_decay=True, amsgrad=group["amsgrad"], beta1=beta1, beta2=beta2,
                    lr=group["lr"], weight_decay=group["weight_decay"], eps=group["eps"],
                    maximize=group["maximize"])

    def _step_torch_fused(self, group, names, params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs,
                          state_steps):
        """Step the anchored, unsharded tensors of a λ > 0 group with `asft_adamw_` (penalty and
        torch's AdamW fused chunk by chunk) and return the lists of the remaining tensors.

        c carries over between steps: ⟨v, p - W0⟩ is folded while the new p is in cache, and
        trusted at the next step only if the parameter's version counter shows no write since
        (else, and after `resync()`/`load_state_dict`, it is recomputed exactly).
        """
        lam = group["asft_lambda"]
        take = [lam > 0 and not _dist.is_dtensor(p) and self._direction(n, p) is not None
                for n, p in zip(names, params)]
        if not any(take):
            return names, params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps
        lists = (names, params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps)
        sel = [[x for x, t in zip(xs, take) if t] for xs in lists]  # max_exp_avg_sqs is [] without amsgrad
        rest = [[x for x, t in zip(xs, take) if not t] for xs in lists]
        sub_names, sub_p = sel[0], sel[1]
        w0s = [self.state[p]["w0"] for p in sub_p]
        bounds = [self._bound[n] for n in sub_names]
        dots: list[Tensor | None] = []
        for n, p in zip(sub_names, sub_p):
            cached = self._dots.get(n)
            dots.append(cached[0] if cached is not None and cached[1] == p._version
                        and cached[0].device == p.device else None)
        stale = [j for j, d in enumerate(dots) if d is None]
        if stale:
            fresh = partial_dots([sub_p[j] for j in stale], [w0s[j] for j in stale], [bounds[j] for j in stale])
            for k, j in enumerate(stale):
                dots[j] = fresh[k]
        new = asft_adamw_(*sel[1:], w0s, bounds, dots, coef=(-2.0 if group["maximize"] else 2.0) * lam,
                          penalty=group["penalty"], **self._adam_kwargs(group))
        for n, p, d in zip(sub_names, sub_p, new):
            self._dots[n] = (d, p._version)
        return tuple(rest)

    def _check_missing(self, group: dict[str, Any], names: list[str]) -> None:
        if group["asft_lambda"] > 0 and not self.allow_unanchored:
            missing = [n for n in names if self._bound.get(n) is None and self._anchor_key(n) not in self.anchors
                       and not (self._lora and n in self._lora.by_param)]
            if missing:
                raise ValueError(f"no direction for parameter(s) {missing} (they gained gradients after "
                                 "the optimizer was built); pass allow_unanchored=True to step them plainly")

    def _penalised_grads(self, group: dict[str, Any], names: list[str], params: list[Tensor],
                         grads: list[Tensor], dots: Mapping[str, Tensor] | None = None) -> list[Tensor]:
        """Gradients with 2λ·R added for every anchored parameter; the user's `.grad` is untouched.

        dots: global ⟨v, ΔW⟩ of sharded parameters by name (`_sharded_dots`); sharded tensors are
        processed as their local shards and their new gradients wrapped back as DTensors.
        """
        if self._lora_pending:
            grads = self._add_lora_grads(names, grads)
        lam = group["asft_lambda"]
        if lam == 0:
            return grads
        coef = (-2.0 if group["maximize"] else 2.0) * lam
        idx = [i for i, (n, p) in enumerate(zip(names, params)) if self._direction(n, p) is not None]
        if not idx:
            return grads
        sub_p = [_dist.local(params[i]) for i in idx]
        sub_g = [_dist.local(grads[i]) for i in idx]
        w0s = [_dist.local(self.state[params[i]]["w0"]) for i in idx]
        bounds = [self._bound[names[i]] for i in idx]
        sub_dots = [dots.get(names[i]) for i in idx] if dots else None
        if group["impl"] == "reference":
            new = penalised_grads_reference(sub_g, sub_p, w0s, bounds, coef, group["penalty"], sub_dots)
        else:
            new = penalised_grads_(self._scratch(sub_p), sub_g, sub_p, w0s, bounds, coef, group["penalty"],
                                   dots=sub_dots)
        grads = list(grads)
        for j, i in enumerate(idx):
            grads[i] = _dist.like(new[j], params[i]) if _dist.is_dtensor(params[i]) else new[j]
        return grads

    def _scratch(self, params: list[Tensor]) -> list[Tensor]:
        """Gradient-shaped views into one reused buffer per (device, dtype), laid out like `params`."""
        sizes: dict[tuple[torch.device, torch.dtype], int] = {}
        offsets = []
        for p in params:
            key = (p.device, p.dtype)
            offsets.append(sizes.get(key, 0))
            sizes[key] = offsets[-1] + (p.numel() + 15) // 16 * 16  # 64-byte aligned slices
        for key, n in sizes.items():
            ws = self._workspace.get(key)
            if ws is None or ws.numel() < n:
                self._workspace[key] = torch.empty(n, device=key[0], dtype=key[1])
        out = []
        for p, off in zip(params, offsets):
            ws = self._workspace[(p.device, p.dtype)]
            if p.is_contiguous():
                out.append(ws[off: off + p.numel()].view(p.shape))
            elif dense_flat(p) is not None:
                out.append(ws.as_strided(p.shape, p.stride(), off))
            else:
                out.append(torch.empty_like(p, memory_format=torch.contiguous_format))
        return out

    # ------------------------------------------------------------------------------- triton
    def _resolve_impl(self, group: dict[str, Any]) -> str:
        """The implementation a group's step runs: impl=None means triton on CUDA when importable."""
        impl = group["impl"]
        if impl is None:
            explicit_torch = group["foreach"] or group["fused"] or group["capturable"]
            if (explicit_torch or not all(p.is_cuda and not _dist.is_dtensor(p) for p in group["params"])
                    or not _triton_importable()):
                return "torch"
            return "triton"
        if impl == "triton":
            for key in ("foreach", "fused", "capturable"):
                if group[key]:
                    raise ValueError(f"impl='triton' cannot honour {key}=True (it runs its own fused "
                                     f"kernel); pass {key}=None or impl='torch'")
            if not _triton_importable():
                raise ValueError("impl='triton' needs the triton package (pip install 'asft_optim[triton]')")
            from .kernels import is_interpreted
            on_cpu = [n for n, p in zip(group["param_names"], group["params"]) if not p.is_cuda]
            if on_cpu and not is_interpreted():
                raise ValueError(f"impl='triton' runs on CUDA tensors, or on CPU only under "
                                 f"TRITON_INTERPRET=1 (set before triton is imported); '{on_cpu[0]}' is on "
                                 f"{group['params'][group['param_names'].index(on_cpu[0])].device}")
        return impl

    def resync(self) -> None:
        """Recompute c = ⟨v, p - W0⟩/‖v‖² exactly at the next step (impl="triton" carries it over).

        Call after writing to the parameters outside `step()` (loading weights, an EMA swap, …)
        or replacing optimizer state tensors by hand. `load_state_dict` calls it. The torch path
        also notices in-place writes through the parameter's version counter; writes through
        `.data` bypass that counter.
        """
        self._dots.clear()
        slots = self.__dict__.get("_triton_c")
        if slots is not None:
            slots.clear()

    def _step_triton(self, group_index: int, group: dict[str, Any]) -> None:
        """One group's step with the fused Triton kernels: one update (+ one fold) launch per
        (device, dtypes, penalised) subset; an exact c pass first where c is not known.

        The launches are kept as a plan; while the same parameters have gradients at the same
        addresses and c stays valid, the next step reuses it without building any lists.
        """
        from .kernels import CSlots, exact_c_, fused_step_, make_table
        if "_triton_c" not in self.__dict__:
            self._triton_c = CSlots()
            self._triton_pending: list[tuple[str, Tensor]] = []
            self._triton_tables: dict[tuple, tuple[tuple, Any]] = {}
            self._triton_v_checked: set[str] = set()
            self._triton_plans: dict[int, dict[str, Any]] = {}
            self._triton_step_bufs: dict[int, Tensor] = {}
        cs = self._triton_c
        signature = _triton_signature(group)
        plan = self._triton_plans.get(group_index)
        if plan is not None and plan["signature"] == signature and plan["epoch"] == cs.epoch:
            steps = _increment_steps(plan["steps"], plan["positions"])
            hyper = _triton_hyper(group)
            for table, c_buf, penalty, positions in plan["launches"]:
                fused_step_(table, c_buf, [steps[j] for j in positions], penalty=penalty, **hyper)
            return
        names = [n for n, p in zip(group["param_names"], group["params"]) if p.grad is not None]
        fresh = {n for n, p in zip(group["param_names"], group["params"])
                 if p.grad is not None and "w0" not in self.state.get(p, {})}
        params: list[Tensor] = []
        grads: list[Tensor] = []
        exp_avgs: list[Tensor] = []
        exp_avg_sqs: list[Tensor] = []
        max_exp_avg_sqs: list[Tensor] = []
        state_steps: list[Tensor] = []
        self._init_group(group, params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps)
        if not params:
            return
        self._check_missing(group, names)
        # state["step"] of every parameter is a view into one buffer per group: one add per step
        positions = [j for j, p in enumerate(group["params"]) if p.grad is not None]
        buf = self._triton_step_bufs.get(group_index)
        if buf is None or buf.numel() != len(group["params"]) or buf.dtype != state_steps[0].dtype:
            buf = self._triton_step_bufs[group_index] = torch.zeros(len(group["params"]),
                                                                    dtype=state_steps[0].dtype)
        for j, step_t in zip(positions, state_steps):
            if step_t._base is not buf or step_t.storage_offset() != j:
                buf[j] = step_t
                self.state[group["params"][j]]["step"] = buf[j]
        positions_t = None if len(positions) == buf.numel() else torch.tensor(positions)
        all_steps = _increment_steps(buf, positions_t)
        steps = [all_steps[j] for j in positions]
        amsgrad, lam, penalty = group["amsgrad"], group["asft_lambda"], group["penalty"]
        subsets: dict[tuple, list[int]] = {}
        rows: list[list[Tensor | None]] = []
        reusable = True
        for i, (name, p, g) in enumerate(zip(names, params, grads)):
            bound = self._direction(name, p) if lam > 0 else None
            # bf16 where exact: fewer bytes per step (not for shards: every rank must launch alike)
            if bound is not None and name not in self._triton_v_checked and name not in self._sharded:
                bound.v = storage_w0(bound.v)
                self._triton_v_checked.add(name)
            if g.stride() != p.stride():
                g = torch.empty_like(p).copy_(g)
                reusable = False  # the table points at this temporary
            reusable &= not _dist.is_dtensor(p)
            w0 = self.state[p]["w0"] if bound is not None else None
            row = [p, g, exp_avgs[i], exp_avg_sqs[i], max_exp_avg_sqs[i] if amsgrad else None, w0,
                   None if bound is None else bound.v]
            row = [None if x is None else _dist.local(x) for x in row]  # DTensors: their local shards
            rows.append(row)
            key = (p.device, bound is not None) + tuple(None if x is None else x.dtype for x in row)
            subsets.setdefault(key, []).append(i)
        hyper = _triton_hyper(group)
        launches = []
        for key, idx in subsets.items():
            device, penalised = key[0], key[1]
            sub_names = [names[i] for i in idx]
            sub_rows = [rows[i] for i in idx]
            cache_key = (tuple(sub_names), tuple(tuple(r[0].shape) for r in sub_rows),
                         tuple(r[1].stride() for r in sub_rows),
                         tuple(0 if x is None else x.data_ptr() for r in sub_rows for x in r))
            slots = cs.slots(sub_names, device) if penalised else [0] * len(idx)
            cached = self._triton_tables.get((group_index, key))
            if cached is None or cached[0] != cache_key:
                inv = [self._bound[n].inv_nv2 if penalised else 0.0 for n in sub_names]
                cached = (cache_key, make_table(sub_rows, slots, inv, sub_names))
                self._triton_tables[(group_index, key)] = cached
            table = cached[1]
            needs_c = penalised and penalty != "full"
            c_buf = cs.buffers[device] if penalised else table.partials
            stale = [n for n in sub_names if n not in cs.valid] if needs_c else []
            if stale and set(stale) <= fresh:  # first step: p = W0, so c = 0
                c_buf.index_fill_(0, torch.tensor([cs.slot[n] for n in stale], device=device), 0.0)
            elif stale:
                exact_c_(table, c_buf)
                self._reduce_c_slots([(names[i], params[i]) for i in idx])
            fused_step_(table, c_buf, [steps[i] for i in idx], penalty=penalty if penalised else None,
                        **hyper)
            launches.append((table, c_buf, penalty if penalised else None, [positions[i] for i in idx]))
            if needs_c:
                cs.valid.update(sub_names)
                self._triton_pending += [(names[i], params[i]) for i in idx if _dist.is_dtensor(params[i])]
        if reusable and signature is not None:
            self._triton_plans[group_index] = dict(signature=signature, epoch=cs.epoch, steps=buf,
                                                   positions=positions_t, launches=launches)
        else:
            self._triton_plans.pop(group_index, None)

    # ------------------------------------------------------------------------------- distributed
    def _bind_sharded_group(self, group: dict[str, Any]) -> None:
        """Bind a group's DTensor (FSDP2) parameters in one go; refuse DeepSpeed ZeRO-3 parameters.

        Collective when the group holds DTensors: every rank adds the same groups.
        """
        for name, p in zip(group["param_names"], group["params"]):
            _dist.check_not_zero3(name, p)
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
            _dist.check_not_flattened(group, index)
            swapped += [(n, p) for n, p in zip(group["param_names"], group["params"])
                        if _dist.is_dtensor(p) and n not in self._sharded]
        if swapped:
            self._bind_sharded(swapped)
        cs = self.__dict__.get("_triton_c")
        triton_stale = []  # (name, p): Triton c to recompute exactly (after resync/load), here
        for group in self.param_groups:
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

    # ------------------------------------------------------------------------------- state
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load state saved by `state_dict()`; refuses a checkpoint made with other anchors, λ or penalty."""
        saved = state_dict["param_groups"]
        for i, (group, sg) in enumerate(zip(self.param_groups, saved)):
            for key, what in (("asft_anchors", "anchors (fingerprint)"), ("asft_lambda", "asft_lambda"),
                              ("penalty", "penalty"), ("projection", "projection")):
                if key in sg and sg[key] != group[key]:
                    raise ValueError(
                        f"cannot resume: param group {i} of the checkpoint was made with {what} "
                        f"{sg[key]!r}, this optimizer has {group[key]!r}")
        impls = [g["impl"] for g in self.param_groups]
        super().load_state_dict(state_dict)
        for group, impl in zip(self.param_groups, impls):
            group["impl"] = impl  # the implementation is a property of this process, not the checkpoint
            for p in group["params"]:
                st = self.state.get(p)
                if st and "w0" in st and not _dist.is_dtensor(st["w0"]):  # cast to the param dtype: restore its storage
                    st["w0"] = storage_w0(st["w0"])
        self.resync()

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self.__dict__.setdefault("_bound", {})
        self.__dict__.setdefault("_dots", {})
        self.__dict__.setdefault("_workspace", {})
        self.__dict__.setdefault("_sharded", set())
        self.__dict__.setdefault("allow_unanchored", False)
        self.__dict__.setdefault("_lora", None)
        self.__dict__.setdefault("_lora_bound", {})
        self.__dict__.setdefault("_lora_pending", {})
        for group in self.param_groups:
            group.setdefault("asft_lambda", 1.0)
            group.setdefault("penalty", "orthogonal")
            group.setdefault("impl", None)
            group.setdefault("projection", "vector")

    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__()
        state.update(anchors=self.anchors, allow_unanchored=self.allow_unanchored, _lora=self._lora,
                     _asft_defaults=self._asft_defaults)
        return state

    # ------------------------------------------------------------------------------- metrics
    @torch.no_grad()
    def drift(self) -> dict[str, Drift]:
        """Per-tensor drift (‖ΔW‖, cos(ΔW, d), ‖C⊥ΔW‖/‖ΔW‖) of every anchored parameter that has stepped."""
        out: dict[str, Drift] = {}
        for group in self.param_groups:
            for name, p in zip(group["param_names"], group["params"]):
                st = self.state.get(p)
                bound = self._bound.get(name)
                if st and "w0" in st and bound is not None and not _dist.is_dtensor(p):
                    out[name] = drift(p.detach().double() - st["w0"].double(), bound.v)
        out.update({name: drift_from_sums(*s) for name, s in self._lora_drift_sums().items()})
        out.update({name: drift_from_sums(*s) for name, s in self._sharded_drift_sums().items()})
        return out

    @torch.no_grad()
    def drift_sums(self) -> dict[str, tuple[float, float, float, int]]:
        """(‖ΔW‖², ‖d‖², ⟨ΔW, d⟩, numel) in float64 per anchored tensor that has stepped, keyed by its
        direction's (normalised) name: LoRA adapters appear as their base weight, `modules_to_save`
        copies as the original module. Feed to `metrics.per_layer`."""
        out: dict[str, tuple[float, float, float, int]] = {}
        for group in self.param_groups:
            for name, p in zip(group["param_names"], group["params"]):
                st = self.state.get(p)
                bound = self._bound.get(name)
                if st and "w0" in st and bound is not None and not _dist.is_dtensor(p):
                    xx, uu, xu, n = sums(p.detach().double() - st["w0"].double(), bound.v)
                    out[normalize_name(self._anchor_key(name))] = (xx, uu * bound.scale ** 2, xu * bound.scale, n)
        out.update(self._lora_drift_sums())
        out.update(self._sharded_drift_sums())
        return out

    # ------------------------------------------------------------------------------- models, LoRA (peft)
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
