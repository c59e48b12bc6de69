"""LoRA (peft) under AsFTAdamW: gradients and trajectories against float64 autograd oracles of the
explicit penalty on the effective base-weight update, pairing, policies and bad input."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

# E402 is silenced below: these imports need the importorskip guards above
from asft_optim import Anchors, AsFTAdamW  # noqa: E402
from asft_optim.functional import bind_direction  # noqa: E402
from asft_optim.lora import lora_layout, lora_penalty_grads, lora_penalty_grads_reference, pair_lora_names  # noqa: E402

IN, OUT = 40, 56


class Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(IN, OUT)
        self.other = nn.Linear(OUT, OUT, bias=False)
        self.head = nn.Linear(OUT, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.other(torch.tanh(self.proj(x)))))


def _directions(model: nn.Module, seed: int = 1, scale: float = 1e-2) -> Anchors:
    g = torch.Generator().manual_seed(seed)
    return Anchors.from_tensors({n: (torch.randn(p.shape, generator=g, dtype=torch.float64) * scale)
                                 for n, p in model.named_parameters()})


def _randomise_lora(model: nn.Module, seed: int = 2) -> None:
    """Give every LoRA matrix (B too, which peft zero-initialises) a random value."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if ".lora_" in n:
                p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.1)


def linear_model(r: int = 8, rslora: bool = False, **cfg) -> tuple[nn.Module, Anchors]:
    torch.manual_seed(0)
    base = Tiny().double()
    anchors = _directions(base)
    config = peft.LoraConfig(r=r, lora_alpha=16, target_modules=cfg.pop("target_modules", ["proj"]),
                             use_rslora=rslora, lora_dropout=0.0, **cfg)
    return peft.get_peft_model(base, config), anchors


def gpt2_model(r: int = 8, rslora: bool = False) -> tuple[nn.Module, Anchors]:
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=37, n_positions=16,
                                  resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    base = transformers.GPT2LMHeadModel(cfg).double()
    anchors = _directions(base)
    config = peft.LoraConfig(r=r, lora_alpha=16, target_modules=["c_attn"], use_rslora=rslora,
                             lora_dropout=0.0, fan_in_fan_out=True)
    return peft.get_peft_model(base, config), anchors


def _lora_params(model: nn.Module) -> dict[str, nn.Parameter]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def explicit_penalty(model: nn.Module, anchors: Anchors, init: dict[str, torch.Tensor], lam: float,
                     projection: str) -> torch.Tensor:
    """λ‖C⊥ΔW‖² (vector) or λ‖(I - C)·B·A‖² (reference) summed over the model's LoRA layers, ΔW of
    the base weight as peft itself computes it (`get_delta_weight`), in float64 with autograd."""
    total = torch.zeros((), dtype=torch.float64)
    for name, module in model.named_modules():
        if not isinstance(module, peft.tuners.lora.LoraLayer):
            continue
        for adapter in module.active_adapters:
            a_name, b_name = f"{name}.lora_A.{adapter}.weight", f"{name}.lora_B.{adapter}.weight"
            d = anchors[f"{name}.weight"].double()
            if projection == "reference":
                a, b = module.lora_A[adapter].weight, module.lora_B[adapter].weight
                v = d.T if module.fan_in_fan_out else d
                c = v @ v.T / torch.linalg.norm(v)
                x = b @ a
                r = x - c @ x
            else:
                now = module.get_delta_weight(adapter)
                saved = (module.lora_A[adapter].weight.data, module.lora_B[adapter].weight.data)
                module.lora_A[adapter].weight.data, module.lora_B[adapter].weight.data = init[a_name], init[b_name]
                start = module.get_delta_weight(adapter).detach()
                module.lora_A[adapter].weight.data, module.lora_B[adapter].weight.data = saved
                dw = (now - start).reshape(-1)
                u = d.reshape(-1)
                r = dw - (dw @ u) / (u @ u) * u
            total = total + lam * (r * r).sum()
    return total


# --------------------------------------------------------------------------------------- gradients
@pytest.mark.parametrize("kind", ["linear", "conv1d"])
@pytest.mark.parametrize("rslora", [False, True])
@pytest.mark.parametrize("r", [1, 8, 64])
@pytest.mark.parametrize("projection", ["vector", "reference"])
def test_gradients_match_autograd_oracle(kind, rslora, r, projection):
    model, anchors = (linear_model if kind == "linear" else gpt2_model)(r=r, rslora=rslora)
    _randomise_lora(model, seed=3)
    init = {n: p.detach().clone() for n, p in _lora_params(model).items()}
    _randomise_lora(model, seed=4)  # A, B now differ from A0, B0 (B0 ≠ 0: the general case)
    layout = lora_layout(model)
    (pair,) = layout.pairs
    module = model.get_submodule(pair.module)
    assert pair.scaling == pytest.approx(16 / (math.sqrt(r) if rslora else r))
    assert pair.fan_in_fan_out == (kind == "conv1d")
    lam = 0.37
    params = _lora_params(model)
    a, b = params[pair.a_name], params[pair.b_name]
    loss = explicit_penalty(model, anchors, init, lam, projection)
    ga, gb = torch.autograd.grad(loss, [a, b])
    d = anchors[pair.direction]
    bound = bind_direction(d, d, pair.direction)
    for fn in (lora_penalty_grads, lora_penalty_grads_reference):
        fa, fb = fn(a.detach(), b.detach(), init[pair.a_name], init[pair.b_name], bound, pair, 2 * lam,
                    "orthogonal", projection)
        for got, want in ((fa, ga), (fb, gb)):
            assert got.shape == want.shape
            assert float((got - want).norm() / want.norm()) < 1e-6, fn.__name__
    assert module.fan_in_fan_out == pair.fan_in_fan_out


def test_fp32_params_bf16_direction_fast_path():
    """fp32 adapters and a bf16 direction: the blocked fp32 path stays within fp32 accuracy."""
    model, anchors = linear_model(r=8)
    model.float()
    _randomise_lora(model, seed=3)
    init = {n: p.detach().clone() for n, p in _lora_params(model).items()}
    _randomise_lora(model, seed=4)
    (pair,) = lora_layout(model).pairs
    d = anchors[pair.direction].bfloat16()
    bound = bind_direction(d, d, pair.direction)
    p = _lora_params(model)
    args = (init[pair.a_name].double(), init[pair.b_name].double())
    want = lora_penalty_grads_reference(p[pair.a_name].detach().double(), p[pair.b_name].detach().double(),
                                        *args, bind_direction(d.double(), d.double(), "d"), pair, 1.0)
    got = lora_penalty_grads(p[pair.a_name].detach(), p[pair.b_name].detach(), init[pair.a_name],
                             init[pair.b_name], bound, pair, 1.0)
    for g, w in zip(got, want):
        assert g.dtype == torch.float32
        assert float((g.double() - w).norm() / w.norm()) < 1e-5


# --------------------------------------------------------------------------------------- trajectories
def _task_loss(model: nn.Module, kind: str, step: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(100 + step)
    if kind == "conv1d":
        ids = torch.randint(0, 37, (2, 7), generator=g)
        return model(input_ids=ids, labels=ids).loss
    x = torch.randn(5, IN, generator=g, dtype=torch.float64)
    return model(x).square().mean()


def _run_asft(model, anchors, kind, steps, **kw):
    opt = AsFTAdamW.from_model(model, anchors=anchors, **kw)
    for t in range(steps):
        opt.zero_grad(set_to_none=True)
        _task_loss(model, kind, t).backward()
        opt.step()
    return opt


def _run_oracle(model, anchors, kind, steps, lam, projection, **adamw):
    params = _lora_params(model)
    init = {n: p.detach().clone() for n, p in params.items()}
    opt = torch.optim.AdamW(list(params.values()), **adamw)
    for t in range(steps):
        opt.zero_grad(set_to_none=True)
        loss = _task_loss(model, kind, t) + explicit_penalty(model, anchors, init, lam, projection)
        loss.backward()
        opt.step()


@pytest.mark.parametrize("kind,projection,rslora", [("linear", "vector", False), ("linear", "reference", True),
                                                    ("conv1d", "vector", True), ("conv1d", "reference", False)])
def test_trajectory_matches_adamw_on_explicit_loss(kind, projection, rslora):
    model, anchors = (linear_model if kind == "linear" else gpt2_model)(r=4, rslora=rslora)
    _randomise_lora(model)
    if (kind, projection) == ("linear", "vector"):  # one run starts from peft's B = 0
        with torch.no_grad():
            for n, p in model.named_parameters():
                if ".lora_B." in n:
                    p.zero_()
    oracle = copy.deepcopy(model)
    hyper = dict(lr=3e-2, weight_decay=0.05, betas=(0.9, 0.99), eps=1e-8)
    lam = 5.0
    _run_asft(model, anchors, kind, 10, asft_lambda=lam, projection=projection, **hyper)
    _run_oracle(oracle, anchors, kind, 10, lam, projection, **hyper)
    got = {n: p.detach() for n, p in _lora_params(model).items()}
    want = {n: p.detach() for n, p in _lora_params(oracle).items()}
    assert got.keys() == want.keys()
    for n in got:
        assert float((got[n] - want[n]).norm() / want[n].norm()) < 1e-6, n


def test_reference_impl_and_maximize_agree_with_default():
    """impl="reference" (materialising twin) matches the fast path, and maximize=True on -L equals the
    default on L (the penalty is minimised either way)."""
    model, anchors = gpt2_model(r=4)
    _randomise_lora(model)
    runs = {}
    for key, kw, sign in (("fast", {}, 1.0), ("reference", {"impl": "reference"}, 1.0),
                          ("maximize", {"maximize": True}, -1.0)):
        m = copy.deepcopy(model)
        opt = AsFTAdamW.from_model(m, anchors=anchors, lr=1e-2, asft_lambda=20.0, **kw)
        for t in range(4):
            opt.zero_grad(set_to_none=True)
            (sign * _task_loss(m, "conv1d", t)).backward()
            opt.step()
        runs[key] = _lora_params(m)
    for key in ("reference", "maximize"):
        for n, p in runs["fast"].items():
            torch.testing.assert_close(runs[key][n].detach(), p.detach(), rtol=1e-10, atol=1e-12, msg=key)


def test_penalty_changes_the_trajectory():
    """The comparison above can fail: λ = 0 and λ > 0 end in different places."""
    model, anchors = linear_model(r=4)
    _randomise_lora(model)
    other = copy.deepcopy(model)
    _run_asft(model, anchors, "linear", 5, asft_lambda=50.0, lr=3e-2)
    _run_asft(other, anchors, "linear", 5, asft_lambda=0.0, lr=3e-2)
    a, b = _lora_params(model), _lora_params(other)
    assert any(float((a[n] - b[n]).detach().norm()) > 1e-3 for n in a)


def test_state_dict_round_trip_mid_run():
    model, anchors = gpt2_model(r=4)
    _randomise_lora(model)
    twin = copy.deepcopy(model)
    hyper = dict(lr=1e-2, asft_lambda=3.0)
    _run_asft(model, anchors, "conv1d", 6, **hyper)
    opt = _run_asft(twin, anchors, "conv1d", 3, **hyper)
    saved = copy.deepcopy(opt.state_dict())
    opt2 = AsFTAdamW.from_model(twin, anchors=anchors, **hyper)
    opt2.load_state_dict(saved)
    for t in range(3, 6):
        opt2.zero_grad(set_to_none=True)
        _task_loss(twin, "conv1d", t).backward()
        opt2.step()
    for (n, p), (_, q) in zip(_lora_params(model).items(), _lora_params(twin).items()):
        assert torch.equal(p, q), n


# --------------------------------------------------------------------------------------- policies
def test_modules_to_save_bias_and_inactive_adapter():
    model, anchors = linear_model(r=4, modules_to_save=["head"], bias="lora_only")
    model.add_adapter("second", peft.LoraConfig(r=2, lora_alpha=4, target_modules=["proj"],
                                                modules_to_save=["head"]))
    model.set_adapter("second")  # only the active adapter trains
    trainable = _lora_params(model)
    assert not any(".default." in n for n in trainable)
    opt = AsFTAdamW.from_model(model, anchors=anchors, lr=1e-2)
    layout = opt.lora_layout
    assert [p.adapter for p in layout.pairs] == ["second"]
    head_w = "base_model.model.head.modules_to_save.second.weight"
    assert layout.aliases[head_w] == "head.weight"
    groups = {n: g["asft_lambda"] for g in opt.param_groups for n in g["param_names"]}
    # proj.bias (lora_only) and the head copy's bias have directions here: anchored
    assert groups[head_w] == 1.0 and groups["base_model.model.proj.base_layer.bias"] == 1.0
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if ".default." in n}
    for t in range(3):
        opt.zero_grad(set_to_none=True)
        _task_loss(model, "linear", t).backward()
        opt.step()
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if n in frozen)
    drift = opt.drift()
    assert "proj.weight" in drift and head_w in drift
    # the head copy is anchored to the original head's direction
    w = dict(model.named_parameters())[head_w]
    delta = w.detach() - opt.state[w]["w0"]
    d = anchors["head.weight"].double()
    assert drift[head_w].cos == pytest.approx(float((delta * d).sum() / delta.norm() / d.norm()), rel=1e-9)


def test_unanchored_bias_takes_plain_steps():
    model, anchors = linear_model(r=4, bias="lora_only")
    kept = {k: v for k, v in anchors.items() if not k.endswith("proj.bias")}
    opt = AsFTAdamW.from_model(model, anchors=Anchors.from_tensors(kept), lr=1e-2,
                               no_weight_decay=["base_model.model.proj.base_layer.bias"])
    (g,) = [g for g in opt.param_groups if "base_model.model.proj.base_layer.bias" in g["param_names"]]
    assert g["asft_lambda"] == 0.0 and g["weight_decay"] == 0.0


def test_lora_drift_matches_materialised():
    model, anchors = gpt2_model(r=4)
    _randomise_lora(model)
    opt = _run_asft(model, anchors, "conv1d", 3, lr=1e-2)
    (pair,) = opt.lora_layout.pairs
    module = model.get_submodule(pair.module)
    p = _lora_params(model)
    a, b = p[pair.a_name], p[pair.b_name]
    now = module.get_delta_weight("default").detach()
    a.data, b.data, keep = opt.state[a]["w0"].double(), opt.state[b]["w0"].double(), (a.data, b.data)
    start = module.get_delta_weight("default").detach()
    a.data, b.data = keep
    delta = now - start
    d = anchors[pair.direction].double()
    got = opt.drift()["transformer.h.0.attn.c_attn.weight"]
    cos = float((delta * d).sum() / delta.norm() / d.norm())
    assert got.cos == pytest.approx(cos, rel=1e-9)
    assert got.delta_norm == pytest.approx(float(delta.norm()), rel=1e-9)
    assert got.orth_ratio == pytest.approx(math.sqrt(1 - cos * cos), rel=1e-9)


# --------------------------------------------------------------------------------------- bad input
def test_named_parameters_of_peft_model_point_to_from_model():
    model, anchors = linear_model()
    with pytest.raises(ValueError, match="from_model"):
        AsFTAdamW(model.named_parameters(), anchors=anchors)


def test_lora_a_without_lora_b():
    with pytest.raises(ValueError, match=r"'m\.q'.*'default'.*lora_A.*without.*lora_B"):
        pair_lora_names(["m.q.lora_A.default.weight", "m.v.lora_A.default.weight", "m.v.lora_B.default.weight"])
    model, anchors = linear_model()
    model.base_model.model.proj.lora_B["default"].requires_grad_(False)
    with pytest.raises(ValueError, match=r"base_model\.model\.proj.*without"):
        AsFTAdamW.from_model(model, anchors=anchors)


def test_adapter_on_module_without_direction():
    model, anchors = linear_model(target_modules=["proj", "other"])
    kept = {k: v for k, v in anchors.items() if k != "other.weight"}
    with pytest.raises(ValueError, match=r"module 'base_model\.model\.other' has no direction"):
        AsFTAdamW.from_model(model, anchors=kept)


def test_direction_shape_mismatch():
    model, anchors = gpt2_model()
    bad = dict(anchors.items())
    bad["transformer.h.0.attn.c_attn.weight"] = bad["transformer.h.0.attn.c_attn.weight"].T.contiguous()
    with pytest.raises(ValueError, match=r"\(96, 32\).*module 'base_model\.model\.transformer\.h\.0\.attn\.c_attn'"
                                         r".*\(32, 96\)"):
        AsFTAdamW.from_model(model, anchors=bad)


def test_reference_projection_refuses_full_parameters():
    model, anchors = linear_model(modules_to_save=["head"])
    with pytest.raises(ValueError, match="projection='reference'.*head"):
        AsFTAdamW.from_model(model, anchors=anchors, projection="reference")


def test_full_parameter_from_model_without_any_direction():
    torch.manual_seed(0)
    model = Tiny()
    with pytest.raises(ValueError, match="none of the model's trainable parameters has a direction"):
        AsFTAdamW.from_model(model, anchors={"unrelated.weight": torch.ones(2)}, allow_unanchored=True)


@pytest.mark.parametrize("user", ["AsFTAdamW", "attach"])
@pytest.mark.parametrize("split", ["groups", "optimizer"])
def test_a_pair_split_across_groups_or_optimizers_is_refused(user, split):
    """lora_A and lora_B of a pair must both be stepped by the optimizer, in groups with one set of AsFT
    options: the penalty lives on their product. Both users of the penalty refuse at the step."""
    from asft_optim import attach
    model, anchors = linear_model()
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    a = [(n, p) for n, p in named if ".lora_A." in n]
    b = [(n, p) for n, p in named if ".lora_B." in n]
    key = "penalty" if user == "AsFTAdamW" else "asft_penalty"
    groups = [{"params": a}, {"params": b, key: "full"}] if split == "groups" else [{"params": a}]
    if user == "AsFTAdamW":
        opt = AsFTAdamW(groups, anchors=anchors, lora=lora_layout(model))
    else:
        opt = torch.optim.AdamW([{**g, "params": [p for _, p in g["params"]]} for g in groups])
        attach(opt, model, anchors=anchors)
    model(torch.randn(4, IN, dtype=torch.float64)).square().sum().backward()
    wording = (rf"lora_A and lora_B are in param groups with different {key} \('orthogonal' and 'full'\)"
               if split == "groups" else r"\(adapter 'default'\): only lora_A is in this optimizer; AsFT needs both")
    with pytest.raises(ValueError, match=r"LoRA module 'base_model\.model\.proj'.*" + wording):
        opt.step()
