"""End to end on CPU: tiny Llama checkpoints → compute_directions → Trainer with AsFTAdamW (peft LoRA
on q_proj/v_proj, and full-parameter), drift logging, accelerate prepare, checkpoint resume."""

from __future__ import annotations

import copy

import pytest
import torch

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

from transformers import LlamaConfig, LlamaForCausalLM, TrainerCallback, TrainingArguments  # noqa: E402

from asft_optim import AsFTAdamW, compute_directions  # noqa: E402
from asft_optim.integrations import AsFTTrainer, unwrap_asft  # noqa: E402
from asft_optim.metrics import per_layer  # noqa: E402

VOCAB = 64


def _config() -> LlamaConfig:
    return LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                       num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=32,
                       tie_word_embeddings=False)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """base and aligned (= base + small perturbation) checkpoints, and their directions file."""
    root = tmp_path_factory.mktemp("llama")
    torch.manual_seed(0)
    base = LlamaForCausalLM(_config())
    base.save_pretrained(root / "base")
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in base.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 1e-2)
    base.save_pretrained(root / "aligned")
    anchors = compute_directions(root / "base", root / "aligned", out=root / "directions.safetensors")
    return root, anchors


def _data(n: int = 16, length: int = 8) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(0, VOCAB, (n, length), generator=g)
    return [{"input_ids": x, "labels": x.clone(), "attention_mask": torch.ones_like(x)} for x in ids]


def _args(out, **kw) -> TrainingArguments:
    base = dict(output_dir=str(out), per_device_train_batch_size=4, max_steps=4, learning_rate=1e-2,
                report_to=[], use_cpu=True, dataloader_num_workers=0, logging_steps=1, save_strategy="no",
                seed=0, disable_tqdm=True, weight_decay=0.01, lr_scheduler_type="linear")
    base.update(kw)
    return TrainingArguments(**base)


def _model(root, lora: bool):
    model = LlamaForCausalLM.from_pretrained(root / "aligned", dtype=torch.float32)
    if lora:
        config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0)
        model = peft.get_peft_model(model, config)
    return model


class Recorder(TrainerCallback):
    """Runs after the reporting callbacks: sees exactly what they see."""

    def __init__(self) -> None:
        self.logs: list[dict[str, float]] = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        self.logs.append(dict(logs or {}))


def _trainable(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("lora", [True, False], ids=["lora", "full"])
def test_trainer_trains_with_asft_and_logs_drift(checkpoints, tmp_path, lora):
    root, anchors = checkpoints
    model = _model(root, lora)
    before = _trainable(model)
    rec = Recorder()
    trainer = AsFTTrainer(model=model, args=_args(tmp_path), train_dataset=_data(), anchors=anchors,
                          asft_lambda=10.0, callbacks=[rec])
    trainer.train()
    opt = unwrap_asft(trainer.optimizer)
    assert isinstance(opt, AsFTAdamW)
    if lora:
        assert sorted(p.direction for p in opt._lora.pairs) == sorted(
            f"model.layers.{i}.self_attn.{m}.weight" for i in range(2) for m in ("q_proj", "v_proj"))
    after = _trainable(model)
    assert all(not torch.equal(before[n], after[n]) for n in after if ".lora_A." in n or not lora)
    train_logs = [log for log in rec.logs if "loss" in log]
    assert len(train_logs) == 4
    last = train_logs[-1]
    for key in ("asft/cos", "asft/orth_ratio", "asft/cos/model.layers.0", "asft/orth_ratio/model.layers.1"):
        assert key in last, sorted(last)
    assert 0.0 <= last["asft/orth_ratio"] <= 1.0 and -1.0 <= last["asft/cos"] <= 1.0
    # the last log came after the last step: it holds the optimizer's own per-layer drift
    layers = per_layer(opt.drift_sums())
    assert set(layers) == {"model.layers.0", "model.layers.1"} | ({"model.embed_tokens", "model.norm", "lm_head"}
                                                                   if not lora else set())
    for layer, d in layers.items():
        assert last[f"asft/cos/{layer}"] == pytest.approx(d.cos, rel=1e-12, abs=1e-15)
        assert last[f"asft/orth_ratio/{layer}"] == pytest.approx(d.orth_ratio, rel=1e-12)


def test_penalty_reaches_trainer_runs(checkpoints, tmp_path):
    """λ changes the result of a Trainer run, and a strong λ pulls the LoRA update towards d."""
    root, anchors = checkpoints
    ends = {}
    for lam in (0.0, 1e4):
        model = _model(root, lora=True)
        rec = Recorder()
        trainer = AsFTTrainer(model=model, args=_args(tmp_path / str(lam), max_steps=6), train_dataset=_data(),
                              anchors=anchors, asft_lambda=lam, callbacks=[rec])
        trainer.train()
        ends[lam] = ([log for log in rec.logs if "loss" in log][-1]["asft/orth_ratio"], _trainable(model))
    assert ends[1e4][0] < ends[0.0][0]
    a, b = ends[0.0][1], ends[1e4][1]
    assert any(not torch.allclose(a[n], b[n]) for n in a)


@pytest.mark.parametrize("lora", [True, False], ids=["lora", "full"])
def test_resume_from_checkpoint_matches_uninterrupted_run(checkpoints, tmp_path, lora):
    root, anchors = checkpoints
    args = dict(max_steps=6, save_strategy="steps", save_steps=3, learning_rate=5e-3)
    model = _model(root, lora)
    AsFTTrainer(model=model, args=_args(tmp_path / "a", **args), train_dataset=_data(), anchors=anchors,
                asft_lambda=5.0).train()
    full = _trainable(model)
    resumed = _model(root, lora)
    trainer = AsFTTrainer(model=resumed, args=_args(tmp_path / "b", **args), train_dataset=_data(),
                          anchors=anchors, asft_lambda=5.0)
    trainer.train(resume_from_checkpoint=str(tmp_path / "a" / "checkpoint-3"))
    got = _trainable(resumed)
    assert got.keys() == full.keys()
    for n in full:
        assert torch.equal(got[n], full[n]), n  # bitwise: same math, same order
    # and a resume with another λ is refused
    other = AsFTTrainer(model=_model(root, lora), args=_args(tmp_path / "c", **args), train_dataset=_data(),
                        anchors=anchors, asft_lambda=1.0)
    with pytest.raises(ValueError, match="asft_lambda"):
        other.train(resume_from_checkpoint=str(tmp_path / "a" / "checkpoint-3"))


def test_accelerate_prepare_and_swapped_parameters(checkpoints):
    """accelerate wraps the optimizer (state_dict round trip inside) and may hand the optimizer new
    parameter objects: binding is by name, so the steps are unchanged."""
    from accelerate import Accelerator

    root, anchors = checkpoints
    batch = {k: torch.stack([d[k] for d in _data(4)]) for k in ("input_ids", "labels")}

    def run(prepare: bool, swap: bool):
        torch.manual_seed(0)
        model = _model(root, lora=True)
        opt = AsFTAdamW.from_model(model, anchors=anchors, lr=1e-2, asft_lambda=100.0)
        if swap:  # what accelerate does when placement moves parameters: new objects, same names
            twin = copy.deepcopy(model)
            by_name = dict(twin.named_parameters())
            for group in opt.param_groups:
                group["params"] = [by_name[n] for n in group["param_names"]]
            model = twin
        if prepare:
            model, opt = Accelerator(cpu=True).prepare(model, opt)
        for _ in range(3):
            opt.zero_grad()
            model(**batch).loss.backward()
            opt.step()
        return _trainable(model), unwrap_asft(opt)

    plain, _ = run(False, False)
    for prepare, swap in ((True, False), (False, True)):
        got, opt = run(prepare, swap)
        assert opt is not None and opt._lora is not None
        for n in plain:
            assert torch.equal(got[n], plain[n]), (prepare, swap, n)
