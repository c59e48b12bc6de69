"""Integrations with training frameworks (need their extras installed).

`asft_optim.integrations.trainer`: `transformers.Trainer` (`AsFTTrainer`, `AsFTTrainerMixin`,
`DriftCallback`, `create_asft_optimizer`). Importing this package imports transformers.
"""

from .trainer import AsFTTrainer, AsFTTrainerMixin, DriftCallback, create_asft_optimizer, unwrap_asft

__all__ = ["AsFTTrainer", "AsFTTrainerMixin", "DriftCallback", "create_asft_optimizer", "unwrap_asft"]
