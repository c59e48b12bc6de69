"""LLaMA-Factory launcher: LLaMA-Factory's training YAML plus `asft_*` keys.

    python -m asft_optim.integrations.llamafactory train config.yaml [key=value ...]
    asft-llamafactory train config.yaml                           # the same, as a console script
    torchrun --nproc_per_node 8 -m asft_optim.integrations.llamafactory train config.yaml

Keys (taken out of the config before LLaMA-Factory parses it): `asft_anchors` (directions file,
required), `asft_lambda` (1.0), `asft_penalty`, `asft_projection`, `asft_impl`,
`asft_allow_unanchored`, `asft_drift_per_layer`. (LLaMA-Factory's own `use_asft_loss`/`asft_alpha`
are another method, a loss, and are passed through untouched.)

LLaMA-Factory has no optimizer plugin: every stage's trainer (pt, sft, rm, dpo, kto, ppo) asks
`create_custom_optimizer` of its module first and falls back to transformers' optimizer. The
launcher replaces that function in each trainer module with one that builds AsFT's optimizer
(`build_optimizer`: AdamW's `optim` names give `AsFTAdamW`, any other optimizer LLaMA-Factory's
transformers builds gets the penalty attached), then calls LLaMA-Factory's `run_exp`
in the same process, with `DriftCallback` (drift in the console log and `trainer_state.json`)
and `RequireAsFT` (no run without the penalty). `llamafactory-cli` itself cannot load it.
Refused before anything loads: an `optim` the penalty cannot reach (LOMO, `_layerwise`), `optim_args`
with AdamW's names (AsFTAdamW would ignore them), another `optim` under DeepSpeed, LLaMA-Factory's own
optimizers (GaLore, APOLLO, LoRA+, BAdam, Adam-mini, Muon), the Megatron/hyper-parallel/Ray paths
(they do not build through `create_custom_optimizer`), and a DeepSpeed config AsFTAdamW cannot
run under (`asft_optim.zero.check_config`: the offload config LLaMA-Factory ships,
`ds_z3_offload_config.json`, needs `"zero_force_ds_cpu_optimizer": false` added).
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["AsFTKeys", "install", "main", "split_config", "train"]

STAGES = ("pt", "sft", "rm", "dpo", "kto", "ppo")
PENALTIES = ("orthogonal", "parallel", "full")
PROJECTIONS = ("vector", "reference")
IMPLS = ("triton", "torch", "native", "reference")
# LLaMA-Factory options that build their own optimizer in `create_custom_optimizer`
_OWN_OPTIMIZERS = ("use_galore", "use_apollo", "loraplus_lr_ratio", "use_badam", "use_adam_mini", "use_muon")
# training paths that never call `create_custom_optimizer`
_BYPASS = ("use_mca", "use_hyper_parallel", "use_ray")
# LLaMA-Factory's own keys with the prefix (its "ASFT" loss, another method)
_THEIRS = ("asft_alpha",)


@dataclass(frozen=True)
class AsFTKeys:
    """The `asft_*` keys of a config, checked."""

    anchors: str
    asft_lambda: float = 1.0
    penalty: str = "orthogonal"
    projection: str = "vector"
    impl: str | None = None
    allow_unanchored: bool = False
    drift_per_layer: bool = True

    @classmethod
    def from_config(cls, keys: Mapping[str, Any]) -> AsFTKeys:
        """Raises ValueError naming the key: unknown, missing `asft_anchors`, absent file, bad value."""
        known = {"asft_anchors", "asft_lambda", "asft_penalty", "asft_projection", "asft_impl",
                 "asft_allow_unanchored", "asft_drift_per_layer"}
        unknown = sorted(set(keys) - known)
        if unknown:
            raise ValueError(f"unknown AsFT key(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
        anchors = keys.get("asft_anchors")
        if not anchors:
            raise ValueError("asft_anchors: the AsFT launcher needs a directions file (asft directions BASE ALIGNED "
                             "-o directions.safetensors)")
        if not Path(anchors).is_file():
            raise ValueError(f"asft_anchors: directions file not found: {anchors}")
        lam = keys.get("asft_lambda", 1.0)
        if isinstance(lam, bool) or not isinstance(lam, (int, float)) or not lam >= 0:
            raise ValueError(f"asft_lambda: expected a number ≥ 0, got {lam!r}")
        choices = {"asft_penalty": PENALTIES, "asft_projection": PROJECTIONS, "asft_impl": IMPLS}
        for key, allowed in choices.items():
            if key in keys and keys[key] is not None and keys[key] not in allowed:
                raise ValueError(f"{key}: expected one of {', '.join(allowed)}, got {keys[key]!r}")
        for key in ("asft_allow_unanchored", "asft_drift_per_layer"):
            if key in keys and not isinstance(keys[key], bool):
                raise ValueError(f"{key}: expected true or false, got {keys[key]!r}")
        return cls(anchors=str(anchors), asft_lambda=float(lam), penalty=keys.get("asft_penalty", "orthogonal"),
                   projection=keys.get("asft_projection", "vector"), impl=keys.get("asft_impl"),
                   allow_unanchored=keys.get("asft_allow_unanchored", False),
                   drift_per_layer=keys.get("asft_drift_per_layer", True))

    def options(self) -> dict[str, Any]:
        """Keyword options of `AsFTAdamW`/`attach`."""
        out: dict[str, Any] = {"asft_lambda": self.asft_lambda, "penalty": self.penalty,
                               "projection": self.projection, "allow_unanchored": self.allow_unanchored}
        if self.impl is not None:
            out["impl"] = self.impl
        return out


def split_config(config: Mapping[str, Any]) -> tuple[dict[str, Any], AsFTKeys]:
    """LLaMA-Factory's part of a config and its checked AsFT keys.

    Raises:
        ValueError: a bad AsFT key, an `optim` the penalty cannot reach, an option that builds its
            own optimizer or bypasses `create_custom_optimizer`, or a DeepSpeed config AsFT refuses.
    """
    from ..zero import check_config
    from .factory import check_optim
    from .trainer import HONOURED_OPTIMS

    ours = {k: v for k, v in config.items() if k.startswith("asft_") and k not in _THEIRS}
    keys = AsFTKeys.from_config(ours)
    rest = {k: v for k, v in config.items() if k not in ours}
    optim = str(rest.get("optim", HONOURED_OPTIMS[0]))
    check_optim(optim)
    if rest.get("optim_args") and optim in HONOURED_OPTIMS:
        raise ValueError(f"optim_args={rest['optim_args']!r} would be ignored by AsFTAdamW; remove it")
    conflicting = [k for k in _OWN_OPTIMIZERS + _BYPASS if rest.get(k) not in (None, False)]
    if conflicting:
        raise ValueError(f"{', '.join(conflicting)}: not with the AsFT launcher (LLaMA-Factory would build its own "
                         "optimizer, or train through a path AsFT does not reach); remove them")
    stage = rest.get("stage", "sft")
    if stage not in STAGES:
        raise ValueError(f"stage {stage!r}: the AsFT launcher covers the stages whose trainer builds an optimizer "
                         f"({', '.join(STAGES)})")
    deepspeed = rest.get("deepspeed")
    if deepspeed is not None:
        if optim not in HONOURED_OPTIMS:
            raise ValueError(f"optim {optim!r} under DeepSpeed: the AsFT penalty runs inside ZeRO only with AsFTAdamW; "
                             "use optim: adamw_torch")
        ds = deepspeed if isinstance(deepspeed, Mapping) else json.loads(Path(deepspeed).read_text())
        # transformers adds "zero_allow_untested_optimizer" itself for an optimizer the Trainer builds
        check_config({**ds, "zero_allow_untested_optimizer": True},
                     has_lora=rest.get("finetuning_type", "lora") == "lora")
    return rest, keys


def install(keys: AsFTKeys) -> None:
    """Make every stage's trainer module build AsFT's optimizer (in this process)."""
    from .factory import build_optimizer

    def create_custom_optimizer(model: Any, training_args: Any, finetuning_args: Any) -> Any:
        return build_optimizer(model, training_args, keys.anchors, **keys.options())

    for stage in STAGES:
        module = importlib.import_module(f"llamafactory.train.{stage}.trainer")
        if not hasattr(module, "create_custom_optimizer"):
            raise RuntimeError(f"llamafactory.train.{stage}.trainer has no create_custom_optimizer: this "
                               "LLaMA-Factory version is not one the AsFT launcher knows (0.9.x)")
        module.create_custom_optimizer = create_custom_optimizer  # type: ignore[attr-defined]


def _read(path: str, overrides: Sequence[str]) -> dict[str, Any]:
    """A YAML or JSON config with flat `key=value` overrides (values read as YAML, as
    `llamafactory-cli train config.yaml key=value` reads them)."""
    import yaml

    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"config file not found: {path}")
    text = file.read_text()
    loaded = json.loads(text) if file.suffix == ".json" else yaml.safe_load(text)
    if not isinstance(loaded, dict):
        raise ValueError(f"{path}: expected a mapping of options")
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"override {item!r}: expected key=value")
        loaded[key] = yaml.safe_load(value)
    return {str(k): v for k, v in loaded.items()}


def train(config: Mapping[str, Any], keys: AsFTKeys) -> None:
    """Install AsFT's optimizer and run LLaMA-Factory's training on `config` (its own keys)."""
    install(keys)
    from llamafactory.train.tuner import run_exp

    from .factory import RequireAsFT
    from .trainer import DriftCallback

    run_exp(args=dict(config), callbacks=[DriftCallback(per_layer=keys.drift_per_layer), RequireAsFT()])


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="asft-llamafactory",
                                     description="LLaMA-Factory training with the AsFT penalty (asft_* keys)")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("train", help="train from a LLaMA-Factory YAML/JSON config with asft_* keys")
    run.add_argument("config")
    run.add_argument("overrides", nargs="*", help="key=value overrides, as llamafactory-cli takes them")
    args = parser.parse_args(argv)
    try:
        config, keys = split_config(_read(args.config, args.overrides))
    except (ValueError, FileNotFoundError, NotImplementedError) as exc:
        print(f"asft-llamafactory: error: {exc}", file=sys.stderr)
        return 2
    train(config, keys)
    return 0


if __name__ == "__main__":
    sys.exit(main())
