"""`AsFTOptimizerFactory` through `Trainer(optimizer_cls_and_kwargs=...)`: the run equals AsFTTrainer's
(full and LoRA), the penalty acts, axolotl's positional call, and the refusals."""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainingArguments  # noqa: E402

from asft_optim import Anchors, AsFTAdamW  # noqa: E402
from asft_optim.integrations import (  # noqa: E402
    AsFTOptimizerFactory,
    AsFTTrainer,
    create_asft_optimizer,
    unwrap_asft,
)
from asft_optim.integrations.factory import carries_penalty  # noqa: E402
from tests.fixtures import base_and_aligned  # noqa: E402

VOCAB = 64


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    """An aligned tiny Llama (base + noise) and the directions file between the two."""
    root = tmp_path_factory.mktemp("factory")
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=32,
                         tie_word_embeddings=False)
    base_and_aligned(root, config)
    return root


def _data() -> list[dict[str, torch.Tensor]]:
    ids = torch.randint(0, VOCAB, (16, 8), generator=torch.Generator().manual_seed(5))
    return [{"input_ids": x, "labels": x.clone(), "attention_mask": torch.ones_like(x)} for x in ids]


def _args(out, **kw) -> TrainingArguments:
    base = dict(output_dir=str(out), per_device_train_batch_size=4, max_steps=4, learning_rate=1e-2,
                report_to=[], use_cpu=True, dataloader_num_workers=0, save_strategy="no", seed=0,
                disable_tqdm=True, weight_decay=0.01, lr_scheduler_type="linear")
    return TrainingArguments(**{**base, **kw})


def _model(root, lora: bool):
    model = LlamaForCausalLM.from_pretrained(root / "aligned", dtype=torch.float32)
    if lora:
        model = peft.get_peft_model(model, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                           lora_dropout=0.0))
    return model


def _trainable(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def _factory_run(root, out, lora: bool, lam: float, optim: str) -> tuple[dict[str, torch.Tensor], Trainer]:
    args = _args(out, optim=optim)
    model = _model(root, lora)
    trainer = Trainer(model=model, args=args, train_dataset=_data(), optimizer_cls_and_kwargs=(
        AsFTOptimizerFactory, {"args": args, "anchors": str(root / "directions.safetensors"), "asft_lambda": lam}))
    trainer.train()
    return _trainable(model), trainer


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
@pytest.mark.parametrize("optim", ["adamw_torch", "adamw_bnb_8bit"])
def test_factory_run_equals_asft_trainer(root, tmp_path, lora, optim):
    """AdamW's name gives AsFTAdamW; bitsandbytes' 8-bit AdamW is built by transformers' rules
    (embeddings in 32 bits) and carries the attached penalty: both equal AsFTTrainer's run."""
    if optim == "adamw_bnb_8bit":
        pytest.importorskip("bitsandbytes")
    ends, trainer = _factory_run(root, tmp_path / "factory", lora, 10.0, optim)
    assert carries_penalty(trainer.optimizer)
    assert (unwrap_asft(trainer.optimizer) is not None) == (optim == "adamw_torch")
    model = _model(root, lora)
    AsFTTrainer(model=model, args=_args(tmp_path / "trainer", optim=optim), train_dataset=_data(),
                anchors=root / "directions.safetensors", asft_lambda=10.0).train()
    reference = _trainable(model)
    assert ends.keys() == reference.keys()
    for name in ends:
        assert torch.equal(ends[name], reference[name]), name
    # and the penalty acted: the same run at λ = 0 ends elsewhere
    plain, _ = _factory_run(root, tmp_path / "plain", lora, 0.0, optim)
    assert any(not torch.equal(plain[n], ends[n]) for n in ends)


def test_positional_training_arguments_as_axolotl_passes_them(root, tmp_path):
    args = _args(tmp_path, learning_rate=3e-3, adam_beta1=0.8, adam_epsilon=1e-6, weight_decay=0.1)
    model = _model(root, lora=True)
    opt = AsFTOptimizerFactory()(model, args, anchors=str(root / "directions.safetensors"), asft_lambda=2.0)
    expected = create_asft_optimizer(Trainer(model=model, args=args), model,
                                     Anchors.load(root / "directions.safetensors"), asft_lambda=2.0)
    assert isinstance(opt, AsFTAdamW)
    keys = ("lr", "betas", "eps", "weight_decay", "asft_lambda", "param_names")
    assert [{k: g[k] for k in keys} for g in opt.param_groups] == [
        {k: g[k] for k in keys} for g in expected.param_groups]
    assert {g["weight_decay"] for g in opt.param_groups} == {0.1}


def test_refusals_name_the_problem(root, tmp_path):
    path = str(root / "directions.safetensors")
    model = _model(root, lora=False)
    factory = AsFTOptimizerFactory()
    with pytest.raises(TypeError, match=r'add "args": args to the kwargs of optimizer_cls_and_kwargs'):
        factory(model, anchors=path, asft_lambda=1.0)
    with pytest.raises(ValueError, match="two different TrainingArguments"):
        factory(model, _args(tmp_path), args=_args(tmp_path), anchors=path)
    missing = tmp_path / "nope.safetensors"
    with pytest.raises(FileNotFoundError, match=f"directions file not found: {missing}"):
        factory(model, args=_args(tmp_path), anchors=str(missing))
    with pytest.raises(ValueError, match="would ignore optim_args='amsgrad=True'"):
        factory(model, args=_args(tmp_path, optim_args="amsgrad=True"), anchors=path)
    with pytest.raises(ValueError, match="updates the parameters inside backward or per layer"):
        factory(model, args=_args(tmp_path, optim="lomo"), anchors=path)
    with pytest.raises(ValueError, match="impl apply to AsFTAdamW"):
        factory(model, args=_args(tmp_path, optim="adafactor"), anchors=path, impl="torch")
    # the Trainer surfaces the factory's error instead of training without AsFT
    trainer = Trainer(model=model, args=_args(tmp_path), train_dataset=_data(),
                      optimizer_cls_and_kwargs=(AsFTOptimizerFactory, {"anchors": path}))
    with pytest.raises(TypeError, match="needs the Trainer's TrainingArguments"):
        trainer.train()
