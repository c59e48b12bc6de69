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

`TrainingArguments.optim` picks the optimizer. AdamW's names ("adamw_torch", "adamw_torch_fused")
give the fused `AsFTAdamW` (lr, betas, eps and weight decay from the arguments, with Trainer's own
weight-decay split); every other optimizer transformers can build ("adamw_8bit", "paged_adamw_8bit",
"adafactor", "lion_8bit", "adamw_torch_8bit", "schedule_free_adamw", ...) is built by transformers,
with `optim_args`, and the penalty attached to it (`asft_optim.attach`). Optimizers that step outside
`optimizer.step()` (LOMO, AdaLOMO, the `_layerwise` variants) are refused. Parameters are bound
by name, so accelerate's `prepare` (which may wrap the optimizer and swap parameter objects) and
checkpoint resume (`Trainer` saves and reloads `optimizer.state_dict()`, W0 included) keep working.
Trainer clips gradients before `optimizer.step()`; the AsFT penalty gradient is added inside the
step and is not clipped.

`lambda_per_micro_batch=True` reproduces the paper's released code, which adds its penalty to the
loss of every micro-batch: each optimizer step then uses λ·k, k = the number of micro-batches in
that step's accumulation window (the last window of an epoch may be shorter).

With a DeepSpeed config (`TrainingArguments(deepspeed=...)`), AsFTAdamW is ZeRO's client
optimizer (stages 1-3, full-parameter training; see `asft_optim.zero`); the config must not have an
"optimizer" section (DeepSpeed would build its own optimizer and AsFT would silently not run), and
`check_config` refuses the other unsupported settings when the Trainer is built.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from transformers import Trainer, TrainerCallback

from ..anchors import Anchors
from ..lora import is_lora_name
from ..metrics import drift_from_sums, per_layer
from ..optimizer import AsFTAdamW, as_anchors
from ..penalty import AsFTPenalty, attach, attached
from ..zero import check_client, check_config

__all__ = ["AsFTTrainer", "AsFTTrainerMixin", "DriftCallback", "create_asft_optimizer", "unwrap_asft",
           "resolve_anchors", "HONOURED_OPTIMS", "optim_route"]

# `TrainingArguments.optim` values whose meaning AsFTAdamW keeps (AdamW; the implementation is its own)
HONOURED_OPTIMS = ("adamw_torch", "adamw_torch_fused")
# optimizers that update inside backward hooks or per layer, where no step pre-hook sees the gradients
_STEP_OUTSIDE = ("lomo", "adalomo")


def optim_route(optim: str) -> str:
    """"fused" (AsFTAdamW) for AdamW's names, "attach" for any other optimizer transformers builds.

    Raises:
        ValueError: an optimizer whose update does not go through `optimizer.step()`.
    """
    if optim in HONOURED_OPTIMS:
        return "fused"
    if optim in _STEP_OUTSIDE or optim.endswith("_layerwise"):
        raise ValueError(f"AsFTTrainer cannot add the AsFT penalty to TrainingArguments(optim={optim!r}): it updates "
                         "the parameters inside backward or per layer, outside optimizer.step(). Use another optim")
    return "attach"


def unwrap_asft(optimizer: Any) -> AsFTAdamW | None:
    """The `AsFTAdamW` inside an optimizer wrapper (accelerate's `AcceleratedOptimizer`, ...), or None."""
    seen = 0
    while optimizer is not None and not isinstance(optimizer, AsFTAdamW) and seen < 8:
        optimizer = getattr(optimizer, "optimizer", None)
        seen += 1
    return optimizer if isinstance(optimizer, AsFTAdamW) else None


def resolve_anchors(anchors: Anchors | Mapping[str, Tensor] | str | os.PathLike) -> Anchors:
    """`AsFTAdamW`'s `as_anchors`, with a message naming the argument for a missing file.

    Raises:
        FileNotFoundError: a path that is not a file.
        TypeError: anything but an `Anchors`, a mapping or a path.
    """
    if isinstance(anchors, (str, os.PathLike)) and not Path(anchors).is_file():
        raise FileNotFoundError(f"anchors: directions file not found: {anchors}")
    return as_anchors(anchors)


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


_ATTACH_OPTIONS = ("asft_lambda", "penalty", "projection", "allow_unanchored")


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

    def metrics(self, optimizer: AsFTAdamW | AsFTPenalty) -> dict[str, float]:
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

    def on_log(self, args, state, control, logs=None, optimizer=None, **kwargs):
        opt: AsFTAdamW | AsFTPenalty | None = unwrap_asft(optimizer) or attached(optimizer)
        if logs is not None and opt is not None and "loss" in logs:
            metrics = self.metrics(opt)
            logs.update(metrics)
            # Trainer.log appended a copy of `logs` to the history before calling back: update it too,
            # so the metrics reach `trainer.state.log_history` and every saved `trainer_state.json`
            last = state.log_history[-1] if state.log_history else {}
            if last.get("step") == state.global_step and last.get("loss") == logs["loss"]:
                last.update(metrics)
        return control


class _MicroBatchLambda(TrainerCallback):
    """Scales every group's λ by the micro-batches of the current accumulation window around
    `optimizer.step()`, then restores it (so checkpoints and resume checks see the configured λ)."""

    def __init__(self, trainer: AsFTTrainerMixin) -> None:
        self.trainer = trainer
        self.saved: list[float] | None = None

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        opt = unwrap_asft(self.trainer.optimizer)  # type: ignore[attr-defined]
        k = self.trainer.asft_micro_batches
        penalty = attached(self.trainer.optimizer)  # type: ignore[attr-defined]
        if penalty is not None and k > 0:
            penalty.lambda_scale = float(k)
        if opt is not None and k > 0:
            self.saved = [g["asft_lambda"] for g in opt.param_groups]
            for g in opt.param_groups:
                g["asft_lambda"] = g["asft_lambda"] * k
        return control

    def on_optimizer_step(self, args, state, control, **kwargs):
        penalty = attached(self.trainer.optimizer)  # type: ignore[attr-defined]
        if penalty is not None:
            penalty.lambda_scale = 1.0
        opt = unwrap_asft(self.trainer.optimizer)  # type: ignore[attr-defined]
        if opt is not None and self.saved is not None:
            for g, lam in zip(opt.param_groups, self.saved, strict=True):
                g["asft_lambda"] = lam
        self.saved = None
        self.trainer.asft_micro_batches = 0
        return control


class AsFTTrainerMixin:
    """Makes a `Trainer` (sub)class train with the AsFT penalty and log drift: `AsFTAdamW` for
    `optim="adamw_torch"`/`"adamw_torch_fused"`, else transformers' own optimizer with the penalty
    attached (`asft_optim.attach`).

    Keyword args (taken before the Trainer's own):
        anchors: directions: `Anchors`, a name → tensor mapping, or the path of a directions file.
        asft_lambda, penalty, projection, allow_unanchored: the penalty's options; impl (and other
            `AsFTAdamW` options in `asft_options`): AdamW names only.
        drift_per_layer: per-layer keys in the drift logs (None: no `DriftCallback`).
        lambda_per_micro_batch: use λ·k at each optimizer step, k = micro-batches in its gradient
            accumulation window, as the paper's code does by adding the penalty to every micro-batch.

    Raises:
        ValueError: `args.optim` updates outside `optimizer.step()` (LOMO, `_layerwise`), `optim_args`
            with an AdamW name (AsFTAdamW would ignore them), AsFTAdamW options with another optim,
            another optim under DeepSpeed, or `optimizers` / `optimizer_cls_and_kwargs` passed.
    """

    def __init__(self, *args: Any, anchors: Anchors | Mapping[str, Tensor] | str | os.PathLike,
                 drift_per_layer: bool | None = True, asft_options: Mapping[str, Any] | None = None,
                 lambda_per_micro_batch: bool = False, **kwargs: Any) -> None:
        options = dict(asft_options or {})
        for key in ("asft_lambda", "penalty", "projection", "impl", "allow_unanchored"):
            if key in kwargs:
                options[key] = kwargs.pop(key)
        if kwargs.get("optimizers", (None, None))[0] is not None or kwargs.get("optimizer_cls_and_kwargs"):
            raise ValueError("AsFTTrainer builds its own AsFTAdamW; do not pass `optimizers` or "
                             "`optimizer_cls_and_kwargs`")
        anchors = resolve_anchors(anchors)
        super().__init__(*args, **kwargs)
        optim = getattr(self.args.optim, "value", self.args.optim)  # type: ignore[attr-defined]
        self.asft_route = optim_route(optim)
        if self.asft_route == "fused" and self.args.optim_args:  # type: ignore[attr-defined]
            raise ValueError(f"AsFTTrainer would ignore TrainingArguments(optim_args="
                             f"{self.args.optim_args!r}); pass AsFTAdamW options as keyword arguments "  # type: ignore[attr-defined]
                             "(asft_lambda=..., penalty=..., ...) instead")
        if self.asft_route == "attach":
            fused_only = sorted(set(options) - set(_ATTACH_OPTIONS))
            if fused_only:
                raise ValueError(f"AsFTTrainer: {', '.join(fused_only)} apply to AsFTAdamW (optim=\"adamw_torch\"), "
                                 f"not to TrainingArguments(optim={optim!r}), whose optimizer transformers builds")
            if self._deepspeed_config() is not None:
                raise ValueError(f"AsFTTrainer: under DeepSpeed ZeRO the penalty runs inside AsFTAdamW only (ZeRO "
                                 f"flattens the parameters of any other client optimizer into partitions that attach "
                                 f"does not follow); use optim=\"adamw_torch\", not {optim!r}")
        self.asft_penalty: AsFTPenalty | None = None
        if self._deepspeed_config() is not None:
            lora = any(p.requires_grad and is_lora_name(n) for n, p in self.model.named_parameters())  # type: ignore[attr-defined]
            check_config(self._deepspeed_config(), has_lora=lora)  # type: ignore[arg-type]
        self.asft_anchors = anchors
        self.asft_options = options
        self.asft_micro_batches = 0  # micro-batches since the last optimizer step
        if drift_per_layer is not None:
            DriftCallback.install(self, per_layer=drift_per_layer)  # type: ignore[arg-type]
        if lambda_per_micro_batch:
            self.add_callback(_MicroBatchLambda(self))  # type: ignore[attr-defined]

    def training_step(self, *args: Any, **kwargs: Any) -> Tensor:
        """The host's micro-batch step, counted for `lambda_per_micro_batch`."""
        self.asft_micro_batches += 1
        return super().training_step(*args, **kwargs)  # type: ignore[misc]

    def create_optimizer(self, model: nn.Module | None = None) -> torch.optim.Optimizer:
        """Build `AsFTAdamW.from_model` on the (possibly prepared) model, or the host's optimizer for
        `args.optim` with the penalty attached, once."""
        if self.optimizer is None and self.asft_route == "attach":  # type: ignore[has-type]
            opt_model = self.model if model is None else model  # type: ignore[attr-defined]
            optimizer = super().create_optimizer(opt_model)  # type: ignore[misc]
            self.asft_penalty = attach(optimizer, opt_model, anchors=self.asft_anchors, **self.asft_options)
            return optimizer
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
