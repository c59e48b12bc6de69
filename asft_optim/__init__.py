"""asft_optim: AsFT (Anchoring Safety in Fine-Tuning) as a drop-in AdamW optimizer."""

from .anchors import Anchors, normalize_name
from .metrics import Drift
from .optimizer import AsFTAdamW

__all__ = ["AsFTAdamW", "Anchors", "Drift", "normalize_name"]
__version__ = "0.1.0"
