"""One fine-tuning path for every method: `transformers.Trainer` with the method's optimizer.

Methods (all with the same data, steps, learning rate, batch size and seed):
    SFT    the stock `Trainer` with `torch.optim.AdamW`
    L2-SP  `AsFTTrainer` with `AsFTAdamW(penalty="full")`: λ‖W - W0‖², a pull to the start
    AsFT   `AsFTTrainer` with `AsFTAdamW(penalty="orthogonal")`: λ‖C⊥(W - W0)‖²
Full-parameter by default; with a `LoraSpec`, a peft LoRA adapter whose effective update
s·B·A is what L2-SP and AsFT penalise.

Data are instruction records `{"instruction", "input", "output"}` (read from files in the one record
format of `asft_optim.evaluation.records`); the loss is on the response.
"""

from __future__ import annotations

import json
import math
import shutil
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..anchors import Anchors
from ..evaluation.generation import prompt_text
from ..evaluation.records import jsonl_rows, parse_record

__all__ = ["Method", "LoraSpec", "parse_methods", "encode", "Collator", "train", "load_jsonl",
           "load_model", "save_model", "FINETUNE_INFO", "SCHEDULERS"]

FINETUNE_INFO = "asft_finetune.json"


@dataclass(frozen=True)
class Method:
    """A fine-tuning method: kind "sft", "l2sp" or "asft", and λ for the penalised ones."""
    kind: str
    lam: float = 0.0

    def __post_init__(self) -> None:
        if self.kind not in ("sft", "l2sp", "asft"):
            raise ValueError(f"unknown method {self.kind!r}; expected sft, l2sp or asft")
        if self.kind != "sft" and not (math.isfinite(self.lam) and self.lam > 0):
            raise ValueError(f"{self.kind} needs λ > 0, got {self.lam}")

    @property
    def label(self) -> str:
        return {"sft": "SFT", "l2sp": "L2-SP", "asft": "AsFT"}[self.kind] + (
            f" λ={self.lam:g}" if self.kind != "sft" else "")

    @property
    def slug(self) -> str:
        return self.kind if self.kind == "sft" else f"{self.kind}_l{self.lam:g}"


def parse_methods(methods: str, lambdas: str) -> list[Method]:
    """`"sft,l2sp,asft"`, `"1,10,100"` → SFT plus L2-SP and AsFT at every λ."""
    try:
        lams = [float(x) for x in lambdas.split(",") if x.strip()]
    except ValueError as e:
        raise ValueError(f"--lambdas must be comma-separated numbers, got {lambdas!r}") from e
    out: list[Method] = []
    for kind in (m.strip() for m in methods.split(",") if m.strip()):
        out += [Method("sft")] if kind == "sft" else [Method(kind, lam) for lam in lams]
    if not out:
        raise ValueError("no fine-tuning method given")
    return out


# ----------------------------------------------------------------------------------- data
def encode(tokenizer: Any, ex: dict[str, str], max_length: int | None = None) -> dict[str, list[int]]:
    """input_ids = prompt + output + eos; labels = -100 on the prompt, the ids on the response;
    both cut to the first `max_length` tokens when given."""
    prompt = tokenizer(prompt_text(tokenizer, ex["instruction"], ex.get("input", "")),
                       add_special_tokens=False).input_ids
    answer = tokenizer(ex["output"], add_special_tokens=False).input_ids + [tokenizer.eos_token_id]
    ids, labels = prompt + answer, [-100] * len(prompt) + answer
    return {"input_ids": ids[:max_length], "labels": labels[:max_length]}


class Collator:
    """Right-pads `input_ids` with the pad id and `labels` with -100; adds the attention mask."""

    def __init__(self, pad_id: int) -> None:
        self.pad_id = pad_id

    def __call__(self, batch: Sequence[dict[str, list[int]]]) -> dict[str, torch.Tensor]:
        n = max(len(b["input_ids"]) for b in batch)
        ids = torch.full((len(batch), n), self.pad_id, dtype=torch.long)
        labels = torch.full((len(batch), n), -100, dtype=torch.long)
        mask = torch.zeros((len(batch), n), dtype=torch.long)
        for i, b in enumerate(batch):
            k = len(b["input_ids"])
            ids[i, :k] = torch.tensor(b["input_ids"])
            labels[i, :k] = torch.tensor(b["labels"])
            mask[i, :k] = 1
        return {"input_ids": ids, "labels": labels, "attention_mask": mask}


def load_jsonl(path: str | Path, need_output: bool = True, what: str = "data") -> list[dict[str, str]]:
    """Instruction records `{"instruction", "input", "output"}` from a JSONL file in the format of
    `asft evaluate` (`asft_optim.evaluation.records`): the prompt from `prompt`, `instruction` or
    `question`, optional `input`, the response from `answer`, `label` or `output` (not needed, and
    "" when absent, unless `need_output`). Blank lines are skipped.

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: a line without the fields required; the message gives the file and line number.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} file not found: {path}")
    out = []
    for where, row in jsonl_rows(path):
        rec = parse_record(where, row, need_answer=need_output)
        out.append({"instruction": rec["instruction"], "input": rec["input"], "output": rec.get("answer", "")})
    if not out:
        raise ValueError(f"{path}: no records")
    return out


# ----------------------------------------------------------------------------------- models
def load_model(path: str | Path, what: str = "model", dtype: torch.dtype = torch.float32) -> nn.Module:
    """A causal LM from a checkpoint folder, on the CPU in `dtype`; a fine-tuned LoRA adapter is
    loaded on its start model (recorded in the adapter's `asft_finetune.json`) and merged."""
    from transformers import AutoModelForCausalLM

    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"{what} checkpoint folder not found: {path}")
    if (path / "adapter_config.json").is_file():
        from peft import PeftModel

        info = json.loads((path / FINETUNE_INFO).read_text())
        base = load_model(info["start"], "start model of the adapter", dtype)
        return PeftModel.from_pretrained(base, str(path)).merge_and_unload().eval()
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{what} folder {path} has no config.json: not a Hugging Face checkpoint")
    return AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype).eval()


def save_model(model: nn.Module, tokenizer: Any, out: Path, info: dict[str, Any]) -> Path:
    """Save a (peft or plain) model, its tokenizer and `asft_finetune.json` describing the run.

    A folder that an earlier `save_model` wrote is replaced whole, so that no file of the earlier
    model (an adapter's `adapter_config.json` beside a full model, say) is read as part of this one.

    Raises:
        FileExistsError: `out` is a non-empty folder that `save_model` did not write.
    """
    if out.is_dir() and any(out.iterdir()):
        if not (out / FINETUNE_INFO).is_file():
            raise FileExistsError(f"{out} is not empty and holds no {FINETUNE_INFO}: not overwriting it")
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out), safe_serialization=True)
    tokenizer.save_pretrained(str(out))
    (out / FINETUNE_INFO).write_text(json.dumps(info, indent=1))
    return out


# ----------------------------------------------------------------------------------- training
@dataclass(frozen=True)
class LoraSpec:
    """A peft LoRA adapter (the paper's setting: rank 8 on q_proj and v_proj)."""
    r: int = 8
    alpha: int = 16
    targets: tuple[str, ...] = ("q_proj", "v_proj")

    def check_targets(self, model: nn.Module) -> None:
        """Raise ValueError when a target is not the name of one of the model's modules; the message
        lists the names of its layers with 2-D weights to choose from."""
        leaves = {n.rsplit(".", 1)[-1] for n, _ in model.named_modules()}
        absent = [t for t in self.targets if t not in leaves]
        if absent:
            layers = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules()
                             if isinstance(getattr(m, "weight", None), torch.Tensor) and m.weight.dim() == 2})
            raise ValueError(f"LoRA target module(s) {', '.join(absent)} not found in {type(model).__name__}; its "
                             f"layers with 2-D weights are named {', '.join(layers)} (choose with --lora-targets)")

    def apply(self, model: nn.Module) -> nn.Module:
        """`model` wrapped by peft with this adapter (after `check_targets`)."""
        from peft import LoraConfig, get_peft_model

        self.check_targets(model)
        return get_peft_model(model, LoraConfig(r=self.r, lora_alpha=self.alpha, lora_dropout=0.0,
                                                target_modules=list(self.targets), task_type="CAUSAL_LM"))


SCHEDULERS = ("constant", "linear", "cosine")


def train(model: nn.Module, data: Sequence[dict[str, list[int]]], *, pad_id: int, method: Method,
          anchors: Anchors | None = None, steps: int, lr: float, batch_size: int, seed: int,
          lora: LoraSpec | None = None, on_step: Callable[[], None] | None = None, grad_accum: int = 1,
          warmup_steps: int = 0, scheduler: str = "constant", logging_steps: int = 0,
          on_log: Callable[[int, dict[str, float]], None] | None = None) -> nn.Module:
    """Train `model` with `transformers.Trainer` for `steps` optimizer steps; returns the trained
    model (the peft model when `lora` is given, else `model` itself, trained in place).

    SFT runs the stock `Trainer` (torch AdamW); L2-SP and AsFT run `AsFTTrainer`, which builds
    `AsFTAdamW.from_model` (full-parameter or LoRA) with penalty "full" or "orthogonal". Everything
    else (data order, batches, learning-rate schedule, no weight decay) is shared.

    Args:
        data: encoded examples `{"input_ids", "labels"}` (see `encode`); pad_id pads them.
        method: the optimizer (see module docstring); its λ is per unit of the summed squared penalty.
        anchors: directions d = W_aligned - W_base by parameter name (L2-SP and AsFT).
        lora: train a peft LoRA adapter instead of all parameters.
        on_step: called after every optimizer step (progress bars).
        grad_accum: micro-batches of `batch_size` per optimizer step.
        warmup_steps, scheduler: linear warmup, then "constant", "linear" (to 0) or "cosine" decay.
        logging_steps, on_log: every `logging_steps` optimizer steps, `on_log(step, logs)` gets the
            mean training loss (`loss`) and, for L2-SP and AsFT, the drift `asft/cos`, `asft/orth_ratio`.
    """
    from transformers import PrinterCallback, Trainer, TrainerCallback, TrainingArguments

    from ..integrations.trainer import AsFTTrainer

    if method.kind != "sft" and anchors is None:
        raise ValueError(f"{method.label} needs the alignment directions (anchors)")
    if scheduler not in SCHEDULERS:
        raise ValueError(f"unknown scheduler {scheduler!r}; expected one of {', '.join(SCHEDULERS)}")
    if lora is not None:
        torch.manual_seed(seed)  # the adapter's initialisation follows the run's seed, not the process's history
        model = lora.apply(model)

    class _Progress(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):  # noqa: ANN001
            if on_step is not None:
                on_step()

        def on_log(self, args, state, control, logs=None, **kw):  # noqa: ANN001
            if on_log is not None and logs and "loss" in logs:
                on_log(state.global_step, logs)

    logging = on_log is not None and logging_steps > 0
    with tempfile.TemporaryDirectory(prefix="asft_trainer_") as tmp:
        args = TrainingArguments(
            output_dir=tmp, max_steps=steps, per_device_train_batch_size=batch_size, learning_rate=lr,
            gradient_accumulation_steps=grad_accum, warmup_steps=warmup_steps,
            lr_scheduler_type="constant_with_warmup" if scheduler == "constant" and warmup_steps else scheduler,
            weight_decay=0.0, optim="adamw_torch", logging_strategy="steps" if logging else "no",
            logging_steps=max(logging_steps, 1), save_strategy="no", report_to=[], disable_tqdm=True, seed=seed,
            data_seed=seed, dataloader_num_workers=0, use_cpu=not torch.cuda.is_available())
        common = {"model": model, "args": args, "train_dataset": list(data), "data_collator": Collator(pad_id),
                  "callbacks": [_Progress()]}
        if method.kind == "sft":
            trainer = Trainer(**common)
        else:
            trainer = AsFTTrainer(**common, anchors=anchors, asft_lambda=method.lam,
                                  drift_per_layer=False if logging else None,
                                  penalty="full" if method.kind == "l2sp" else "orthogonal")
        trainer.remove_callback(PrinterCallback)  # the final metrics dict; callers show progress
        trainer.train()
    return model.eval()
