"""A tiny local model for the fine-tuning stacks' tests (axolotl, LLaMA-Factory), made offline.

`make_stack_model(root)` writes `root/aligned` (a Llama with a word-level tokenizer saved beside it,
loadable by `AutoModelForCausalLM`/`AutoTokenizer`), `root/directions.safetensors` (d between a base
and that aligned model), `root/sft.jsonl` (`{"instruction", "input", "output", "text"}` rows) and
`root/dpo.jsonl` (`{"instruction", "input", "chosen", "rejected"}` rows).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file

WORDS = ("the cat dog sat ran on a mat log red blue big small fast slow sun moon day night one two three "
         "four five yes no up down").split()
SPECIAL = ["<unk>", "<pad>", "<s>", "</s>"]


def _tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(SPECIAL + WORDS + list(":.,?!'\"#0123456789"))}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Whitespace(), pre_tokenizers.Digits(True)])
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                       special_tokens=[("<s>", vocab["<s>"])])
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>", bos_token="<s>",
                                   eos_token="</s>", model_max_length=64)


def make_stack_model(root: Path, seed: int = 0) -> Path:
    """Write the tiny aligned model, its directions and the data sets under `root`; return `root`."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from asft_optim import compute_directions

    root.mkdir(parents=True, exist_ok=True)
    tokenizer = _tokenizer()
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64,
                         tie_word_embeddings=False, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    model = LlamaForCausalLM(config)
    model.save_pretrained(root / "base")
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 1e-2)
    model.save_pretrained(root / "aligned")
    tokenizer.save_pretrained(root / "aligned")
    compute_directions(root / "base", root / "aligned", out=root / "directions.safetensors")
    g = torch.Generator().manual_seed(seed + 2)

    def sentence(n: int) -> str:
        return " ".join(WORDS[int(i)] for i in torch.randint(0, len(WORDS), (n,), generator=g))

    with open(root / "sft.jsonl", "w") as f:
        for _ in range(16):
            q, a = sentence(4), sentence(4)
            f.write(json.dumps({"instruction": q, "input": "", "output": a, "text": f"{q} {a}"}) + "\n")
    with open(root / "dpo.jsonl", "w") as f:
        for _ in range(16):
            f.write(json.dumps({"instruction": sentence(4), "input": "", "chosen": sentence(3),
                                "rejected": sentence(3)}) + "\n")
    return root


def weights(folder: Path) -> dict[str, torch.Tensor]:
    """The tensors of a saved model or adapter folder (`model.safetensors`/`adapter_model.safetensors`)."""
    for name in ("adapter_model.safetensors", "model.safetensors"):
        if (folder / name).is_file():
            return load_file(folder / name)
    raise FileNotFoundError(f"no model.safetensors or adapter_model.safetensors in {folder}")


if __name__ == "__main__":  # run as a script from outside the clone: python tests/stacks.py ROOT
    import sys

    make_stack_model(Path(sys.argv[1]))
