"""impl="native": the native CPU kernel as a promise (as torch's `fused=True`): the same numbers as
impl="torch" where the kernel applies, and an error naming the option or the tensor where it does
not (impl="torch" falls back to the PyTorch path there instead)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from asft_optim import Anchors, AsFTAdamW, native

pytestmark = pytest.mark.skipif(not native.available(), reason="the native kernel does not build here")


def _model(dtype: torch.dtype = torch.float32) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(7, 5), nn.Tanh(), nn.Linear(5, 3)).to(dtype)


def _anchors(model: nn.Module) -> Anchors:
    gen = torch.Generator().manual_seed(4)
    return Anchors.from_tensors({n: torch.randn(p.shape, generator=gen) for n, p in model.named_parameters()})


def _train(model: nn.Module, opt: torch.optim.Optimizer, steps: int = 5) -> None:
    """`steps` steps on fixed random gradients, with a `state_dict` round trip after step 2."""
    gen = torch.Generator().manual_seed(9)
    for step in range(steps):
        for p in model.parameters():
            p.grad = torch.randn(p.shape, generator=gen).to(p.dtype)
        opt.step()
        if step == 2:
            opt.load_state_dict(copy.deepcopy(opt.state_dict()))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("penalty", ["orthogonal", "parallel", "full"])
@pytest.mark.parametrize("maximize", [False, True])
def test_native_equals_torch_where_the_kernel_applies(dtype, penalty, maximize):
    ref, new = _model(dtype), _model(dtype)
    anchors = _anchors(ref)
    kw = dict(lr=5e-2, anchors=anchors, asft_lambda=3.0, penalty=penalty, maximize=maximize)
    a = AsFTAdamW(ref.named_parameters(), impl="torch", **kw)
    b = AsFTAdamW(new.named_parameters(), impl="native", **kw)
    _train(ref, a)
    _train(new, b)
    for (n, p), q in zip(ref.named_parameters(), new.parameters()):
        assert torch.equal(p, q), n
        for key in ("exp_avg", "exp_avg_sq", "w0"):
            assert torch.equal(a.state[p][key], b.state[q][key]), (n, key)
    assert a.drift_sums() == b.drift_sums()


@pytest.mark.parametrize("option", [dict(foreach=True), dict(fused=True), dict(amsgrad=True),
                                    dict(capturable=True)])
def test_options_the_kernel_does_not_implement_are_refused_when_built(option):
    model = _model()
    key = next(iter(option))
    with pytest.raises(ValueError, match=f"impl='native' cannot honour {key}=True"):
        AsFTAdamW(model.named_parameters(), anchors=_anchors(model), impl="native", **option)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float64])
def test_a_tensor_the_kernel_cannot_step_is_named_and_left_unchanged(dtype):
    """impl="torch" steps an fp16/fp64 parameter on the PyTorch path; impl="native" names it and
    writes nothing."""
    model = _model()
    model[2].weight.data = model[2].weight.data.to(dtype)
    before = [p.detach().clone() for p in model.parameters()]
    opt = AsFTAdamW(model.named_parameters(), anchors=_anchors(model), impl="native")
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    with pytest.raises(ValueError, match=r"impl='native' cannot step '2\.weight'"):
        opt.step()
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))
    assert all(int(opt.state[p]["step"]) == 0 for p in model.parameters())

    twin = _model()
    twin[2].weight.data = twin[2].weight.data.to(dtype)
    fallback = AsFTAdamW(twin.named_parameters(), anchors=_anchors(twin), impl="torch")
    for p in twin.parameters():
        p.grad = torch.ones_like(p)
    fallback.step()
    assert not torch.equal(twin[2].weight, before[2])


def test_an_unavailable_kernel_is_refused_when_built(monkeypatch):
    monkeypatch.setattr(native, "available", lambda: False)
    monkeypatch.setattr(native, "reason", lambda: "disabled by ASFT_NATIVE=0")
    model = _model()
    with pytest.raises(RuntimeError, match=r"native CPU kernel is unavailable \(disabled by ASFT_NATIVE=0\)"):
        AsFTAdamW(model.named_parameters(), anchors=_anchors(model), impl="native")
    AsFTAdamW(model.named_parameters(), anchors=_anchors(model), impl="torch")  # falls back, at its step


def test_lambda_zero_and_unanchored_parameters_take_torch_adamw():
    """What impl="native" does not penalise steps as torch's AdamW, bitwise (λ = 0 group, a
    parameter without a direction)."""
    model, twin = _model(), _model()
    anchors = Anchors.from_tensors({n: d for n, d in _anchors(model).items() if n != "2.bias"})
    named = dict(model.named_parameters())
    opt = AsFTAdamW([{"params": [(n, p) for n, p in named.items() if n.startswith("0.")], "asft_lambda": 0.0},
                     {"params": [(n, p) for n, p in named.items() if n.startswith("2.")]}],
                    lr=5e-2, anchors=anchors, impl="native", allow_unanchored=True)
    ref = torch.optim.AdamW(twin.parameters(), lr=5e-2)
    _train(model, opt, steps=3)
    _train(twin, ref, steps=3)
    for n in ("0.weight", "0.bias", "2.bias"):
        assert torch.equal(named[n], dict(twin.named_parameters())[n]), n


def test_zero_check_client_takes_native_only_under_offload():
    from asft_optim.zero import check_client
    model = _model()
    opt = AsFTAdamW(model.named_parameters(), anchors=_anchors(model), impl="native")
    base = {"zero_optimization": {"stage": 2}, "zero_allow_untested_optimizer": True}
    with pytest.raises(ValueError, match="impl='native' steps DeepSpeed ZeRO partitions only on the CPU"):
        check_client(opt, base)
    check_client(opt, {**base, "zero_force_ds_cpu_optimizer": False,
                       "zero_optimization": {"stage": 2, "offload_optimizer": {"device": "cpu"}}})


def test_a_zero_partition_steps_natively_as_with_torch():
    """A ZeRO-1-style flat fp32 partition on the CPU (ZeRO-Offload): impl="native" steps its
    segments as impl="torch" does (the native kernel there too), bitwise."""
    pytest.importorskip("deepspeed.utils.tensor_fragment")
    from .test_zero import _link, _zero1_step
    runs = []
    for impl in ("torch", "native"):
        model = _model()
        opt = AsFTAdamW(model.named_parameters(), lr=5e-2, anchors=_anchors(model), asft_lambda=3.0, impl=impl)
        params = list(model.parameters())
        flat = torch.cat([p.detach().reshape(-1) for p in params] + [torch.zeros(2)]).requires_grad_()
        _link(params, flat, 0, flat.numel(), [0, 35, 40, 55])
        opt.param_groups[0]["params"] = [flat]
        gen = torch.Generator().manual_seed(9)
        for _ in range(4):
            _zero1_step(model, opt, flat, opt.state, [torch.randn(p.shape, generator=gen) for p in params])
        runs.append((flat.detach().clone(), opt.drift_sums()))
    assert torch.equal(runs[0][0], runs[1][0])
    assert runs[0][1] == runs[1][1]
