"""End to end on CPU: tiny Llama checkpoints → compute_directions → Trainer with AsFTAdamW (peft LoRA
on q_proj/v_proj, and full-parameter), drift logging, accelerate prepare, checkpoint resume."""

from __future__ import annotations

import copy

import pytest
import torch

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

# E402 is silenced below: these imports need the importorskip guards above
from transformers import LlamaConfig, LlamaForCausalLM, TrainerCallback, TrainingArguments  # noqa: E402

from asft_optim import AsFTAdamW  # noqa: E402
from asft_optim.integrations import AsFTTrainer, unwrap_asft  # noqa: E402
from asft_optim.metrics import per_layer  # noqa: E402
from tests.fixtures import base_and_aligned  # noqa: E402

VOCAB = 64


def _config() -> LlamaConfig:
    return LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                       num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=32,
                       tie_word_embeddings=False)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """base and aligned (= base + small perturbation) checkpoints, and their directions file."""
    root = tmp_path_factory.mktemp("llama")
    return root, base_and_aligned(root, _config())


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
        assert sorted(p.direction for p in opt.lora_layout.pairs) == sorted(
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
        assert opt is not None and opt.lora_layout is not None
        for n in plain:
            assert torch.equal(got[n], plain[n]), (prepare, swap, n)


def test_drift_reaches_log_history_and_trainer_state_json(checkpoints, tmp_path):
    """Where people and tools read metrics afterwards: `state.log_history` and a checkpoint's
    `trainer_state.json` hold the same `asft/` values the reporting callbacks saw."""
    import json

    root, anchors = checkpoints
    rec = Recorder()
    trainer = AsFTTrainer(model=_model(root, lora=True), args=_args(tmp_path, save_strategy="steps", save_steps=4),
                          train_dataset=_data(), anchors=anchors, asft_lambda=10.0, callbacks=[rec])
    trainer.train()
    seen = [log for log in rec.logs if "loss" in log]
    history = [log for log in trainer.state.log_history if "loss" in log]
    saved = [log for log in json.loads((tmp_path / "checkpoint-4" / "trainer_state.json").read_text())["log_history"]
             if "loss" in log]
    assert len(seen) == len(history) == len(saved) == 4
    for s, h, j in zip(seen, history, saved, strict=True):
        keys = {k for k in s if k.startswith("asft/")}
        assert {"asft/cos", "asft/orth_ratio", "asft/cos/model.layers.1"} <= keys
        assert {k: h[k] for k in keys} == {k: s[k] for k in keys} == {k: j[k] for k in keys}


@pytest.mark.parametrize("form", ["str", "path", "anchors", "dict"])
def test_anchors_as_path_anchors_or_mapping(checkpoints, tmp_path, form):
    from asft_optim import Anchors

    root, anchors = checkpoints
    file = root / "directions.safetensors"
    given = {"str": str(file), "path": file, "anchors": Anchors.load(file), "dict": dict(anchors.items())}[form]
    model = _model(root, lora=False)
    AsFTTrainer(model=model, args=_args(tmp_path, max_steps=2), train_dataset=_data(), anchors=given,
                asft_lambda=10.0).train()
    reference = _model(root, lora=False)
    AsFTTrainer(model=reference, args=_args(tmp_path / "ref", max_steps=2), train_dataset=_data(),
                anchors=anchors, asft_lambda=10.0).train()
    got, want = _trainable(model), _trainable(reference)
    assert all(torch.equal(got[n], want[n]) for n in want)


def test_bad_anchors_arguments(checkpoints, tmp_path):
    root, _ = checkpoints
    with pytest.raises(FileNotFoundError) as e:
        AsFTTrainer(model=_model(root, lora=False), args=_args(tmp_path), train_dataset=_data(),
                    anchors=str(tmp_path / "nope.safetensors"))
    assert str(e.value) == f"anchors: directions file not found: {tmp_path / 'nope.safetensors'}"
    with pytest.raises(TypeError) as e:
        AsFTTrainer(model=_model(root, lora=False), args=_args(tmp_path), train_dataset=_data(), anchors=3)
    assert str(e.value) == ("anchors must be an Anchors, a name -> tensor mapping or the path of a directions "
                            "file, got int")


def test_trainer_optimizer_cls_and_kwargs_points_to_asft_trainer(checkpoints, tmp_path):
    """The route users try first: a stock Trainer handing AsFTAdamW its bare-tensor param groups."""
    from transformers import Trainer

    root, anchors = checkpoints
    trainer = Trainer(model=_model(root, lora=False), args=_args(tmp_path), train_dataset=_data(),
                      optimizer_cls_and_kwargs=(AsFTAdamW, {"anchors": anchors, "asft_lambda": 1.0}))
    with pytest.raises(ValueError) as e:
        trainer.train()
    assert str(e.value) == (
        "AsFTAdamW binds directions to parameters by name: pass model.named_parameters() or (name, tensor) pairs, "
        "not bare tensors (with the transformers Trainer, use asft_optim.integrations.AsFTTrainer, or build the "
        "optimizer with AsFTAdamW.from_model(model, anchors=...) and pass optimizers=(optimizer, None))")


@pytest.mark.parametrize("optim", ["adamw_torch", "adamw_torch_fused"])
def test_adamw_optim_names_are_honoured(checkpoints, tmp_path, optim):
    root, anchors = checkpoints
    trainer = AsFTTrainer(model=_model(root, lora=False), args=_args(tmp_path, optim=optim, max_steps=1),
                          train_dataset=_data(), anchors=anchors)
    trainer.train()
    assert isinstance(unwrap_asft(trainer.optimizer), AsFTAdamW)


def test_unhonoured_optim_and_optim_args_are_refused(checkpoints, tmp_path):
    root, anchors = checkpoints
    for optim in ("lomo", "galore_adamw_layerwise"):  # they update outside optimizer.step()
        with pytest.raises(ValueError, match=f"optim='{optim}'.*outside optimizer.step"):
            AsFTTrainer(model=_model(root, lora=False), args=_args(tmp_path, optim=optim), train_dataset=_data(),
                        anchors=anchors)
    with pytest.raises(ValueError, match="impl apply to AsFTAdamW"):
        AsFTTrainer(model=_model(root, lora=False), args=_args(tmp_path, optim="adafactor"), train_dataset=_data(),
                    anchors=anchors, impl="torch")
    with pytest.raises(ValueError) as e:
        AsFTTrainer(model=_model(root, lora=False), args=_args(tmp_path, optim_args="amsgrad=True"),
                    train_dataset=_data(), anchors=anchors)
    assert str(e.value) == ("AsFTTrainer would ignore TrainingArguments(optim_args='amsgrad=True'); pass AsFTAdamW "
                            "options as keyword arguments (asft_lambda=..., penalty=..., ...) instead")


class _LambdaSeen(TrainerCallback):
    """Added after the trainer's own callbacks: records every group's λ as `optimizer.step()` sees it."""

    def __init__(self, trainer) -> None:
        self.trainer, self.seen = trainer, []

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        self.seen.append({g["asft_lambda"] for g in unwrap_asft(self.trainer.optimizer).param_groups})


def test_lambda_per_micro_batch_reproduces_the_reference_loss(checkpoints, tmp_path):
    """The released code adds λ‖C⊥ΔW‖² to the loss of every micro-batch. A Trainer doing exactly that
    (explicit penalty through autograd, torch AdamW) and AsFTTrainer(lambda_per_micro_batch=True) follow
    the same trajectory over 2 epochs of 5 micro-batches with 2 accumulation steps (windows 2, 2, 1)."""
    from transformers import Trainer

    root, anchors = checkpoints
    lam = 0.5
    args = dict(per_device_train_batch_size=2, gradient_accumulation_steps=2, max_steps=-1, num_train_epochs=2,
                weight_decay=0.0, learning_rate=1e-3, lr_scheduler_type="constant", logging_steps=100,
                max_grad_norm=0.0)  # the reference clips its penalty gradient, AsFTAdamW does not
    data = _data(10)

    class ReferenceTrainer(Trainer):
        def __init__(self, *a, **kw):
            super().__init__(*a, **kw)
            self.w0 = {n: p.detach().clone() for n, p in self.model.named_parameters()}

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            loss = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            for n, p in model.named_parameters():
                u = anchors[n].float().flatten() / anchors[n].float().norm()
                delta = (p - self.w0[n]).flatten()
                loss = loss + lam * (delta - (u @ delta) * u).square().sum()
            return loss

    reference = _model(root, lora=False)
    ReferenceTrainer(model=reference, args=_args(tmp_path / "ref", **args), train_dataset=data).train()
    ends = {}
    for per_micro_batch, asft_lambda in ((True, lam), (False, 2 * lam)):
        model = _model(root, lora=False)
        trainer = AsFTTrainer(model=model, args=_args(tmp_path / str(per_micro_batch), **args), train_dataset=data,
                              anchors=anchors, asft_lambda=asft_lambda, lambda_per_micro_batch=per_micro_batch)
        seen = _LambdaSeen(trainer)
        trainer.add_callback(seen)
        trainer.train()
        ends[per_micro_batch] = (_trainable(model), seen.seen)
        assert {g["asft_lambda"] for g in unwrap_asft(trainer.optimizer).param_groups} == {asft_lambda}  # restored
    want = _trainable(reference)
    got, seen = ends[True]
    assert seen == [{2 * lam}, {2 * lam}, {lam}] * 2
    for n in want:
        torch.testing.assert_close(got[n], want[n], rtol=1e-4, atol=1e-6, msg=n)
    # a constant asft_lambda = k·λ overshoots in the shorter last window of each epoch
    constant, _ = ends[False]
    assert max(float((constant[n] - want[n]).abs().max()) for n in want) > 1e-4


def test_trl_sft_trainer_recipe(tmp_path):
    """The README's TRL recipe: `class AsFTSFTTrainer(AsFTTrainerMixin, SFTTrainer)` trains with
    AsFTAdamW on prompt/completion data and logs drift into the history."""
    pytest.importorskip("trl")
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    from asft_optim.demo.language import Language, LanguageConfig
    from asft_optim.demo.models import build_tokenizer
    from asft_optim.integrations import AsFTTrainerMixin

    tok = build_tokenizer(Language(LanguageConfig()))
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64,
                                         num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2))
    base = {n: p.detach().clone() for n, p in model.named_parameters()}
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 1e-2)
    anchors = {n: p.detach() - base[n] for n, p in model.named_parameters()}

    class AsFTSFTTrainer(AsFTTrainerMixin, SFTTrainer):
        pass

    data = Dataset.from_list([{"prompt": "<s> MAP w1 w2 =>", "completion": " w3 w4"}] * 8)
    args = SFTConfig(output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=4, logging_steps=1,
                     report_to=[], use_cpu=True, save_strategy="no", disable_tqdm=True)
    trainer = AsFTSFTTrainer(model=model, args=args, train_dataset=data, processing_class=tok, anchors=anchors,
                             asft_lambda=1.0)
    trainer.train()
    assert isinstance(unwrap_asft(trainer.optimizer), AsFTAdamW)
    logs = [log for log in trainer.state.log_history if "loss" in log]
    assert len(logs) == 2 and all("asft/orth_ratio" in log for log in logs)


def test_plain_trainer_with_a_ready_optimizer_and_drift_callback(checkpoints, tmp_path):
    """The README's third route: `Trainer(optimizers=(AsFTAdamW.from_model(...), None))` plus
    `DriftCallback.install` trains with AsFT and logs drift into the history."""
    from transformers import Trainer

    from asft_optim.integrations import DriftCallback

    root, anchors = checkpoints
    model = _model(root, lora=True)
    opt = AsFTAdamW.from_model(model, anchors=anchors, lr=1e-2, asft_lambda=10.0)
    trainer = Trainer(model=model, args=_args(tmp_path, max_steps=2), train_dataset=_data(), optimizers=(opt, None))
    DriftCallback.install(trainer)
    trainer.train()
    assert unwrap_asft(trainer.optimizer) is opt and opt.state
    assert all("asft/cos/model.layers.0" in log for log in trainer.state.log_history if "loss" in log)


ATTACHED_OPTIMS = ["adamw_8bit", "paged_adamw_8bit", "adafactor", "lion_8bit"]


@pytest.mark.parametrize("optim", ATTACHED_OPTIMS)
def test_other_optims_are_built_by_transformers_with_the_penalty_attached(checkpoints, tmp_path, optim):
    """optim= other than AdamW's: transformers' optimizer (class kept) with `attach`; the penalty acts,
    drift reaches log_history, and a resume from a Trainer checkpoint continues bitwise."""
    if optim != "adafactor":
        pytest.importorskip("bitsandbytes")
    from asft_optim.penalty import attached

    root, anchors = checkpoints
    kw = dict(optim=optim, max_steps=4, save_strategy="steps", save_steps=2, learning_rate=5e-3)
    runs = {}
    for lam in (0.0, 1e3):
        model = _model(root, lora=True)
        trainer = AsFTTrainer(model=model, args=_args(tmp_path / f"run{lam}", **kw), train_dataset=_data(),
                              anchors=anchors, asft_lambda=lam)
        trainer.train()
        inner = trainer.optimizer.optimizer  # accelerate's wrapper around transformers' optimizer
        assert not isinstance(inner, AsFTAdamW) and attached(trainer.optimizer) is trainer.asft_penalty
        logged = [h for h in trainer.state.log_history if "loss" in h]
        assert len(logged) == 4 and all("asft/orth_ratio" in h for h in logged)
        orth = sum((d.delta_norm * d.orth_ratio) ** 2 for d in trainer.asft_penalty.drift().values()) ** 0.5
        runs[lam] = (_trainable(model), orth)
    assert runs[1e3][1] < 0.5 * runs[0.0][1]  # the penalty acts: ‖C⊥ΔW‖ shrinks
    resumed = _model(root, lora=True)
    trainer = AsFTTrainer(model=resumed, args=_args(tmp_path / "resumed", **kw), train_dataset=_data(),
                          anchors=anchors, asft_lambda=1e3)
    trainer.train(resume_from_checkpoint=str(tmp_path / "run1000.0" / "checkpoint-2"))
    got, want = _trainable(resumed), runs[1e3][0]
    assert all(torch.equal(got[n], want[n]) for n in want)
    other = AsFTTrainer(model=_model(root, lora=True), args=_args(tmp_path / "other", **kw), train_dataset=_data(),
                        anchors=anchors, asft_lambda=1.0)
    with pytest.raises(ValueError, match="cannot resume: .*asft_lambda"):
        other.train(resume_from_checkpoint=str(tmp_path / "run1000.0" / "checkpoint-2"))


def test_lambda_per_micro_batch_on_an_attached_optimizer(checkpoints, tmp_path):
    """lambda_per_micro_batch scales the attached penalty's λ by the window's micro-batches around each
    step (λ·k seen by the step, the configured λ saved)."""
    root, anchors = checkpoints
    seen = []
    from asft_optim import penalty as penalty_module

    real = penalty_module.AsFTPenalty.add_penalty_grads

    def spy(self, snapshot=True):
        seen.append(self.lambda_scale)
        return real(self, snapshot)

    penalty_module.AsFTPenalty.add_penalty_grads = spy
    try:
        trainer = AsFTTrainer(model=_model(root, lora=True), train_dataset=_data(10), anchors=anchors,
                              args=_args(tmp_path, optim="adafactor", per_device_train_batch_size=2,
                                         gradient_accumulation_steps=2, max_steps=-1, num_train_epochs=1),
                              lambda_per_micro_batch=True)
        trainer.train()
    finally:
        penalty_module.AsFTPenalty.add_penalty_grads = real
    assert seen == [2.0, 2.0, 1.0]
    assert trainer.asft_penalty.lambda_scale == 1.0
    assert {g["asft_lambda"] for g in trainer.optimizer.param_groups} == {1.0}
