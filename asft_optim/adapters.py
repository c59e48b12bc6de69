"""peft LoRA adapter folders on disk (`adapter_config.json` + `adapter_model.safetensors`), read
without peft: the adapted modules, their scaling and base-weight shapes, whether they fit a model,
and the drift sums of each effective update ΔW = s·B·A against its direction, streamed.

peft initialises B = 0, so a saved adapter's s·B·A is the whole change it makes to its base weight
(ΔW = (s·B·A)ᵀ for `fan_in_fan_out` layers such as GPT-2's `Conv1D`, whose weight is stored in×out).
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .anchors import normalize_name
from .checkpoints import Checkpoint, CheckpointError, open_checkpoint
from .metrics import DriftSums

__all__ = ["ADAPTER_CONFIG", "ADAPTER_WEIGHTS", "AdapterModule", "Adapter", "is_adapter_folder", "open_adapter",
           "check_fits", "adapter_drift_sums"]

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
_PAIR = re.compile(r"^(?P<module>.+)\.lora_(?P<kind>[AB])(?:\.(?P<adapter>[^.]+))?\.weight$")


@dataclass(frozen=True)
class AdapterModule:
    """One adapted module of a saved adapter.

    Attributes:
        direction: the anchors key of its base weight (normalised `module + ".weight"`).
        a_name, b_name: lora_A (r×in) and lora_B (out×r) in the adapter's weights file.
        scaling: s = lora_alpha/r (lora_alpha/√r with rslora); r is lora_A's row count (so peft's
            `rank_pattern` is honoured), alpha is `alpha_pattern`'s value for the module or `lora_alpha`.
        fan_in_fan_out: the base weight is stored in×out.
        base_shape: the base weight's stored shape, (out, in), or (in, out) with fan_in_fan_out.
    The fields a `lora.LoraPair` also has (one adapter on one module of a live model) have its names.
    """
    direction: str
    a_name: str
    b_name: str
    scaling: float
    fan_in_fan_out: bool
    base_shape: tuple[int, int]

    @property
    def module(self) -> str:
        """The adapted module's path in the base model (`model.layers.0.self_attn.q_proj`)."""
        return self.direction.removesuffix(".weight")

    @property
    def weight_shape(self) -> tuple[int, int]:
        """`base_shape` (its former name)."""
        return self.base_shape


@dataclass(frozen=True)
class Adapter:
    """An opened adapter folder: its config, its weights file (read lazily) and its adapted modules.

    Attributes:
        others: tensors of the weights file that are no lora_A/lora_B weight (DoRA magnitudes,
            embedding adapters, lora_bias, modules_to_save copies); peft can load them, but their
            change is not s·B·A.
    """
    folder: Path
    config: dict[str, Any]
    weights: Checkpoint
    modules: tuple[AdapterModule, ...]
    others: tuple[str, ...]

    def read(self, name: str) -> torch.Tensor:
        """Tensor `name` of the weights file, in its stored dtype."""
        info = self.weights.tensors[name]
        return self.weights.read_into(name, torch.empty(info.shape, dtype=info.dtype))

    def require_plain_lora(self, action: str) -> None:
        """Raise CheckpointError unless every change the adapter makes is some s·B·A (no DoRA, no
        other tensors); `action` ends the message ("inspected", "projected")."""
        if self.config.get("use_dora"):
            raise CheckpointError(f"{self.folder} holds a DoRA adapter: its update is not s·B·A, so it cannot be "
                                  f"{action}")
        if self.others:
            raise CheckpointError(f"{self.folder / ADAPTER_WEIGHTS}: tensor '{self.others[0]}' is not a lora_A/lora_B "
                                  f"weight (DoRA magnitudes, embedding adapters, lora_bias and modules_to_save cannot "
                                  f"be {action})")


def is_adapter_folder(path: str | os.PathLike) -> bool:
    """True for a folder holding a peft adapter (its `adapter_config.json`)."""
    return (Path(path) / ADAPTER_CONFIG).is_file()


def _pattern_value(patterns: dict[str, float], module: str, default: float) -> float:
    """peft's per-module override: the first pattern that matches the end of the module path."""
    for pattern, value in patterns.items():
        if re.match(rf"(.*\.)?({pattern})$", module):
            return value
    return default


def open_adapter(folder: str | os.PathLike) -> Adapter:
    """Open a peft LoRA adapter folder (safetensors weights) and resolve its adapted modules.

    Raises:
        CheckpointError (a ValueError): the folder, config or weights are missing or unreadable, the
            adapter is not LoRA, a lora_A has no lora_B (or their ranks differ), a LoRA weight is not
            a 2-D floating-point tensor, or there is no LoRA weight at all. Each message names the
            folder or file, and the module or tensor.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointError(f"adapter folder not found: {folder}")
    if not is_adapter_folder(folder):
        raise CheckpointError(f"adapter folder {folder} has no {ADAPTER_CONFIG}: not a peft adapter")
    try:
        config = json.loads((folder / ADAPTER_CONFIG).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"cannot read {folder / ADAPTER_CONFIG}: {e}") from None
    if config.get("peft_type", "LORA") != "LORA":
        raise CheckpointError(f"{folder} holds a {config['peft_type']} adapter; only LoRA adapters are supported")
    if "lora_alpha" not in config:
        raise CheckpointError(f"{folder / ADAPTER_CONFIG} has no lora_alpha")
    weights = folder / ADAPTER_WEIGHTS
    if not weights.is_file():
        raise CheckpointError(f"{folder} has {ADAPTER_CONFIG} but no {ADAPTER_WEIGHTS} (save it with "
                              "safe_serialization=True)")
    ck = open_checkpoint(weights)
    found: dict[str, dict[str, str]] = {}
    others = []
    for name in ck.tensors:
        m = _PAIR.match(name)
        if m is None:
            others.append(name)
        else:
            found.setdefault(m["module"], {})[m["kind"]] = name
    alpha, rslora = float(config["lora_alpha"]), bool(config.get("use_rslora"))
    fifo = bool(config.get("fan_in_fan_out"))
    modules = []
    for module, kinds in sorted(found.items()):
        if set(kinds) != {"A", "B"}:
            raise CheckpointError(f"{weights}: module '{module}' has a lora_{next(iter(kinds))} but no partner")
        a, b = ck.tensors[kinds["A"]], ck.tensors[kinds["B"]]
        for info in (a, b):
            if len(info.shape) != 2 or not info.is_floating_point:
                raise CheckpointError(f"{weights}: '{info.name}' is {info.dtype_str} of shape {list(info.shape)}; only "
                                      "2-D floating-point lora_A/lora_B (Linear and Conv1D layers) are supported")
        r = a.shape[0]
        if b.shape[1] != r:
            raise CheckpointError(f"{weights}: module '{module}' has lora_A of shape {list(a.shape)} but lora_B of "
                                  f"shape {list(b.shape)}: their ranks differ")
        direction = normalize_name(module + ".weight")
        s = _pattern_value(config.get("alpha_pattern") or {}, direction.removesuffix(".weight"), alpha)
        shape = (a.shape[1], b.shape[0]) if fifo else (b.shape[0], a.shape[1])
        modules.append(AdapterModule(direction, kinds["A"], kinds["B"], s / (math.sqrt(r) if rslora else r), fifo,
                                     shape))
    if not modules:
        raise CheckpointError(f"{weights} holds no lora_A/lora_B weights")
    return Adapter(folder, config, ck, tuple(modules), tuple(others))


def check_fits(adapter: Adapter, shapes: Mapping[str, tuple[int, ...]], model: str, *,
               missing_ok: bool = False) -> list[str]:
    """Check every adapted module's base weight against `shapes` (name → shape: a checkpoint's
    tensors, a model's parameters, a directions file; names are normalised).

    Returns:
        the direction keys of adapted modules that `shapes` lacks (empty unless `missing_ok`).

    Raises:
        ValueError: a base weight has another shape than the adapter's update, or (unless
            `missing_ok`) is missing; `model` names the other side in the message.
    """
    known = {normalize_name(n): tuple(s) for n, s in shapes.items()}
    missing = []
    for m in adapter.modules:
        if m.direction not in known:
            if not missing_ok:
                raise ValueError(f"adapter {adapter.folder} does not fit model {model}: it adapts '{m.module}', which "
                                 "the model does not have (an adapter made for another base model?)")
            missing.append(m.direction)
        elif known[m.direction] != m.base_shape:
            raise ValueError(f"adapter {adapter.folder} does not fit model {model}: '{m.direction}' has shape "
                             f"{known[m.direction]}, the adapter's update is {m.base_shape[0]}×{m.base_shape[1]} "
                             "(an adapter made for another base model?)")
    return missing


@torch.no_grad()
def adapter_drift_sums(adapter: Adapter, module: AdapterModule,
                       read_rows: Callable[[int, int], torch.Tensor]) -> DriftSums:
    """(‖ΔW‖², ‖d‖², ⟨ΔW, d⟩, numel) in float64 for ΔW = s·B·A, without materialising ΔW.

    Args:
        read_rows: `read_rows(first, count)` returns rows first:first+count of the direction
            (count × cols), whose shape is `module.base_shape` (see `check_fits`).
    """
    a, b = adapter.read(module.a_name).double(), adapter.read(module.b_name).double()
    left, right = (a.T, b.T) if module.fan_in_fan_out else (b, a)  # stored ΔW = s · left @ right
    rows, cols = module.base_shape
    s = module.scaling
    xx = s * s * float(((left.T @ left) * (right @ right.T)).sum())
    uu = xu = 0.0
    step = max(1, (16 << 20) // max(cols, 1))
    for first in range(0, rows, step):
        d = read_rows(first, min(step, rows - first)).double()
        uu += float(d.square().sum())
        xu += s * float((left[first:first + d.shape[0]] * (d @ right.T)).sum())
    return DriftSums(max(xx, 0.0), uu, xu, rows * cols)
