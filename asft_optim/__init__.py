"""asft_optim: AsFT (Anchoring Safety in Fine-Tuning) as a drop-in AdamW optimizer."""

from .anchors import Anchors, normalize_name
from .directions import compute_directions
from .lora import LoraLayout, LoraPair, lora_layout
from .metrics import Drift
from .optimizer import AsFTAdamW
from .penalty import AsFTPenalty, attach

__all__ = ["AsFTAdamW", "AsFTPenalty", "attach", "Anchors", "Drift", "compute_directions", "normalize_name",
           "LoraLayout", "LoraPair", "lora_layout"]
__version__ = "0.1.0"
