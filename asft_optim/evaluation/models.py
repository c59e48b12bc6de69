"""The model under evaluation: a transformers folder or Hub id, optionally with a peft adapter on top,
and fingerprints that identify what was evaluated."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..adapters import check_fits, open_adapter

__all__ = ["load_causal_lm", "fingerprint", "resolve_dtype"]

_HASHED = (".safetensors", ".bin", ".json", ".model")
_CHUNK = 8 << 20


def fingerprint(source: str | Path) -> dict[str, Any]:
    """{"source", "sha256"}: sha256 over the names and bytes of a local folder's weight, config and
    tokenizer files (sorted); for a Hub id, the source only (its revision is recorded by the caller)."""
    path = Path(source)
    if not path.is_dir():
        return {"source": str(source), "sha256": None}
    h = hashlib.sha256()
    for f in sorted(p for p in path.iterdir() if p.is_file() and p.suffix in _HASHED):
        h.update(f.name.encode() + b"\0")
        with f.open("rb") as fh:
            while block := fh.read(_CHUNK):
                h.update(block)
    return {"source": str(path.resolve()), "sha256": h.hexdigest()}


def resolve_dtype(name: str, device: str) -> torch.dtype:
    """'auto' → bfloat16 on CUDA, float32 elsewhere; else the named dtype."""
    table = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if name == "auto":
        return torch.bfloat16 if device.startswith("cuda") else torch.float32
    if name not in table:
        raise ValueError(f"unknown --dtype {name!r}; expected auto, {', '.join(table)}")
    return table[name]


def load_causal_lm(model: str, adapter: str | None, *, dtype: torch.dtype, device: str) -> tuple[nn.Module, Any, str]:
    """(model in eval mode on `device`, its tokenizer, where the tokenizer came from).

    The adapter is checked against the model before peft loads it, and merged. The tokenizer is the
    adapter folder's when it has one (what fine-tuning used), else the model's; without a pad token,
    EOS pads.

    Raises:
        FileNotFoundError: a missing model folder, or no tokenizer.
        ValueError: an unreadable adapter folder (`adapters.open_adapter`), or an adapter made for
            another model (names the module and shapes).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(model)
    if not path.is_dir() and (path.exists() or model.startswith((".", "/")) or model.count("/") > 1):
        raise FileNotFoundError(f"model not found: {model} (expected a transformers model folder or a Hub id)")
    if path.is_dir() and not (path / "config.json").is_file():
        hint = ""
        if (path / "adapter_config.json").is_file():
            base = json.loads((path / "adapter_config.json").read_text()).get("base_model_name_or_path") or "BASE"
            hint = f"; it is a LoRA adapter folder: asft evaluate {base} --adapter {model}"
        raise FileNotFoundError(f"model folder {model} has no config.json: not a transformers checkpoint{hint}")
    lm = AutoModelForCausalLM.from_pretrained(model, dtype=dtype)
    tok_source = model
    if adapter is not None:
        apath = Path(adapter)
        check_fits(open_adapter(apath), {n: tuple(p.shape) for n, p in lm.named_parameters()}, model)
        from peft import PeftModel

        lm = PeftModel.from_pretrained(lm, str(apath)).merge_and_unload()
        if any((apath / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")):
            tok_source = str(apath)
    try:
        tok = AutoTokenizer.from_pretrained(tok_source)
    except (OSError, ValueError) as e:
        raise FileNotFoundError(f"no tokenizer for {tok_source}: {e}") from None
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return lm.to(device).eval(), tok, tok_source
