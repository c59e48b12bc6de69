"""peft LoRA adapters under AsFT: pairing, and the penalty on the adapted base weight.

A peft LoRA layer adds s·B·A to its base weight W (out×in; a GPT-2 `Conv1D` stores W as in×out and
peft transposes the product, `fan_in_fan_out`). With A0, B0 the adapter's values at its first
optimizer step, the effective update of the base weight is

    ΔW = s·(B·A − B0·A0) = s·(δB·A + B0·δA),   δA = A − A0, δB = B − B0   (no cancellation)

s = lora_alpha/r, or lora_alpha/√r under rslora. The direction is the base weight's d. Writing
V for d (or dᵀ for fan_in_fan_out) in out×in orientation, v = V/2^k its bound copy and
L = [δB, B0] (out×2r), M = [A; δA] (2r×in), so that ΔW = s·L·M:

projection="vector" (the paper's Eq. 3, d flattened), R = ΔW − c·v with c = ⟨v, ΔW⟩/‖v‖²:

    c      = s·Σ(L ⊙ P)/‖v‖²,                 P = v·Mᵀ (out×2r), Q = Bᵀ·v (r×in), one pass over v
    ∂/∂B   = 2λ·s·R·Aᵀ = 2λ·s·(s·L·(M·Aᵀ) − c·P[:, :r])
    ∂/∂A   = 2λ·s·Bᵀ·R = 2λ·s·(s·(Bᵀ·L)·M − c·Q)

projection="reference" (the paper's released code): C = V·Vᵀ/‖V‖_F (out×out, never built),
X = B·A (no scaling, no A0/B0), penalty λ‖(I − C)·X‖²_F, Z = (I − C)²·B = B − 2C·B + C²·B:

    ∂/∂B = 2λ·Z·(A·Aᵀ),   ∂/∂A = 2λ·(Zᵀ·B)·A

(C is not a projector and scales with ‖d‖, as in that code. The released code adds its penalty on
every micro-batch: to match a run with k gradient-accumulation steps, use asft_lambda = k·λ.)

Every product is a skinny matmul against V, taken over row blocks of V cast to the compute dtype,
so no out×in or out×out temporary exists; the vector projection reads v once per step, the
reference projection three times (C²·B needs Vᵀ·B before V·(Vᵀ·B)).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch import Tensor, nn

from .anchors import Anchors, normalize_name
from .functional import PENALTIES, BoundDirection, bind_direction, penalty_coef
from .metrics import DriftSums

__all__ = ["PROJECTIONS", "LoraPair", "LoraLayout", "lora_layout", "pair_lora_names", "is_lora_name",
           "base_weight_shape", "bind_lora_direction", "lora_penalty_grads", "lora_penalty_grads_reference",
           "pairs_penalty_grads", "pairs_drift_sums",
           "lora_drift_sums", "check_one_adapter_per_module"]

PROJECTIONS: tuple[str, ...] = ("vector", "reference")

_LORA = re.compile(r"^(?P<module>.+)\.lora_(?P<kind>A|B)\.(?P<adapter>[^.]+)\.weight$")
_LORA_ANY = re.compile(r"(^|\.)lora_(A|B|embedding_A|embedding_B|magnitude_vector)\.")
_SAVED_COPY = re.compile(r"\.modules_to_save\.[^.]+\.")
_BLOCK_CPU = 1 << 20  # elements of v per block on CPU (4 MiB fp32: stays in L3 between two matmuls)


def is_lora_name(name: str) -> bool:
    """True for any peft LoRA parameter name (lora_A/B, lora_embedding_A/B, DoRA magnitudes)."""
    return _LORA_ANY.search(name) is not None


@dataclass(frozen=True)
class LoraPair:
    """One adapter on one module: its two parameters and what they mean for the base weight.

    Attributes:
        module: the module's path in `model.named_modules()`.
        adapter: peft adapter name (`"default"` unless named).
        a_name, b_name: the names of lora_A (r×in) and lora_B (out×r) in `model.named_parameters()`.
        direction: the anchors key of the base weight (normalised `module + ".weight"`).
        scaling: s (lora_alpha/r, or lora_alpha/√r with rslora), as peft applies it.
        fan_in_fan_out: the base weight is stored in×out (GPT-2 `Conv1D`); ΔW is then (s·B·A)ᵀ.
        base_shape: the base weight's stored shape (unpacked for a bitsandbytes 4-bit weight).
    """
    module: str
    adapter: str
    a_name: str
    b_name: str
    direction: str
    scaling: float
    fan_in_fan_out: bool
    base_shape: tuple[int, int]

    @property
    def key(self) -> str:
        return f"{self.module}[{self.adapter}]"


@dataclass
class LoraLayout:
    """What `AsFTAdamW` needs to know about a peft model beyond parameter names.

    Attributes:
        pairs: the trainable LoRA adapters.
        aliases: full-parameter names → the anchors key to use (`modules_to_save` copies point at the
            original module's weight).
    """
    pairs: list[LoraPair] = field(default_factory=list)
    aliases: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.by_param: dict[str, tuple[LoraPair, str]] = {}
        for pair in self.pairs:
            self.by_param[pair.a_name] = (pair, "A")
            self.by_param[pair.b_name] = (pair, "B")


def pair_lora_names(names: Iterable[str]) -> dict[tuple[str, str], tuple[str, str]]:
    """Pair `...<module>.lora_A.<adapter>.weight` with `...<module>.lora_B.<adapter>.weight`.

    Returns (module, adapter) → (a_name, b_name). Raises ValueError naming the module and adapter
    when one of the two is missing, and for LoRA kinds AsFT cannot anchor (embedding adapters, DoRA
    magnitudes, a bias on lora_B).
    """
    found: dict[tuple[str, str], dict[str, str]] = {}
    for name in names:
        m = _LORA.match(name)
        if m is None:
            if is_lora_name(name):
                raise ValueError(
                    f"AsFT cannot anchor the LoRA parameter '{name}': only lora_A/lora_B weights of "
                    "Linear and Conv1D adapters are supported (no embedding adapters, DoRA or lora_bias)")
            continue
        found.setdefault((m["module"], m["adapter"]), {})[m["kind"]] = name
    pairs = {}
    for (module, adapter), kinds in found.items():
        if set(kinds) != {"A", "B"}:
            have, lack = ("A", "B") if "A" in kinds else ("B", "A")
            raise ValueError(f"LoRA module '{module}' (adapter '{adapter}') has a trainable lora_{have} "
                             f"('{kinds[have]}') without a trainable lora_{lack}: AsFT penalises their "
                             "product, so both must be trained together")
        pairs[(module, adapter)] = (kinds["A"], kinds["B"])
    return pairs


def lora_layout(model: nn.Module) -> LoraLayout:
    """Read the trainable LoRA adapters and `modules_to_save` copies of a (peft) model.

    Scaling and layout are read from the peft layers when this is called (a later `set_scale`
    is not seen). Raises ValueError naming the module for DoRA or other LoRA variants, adapters on
    non-Linear/Conv1D layers, and shapes that do not fit the base weight.
    """
    named = dict(model.named_parameters())
    pairs = []
    trainable = [n for n, p in named.items() if p.requires_grad]
    for (module_name, adapter), (a_name, b_name) in pair_lora_names(trainable).items():
        module = model.get_submodule(module_name)
        where = f"LoRA module '{module_name}' (adapter '{adapter}')"
        if getattr(module, "use_dora", {}).get(adapter) or adapter in getattr(module, "lora_variant", {}):
            raise ValueError(f"{where} uses DoRA or another LoRA variant; AsFT supports plain LoRA only")
        if not hasattr(module, "scaling") or not hasattr(module, "get_base_layer"):
            raise ValueError(f"{where} is not a peft LoRA layer (no `scaling`/`get_base_layer`)")
        if not isinstance(module.lora_A[adapter], nn.Linear):
            raise ValueError(f"{where}: AsFT supports Linear and Conv1D adapters, not "
                             f"{type(module.lora_A[adapter]).__name__}")
        shape = base_weight_shape(module.get_base_layer().weight)
        a, b = named[a_name], named[b_name]
        ffo = bool(getattr(module, "fan_in_fan_out", False))
        if len(shape) != 2:
            raise ValueError(f"{where}: base weight has shape {shape}; expected 2-D")
        out_f, in_f = (shape[1], shape[0]) if ffo else shape
        if a.dim() != 2 or b.dim() != 2 or a.shape[1] != in_f or b.shape[0] != out_f or a.shape[0] != b.shape[1]:
            raise ValueError(f"{where}: lora_A {tuple(a.shape)} and lora_B {tuple(b.shape)} do not fit the "
                             f"base weight {shape} (fan_in_fan_out={ffo})")
        pairs.append(LoraPair(module=module_name, adapter=adapter, a_name=a_name, b_name=b_name,
                              direction=normalize_name(f"{module_name}.weight"),
                              scaling=float(module.scaling[adapter]), fan_in_fan_out=ffo,
                              base_shape=(int(shape[0]), int(shape[1]))))
    aliases = {n: normalize_name(_SAVED_COPY.sub(".", n)) for n in trainable if _SAVED_COPY.search(n)}
    return LoraLayout(pairs, aliases)


def base_weight_shape(weight: Tensor) -> tuple[int, ...]:
    """The logical shape of a base weight, as its direction has it.

    A quantised bitsandbytes 4-bit weight (`Params4bit`, NF4 or FP4: QLoRA) is stored packed, two
    values per byte in an (n/2, 1) uint8 tensor; its shape comes from its quantisation state. 8-bit
    weights (`Int8Params`), 4-bit weights not quantised yet and plain tensors keep their shape.
    """
    quant_state = getattr(weight, "quant_state", None)
    return tuple(int(n) for n in (weight.shape if quant_state is None else quant_state.shape))


def bind_lora_direction(anchors: Anchors, pair: LoraPair, device: torch.device) -> BoundDirection:
    """The pair's base-weight direction bound on `device` (laid out as the base weight is stored).

    Raises ValueError naming the module when the anchors lack it or its shape differs.
    """
    if pair.direction not in anchors:
        raise ValueError(f"LoRA adapter '{pair.adapter}' on module '{pair.module}' has no direction: the "
                         f"anchors hold no '{pair.direction}'. Compute directions for this weight, or "
                         "leave the module out of the LoRA target_modules")
    shape = tuple(anchors.shape(pair.direction))
    if shape != pair.base_shape:
        raise ValueError(f"direction '{pair.direction}' has shape {shape} but the base weight of LoRA "
                         f"module '{pair.module}' has shape {pair.base_shape}")
    d = anchors[pair.direction].to(device)
    return bind_direction(d, d, pair.direction)


# ------------------------------------------------------------------------------------ passes over v
def _block_rows(v: Tensor, transpose: bool, dtype: torch.dtype) -> Iterator[tuple[int, int, Tensor]]:
    """Row blocks (lo, hi, V[lo:hi]) of V = vᵀ if `transpose` else v, in `dtype`.

    A block holds about 2^20 elements on CPU (it stays in cache while two matmuls read it) and 2^24 on
    accelerators; it is a view when v already has `dtype`, else a bounded copy.
    """
    rows, cols = (v.shape[1], v.shape[0]) if transpose else (v.shape[0], v.shape[1])
    budget = _BLOCK_CPU if v.device.type == "cpu" else (1 << 24)
    step = max(1, budget // max(1, cols))
    for lo in range(0, rows, step):
        hi = min(rows, lo + step)
        blk = v[:, lo:hi].T if transpose else v[lo:hi]
        yield lo, hi, blk.to(dtype)


def _v_times(v: Tensor, transpose: bool, x: Tensor) -> Tensor:
    """V·X (X: in×k) → out×k."""
    out = x.new_empty(v.shape[1] if transpose else v.shape[0], x.shape[1])
    for lo, hi, blk in _block_rows(v, transpose, x.dtype):
        torch.mm(blk, x, out=out[lo:hi])
    return out


def _vt_times(v: Tensor, transpose: bool, y: Tensor) -> Tensor:
    """Vᵀ·Y (Y: out×k) → in×k, accumulated as (Yᵀ·V)ᵀ (row-major k×in: the fast BLAS layout)."""
    out = y.new_zeros(y.shape[1], v.shape[0] if transpose else v.shape[1])
    for lo, hi, blk in _block_rows(v, transpose, y.dtype):
        out.addmm_(y[lo:hi].T, blk)
    return out.T


def _compute_dtype(*ts: Tensor) -> torch.dtype:
    return torch.float64 if any(t.dtype == torch.float64 for t in ts) else torch.float32


# ------------------------------------------------------------------------------------ penalty gradients
@torch.no_grad()
def lora_penalty_grads(a: Tensor, b: Tensor, a0: Tensor, b0: Tensor, bound: BoundDirection,
                       pair: LoraPair, coef: float, penalty: str = "orthogonal",
                       projection: str = "vector") -> tuple[Tensor, Tensor]:
    """coef/2 times the gradients of ‖R‖² for A (r×in) and B (out×r), fast path (see module doc).

    coef is ±2λ. Returns tensors shaped like A and B in the compute dtype (fp64 if any input is
    fp64, else fp32). Temporaries are O((out + in)·r) plus one block of v.
    """
    ct = _compute_dtype(a, b)
    a, b = a.to(ct), b.to(ct)
    v, ffo = bound.v, pair.fan_in_fan_out
    if projection == "reference":
        if penalty != "orthogonal":
            raise ValueError(f"projection='reference' penalises (I - C)·B·A only; got penalty={penalty!r}")
        if bound.is_null:
            z = b
        else:
            kappa = bound.scale * bound.inv_nv2 ** 0.5  # C = κ·v·vᵀ with v = d/scale
            k = _vt_times(v, ffo, b)                      # Vᵀ·B        in×r
            j = _v_times(v, ffo, k)                       # V·Vᵀ·B      out×r
            h = _vt_times(v, ffo, j)                      # Vᵀ·V·Vᵀ·B   in×r
            z = b - (2.0 * kappa) * j + (kappa * kappa) * _v_times(v, ffo, h)
        return coef * (z.T @ b) @ a, coef * z @ (a @ a.T)
    if projection != "vector":
        raise ValueError(f"unknown projection {projection!r}; expected one of {PROJECTIONS}")
    if penalty not in PENALTIES:
        raise ValueError(f"unknown penalty {penalty!r}; expected one of {PENALTIES}")
    s = pair.scaling
    r = a.shape[0]
    a0, b0 = a0.to(ct), b0.to(ct)
    left = torch.cat([b - b0, b0], dim=1)                 # L  out×2r
    right = torch.cat([a, a - a0], dim=0)                 # M  2r×in
    ga = torch.zeros_like(a)
    gb = torch.zeros_like(b)
    if penalty in ("orthogonal", "full"):
        gb.addmm_(left, right @ a.T, alpha=s * s)
        ga.addmm_(b.T @ left, right, alpha=s * s)
    if penalty != "full" and not bound.is_null:
        p = right.new_empty(left.shape[0], 2 * r)        # P = V·Mᵀ   out×2r
        q = torch.zeros_like(a)                           # Q = Bᵀ·V   r×in
        for lo, hi, blk in _block_rows(v, ffo, ct):       # one pass over v
            torch.mm(blk, right.T, out=p[lo:hi])
            q.addmm_(b[lo:hi].T, blk)
        # c·s (sign folded in) stays a 0-d tensor: no host sync
        cs = (left * p).sum() * ((-1.0 if penalty == "orthogonal" else 1.0) * s * s * bound.inv_nv2)
        gb.add_(p[:, :r] * cs)
        ga.add_(q * cs)
    return ga.mul_(coef), gb.mul_(coef)


@torch.no_grad()
def lora_penalty_grads_reference(a: Tensor, b: Tensor, a0: Tensor, b0: Tensor, bound: BoundDirection,
                                 pair: LoraPair, coef: float, penalty: str = "orthogonal",
                                 projection: str = "vector") -> tuple[Tensor, Tensor]:
    """Same as `lora_penalty_grads`, written the obvious way with out×in (and out×out) temporaries."""
    ct = _compute_dtype(a, b)
    a, b, a0, b0 = (t.to(ct) for t in (a, b, a0, b0))
    d = bound.v.to(ct) * bound.scale
    if pair.fan_in_fan_out:
        d = d.T
    if projection == "reference":
        if penalty != "orthogonal":
            raise ValueError(f"projection='reference' penalises (I - C)·B·A only; got penalty={penalty!r}")
        nd = torch.linalg.norm(d)
        eye = torch.eye(d.shape[0], dtype=ct, device=d.device)
        c = d @ d.T / nd if float(nd) > 0 else torch.zeros_like(eye)
        grad_x = (eye - c) @ (eye - c) @ (b @ a)
        return coef * b.T @ grad_x, coef * grad_x @ a.T
    dw = pair.scaling * (b @ a - b0 @ a0)  # out×in, like d here
    nd2 = float((d * d).sum())
    par = (d * dw).sum() / nd2 * d if nd2 > 0 else torch.zeros_like(dw)
    rr = {"orthogonal": dw - par, "parallel": par, "full": dw}[penalty]
    s = pair.scaling
    return coef * s * b.T @ rr, coef * s * rr @ a.T


@torch.no_grad()
def lora_drift_sums(a: Tensor, b: Tensor, a0: Tensor, b0: Tensor, bound: BoundDirection,
                    pair: LoraPair) -> DriftSums:
    """(‖ΔW‖², ‖d‖², ⟨ΔW, d⟩, numel) of the effective update in float64, without materialising it."""
    a, b, a0, b0 = (t.double() for t in (a, b, a0, b0))
    s = pair.scaling
    left = torch.cat([b - b0, b0], dim=1)
    right = torch.cat([a, a - a0], dim=0)
    xx = s * s * float(((left.T @ left) * (right @ right.T)).sum())
    numel = pair.base_shape[0] * pair.base_shape[1]
    if bound.is_null:
        return DriftSums(max(xx, 0.0), 0.0, 0.0, numel)
    p = _v_times(bound.v, pair.fan_in_fan_out, right.T.contiguous())
    xu = s * bound.scale * float((left * p).sum())
    uu = bound.scale * bound.scale / bound.inv_nv2
    return DriftSums(max(xx, 0.0), uu, xu, numel)



class PairBound(Protocol):
    """What the pair-level functions read of a parameter's binding (`binding.Binding`)."""
    pair: LoraPair | None

    def direction_on(self, device: torch.device) -> BoundDirection: ...


def pairs_penalty_grads(pairs: Iterable[tuple[LoraPair, Mapping[str, Any], Tensor, Tensor]],
                        bindings: Mapping[str, PairBound], state: Mapping[Tensor, Any]) -> dict[str, Tensor]:
    """Penalty gradients (by parameter name) of every LoRA pair with a gradient, from the pre-step A
    and B. pairs: (pair, the AsFTAdamW param group holding both, A, B) per pair
    (`records.ParamRecords.lora_pairs`; the group's asft_lambda, penalty, projection, maximize, impl).

    A0/B0 are each parameter's W0 (`state[p]["w0"]`, snapshot at its first step); before that the
    parameter has not moved, so its current value is its W0.
    """
    out: dict[str, Tensor] = {}
    for pair, group, a, b in pairs:
        if (a.grad is None and b.grad is None) or group["asft_lambda"] == 0:
            continue
        coef = penalty_coef(group["asft_lambda"], group["maximize"])
        fn = lora_penalty_grads_reference if group["impl"] == "reference" else lora_penalty_grads
        a0 = state[a]["w0"] if "w0" in state.get(a, {}) else a
        b0 = state[b]["w0"] if "w0" in state.get(b, {}) else b
        bound = bindings[pair.a_name].direction_on(a.device)
        g_a, g_b = fn(a.detach(), b.detach(), a0, b0, bound, pair, coef, group["penalty"], group["projection"])
        if a.grad is not None:
            out[pair.a_name] = g_a
        if b.grad is not None:
            out[pair.b_name] = g_b
    return out


def check_one_adapter_per_module(layout: LoraLayout | None, param_groups: list[dict[str, Any]]) -> None:
    """Refuse two LoRA adapters of one module that both have a task gradient in a penalised group
    this step (peft `set_adapter([...])`): the base weight moves by the sum of their updates, and
    the penalty of each adapter's own s·B·A would leave out the cross terms."""
    if layout is None or len({p.module for p in layout.pairs}) == len(layout.pairs):
        return
    where = {n: (g, p) for g in param_groups for n, p in zip(g["param_names"], g["params"])}
    training: dict[str, list[str]] = {}
    for pair in layout.pairs:
        for name in (pair.a_name, pair.b_name):
            group, p = where.get(name, (None, None))
            if p is not None and p.grad is not None and group["asft_lambda"] > 0:
                training.setdefault(pair.module, []).append(pair.adapter)
                break
    for module, adapters in training.items():
        if len(adapters) > 1:
            raise NotImplementedError(
                f"LoRA module '{module}': adapters {', '.join(repr(a) for a in adapters)} all have gradients "
                "in this step. The base weight then moves by the sum of their updates, while AsFTAdamW "
                "penalises each adapter's own s·B·A (the cross terms would be left out). Train one adapter "
                "per module at a time (peft: model.set_adapter('name')), or put the other adapters in a "
                "param group with asft_lambda=0")


@torch.no_grad()
def pairs_drift_sums(layout: LoraLayout | None, where: Mapping[str, Tensor], w0s: Mapping[str, Tensor],
                     bindings: Mapping[str, PairBound]) -> dict[str, DriftSums]:
    """Drift sums (`lora_drift_sums`) of each stepped LoRA pair's effective update, keyed by the base
    weight's name (`name@adapter` when several adapters on one module train).

    where: the optimizer's parameters by name. w0s: W0 of the stepped adapters by name (a pair
    counts once either has one; the other, not moved yet, is its own W0).
    """
    if layout is None:
        return {}
    per_module: dict[str, int] = {}
    for pair in layout.pairs:
        per_module[pair.direction] = per_module.get(pair.direction, 0) + 1
    out = {}
    for pair in layout.pairs:
        if pair.a_name not in where or pair.b_name not in where:
            continue
        if pair.a_name not in w0s and pair.b_name not in w0s:
            continue
        a, b = where[pair.a_name], where[pair.b_name]
        key = pair.direction if per_module[pair.direction] == 1 else f"{pair.direction}@{pair.adapter}"
        out[key] = lora_drift_sums(a, b, w0s.get(pair.a_name, a), w0s.get(pair.b_name, b),
                                   bindings[pair.a_name].direction_on(a.device), pair)
    return out
