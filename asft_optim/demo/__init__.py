"""End-to-end demo: a tiny aligned Llama fine-tuned with SFT, L2-SP and AsFT on a synthetic language.

Modules, in the order data flows: `language` (the synthetic language and its splits) → `models`
(cached base and aligned checkpoints, directions) → `finetune` (`asft_optim.finetune`'s one Trainer
path for every method) → `evaluate` (Harmful Score, Fine-tune Accuracy) → `landscape` (HS along
directions) → `report`; `run` is `asft demo`.
Needs the `hf` and `plot` extras (transformers, peft, matplotlib).
"""
