"""Integrations with training frameworks (need their extras installed).

`asft_optim.integrations.trainer`: `transformers.Trainer` (`AsFTTrainer`, `AsFTTrainerMixin`,
`DriftCallback`, `create_asft_optimizer`). `asft_optim.integrations.factory`: `AsFTOptimizerFactory`
for `Trainer(optimizer_cls_and_kwargs=...)`. `asft_optim.integrations.axolotl`: axolotl's plugin;
`asft_optim.integrations.llamafactory`: a LLaMA-Factory launcher.

The names below are imported on first use (they import transformers), so that importing a
submodule (axolotl's plugin) runs nothing else first.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .factory import AsFTOptimizerFactory
    from .trainer import (
        AsFTTrainer,
        AsFTTrainerMixin,
        DriftCallback,
        create_asft_optimizer,
        unwrap_asft,
    )

_HOME = {"AsFTOptimizerFactory": ".factory", "AsFTTrainer": ".trainer", "AsFTTrainerMixin": ".trainer",
         "DriftCallback": ".trainer", "create_asft_optimizer": ".trainer", "unwrap_asft": ".trainer"}

__all__ = ["AsFTOptimizerFactory", "AsFTTrainer", "AsFTTrainerMixin", "DriftCallback", "create_asft_optimizer",
           "unwrap_asft"]


def __getattr__(name: str) -> Any:
    if name in _HOME:
        return getattr(importlib.import_module(_HOME[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
