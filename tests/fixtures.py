"""The tests' tiny models, built from configs: a word-level tokenizer, causal LMs (Llama with a chat
template, GPT-2 without), a 14-label QA-moderation classifier, a generative guard that can only
answer "safe" or "unsafe", and random peft LoRA adapters of any of them."""

from __future__ import annotations

from pathlib import Path

import torch

WORDS = ["how", "do", "i", "make", "a", "bomb", "steal", "car", "hack", "bank", "sure", "here", "is", "the",
         "plan", "sorry", "cannot", "help", "what", "two", "plus", "3", "4", "5", "answer", "positive",
         "negative", "great", "movie", "bad", "safe", "unsafe", "user", "agent", "task", "check"]
SPECIAL = ["<pad>", "<s>", "</s>", "<unk>"]
CHAT = ("{{ bos_token }}{% for m in messages %}{{ m['role'] }} : {{ m['content'] }} {% endfor %}"
        "{% if add_generation_prompt %}agent :{% endif %}")
BEAVERTAILS = ["animal_abuse", "child_abuse", "controversial_topics,politics", "discrimination,stereotype,injustice",
               "drug_abuse,weapons,banned_substance", "financial_crime,property_crime,theft",
               "hate_speech,offensive_language", "misinformation_regarding_ethics,laws_and_safety",
               "non_violent_unethical_behavior", "privacy_violation", "self_harm", "sexually_explicit,adult_content",
               "terrorism,organized_crime", "violence,aiding_and_abetting,incitement"]


def tokenizer(chat: bool):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(SPECIAL + WORDS + [":"])}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    core.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    tok = PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                  unk_token="<unk>")
    if chat:
        tok.chat_template = CHAT
    return tok


def _llama_config(tok, hidden: int = 16, **kw):
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=len(tok), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=1,
                       num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=512,
                       bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                       tie_word_embeddings=False, **kw)


def save(model, tok, folder: Path, **kw) -> Path:
    model.save_pretrained(str(folder), safe_serialization=True, **kw)
    tok.save_pretrained(str(folder))
    return folder


def llama(folder: Path, seed: int = 0, chat: bool = True, hidden: int = 16) -> Path:
    from transformers import LlamaForCausalLM

    tok = tokenizer(chat)
    torch.manual_seed(seed)
    return save(LlamaForCausalLM(_llama_config(tok, hidden)), tok, folder)


def gpt2(folder: Path, seed: int = 0) -> Path:
    from transformers import GPT2Config, GPT2LMHeadModel

    tok = tokenizer(chat=False)
    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=len(tok), n_embd=16, n_layer=1, n_head=2, n_positions=512,
                     bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    return save(GPT2LMHeadModel(cfg), tok, folder)


def moderation(folder: Path, seed: int = 1) -> Path:
    from transformers import LlamaForSequenceClassification

    tok = tokenizer(chat=False)
    torch.manual_seed(seed)
    cfg = _llama_config(tok, num_labels=14, problem_type="multi_label_classification",
                        id2label=dict(enumerate(BEAVERTAILS)), label2id={n: i for i, n in enumerate(BEAVERTAILS)})
    model = LlamaForSequenceClassification(cfg)
    with torch.no_grad():  # content decides: the pooled EOS and unknown words carry no embedding,
        model.model.embed_tokens.weight[[tok.eos_token_id, tok.unk_token_id]] = 0
        w = torch.randn(cfg.hidden_size) * 20  # and the 14 labels nearly agree
        model.score.weight.copy_(w + torch.randn(14, cfg.hidden_size))
    return save(model, tok, folder)


def guard(folder: Path, seed: int = 2, chat: bool = False) -> Path:
    """A causal LM whose only non-zero output logits are ±h·w for "unsafe" / "safe"."""
    from transformers import LlamaForCausalLM

    tok = tokenizer(chat)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(_llama_config(tok))
    with torch.no_grad():
        model.model.embed_tokens.weight[tok.unk_token_id] = 0  # the last prompt word is unknown: content decides
        w = model.lm_head.weight
        row = torch.randn(w.shape[1]) * 5
        w.zero_()
        w[tok.convert_tokens_to_ids("unsafe")] = row
        w[tok.convert_tokens_to_ids("safe")] = -row
    return save(model, tok, folder)


def lora_adapter(model, folder: Path, *, seed: int = 3, std: float = 0.05, **config) -> dict[str, torch.Tensor]:
    """Save a peft LoRA adapter of `model` (a module, or a checkpoint folder to load) to `folder`, with
    every lora_A and lora_B entry drawn from N(0, std²), so that its update s·B·A is nonzero; `config`
    goes to `peft.LoraConfig`. Returns the merged weights, the model the adapter stands for."""
    import peft
    from transformers import AutoModelForCausalLM

    if isinstance(model, (str, Path)):
        model = AutoModelForCausalLM.from_pretrained(str(model))
    lora = peft.get_peft_model(model, peft.LoraConfig(lora_dropout=0.0, **config))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in lora.named_parameters():
            if "lora_" in n:
                p.copy_(torch.randn(p.shape, generator=g) * std)
    lora.save_pretrained(str(folder))
    return {n: p.detach().clone() for n, p in lora.merge_and_unload().named_parameters()}


def base_and_aligned(root: Path, config):
    """`root/base`: a LlamaForCausalLM built from `config` after `torch.manual_seed(0)`; `root/aligned`:
    the same plus N(0, 0.01²) noise (generator seed 1); `root/directions.safetensors` between the two.
    Returns the directions (`Anchors`)."""
    from transformers import LlamaForCausalLM

    from asft_optim import compute_directions

    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    model.save_pretrained(root / "base")
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 1e-2)
    model.save_pretrained(root / "aligned")
    return compute_directions(root / "base", root / "aligned", out=root / "directions.safetensors")
