"""peft LoRA adapter folders on disk: the config, the lora_A/lora_B pairs, and whether they fit a model.

A saved adapter holds `adapter_config.json` and `adapter_model.safetensors` whose tensors are named
`base_model.model.<module>.lora_A.weight` (r×in) and `...lora_B.weight` (out×r); the adapted base
weight is `<module>.weight`, out×in (in×out when `fan_in_fan_out`, GPT-2's Conv1D).
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

__all__ = ["ADAPTER_CONFIG", "ADAPTER_WEIGHTS", "Adapter", "is_adapter", "read_adapter", "check_fits"]

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
_PAIR = re.compile(r"^(?:base_model\.model\.)?(?P<module>.+)\.lora_(?P<kind>A|B)(?:\.[^.]+)?\.weight$")


@dataclass
class Adapter:
    """One adapter folder: its config and tensors; `pairs` maps module → (lora_A name, lora_B name)."""
    folder: Path
    config: dict
    tensors: dict[str, torch.Tensor]
    pairs: dict[str, tuple[str, str]]

    @property
    def fan_in_fan_out(self) -> bool:
        return bool(self.config.get("fan_in_fan_out", False))

    def weight_shape(self, module: str) -> tuple[int, int]:
        """The base weight's stored shape that this adapter's update s·B·A has."""
        a, b = self.pairs[module]
        out, inp = self.tensors[b].shape[0], self.tensors[a].shape[1]
        return (inp, out) if self.fan_in_fan_out else (out, inp)


def is_adapter(folder: str | Path) -> bool:
    return (Path(folder) / ADAPTER_CONFIG).is_file()


def read_adapter(folder: str | Path) -> Adapter:
    """Read an adapter folder (safetensors weights only).

    Raises:
        FileNotFoundError: no adapter_config.json or no adapter_model.safetensors.
        ValueError: not a LoRA adapter, or a lora_A without its lora_B (the message names the module).
    """
    from safetensors.torch import load_file

    folder = Path(folder)
    if not (folder / ADAPTER_CONFIG).is_file():
        raise FileNotFoundError(f"adapter folder {folder} has no {ADAPTER_CONFIG}: not a peft adapter")
    config = json.loads((folder / ADAPTER_CONFIG).read_text())
    if config.get("peft_type", "LORA") != "LORA":
        raise ValueError(f"adapter {folder} is a {config.get('peft_type')} adapter; only LoRA is supported")
    if not (folder / ADAPTER_WEIGHTS).is_file():
        raise FileNotFoundError(f"adapter folder {folder} has no {ADAPTER_WEIGHTS}")
    tensors = load_file(str(folder / ADAPTER_WEIGHTS))
    found: dict[str, dict[str, str]] = {}
    for name in tensors:
        m = _PAIR.match(name)
        if m:
            found.setdefault(m["module"], {})[m["kind"]] = name
    pairs = {}
    for module, ab in found.items():
        if set(ab) != {"A", "B"}:
            raise ValueError(f"adapter {folder}: module '{module}' has lora_{''.join(ab)} without its pair")
        pairs[module] = (ab["A"], ab["B"])
    if not pairs:
        raise ValueError(f"adapter {folder}: {ADAPTER_WEIGHTS} holds no lora_A/lora_B weights")
    return Adapter(folder, config, tensors, pairs)


def check_fits(adapter: Adapter, shapes: Mapping[str, tuple[int, ...]], model: str) -> None:
    """Raise ValueError unless every adapted module's base weight `<module>.weight` is in `shapes`
    (name → shape, e.g. a checkpoint's tensors or a model's parameters) with the adapter's shape."""
    for module in sorted(adapter.pairs):
        name = f"{module}.weight"
        if name not in shapes:
            raise ValueError(f"adapter {adapter.folder} does not fit model {model}: it adapts '{module}', which "
                             "the model does not have (an adapter made for another base model?)")
        want = adapter.weight_shape(module)
        if tuple(shapes[name]) != want:
            raise ValueError(f"adapter {adapter.folder} does not fit model {model}: '{name}' has shape "
                             f"{tuple(shapes[name])}, the adapter's update is {want[0]}×{want[1]} "
                             "(an adapter made for another base model?)")
