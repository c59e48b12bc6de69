"""QLoRA: peft LoRA on bitsandbytes 4-bit (NF4, FP4) and 8-bit base layers, loaded on CPU.

The penalty belongs to the base weight's update ΔW = s·(B·A − B0·A0) against the direction of the
(unquantised) base weight. `AsFTAdamW.from_model` and `attach(bitsandbytes AdamW8bit)` must equal the
same optimizer stepping on the gradient of the explicit loss L_task + λ‖C⊥ΔW‖² (penalty by autograd
in float64), the task gradient coming from the quantised model itself.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")
bnb = pytest.importorskip("bitsandbytes")

# E402 is silenced below: these imports need the importorskip guards above
from transformers import BitsAndBytesConfig, LlamaConfig, LlamaForCausalLM  # noqa: E402

from asft_optim import AsFTAdamW, attach  # noqa: E402
from asft_optim.lora import lora_layout  # noqa: E402
from asft_optim.penalty import attached  # noqa: E402
from tests.fixtures import base_and_aligned  # noqa: E402
from tests.oracle import penalty as explicit_penalty  # noqa: E402

VOCAB = 64
HIDDEN = 64
LAM = 5.0
STEPS = 4


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("qllama")
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=128, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=32,
                      tie_word_embeddings=False)
    return root, base_and_aligned(root, cfg)


def _quantised(root, kind: str):
    """The aligned model loaded with bitsandbytes (kind nf4 / fp4 / int8), LoRA r=4 on q and v."""
    if kind == "int8":
        q = BitsAndBytesConfig(load_in_8bit=True)
    else:
        q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=kind, bnb_4bit_compute_dtype=torch.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = LlamaForCausalLM.from_pretrained(root / "aligned", quantization_config=q, dtype=torch.float32,
                                                 device_map="cpu")
    torch.manual_seed(3)  # init_lora_weights=False: B0 ≠ 0, so B0·A0 counts
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0,
                             init_lora_weights=False)
    return peft.get_peft_model(model, config)


def _batch(step: int) -> torch.Tensor:
    return torch.randint(0, VOCAB, (2, 8), generator=torch.Generator().manual_seed(10 + step))


def _task_grads(model, step: int) -> None:
    model.zero_grad(set_to_none=True)
    ids = _batch(step)
    model(input_ids=ids, labels=ids).loss.backward()


def _lora(model) -> dict[str, torch.Tensor]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def _explicit_penalty_grads(model, anchors, start: dict[str, torch.Tensor]) -> None:
    """Add λ·∂‖C⊥ΔW‖²/∂(A, B) (autograd, float64) to the LoRA gradients, ΔW = s·(B·A − B0·A0)."""
    named = _lora(model)
    for pair in lora_layout(model).pairs:
        a = named[pair.a_name].detach().double().requires_grad_()
        b = named[pair.b_name].detach().double().requires_grad_()
        a0, b0 = start[pair.a_name].double(), start[pair.b_name].double()
        dw = pair.scaling * (b @ a - b0 @ a0)
        d = anchors[pair.direction].double()
        assert d.shape == dw.shape  # the unquantised base weight's direction
        ga, gb = torch.autograd.grad(LAM * explicit_penalty(dw, torch.zeros_like(dw), d, "orthogonal"), (a, b))
        for name, g in ((pair.a_name, ga), (pair.b_name, gb)):
            p = named[name]
            p.grad = p.grad + g.float()


def _adamw(params):
    return torch.optim.AdamW(params, lr=1e-2, weight_decay=0.0)


def _adamw8bit(params):
    return bnb.optim.AdamW8bit(params, lr=1e-2, weight_decay=0.0, min_8bit_size=0)


def _run(model, opt, steps: int, explicit_from: dict[str, torch.Tensor] | None = None, anchors=None) -> None:
    for t in range(steps):
        _task_grads(model, t)
        if explicit_from is not None:
            _explicit_penalty_grads(model, anchors, explicit_from)
        opt.step()


@pytest.mark.parametrize("kind", ["nf4", "fp4", "int8"])
@pytest.mark.parametrize("route", ["from_model", "attach_adamw8bit"])
def test_qlora_equals_the_explicit_loss(checkpoints, kind, route):
    root, anchors = checkpoints
    model = _quantised(root, kind)
    layout = lora_layout(model)
    assert {p.base_shape for p in layout.pairs} == {(HIDDEN, HIDDEN)}  # not the packed (2048, 1)
    start = {n: p.detach().clone() for n, p in _lora(model).items()}
    if route == "from_model":
        opt = AsFTAdamW.from_model(model, anchors=anchors, lr=1e-2, weight_decay=0.0, asft_lambda=LAM)
        make = _adamw
    else:
        opt = _adamw8bit(list(_lora(model).values()))
        attach(opt, model, anchors=anchors, asft_lambda=LAM)
        make = _adamw8bit
    _run(model, opt, STEPS)
    got = {n: p.detach().clone() for n, p in _lora(model).items()}
    for n, p in _lora(model).items():  # the explicit loss, from the same start, same optimizer class
        p.data.copy_(start[n])
    ref_opt = make(list(_lora(model).values()))
    _run(model, ref_opt, STEPS, explicit_from=start, anchors=anchors)
    want = {n: p.detach().clone() for n, p in _lora(model).items()}
    for n, p in _lora(model).items():  # and without the penalty: the comparison must have teeth
        p.data.copy_(start[n])
    _run(model, make(list(_lora(model).values())), STEPS)
    plain = {n: p.detach().clone() for n, p in _lora(model).items()}
    diff = max(float((got[n] - want[n]).abs().max()) for n in got)
    effect = max(float((plain[n] - want[n]).abs().max()) for n in got)
    assert diff <= 1e-5, diff
    assert effect > 100 * max(diff, 1e-7)
    drift = (opt if route == "from_model" else attached(opt)).drift()
    assert set(drift) == {p.direction for p in layout.pairs}


def test_qlora_resume_through_bnb_state_dict(checkpoints):
    """attach(AdamW8bit) on a 4-bit model: a mid-run state_dict round trip continues bitwise."""
    root, anchors = checkpoints
    model = _quantised(root, "nf4")
    start = {n: p.detach().clone() for n, p in _lora(model).items()}
    opt = _adamw8bit(list(_lora(model).values()))
    attach(opt, model, anchors=anchors, asft_lambda=LAM)
    _run(model, opt, STEPS)
    whole = {n: p.detach().clone() for n, p in _lora(model).items()}
    for n, p in _lora(model).items():
        p.data.copy_(start[n])
    opt = _adamw8bit(list(_lora(model).values()))
    attach(opt, model, anchors=anchors, asft_lambda=LAM)
    _run(model, opt, 2)
    saved = copy.deepcopy(opt.state_dict())
    fresh = _adamw8bit(list(_lora(model).values()))
    attach(fresh, model, anchors=anchors, asft_lambda=LAM)
    fresh.load_state_dict(saved)
    for t in range(2, STEPS):
        _task_grads(model, t)
        fresh.step()
    for n, p in _lora(model).items():
        assert torch.equal(p, whole[n]), n
