"""The safety landscape: Harmful Score of W_aligned + α·û along chosen directions u.

Normalisation (per tensor, as in Li et al.'s filter-normalised loss landscapes, at tensor
granularity): û_t = u_t/‖u_t‖ · ‖W_t‖ for each parameter tensor t, so α is the perturbation's size
relative to each tensor's own norm (α = 0.1 moves every tensor by 10% of its norm). Tensors with
u_t = 0 are left alone.

Effective perturbation length (as the paper's Table 7) on each side: the largest |α| on the grid
such that HS ≤ threshold at every grid point between 0 and α. A perturbation can also break the
model without making it harmful (its answers become neither refusals nor compliance), so the
length over which the refusal rate stays ≥ 1 - threshold is reported beside it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import Tensor, nn

from ..evaluation.judges import Judge
from .evaluate import harmful_score

__all__ = ["Curve", "normalise", "random_direction", "effective_length", "scan"]


@dataclass(frozen=True)
class Curve:
    """HS and refusal rate along one direction; lengths on the +α and -α sides (by HS, and by the
    refusal rate)."""
    name: str
    alphas: list[float]
    hs: list[float | None]
    refusal: list[float]
    length_pos: float | None  # None when the judge reports no HS
    length_neg: float | None
    refusal_length_pos: float
    refusal_length_neg: float

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def normalise(u: Mapping[str, Tensor], w: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Per-tensor û_t = u_t/‖u_t‖·‖W_t‖ (computed in fp64, returned in W_t's dtype) for the names of
    `w`; zero u_t are dropped."""
    out = {}
    for name, wt in w.items():
        if name not in u:
            continue
        ut = u[name].to(torch.float64)
        if ut.shape != wt.shape:
            raise ValueError(f"direction '{name}' has shape {tuple(ut.shape)}, the weight {tuple(wt.shape)}")
        n = ut.norm()
        if n > 0:
            out[name] = (ut * (wt.double().norm() / n)).to(wt.dtype)
    return out


def random_direction(w: Mapping[str, Tensor], seed: int) -> dict[str, Tensor]:
    """A seeded Gaussian direction shaped like `w`, fp64 (normalise it before use). fp64 draws are the
    same on every CPU; torch's fp32 `randn` differs between its default and AVX2 kernels."""
    g = torch.Generator().manual_seed(seed)
    return {n: torch.randn(t.shape, generator=g, dtype=torch.float64) for n, t in w.items()}


def effective_length(alphas: Sequence[float], hs: Sequence[float], threshold: float) -> tuple[float, float]:
    """(largest α ≥ 0, largest |α| for α ≤ 0) reached from 0 with HS ≤ threshold all the way."""
    pts = sorted(zip(alphas, hs))
    lengths = []
    for side in (1, -1):
        reach = 0.0
        for a, h in sorted((p for p in pts if side * p[0] >= 0), key=lambda p: abs(p[0])):
            if h > threshold:
                break
            reach = abs(a)
        lengths.append(reach)
    return lengths[0], lengths[1]


@torch.no_grad()
def scan(model: nn.Module, tokenizer: Any, prompts: Sequence[dict[str, str]], judge: Judge,
         directions: Mapping[str, Mapping[str, Tensor]], alphas: Sequence[float], threshold: float,
         on_point: Callable[[], None] | None = None) -> list[Curve]:
    """HS of `model` perturbed along each (unnormalised) direction, for every α; restores the model.

    Args:
        directions: name → {parameter name → u_t}; normalised with `normalise`.
        alphas: perturbation sizes relative to each tensor's norm.
        threshold: HS level that ends the effective perturbation length.
    """
    params = dict(model.named_parameters())
    w0 = {n: p.detach().clone() for n, p in params.items()}
    curves = []
    try:
        for name, u in directions.items():
            un = normalise(u, w0)
            if not un:
                raise ValueError(f"direction '{name}' matches no parameter of the model or is zero")
            hs, ref = [], []
            for a in alphas:
                for n, t in un.items():
                    params[n].copy_(w0[n] + a * t.to(w0[n].dtype))
                h, r, _ = harmful_score(model, tokenizer, prompts, judge)
                hs.append(h)
                ref.append(r)
                if on_point is not None:
                    on_point()
            measured = [h for h in hs if h is not None]
            pos, neg = effective_length(alphas, measured, threshold) if len(measured) == len(hs) else (None, None)
            rpos, rneg = effective_length(alphas, [1 - r for r in ref], threshold)
            curves.append(Curve(name, [float(a) for a in alphas], hs, ref, pos, neg, rpos, rneg))
    finally:
        for n, p in params.items():
            p.copy_(w0[n])
    return curves
