"""`transformers.Trainer` glue: AsFTAdamW as the Trainer's optimizer, drift metrics in its logs.

Full-parameter and peft LoRA training alike (the optimizer is built with `AsFTAdamW.from_model`,
which reads the LoRA pairs, scaling and layout from the model):

    from asft_optim import Anchors
    from asft_optim.integrations import AsFTTrainer

    trainer = AsFTTrainer(model=model, args=args, train_dataset=data,
                          anchors=Anchors.load("directions.safetensors"), asft_lambda=1.0)
    trainer.train()                                   # resume_from_checkpoint=... works as usual

Any other Trainer subclass (TRL's `SFTTrainer`, ...) gets the same behaviour from the mixin:
`class MyTrainer(AsFTTrainerMixin, SFTTrainer): ...`.

The optimizer takes lr, betas, eps and weight decay from `TrainingArguments` (`args.optim` is not
used), with Trainer's own weight-decay split (no decay for biases and norms). Parameters are bound
by name, so accelerate's `prepare` (which may wrap the optimizer and swap parameter objects) and
checkpoint resume (`Trainer` saves and reloads `optimizer.state_dict()`, W0 included) keep working.
Trainer clips gradients before `optimizer.step()`; the AsFT penalty gradient is added inside the
step and is not clipped.

With a DeepSpeed config (`TrainingArguments(deepspeed=...)`), AsFTAdamW is ZeRO's client
optimizer (stages 1-3, full-parameter training; see `asft_optim.zero`); the config must not have an
"optimizer" section (DeepSpeed would build its own optimizer and AsFT would silently not run), and
`check_config` refuses the other unsupported settings when the Trainer is built.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn
from transformers import Trainer, TrainerCallback

from ..anchors import Anchors
from ..lora import is_lora_name
from ..metrics import drift_from_sums, per_layer
from ..optimizer import AsFTAdamW
from ..zero import check_client, check_config

__all__ = ["AsFTTrainer", "AsFTTrainerMixin", "DriftCallback", "create_asft_optimizer", "unwrap_asft"]


def unwrap_asft(optimizer: Any) -> AsFTAdamW | None:
    """The `AsFTAdamW` inside an optimizer wrapper (accelerate's `AcceleratedOptimizer`, ...), or None."""
    seen = 0
    while optimizer is not None and not isinstance(optimizer, AsFTAdamW) and seen < 8:
        optimizer = getattr(optimizer, "optimizer", None)
        seen += 1
    return optimizer if isinstance(optimizer, AsFTAdamW) else None


def create_asft_optimizer(trainer: Trainer, model: nn.Module, anchors: Anchors | Mapping[str, Tensor],
                          **options: Any) -> AsFTAdamW:
    """`AsFTAdamW.from_model` with the Trainer's hyper-parameters and weight-decay split.

    Args:
        trainer: supplies `args` (learning_rate, adam_beta1/2, adam_epsilon, weight_decay) and
            `get_decay_parameter_names`.
        model: the model whose trainable parameters are optimised.
        anchors: directions keyed by the base model's tensor names.
        **options: further `AsFTAdamW` arguments (asft_lambda, penalty, projection, impl,
            allow_unanchored, ...); they override the values taken from `args`.
    """
    args = trainer.args
    decay = set(trainer.get_decay_parameter_names(model))
    no_decay = [n for n, p in model.named_parameters() if p.requires_grad and n not in decay]
    kwargs: dict[str, Any] = dict(lr=args.learning_rate, betas=(args.adam_beta1, args.adam_beta2),
                                  eps=args.adam_epsilon, weight_decay=args.weight_decay)
    kwargs.update(options)
    return AsFTAdamW.from_model(model, anchors=anchors, no_weight_decay=no_decay, **kwargs)


class DriftCallback(TrainerCallback):
    """Adds AsFT drift metrics to every training log (and so to every reporting integration).

    Keys: `asft/cos` and `asft/orth_ratio` over all anchored tensors taken as one vector, and
    `asft/cos/<layer>`, `asft/orth_ratio/<layer>` per layer (`metrics.layer_of`; LoRA adapters count
    as their base weight) when `per_layer` is set. cos = cos(ΔW, d); orth_ratio = ‖C⊥ΔW‖/‖ΔW‖.

    Trainer calls callbacks in order and puts its reporting callbacks first, so this callback must
    run before them: `AsFTTrainer` inserts it at the front; elsewhere use `DriftCallback.install(trainer)`.
    """

    def __init__(self, per_layer: bool = True) -> None:
        self.per_layer = per_layer

    @classmethod
    def install(cls, trainer: Trainer, per_layer: bool = True) -> DriftCallback:
        """Insert a DriftCallback before the trainer's other callbacks and return it."""
        cb = cls(per_layer)
        trainer.callback_handler.callbacks.insert(0, cb)
        return cb

    def metrics(self, optimizer: AsFTAdamW) -> dict[str, float]:
        sums = optimizer.drift_sums()
        if not sums:
            return {}
        total = [sum(s[i] for s in sums.values()) for i in range(4)]
        overall = drift_from_sums(total[0], total[1], total[2], int(total[3]))
        out = {"asft/cos": overall.cos, "asft/orth_ratio": overall.orth_ratio}
        if self.per_layer:
            for layer, d in per_layer(sums).items():
                out[f"asft/cos/{layer}"] = d.cos
                out[f"asft/orth_ratio/{layer}"] = d.orth_ratio
        return out

    def on_log(self, args, state, control, logs=None, optimizer=None, **kwargs):  # noqa: D102
        opt = unwrap_asft(optimizer)
        if logs is not None and opt is not None and "loss" in logs:
            logs.update(self.metrics(opt))
        return control


class AsFTTrainerMixin:
    """Makes a `Trainer` (sub)class train with `AsFTAdamW` and log drift.

    Keyword args (taken before the Trainer's own):
        anchors: directions (`Anchors` or a name → tensor mapping).
        asft_lambda, penalty, projection, impl, allow_unanchored, ...: passed to `AsFTAdamW`.
        drift_per_layer: per-layer keys in the drift logs (None: no `DriftCallback`).
    """

    def __init__(self, *args: Any, anchors: Anchors | Mapping[str, Tensor],
                 drift_per_layer: bool | None = True, asft_options: Mapping[str, Any] | None = None,
                 **kwargs: Any) -> None:
        options = dict(asft_options or {})
        for key in ("asft_lambda", "penalty", "projection", "impl", "allow_unanchored"):
            if key in kwargs:
                options[key] = kwargs.pop(key)
        if kwargs.get("optimizers", (None, None))[0] is not None or kwargs.get("optimizer_cls_and_kwargs"):
            raise ValueError("AsFTTrainer builds its own AsFTAdamW; do not pass `optimizers` or "
                             "`optimizer_cls_and_kwargs`")
        super().__init__(*args, **kwargs)
        if self._deepspeed_config() is not None:
            lora = any(p.requires_grad and is_lora_name(n) for n, p in self.model.named_parameters())  # type: ignore[attr-defined]
            check_config(self._deepspeed_config(), has_lora=lora)  # type: ignore[arg-type]
        self.asft_anchors = anchors
        self.asft_options = options
        if drift_per_layer is not None:
            DriftCallback.install(self, per_layer=drift_per_layer)  # type: ignore[arg-type]

    def create_optimizer(self, model: nn.Module | None = None) -> torch.optim.Optimizer:
        """Build `AsFTAdamW.from_model` on the (possibly prepared) model, once."""
        if self.optimizer is None:  # type: ignore[has-type]
            opt_model = self.model if model is None else model  # type: ignore[attr-defined]
            self.optimizer = create_asft_optimizer(self, opt_model, self.asft_anchors,  # type: ignore[arg-type]
                                                   **self.asft_options)
            if self._deepspeed_config() is not None:
                check_client(self.optimizer, self._deepspeed_config())  # type: ignore[arg-type]
        return self.optimizer

    def _deepspeed_config(self) -> dict[str, Any] | None:
        """The DeepSpeed config the Trainer will use, or None without DeepSpeed. transformers adds
        "zero_allow_untested_optimizer": true itself for an optimizer the Trainer builds."""
        if not getattr(self, "is_deepspeed_enabled", False):
            return None
        config = self.accelerator.state.deepspeed_plugin.hf_ds_config.config  # type: ignore[attr-defined]
        return {**config, "zero_allow_untested_optimizer": True}


class AsFTTrainer(AsFTTrainerMixin, Trainer):
    """`transformers.Trainer` with `AsFTAdamW` (see `AsFTTrainerMixin` for the extra arguments)."""
