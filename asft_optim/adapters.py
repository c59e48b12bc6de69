"""peft LoRA adapter folders on disk (`adapter_config.json` + `adapter_model.safetensors`), read
without peft: the adapted modules, their scaling, and the drift sums of each effective update
ΔW = s·B·A against its direction, streamed.

peft initialises B = 0, so a saved adapter's s·B·A is the whole change it makes to its base weight
(ΔW = (s·B·A)ᵀ for `fan_in_fan_out` layers such as GPT-2's `Conv1D`, whose weight is stored in×out).
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from .anchors import normalize_name
from .checkpoints import Checkpoint, CheckpointError, open_checkpoint

__all__ = ["ADAPTER_CONFIG", "AdapterModule", "is_adapter_folder", "open_adapter", "adapter_drift_sums"]

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
_PAIR = re.compile(r"^(?P<module>.+)\.lora_(?P<kind>[AB])(?:\.(?P<adapter>[^.]+))?\.weight$")


@dataclass(frozen=True)
class AdapterModule:
    """One adapted module of a saved adapter.

    Attributes:
        direction: the anchors key of its base weight (normalised `module + ".weight"`).
        a_name, b_name: lora_A (r×in) and lora_B (out×r) in the adapter's weights file.
        scaling: s = lora_alpha/r (lora_alpha/√r with rslora), with r and alpha as peft resolves them.
        fan_in_fan_out: the base weight is stored in×out.
    """
    direction: str
    a_name: str
    b_name: str
    scaling: float
    fan_in_fan_out: bool


def is_adapter_folder(path: str | os.PathLike) -> bool:
    """True for a folder holding a peft adapter (its `adapter_config.json`)."""
    return (Path(path) / ADAPTER_CONFIG).is_file()


def _pattern_value(patterns: dict[str, float], module: str, default: float) -> float:
    """peft's per-module override: the first pattern that matches the end of the module path."""
    for pattern, value in patterns.items():
        if re.match(rf"(.*\.)?({pattern})$", module):
            return value
    return default


def open_adapter(folder: str | os.PathLike) -> tuple[Checkpoint, list[AdapterModule]]:
    """The adapter's weights file and its adapted modules.

    Raises:
        CheckpointError: the config or weights are missing or unreadable, the adapter is not plain
            LoRA (DoRA, embedding adapters, lora_bias, another peft method), or a lora_A has no lora_B.
    """
    folder = Path(folder)
    try:
        config = json.loads((folder / ADAPTER_CONFIG).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"cannot read {folder / ADAPTER_CONFIG}: {e}") from None
    if config.get("peft_type", "LORA") != "LORA":
        raise CheckpointError(f"{folder} holds a {config['peft_type']} adapter; only LoRA adapters can be inspected")
    if config.get("use_dora"):
        raise CheckpointError(f"{folder} holds a DoRA adapter: its update is not s·B·A, so it cannot be inspected")
    weights = folder / ADAPTER_WEIGHTS
    if not weights.is_file():
        raise CheckpointError(f"{folder} has {ADAPTER_CONFIG} but no {ADAPTER_WEIGHTS} (save it with "
                              "safe_serialization=True)")
    ck = open_checkpoint(weights)
    found: dict[str, dict[str, str]] = {}
    for name in ck.tensors:
        m = _PAIR.match(name)
        if m is None:
            raise CheckpointError(f"{weights}: tensor '{name}' is not a lora_A/lora_B weight (DoRA magnitudes, "
                                  "embedding adapters, lora_bias and modules_to_save cannot be inspected)")
        found.setdefault(m["module"], {})[m["kind"]] = name
    alpha, rslora, fifo = float(config["lora_alpha"]), bool(config.get("use_rslora")), bool(config.get("fan_in_fan_out"))
    modules = []
    for module, kinds in found.items():
        if set(kinds) != {"A", "B"}:
            raise CheckpointError(f"{weights}: module '{module}' has a lora_{next(iter(kinds))} but no partner")
        r = ck.tensors[kinds["A"]].shape[0]
        inner = module[len("base_model.model."):] if module.startswith("base_model.model.") else module
        a = _pattern_value(config.get("alpha_pattern") or {}, inner, alpha)
        modules.append(AdapterModule(normalize_name(module + ".weight"), kinds["A"], kinds["B"],
                                     a / (math.sqrt(r) if rslora else r), fifo))
    if not modules:
        raise CheckpointError(f"{weights} holds no LoRA weights")
    return ck, modules


def _read(ck: Checkpoint, name: str) -> torch.Tensor:
    info = ck.tensors[name]
    return ck.read_into(name, torch.empty(info.shape, dtype=info.dtype)).double()


@torch.no_grad()
def adapter_drift_sums(ck: Checkpoint, module: AdapterModule, shape: tuple[int, ...],
                       read_rows: Callable[[int, int], torch.Tensor]) -> tuple[float, float, float, int]:
    """(‖ΔW‖², ‖d‖², ⟨ΔW, d⟩, numel) in float64 for ΔW = s·B·A, without materialising ΔW.

    Args:
        shape: the direction's (= base weight's) stored shape, (out, in) or (in, out) with fan_in_fan_out.
        read_rows: `read_rows(first, count)` returns rows first:first+count of the direction (count × cols).
    """
    a, b = _read(ck, module.a_name), _read(ck, module.b_name)
    left, right = (a.T, b.T) if module.fan_in_fan_out else (b, a)  # stored ΔW = s · left @ right
    rows, cols = (int(shape[0]), int(shape[1])) if len(shape) == 2 else (0, 0)
    if (rows, cols) != (left.shape[0], right.shape[1]):
        raise CheckpointError(f"adapter update of '{module.direction}' has shape {[left.shape[0], right.shape[1]]}, "
                              f"but its direction has shape {list(shape)}")
    s = module.scaling
    xx = s * s * float(((left.T @ left) * (right @ right.T)).sum())
    uu = xu = 0.0
    step = max(1, (16 << 20) // max(cols, 1))
    for first in range(0, rows, step):
        d = read_rows(first, min(step, rows - first)).double()
        uu += float(d.square().sum())
        xu += s * float((left[first:first + d.shape[0]] * (d @ right.T)).sum())
    return max(xx, 0.0), uu, xu, rows * cols
