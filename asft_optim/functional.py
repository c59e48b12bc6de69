"""The AsFT penalty gradient in PyTorch: a slow obvious reference and a fast chunked path.

Notation (per parameter tensor, flattened): v is the bound direction (d rescaled by a power of two,
so that max|v| is in [1, 2) and ‖v‖² cannot underflow), `inv_nv2` = 1/‖v‖² (0 when d = 0),
ΔW = p - W0 and c = ⟨v, ΔW⟩/‖v‖². The penalised quantity R is

    "orthogonal":  R = ΔW - c·v     (= C⊥ΔW, AsFT)
    "parallel":    R = c·v          (= C_aligned ΔW, the paper's ablation / AsFT_Alt)
    "full":        R = ΔW           (L2-SP)

and the gradient handed to AdamW is g̃ = g + coef·R with coef = ±2λ (negative under `maximize`,
since AdamW negates the whole gradient there and the penalty is always minimised).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

__all__ = ["BoundDirection", "bind_direction", "penalty_reference", "penalised_grads_reference",
           "penalised_grads_", "PENALTIES", "Penalty", "dense_flat"]

Penalty = Literal["orthogonal", "parallel", "full"]
PENALTIES: tuple[str, ...] = ("orthogonal", "parallel", "full")

CHUNK = 1 << 15  # elements per chunk of the fast path: its fp32 temporaries stay in L2


@dataclass
class BoundDirection:
    """A direction prepared for one parameter.

    v: the direction rescaled by 2**-k, laid out like the parameter (same shape and strides),
       on its device, in the direction's stored dtype.
    inv_nv2: 1/‖v‖² as a Python float, 0.0 for an all-zero direction (then R = ΔW: an L2 pull).
    scale: 2**k, so that d = scale·v.
    """
    v: Tensor
    inv_nv2: float
    scale: float

    @property
    def is_zero(self) -> bool:
        return self.inv_nv2 == 0.0


def bind_direction(d: Tensor, like: Tensor, name: str) -> BoundDirection:
    """Check a direction against its parameter and prepare it (see `BoundDirection`).

    Raises ValueError naming `name` for a shape mismatch or a non-finite entry.
    """
    if tuple(d.shape) != tuple(like.shape):
        raise ValueError(f"direction for '{name}' has shape {tuple(d.shape)} but the parameter has "
                         f"shape {tuple(like.shape)}")
    if not d.is_floating_point():
        raise ValueError(f"direction for '{name}' has dtype {d.dtype}; expected a floating dtype")
    d = d.to(like.device)
    if not bool(torch.isfinite(d).all()):
        raise ValueError(f"direction for '{name}' contains NaN or Inf")
    amax = float(d.abs().max()) if d.numel() else 0.0
    if amax == 0.0:
        v = torch.zeros_like(like, dtype=d.dtype)
        return BoundDirection(v, 0.0, 1.0)
    k = math.floor(math.log2(amax))
    scale = math.ldexp(1.0, k)
    v = torch.empty_like(like, dtype=d.dtype)
    v.copy_(d.reshape(like.shape))
    v.mul_(math.ldexp(1.0, -k))  # exact: a power of two
    nv2 = float(v.double().square().sum())
    return BoundDirection(v, 1.0 / nv2, scale)


def penalty_reference(p: Tensor, w0: Tensor, bound: BoundDirection, penalty: Penalty) -> Tensor:
    """R for one tensor, in fp32, written the obvious way (the oracle's twin)."""
    dw = p.float() - w0.float()
    v = bound.v.float()
    c = (v * dw).sum() * bound.inv_nv2
    if penalty == "orthogonal":
        return dw - c * v
    if penalty == "parallel":
        return c * v
    if penalty == "full":
        return dw
    raise ValueError(f"unknown penalty {penalty!r}; expected one of {PENALTIES}")


@torch.no_grad()
def penalised_grads_reference(grads: list[Tensor], params: list[Tensor], w0s: list[Tensor],
                              bounds: list[BoundDirection], coef: float, penalty: Penalty) -> list[Tensor]:
    """g̃ = g + coef·R per tensor, each a new tensor in the gradient's dtype."""
    return [(g.float() + coef * penalty_reference(p, w0, b, penalty)).to(g.dtype)
            for g, p, w0, b in zip(grads, params, w0s, bounds, strict=True)]


def dense_flat(t: Tensor) -> Tensor | None:
    """A 1-D view of `t` in memory order if `t` is dense and non-overlapping, else None."""
    if t.is_contiguous():
        return t.view(-1)
    order = sorted(range(t.dim()), key=lambda i: -t.stride(i))
    perm = t.permute(order)
    return perm.view(-1) if perm.is_contiguous() else None


@torch.no_grad()
def penalised_grads_(out: list[Tensor], grads: list[Tensor], params: list[Tensor], w0s: list[Tensor],
                     bounds: list[BoundDirection], coef: float, penalty: Penalty,
                     chunk: int = CHUNK) -> list[Tensor]:
    """Write g̃ = g + coef·R into `out` (preallocated, laid out like the params) and return it.

    Reads p, W0, v twice and g once, in chunks of `chunk` elements whose fp32 temporaries stay in
    cache, so no full-size temporary is allocated. c is kept as a 0-d tensor (no host sync).
    Tensors whose layouts differ fall back to whole-tensor ops.
    """
    if penalty not in PENALTIES:
        raise ValueError(f"unknown penalty {penalty!r}; expected one of {PENALTIES}")
    bufs: dict[torch.device, Tensor] = {}
    for s, g, p, w0, b in zip(out, grads, params, w0s, bounds, strict=True):
        if p.numel() == 0:
            continue
        flats = [dense_flat(x) for x in (s, g, p, w0, b.v)]
        same_layout = all(x.stride() == p.stride() for x in (s, g, w0, b.v))
        if any(f is None for f in flats) or not same_layout:
            s.copy_(g.float() + coef * penalty_reference(p, w0, b, penalty))
            continue
        fs, fg, fp, fw0, fv = flats
        n = fp.numel()
        if p.device not in bufs:
            bufs[p.device] = torch.empty(2 * chunk, device=p.device, dtype=torch.float32)
        buf = bufs[p.device]
        need_c = penalty != "full" and not b.is_zero
        c = None
        if need_c:
            parts = []
            for lo in range(0, n, chunk):
                hi = min(lo + chunk, n)
                t = buf[: hi - lo]
                _delta_into(t, fp[lo:hi], fw0[lo:hi])
                if fv.dtype == torch.float32:
                    parts.append(torch.dot(t, fv[lo:hi]))
                else:
                    tv = buf[chunk: chunk + hi - lo]
                    tv.copy_(fv[lo:hi])
                    parts.append(torch.dot(t, tv))
            c = torch.stack(parts).sum() * b.inv_nv2
        for lo in range(0, n, chunk):
            hi = min(lo + chunk, n)
            t = buf[: hi - lo]
            if penalty == "parallel":
                if c is None:
                    t.zero_()
                else:
                    torch.mul(fv[lo:hi], c, out=t)
            else:
                _delta_into(t, fp[lo:hi], fw0[lo:hi])
                if penalty == "orthogonal" and c is not None:
                    t.addcmul_(fv[lo:hi], c, value=-1.0)
            torch.add(fg[lo:hi], t, alpha=coef, out=fs[lo:hi])
    return out


def _delta_into(t: Tensor, p: Tensor, w0: Tensor) -> None:
    """t ← p - w0 in fp32 (t fp32, 1-D chunks)."""
    if p.dtype == torch.float32:
        torch.sub(p, w0, out=t)
    else:
        t.copy_(p)
        t.sub_(w0)
