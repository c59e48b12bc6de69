"""`AsFTOptimizerFactory`: AsFT through `Trainer(optimizer_cls_and_kwargs=...)` (transformers ≥ 5).

transformers ≥ 5 calls a class given there that is not an `Optimizer` as `cls()(model, **kwargs)`,
so the factory sees the model (names, LoRA pairs) but not the Trainer: hand it the
`TrainingArguments` as `args`, and it builds what `AsFTTrainer` builds for them.

    args = TrainingArguments(output_dir="out", learning_rate=1e-4)
    trainer = Trainer(model=model, args=args, train_dataset=data,
                      optimizer_cls_and_kwargs=(AsFTOptimizerFactory, {
                          "args": args, "anchors": "directions.safetensors", "asft_lambda": 1.0}))
    DriftCallback.install(trainer)                   # drift metrics in the logs

axolotl's trainers call factories as `cls()(model, training_args, **kwargs)`; the arguments may
then come positionally. `args.optim` picks the optimizer as in `AsFTTrainer`: AdamW's names give
`AsFTAdamW` (lr, betas, eps, weight decay from `args`, Trainer's weight-decay split); every other
optimizer transformers can build is built as `Trainer` builds it (with `optim_args`) and the
penalty attached (`asft_optim.attach`).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn
from transformers import Trainer, TrainerCallback, TrainingArguments

from ..anchors import Anchors
from ..penalty import attach, attached
from .trainer import (
    HONOURED_OPTIMS,
    create_asft_optimizer,
    optim_route,
    resolve_anchors,
    unwrap_asft,
)

# the options `attach` takes; the others (impl, ...) belong to AsFTAdamW
_ATTACH_OPTIONS = ("asft_lambda", "penalty", "projection", "allow_unanchored")

__all__ = ["AsFTOptimizerFactory", "RequireAsFT", "attach_penalty", "build_optimizer", "check_optim", "optim_name"]


class _TrainerView:
    """What `create_asft_optimizer` reads from a Trainer: its arguments and its weight-decay rule."""

    get_decay_parameter_names = Trainer.get_decay_parameter_names

    def __init__(self, args: TrainingArguments) -> None:
        self.args = args


def optim_name(args: TrainingArguments) -> str:
    """`args.optim` as a plain string ("adamw_torch", "adamw_bnb_8bit", ...)."""
    return str(getattr(args.optim, "value", args.optim))


def check_optim(optim: str) -> None:
    """Refuse, before anything loads, an optimizer name the penalty cannot reach.

    Raises:
        ValueError: an optimizer that updates outside `optimizer.step()` (LOMO, AdaLOMO, `_layerwise`).
    """
    optim_route(optim)


def carries_penalty(optimizer: Any) -> bool:
    """Whether an optimizer (or the one inside a wrapper) applies the AsFT penalty."""
    return unwrap_asft(optimizer) is not None or attached(optimizer) is not None


class RequireAsFT(TrainerCallback):
    """Stops a run at `on_train_begin` when the trainer's optimizer does not carry the AsFT penalty
    (another plugin or a code path of the host built its own): never a plain run by accident."""

    def on_train_begin(self, args, state, control, optimizer=None, **kwargs):
        if not carries_penalty(optimizer):
            raise RuntimeError(f"AsFT is configured but the trainer's optimizer is {type(optimizer).__name__}, "
                               "without the AsFT penalty; refusing to train")
        return control


def attach_penalty(optimizer: torch.optim.Optimizer, model: nn.Module, anchors: Anchors,
                   **options: Any) -> torch.optim.Optimizer:
    """Add the AsFT penalty to an optimizer that is not AsFTAdamW (`asft_optim.attach`); return it.

    Raises:
        ValueError: an option only AsFTAdamW takes (impl, ...).
    """
    fused_only = sorted(set(options) - set(_ATTACH_OPTIONS))
    if fused_only:
        raise ValueError(f"AsFT: {', '.join(fused_only)} apply to AsFTAdamW (optim 'adamw_torch'), not to "
                         f"{type(optimizer).__name__}, whose penalty is attached")
    attach(optimizer, model, anchors=anchors, **options)
    return optimizer


def _host_optimizer(model: nn.Module, args: TrainingArguments,
                    base: tuple[type, Mapping[str, Any]] | None) -> torch.optim.Optimizer:
    """The optimizer `Trainer.create_optimizer` builds for `args.optim` (or for `base`, a
    `(class, kwargs)` pair), on Trainer's two weight-decay groups.

    Raises:
        ValueError: an optimizer that builds its own parameter groups (GaLore, LOMO, layer-wise).
    """
    cls, kwargs = base if base is not None else Trainer.get_optimizer_cls_and_kwargs(args, model)  # type: ignore[arg-type]
    kwargs = dict(kwargs)
    own = sorted({"params", "model", "optimizer_dict"} & kwargs.keys())
    if own:
        raise ValueError(f"AsFT cannot attach to optim {optim_name(args)!r}: it builds its own parameter groups "
                         f"({', '.join(own)}) and updates outside the groups the penalty follows")
    decay = set(Trainer.get_decay_parameter_names(_TrainerView(args), model))  # type: ignore[arg-type]
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    groups = [{"params": [p for n, p in trainable if n in decay], "weight_decay": args.weight_decay},
              {"params": [p for n, p in trainable if n not in decay], "weight_decay": 0.0}]
    optimizer = cls(groups, **kwargs)
    if "bitsandbytes" in str(cls) and kwargs.get("optim_bits") == 8:
        # as Trainer does: embeddings keep 32-bit optimizer states
        import bitsandbytes

        manager = bitsandbytes.optim.GlobalOptimManager.get_instance()
        for module in model.modules():
            if isinstance(module, nn.Embedding):
                manager.register_module_override(module, "weight", {"optim_bits": 32})
    return optimizer


def build_optimizer(model: nn.Module, args: TrainingArguments,
                    anchors: Anchors | Mapping[str, Tensor] | str | os.PathLike, *,
                    base: tuple[type, Mapping[str, Any]] | None = None, **options: Any) -> torch.optim.Optimizer:
    """What `AsFTTrainer` builds for `args`: `AsFTAdamW.from_model` for AdamW's names, else the host's
    optimizer for `args.optim` (or `base`) with the penalty attached.

    Args:
        model: the (possibly peft-wrapped) model; its trainable parameters are optimised.
        args: lr, betas, eps, weight_decay, optim, optim_args.
        anchors: a directions file, an `Anchors` or a `{name: d}` mapping.
        base: `(optimizer class, kwargs)` to build instead of `args.optim`'s (axolotl's own optimizers).
        **options: AsFT options (asft_lambda, penalty, projection, impl, allow_unanchored, ...).

    Raises:
        FileNotFoundError: a directions file that does not exist.
        ValueError: `optim_args` with an AdamW name (AsFTAdamW would ignore them), an optimizer
            the penalty cannot reach, or an AsFTAdamW-only option with another optimizer.
    """
    bound = resolve_anchors(anchors)
    optim = optim_name(args)
    if base is None:
        check_optim(optim)
    if base is None and optim in HONOURED_OPTIMS:
        if args.optim_args:
            raise ValueError(f"AsFT would ignore optim_args={args.optim_args!r} with optim {optim!r} (AsFTAdamW takes "
                             "lr, betas, eps and weight_decay from the arguments); pass AsFT options instead")
        return create_asft_optimizer(_TrainerView(args), model, bound, **options)  # type: ignore[arg-type]
    return attach_penalty(_host_optimizer(model, args, base), model, bound, **options)


class AsFTOptimizerFactory:
    """An optimizer factory for `Trainer(optimizer_cls_and_kwargs=(AsFTOptimizerFactory, kwargs))`.

    kwargs: `args` (the Trainer's `TrainingArguments`; axolotl passes them positionally instead),
    `anchors` (directions file, `Anchors` or mapping), AsFT options (`asft_lambda`, `penalty`,
    `projection`, `impl`, `allow_unanchored`, ...) and `base` (see `build_optimizer`).

    Raises:
        TypeError: no `TrainingArguments` (the optimizer's lr, betas and weight decay would silently
            differ from the Trainer's).
        ValueError: two different `TrainingArguments`.
    """

    def __call__(self, model: nn.Module, training_args: TrainingArguments | None = None, /, *,
                 anchors: Anchors | Mapping[str, Tensor] | str | os.PathLike,
                 args: TrainingArguments | None = None, **options: Any) -> torch.optim.Optimizer:
        if training_args is not None and args is not None and training_args is not args:
            raise ValueError("AsFTOptimizerFactory got two different TrainingArguments (positional and args=)")
        args = args if args is not None else training_args
        if not isinstance(args, TrainingArguments):
            raise TypeError("AsFTOptimizerFactory needs the Trainer's TrainingArguments: add \"args\": args to the "
                             "kwargs of optimizer_cls_and_kwargs (transformers calls the factory without the "
                             f"Trainer); got args={args!r}")
        return build_optimizer(model, args, anchors, **options)
