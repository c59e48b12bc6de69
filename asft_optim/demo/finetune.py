"""The demo's import path of `asft_optim.finetune.training` (moved there: `asft finetune` is a product
feature, which the demo uses)."""

from ..finetune.training import LoraSpec, Method, encode, load_model, save_model, train

__all__ = ["LoraSpec", "Method", "encode", "load_model", "save_model", "train"]
