"""Drift metrics: how far, and in which direction, fine-tuning moved each tensor.

For ΔW = W - W0 and the alignment direction d of one tensor (both flattened):

    delta_norm = ‖ΔW‖
    cos        = ⟨ΔW, d⟩ / (‖ΔW‖·‖d‖)          (0 when ΔW = 0 or d = 0)
    orth_ratio = ‖C⊥ΔW‖ / ‖ΔW‖ = sqrt(1 - cos²) (0 when ΔW = 0; 1 when d = 0)
"""

from __future__ import annotations

import math
import re
from collections import defaultdict
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import NamedTuple

import torch
from torch import Tensor

__all__ = ["Drift", "DriftSums", "drift", "drift_from_sums", "sums", "layer_of", "per_layer"]


class DriftSums(NamedTuple):
    """One tensor's drift sums in float64 (additive over pieces of the tensor and over ranks)."""
    xx: float    # ‖ΔW‖²
    uu: float    # ‖d‖²
    xu: float    # ⟨ΔW, d⟩
    numel: int


@dataclass(frozen=True)
class Drift:
    """Drift of one tensor (or the aggregate of a layer's tensors)."""
    delta_norm: float
    cos: float
    orth_ratio: float
    numel: int

    def as_dict(self) -> dict[str, float]:
        return asdict(self)


def drift(delta: Tensor, d: Tensor) -> Drift:
    """Drift of one tensor from its update `delta` = W - W0 and its direction `d` (equal numel)."""
    return _from_sums(*sums(delta, d))


def drift_from_sums(xx: float, uu: float, xu: float, numel: int) -> Drift:
    """Drift of one tensor from its `sums` (which may be accumulated over pieces of the tensor)."""
    return _from_sums(xx, uu, xu, numel)


def _from_sums(xx: float, uu: float, xu: float, numel: int) -> Drift:
    nx = math.sqrt(xx)
    if nx == 0.0:
        return Drift(0.0, 0.0, 0.0, numel)
    if uu == 0.0:
        return Drift(nx, 0.0, 1.0, numel)
    cos = max(-1.0, min(1.0, xu / (nx * math.sqrt(uu))))
    return Drift(nx, cos, math.sqrt(max(0.0, 1.0 - cos * cos)), numel)


_LAYER = re.compile(r"^(.*?\.(?:layers|h|blocks|layer)\.\d+)\.")


def layer_of(name: str) -> str:
    """The layer a parameter belongs to: `model.layers.3.self_attn.q_proj.weight` → `model.layers.3`;
    names outside numbered blocks map to their module path (`lm_head.weight` → `lm_head`)."""
    m = _LAYER.match(name)
    return m.group(1) if m else name.rsplit(".", 1)[0]


def per_layer(sums: Mapping[str, tuple[float, float, float, int]]) -> dict[str, Drift]:
    """Aggregate per-tensor sums (⟨ΔW,ΔW⟩, ⟨d,d⟩, ⟨ΔW,d⟩, numel) into per-layer drift, treating a layer's
    tensors as one concatenated vector."""
    acc: dict[str, list[float]] = defaultdict(lambda: [0.0, 0.0, 0.0, 0])
    for name, (xx, uu, xu, n) in sums.items():
        a = acc[layer_of(name)]
        a[0] += xx
        a[1] += uu
        a[2] += xu
        a[3] += n
    return {layer: _from_sums(xx, uu, xu, int(n)) for layer, (xx, uu, xu, n) in acc.items()}


@torch.no_grad()
def sums(delta: Tensor, d: Tensor) -> DriftSums:
    """(⟨ΔW,ΔW⟩, ⟨d,d⟩, ⟨ΔW,d⟩, numel) in float64, the inputs of `per_layer`."""
    x = delta.double().reshape(-1)
    u = d.double().reshape(-1)
    if x.numel() != u.numel():
        raise ValueError(f"drift: update has {x.numel()} elements but direction has {u.numel()}")
    return DriftSums(float(x @ x), float(u @ u), float(x @ u), x.numel())
