"""The drift plots of `asft inspect --model` and `asft finetune`: per-layer values in depth order.

Layers are ordered as the data flows through the model: embeddings first, then the numbered blocks
(`model.layers.0`, `model.layers.1`, … by number), then the other modules (final norms), then the
output heads (`lm_head`, `score`, `classifier`). Lines join only consecutive blocks of one numbered
stack; every other layer is a lone marker, since a line between unrelated tensors would suggest a
trend that is not there. A layer whose ΔW is 0 (one a LoRA adapter never trained) has no marker and
its tick says "(not trained)": its ‖C⊥ΔW‖/‖ΔW‖ is undefined, not 0.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

__all__ = ["PlotLayout", "depth_key", "layout", "draw"]

_BLOCK = re.compile(r"^(.*)\.(\d+)$")
_HEADS = ("lm_head", "score", "classifier", "head", "output")
_EMBEDDINGS = ("embed", "wte", "wpe", "tok_embeddings")


def depth_key(layer: str) -> tuple[int, str, int, str]:
    """Sort key of a layer name (see the module docstring)."""
    m = _BLOCK.match(layer)
    if m:
        return (1, m.group(1), int(m.group(2)), "")
    last = layer.rsplit(".", 1)[-1]
    if any(e in last for e in _EMBEDDINGS):
        return (0, "", 0, layer)
    return (3 if last in _HEADS else 2, "", 0, layer)


@dataclass(frozen=True)
class PlotLayout:
    """What a drift plot draws: `layers` in depth order (x = index), `segments` (runs of x joined by a
    line; a run of one is a lone marker), `untrained` (layers with ΔW = 0 in every series)."""
    layers: list[str]
    segments: list[list[int]]
    untrained: set[str]

    def ticks(self) -> list[str]:
        return [f"{name} (not trained)" if name in self.untrained else name for name in self.layers]


def layout(layers: Iterable[str], trained: Iterable[str]) -> PlotLayout:
    """The `PlotLayout` of these layers, given those some series changed (ΔW ≠ 0)."""
    ordered = sorted(dict.fromkeys(layers), key=depth_key)
    done = set(trained)
    segments: list[list[int]] = []
    prev: tuple[str, int] | None = None
    for i, name in enumerate(ordered):
        m = _BLOCK.match(name)
        here = (m.group(1), int(m.group(2))) if m else None
        if here is not None and prev is not None and here[0] == prev[0] and here[1] == prev[1] + 1:
            segments[-1].append(i)
        else:
            segments.append([i])
        prev = here
    return PlotLayout(ordered, segments, {n for n in ordered if n not in done})


def draw(ax: Any, plot: PlotLayout, values: Sequence[float], **style: Any) -> None:
    """One series on `ax`: `values[i]` at x = i (NaN: no marker), lines along each segment only; `style`
    goes to matplotlib (its `label` to the first segment drawn, so the legend has one entry)."""
    label = style.pop("label", None)
    for seg in plot.segments:
        ys = [values[i] for i in seg]
        ax.plot(seg, ys, **style, label=label, linestyle="-" if len(seg) > 1 else "none")
        label = None
