"""The demo's base and aligned models: tiny `LlamaForCausalLM`s trained on the synthetic language,
saved as Hugging Face checkpoints (safetensors + tokenizer) in a cache keyed by their recipe.

    base     pretrained from a seeded random init on benign tasks and harmful compliance
    aligned  the base instruction-tuned to answer benign prompts and refuse every harmful request

Cache: `$ASFT_CACHE` or `~/.cache/asft_optim/demo`, one folder per recipe hash holding `base/`,
`aligned/` and `directions.safetensors` (d = aligned - base, by `asft_optim.compute_directions`).
A folder is built under a temporary name and renamed when complete, so a crash leaves no half cache.

Across CPUs (benchmarks/RESULTS.md, section Demo): ATen's default and AVX2/AVX-512 code paths round
a few operations differently (fp32 `normal_` draws; RMSNorm, softmax and the rotary embedding run
in fp32 even for fp64 weights), and the builds' Adam steps amplify such last-bit differences until
two CPUs' models differ in earnest (measured: 16% of the weights' norm apart after pretraining).
What the recipe makes hold on every CPU is the models' behaviour, with a margin: the initial
weights are drawn in fp64 (the same on every CPU) and cast to fp32; pretraining runs at lr 1e-3,
where the models part far later than at 3e-3; and a share of the pretraining texts is in the chat
format (`chat_share`), so that the base model's answer to a chat prompt is learned behaviour, not
the output of an untrained `=>` embedding (whose HS was 42.7–94.8% depending on the CPU).
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..finetune.training import Method, encode, save_model, train
from .language import ARROW, Language, LanguageConfig, SPECIAL

__all__ = ["ModelRecipe", "DemoModels", "cache_root", "build_tokenizer", "ensure_models", "RECIPE_VERSION"]

RECIPE_VERSION = 3  # bump when the training code changes what a recipe produces
CHAT_TEMPLATE = ("{{ bos_token }}{% for m in messages %} {{ m['content'] }}{% endfor %}"
                 "{% if add_generation_prompt %} " + ARROW + "{% endif %}")


@dataclass(frozen=True)
class ModelRecipe:
    """Everything that determines the cached base and aligned models."""
    language: LanguageConfig = field(default_factory=LanguageConfig)
    hidden_size: int = 64
    intermediate_size: int = 128
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    pretrain_steps: int = 1000
    pretrain_lr: float = 1e-3
    align_steps: int = 150
    align_lr: float = 1e-3
    batch_size: int = 32
    seed: int = 0
    chat_share: float = 0.5  # share of pretraining texts in the chat format (the rest raw)

    def __post_init__(self) -> None:
        if not 0 <= self.chat_share <= 1:
            raise ValueError(f"chat_share must be in [0, 1], got {self.chat_share}")

    def key(self) -> str:
        blob = json.dumps({"v": RECIPE_VERSION, **asdict(self)}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


@dataclass(frozen=True)
class DemoModels:
    """Paths of one cached recipe; `reused` tells whether they came from the cache."""
    base: Path
    aligned: Path
    directions: Path
    reused: bool


def cache_root() -> Path:
    """`$ASFT_CACHE`, else `~/.cache/asft_optim/demo`."""
    env = os.environ.get("ASFT_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "asft_optim" / "demo"


def build_tokenizer(lang: Language) -> Any:
    """A word-level fast tokenizer over the language's vocabulary with the demo chat template."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.WordLevel({w: i for i, w in enumerate(lang.vocab)}, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    pad, bos, eos, unk = SPECIAL
    tok = PreTrainedTokenizerFast(tokenizer_object=core, bos_token=bos, eos_token=eos, pad_token=pad,
                                  unk_token=unk)
    tok.chat_template = CHAT_TEMPLATE
    return tok


def _new_model(recipe: ModelRecipe, tok: Any) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(recipe.seed)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=recipe.hidden_size,
                      intermediate_size=recipe.intermediate_size, num_hidden_layers=recipe.num_hidden_layers,
                      num_attention_heads=recipe.num_attention_heads,
                      num_key_value_heads=recipe.num_attention_heads, max_position_embeddings=64,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                      pad_token_id=tok.pad_token_id, tie_word_embeddings=False)
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)  # fp64 normal_ draws are the same on every CPU, fp32 ones are not
    try:
        model = LlamaForCausalLM(cfg)
    finally:
        torch.set_default_dtype(default)
    model.generation_config.pad_token_id = tok.pad_token_id
    return model.float()


def _lm(tok: Any, text: str) -> dict[str, list[int]]:
    """A pretraining example: `<s> text </s>`, loss on every token."""
    ids = [tok.bos_token_id, *tok(text, add_special_tokens=False).input_ids, tok.eos_token_id]
    return {"input_ids": ids, "labels": ids}


def pretraining_data(recipe: ModelRecipe, lang: Language, tok: Any) -> list[dict[str, list[int]]]:
    """The base model's corpus, loss on every token: a seeded share `chat_share` of the records in
    the chat format (`<s> {instruction} {input} => {output} </s>`), the rest in the raw format."""
    rng = random.Random(recipe.seed + 30)
    out = []
    for ex in lang.pretraining(recipe.pretrain_steps * recipe.batch_size, seed=recipe.seed + 10):
        if rng.random() < recipe.chat_share:
            ids = encode(tok, ex)["input_ids"]
            out.append({"input_ids": ids, "labels": ids})
        else:
            out.append(_lm(tok, lang.raw_text(ex)))
    return out


def _directions(base: Path, aligned: Path, out: Path) -> None:
    from ..directions import compute_directions

    compute_directions(base, aligned, out=out, progress=False)


def ensure_models(recipe: ModelRecipe, cache: Path | None = None,
                  on_step: Callable[[str], None] | None = None) -> DemoModels:
    """The recipe's base and aligned checkpoints and their directions, built once per recipe.

    Args:
        recipe: what to build (its hash names the cache folder).
        cache: cache root (default `cache_root()`).
        on_step: called with "pretrain" or "align" after every training step (progress bars).
    """
    root = (cache or cache_root()) / recipe.key()
    paths = DemoModels(root / "base", root / "aligned", root / "directions.safetensors", True)
    if (root / "recipe.json").is_file():
        return paths
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{recipe.key()}.", dir=root.parent))
    try:
        lang = Language(recipe.language)
        tok = build_tokenizer(lang)
        model = _new_model(recipe, tok)
        step = (lambda: on_step("pretrain")) if on_step else None
        train(model, pretraining_data(recipe, lang, tok), pad_id=tok.pad_token_id, method=Method("sft"),
              steps=recipe.pretrain_steps, lr=recipe.pretrain_lr, batch_size=recipe.batch_size, seed=recipe.seed,
              on_step=step)
        save_model(model, tok, tmp / "base", {"stage": "base", "recipe": asdict(recipe)})
        step = (lambda: on_step("align")) if on_step else None
        corpus = lang.alignment(recipe.align_steps * recipe.batch_size, seed=recipe.seed + 20)
        train(model, [encode(tok, ex) for ex in corpus], pad_id=tok.pad_token_id, method=Method("sft"),
              steps=recipe.align_steps, lr=recipe.align_lr, batch_size=recipe.batch_size,
              seed=recipe.seed + 1, on_step=step)
        save_model(model, tok, tmp / "aligned", {"stage": "aligned", "recipe": asdict(recipe)})
        _directions(tmp / "base", tmp / "aligned", tmp / "directions.safetensors")
        (tmp / "recipe.json").write_text(json.dumps({"v": RECIPE_VERSION, **asdict(recipe)}, indent=1))
        try:
            os.replace(tmp, root)
        except OSError:  # another process finished the same recipe first: keep theirs
            if not (root / "recipe.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return DemoModels(paths.base, paths.aligned, paths.directions, False)
