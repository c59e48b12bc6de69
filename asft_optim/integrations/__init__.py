"""Integrations with training frameworks (need their extras installed).

`asft_optim.integrations.trainer`: `transformers.Trainer` (`AsFTTrainer`, `AsFTTrainerMixin`,
`DriftCallback`, `create_asft_optimizer`). `asft_optim.integrations.factory`: `AsFTOptimizerFactory`
for `Trainer(optimizer_cls_and_kwargs=...)`. `asft_optim.integrations.axolotl` (axolotl's plugin) and
`asft_optim.integrations.llamafactory` (a LLaMA-Factory launcher) are imported on their own.
Importing this package imports transformers.
"""

from .factory import AsFTOptimizerFactory
from .trainer import (
           AsFTTrainer,
           AsFTTrainerMixin,
           DriftCallback,
           create_asft_optimizer,
           unwrap_asft,
)

__all__ = ["AsFTOptimizerFactory", "AsFTTrainer", "AsFTTrainerMixin", "DriftCallback", "create_asft_optimizer",
           "unwrap_asft"]
