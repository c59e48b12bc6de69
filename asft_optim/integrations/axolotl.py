"""axolotl plugin: AsFT in `axolotl train` from the YAML config.

    plugins:
      - asft_optim.integrations.axolotl.AsFTPlugin
    asft_anchors: directions.safetensors     # required: d = W_aligned - W_base, by tensor name
    asft_lambda: 1.0                         # and asft_penalty, asft_projection, asft_impl,
                                             # asft_allow_unanchored, asft_drift_per_layer

The keys are validated by axolotl's own config schema (`get_input_args`): a missing or absent
directions file, a negative λ or a value of asft_penalty/projection/impl outside their choices
stops `axolotl train` before any model loads.
After axolotl has built its trainer, the plugin hands it `AsFTOptimizerFactory` through the trainer's
`optimizer_cls_and_kwargs`, which axolotl's trainers call with the model and the `TrainingArguments`:
`optimizer: adamw_torch` / `adamw_torch_fused` give `AsFTAdamW`; every other `optimizer:`
(`adamw_bnb_8bit`, `paged_adamw_8bit`, `adafactor`, ..., and axolotl's own optimizers) is built as
axolotl would build it, with the penalty attached (`asft_optim.attach`). LoRA and full-parameter
runs alike; drift metrics go into axolotl's logs (`DriftCallback`). axolotl's
`BasePlugin.create_optimizer` hook is not used: axolotl 0.19-0.21 never call it.

axolotl skips a plugin whose module raises `ImportError` and trains without it; this module turns
its own import failures into `RuntimeError`, and a callback refuses to start training unless the
optimizer carries the penalty.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

try:
    from axolotl.integrations.base import BasePlugin
    from pydantic import BaseModel, Field, model_validator
    from transformers import Trainer

    from .factory import AsFTOptimizerFactory, RequireAsFT, check_optim, optim_name
    from .trainer import DriftCallback
except ImportError as exc:  # axolotl would log it and train plain AdamW
    raise RuntimeError(f"asft_optim's axolotl plugin cannot be imported ({exc}); stopping rather than letting "
                       "axolotl train without AsFT") from exc

__all__ = ["AsFTArgs", "AsFTPlugin"]

# axolotl options that build their own parameter groups inside axolotl's create_optimizer, which the
# factory path replaces
_OWN_GROUPS = ("loraplus_lr_ratio", "embedding_lr", "embedding_lr_scale", "lr_groups")


class AsFTArgs(BaseModel):
    """The plugin's YAML keys (merged into axolotl's config schema)."""

    asft_anchors: str | None = Field(default=None, description="directions file (safetensors) d = W_aligned - W_base")
    asft_lambda: float = Field(default=1.0, ge=0.0, description="λ of the AsFT penalty; 0 switches it off")
    asft_penalty: Literal["orthogonal", "parallel", "full"] = "orthogonal"
    asft_projection: Literal["vector", "reference"] = "vector"
    asft_impl: Literal["triton", "torch", "native", "reference"] | None = None
    asft_allow_unanchored: bool = False
    asft_drift_per_layer: bool = True

    @model_validator(mode="after")
    def _check_anchors(self) -> AsFTArgs:
        if self.asft_anchors is None:
            raise ValueError("asft_anchors: the AsFT plugin needs a directions file (asft directions BASE ALIGNED "
                             "-o directions.safetensors)")
        if not Path(self.asft_anchors).is_file():
            raise ValueError(f"asft_anchors: directions file not found: {self.asft_anchors}")
        return self


def asft_options(cfg: Any) -> dict[str, Any]:
    """The AsFT options of a validated axolotl config, as `AsFTAdamW`/`attach` keywords."""
    options = {"asft_lambda": cfg.asft_lambda, "penalty": cfg.asft_penalty, "projection": cfg.asft_projection,
               "allow_unanchored": bool(cfg.asft_allow_unanchored)}
    if cfg.asft_impl is not None:
        options["impl"] = cfg.asft_impl
    return {k: v for k, v in options.items() if v is not None}


class AsFTPlugin(BasePlugin):
    """`plugins: [asft_optim.integrations.axolotl.AsFTPlugin]` (see the module's docstring)."""

    def get_input_args(self) -> str:
        return "asft_optim.integrations.axolotl.AsFTArgs"

    def post_trainer_create(self, cfg: Any, trainer: Trainer) -> None:
        """Give the trainer AsFT's optimizer factory, the drift callback and the AsFT check."""
        if trainer.optimizer is not None:
            raise RuntimeError(f"AsFT plugin: the trainer already holds a {type(trainer.optimizer).__name__}; "
                               "AsFT must build the optimizer (is another plugin creating one?)")
        own = [key for key in _OWN_GROUPS if cfg.get(key) is not None]
        if own:
            raise ValueError(f"AsFT plugin: {', '.join(own)} cannot be combined with AsFT (axolotl builds those "
                             "parameter groups itself); remove them from the config")
        base = getattr(trainer, "optimizer_cls_and_kwargs", None)  # axolotl's own optimizers (optimi, ao, ...)
        if base is None:
            check_optim(optim_name(trainer.args))
        kwargs = {"args": trainer.args, "anchors": cfg.asft_anchors, **asft_options(cfg)}
        if base is not None:
            kwargs["base"] = base
        trainer.optimizer_cls_and_kwargs = (AsFTOptimizerFactory, kwargs)
        DriftCallback.install(trainer, per_layer=bool(cfg.asft_drift_per_layer))
        trainer.add_callback(RequireAsFT())
        print(f"AsFT plugin: optimizer {optim_name(trainer.args)!r} with the AsFT penalty, λ = {cfg.asft_lambda}, "
              f"directions {cfg.asft_anchors}", flush=True)
