"""The ways AsFTAdamW once trained silently wrong, each as the class of bug that would have caught it:
every impl × every layout × every resume route × directions down to the smallest subnormal.

impl="triton" runs in Triton's CPU interpreter here (tests/conftest.py sets TRITON_INTERPRET=1).
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn

from asft_optim import Anchors, AsFTAdamW

from .oracle import run_oracle, task_grads
from .test_lora import IN, linear_model
from .test_optimizer import close_rel

IMPLS = ["torch", "reference", "triton"]
HAS_TRITON = pytest.importorskip("importlib").util.find_spec("triton") is not None


def _impl(impl: str) -> str:
    if impl == "triton" and not HAS_TRITON:
        pytest.skip("triton is not installed")
    return impl


def _run(opt: AsFTAdamW, params: list[torch.Tensor], steps: range) -> None:
    """Gradients written in place where they exist (as backward accumulates into kept grads, and as a
    caching allocator hands back the same addresses): the Triton path then reuses its launch plans."""
    for t in steps:
        for p, g in zip(params, task_grads(params, t)):
            if p.grad is None or p.grad.stride() != g.stride():
                p.grad = g
            else:
                p.grad.copy_(g)
        opt.step()


# ----------------------------------------------------------------------------------------- layouts
def _layout(kind: str, gen: torch.Generator) -> nn.Parameter:
    if kind == "contiguous":
        return nn.Parameter(torch.randn(6, 10, generator=gen))
    if kind == "transposed":
        return nn.Parameter(torch.randn(10, 6, generator=gen).t())
    if kind == "channels_last":
        return nn.Parameter(torch.randn(2, 3, 4, 5, generator=gen).to(memory_format=torch.channels_last))
    if kind == "non_dense":  # every other column of a wider tensor: gaps in memory
        return nn.Parameter(torch.randn(6, 20, generator=gen)[:, ::2])
    raise AssertionError(kind)


LAYOUTS = ["contiguous", "transposed", "channels_last", "non_dense"]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_every_layout_on_every_impl_matches_the_fp64_oracle(impl, layout):
    gen = torch.Generator().manual_seed(3)
    p = _layout(layout, gen)
    q = nn.Parameter(torch.randn(7, generator=gen))
    named = [("w", p), ("b", q)]
    dirs = {"w": torch.randn(p.shape, generator=gen), "b": torch.randn(7, generator=gen)}
    init = [x.detach().clone() for _, x in named]
    strides = p.stride()
    opt = AsFTAdamW(named, lr=0.02, anchors=dirs, asft_lambda=3.0, impl=_impl(impl))
    _run(opt, [p, q], range(8))
    want = run_oracle(init, [dirs["w"], dirs["b"]], [3.0, 3.0], 8, lr=0.02)
    for got, w in zip((p, q), want):
        close_rel(got.detach(), w)
    assert p.stride() == strides  # the parameter kept its layout


# ----------------------------------------------------------------------------------------- directions
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype,exponent", [(torch.float32, -126), (torch.float32, -140), (torch.float32, -147),
                                            (torch.bfloat16, -131), (torch.float16, -22), (torch.float64, -1070)])
def test_tiny_directions_down_to_the_smallest_subnormal(impl, dtype, exponent):
    """The penalty depends on d's direction only: d = k·2**e must train exactly as d = k, even where
    every entry is subnormal (the power-of-two rescale once overflowed to inf, then NaN)."""
    gen = torch.Generator().manual_seed(0)
    ints = torch.randint(-3, 4, (5, 9), generator=gen).double()
    ints[0, 0] = 3.0  # max|d| = 3·2**e: representable down to the dtype's smallest subnormal
    runs = []
    for scale in (1.0, 2.0 ** exponent):
        d = (ints * scale).to(dtype)
        assert bool((d.double() == ints * scale).all())  # exact in the dtype
        p = nn.Parameter(torch.randn(5, 9, generator=torch.Generator().manual_seed(1)))
        opt = AsFTAdamW([("w", p)], lr=0.02, anchors={"w": d}, asft_lambda=3.0, impl=_impl(impl))
        _run(opt, [p], range(5))
        assert bool(torch.isfinite(p).all())
        runs.append(p.detach().clone())
    assert torch.equal(runs[0], runs[1])


def test_binding_never_writes_to_the_given_directions():
    dirs = {"a": torch.randn(4, 3, dtype=torch.float64), "b": torch.randn(5) * 1e-30}
    before = {n: d.clone() for n, d in dirs.items()}
    named = [("a", nn.Parameter(torch.randn(4, 3, dtype=torch.float64))), ("b", nn.Parameter(torch.randn(5)))]
    opt = AsFTAdamW(named, anchors=dirs)
    _run(opt, [p for _, p in named], range(2))
    for n in dirs:
        assert torch.equal(dirs[n], before[n]), n


@pytest.mark.parametrize("impl", ["torch", "triton"])
def test_fp64_directions_work_on_every_impl(impl):
    gen = torch.Generator().manual_seed(4)
    named = [("a", nn.Parameter(torch.randn(33, generator=gen))), ("b", nn.Parameter(torch.randn(4, 5, generator=gen)))]
    dirs = {n: torch.randn(p.shape, generator=gen, dtype=torch.float64) for n, p in named}
    init = [p.detach().clone() for _, p in named]
    opt = AsFTAdamW(named, lr=0.02, anchors=dirs, asft_lambda=2.0, impl=_impl(impl))
    _run(opt, [p for _, p in named], range(6))
    want = run_oracle(init, list(dirs.values()), [2.0, 2.0], 6, lr=0.02)
    for (_, p), w in zip(named, want):
        close_rel(p.detach(), w)


def test_triton_refuses_fp64_parameters_when_built():
    _impl("triton")
    p = nn.Parameter(torch.randn(3, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"impl='triton' supports float32, bfloat16 and float16 parameters; "
                                         r"'a' is torch.float64 \(use impl='torch'\)"):
        AsFTAdamW([("a", p)], anchors={"a": torch.randn(3)}, impl="triton")


# ----------------------------------------------------------------------------------------- many groups
def _group(prefix: str, n: int, gen: torch.Generator) -> tuple[list[tuple[str, nn.Parameter]], dict]:
    named = [(f"{prefix}.{i}", nn.Parameter(torch.randn(3 + i % 5, generator=gen))) for i in range(n)]
    return named, {name: torch.randn(p.shape, generator=gen) for name, p in named}


def test_triton_many_groups_and_add_param_group_match_reference():
    """More names than the first c buffer holds (64), spread over groups and a group added mid-run:
    the c buffer grows and every cached launch must follow it."""
    _impl("triton")
    results = {}
    for impl in ("triton", "reference"):
        gen = torch.Generator().manual_seed(9)
        g1, d1 = _group("g1", 40, gen)
        g2, d2 = _group("g2", 50, gen)
        g3, d3 = _group("g3", 30, gen)
        opt = AsFTAdamW([{"params": g1}, {"params": g2, "asft_lambda": 2.0}], lr=0.03,
                        anchors={**d1, **d2, **d3}, impl=impl)
        params = [p for _, p in g1 + g2]
        _run(opt, params, range(3))
        for _, p in g1:  # new gradient tensors: the first group's launch plan is rebuilt
            p.grad = p.grad.clone()
        _run(opt, params, range(3, 5))
        opt.add_param_group({"params": g3, "asft_lambda": 0.5})
        params += [p for _, p in g3]
        _run(opt, params, range(5, 8))
        for _, p in g2:
            p.grad = p.grad.clone()
        _run(opt, params, range(8, 10))
        results[impl] = [p.detach().clone() for p in params]
    for a, b in zip(results["triton"], results["reference"]):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


# ----------------------------------------------------------------------------------------- resume
class Wrapped(nn.Module):
    """What DDP looks like to `named_parameters()`: the model under `module.`."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = module


def _wrap(model: nn.Module, how: str) -> nn.Module:
    return {"bare": lambda m: m, "ddp": Wrapped, "compile": torch.compile}[how](model)


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3))


def _mlp_steps(model: nn.Module, opt: AsFTAdamW, steps: range) -> None:
    for t in steps:
        gen = torch.Generator().manual_seed(t)
        x = torch.randn(8, 5, generator=gen)
        opt.zero_grad()
        model(x).square().mean().backward()
        opt.step()


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("saved_under", ["bare", "ddp", "compile"])
def test_full_parameter_resume_under_each_wrapper_prefix(impl, saved_under):
    impl = _impl(impl)
    model = _mlp()
    anchors = {n: torch.randn(p.shape, generator=torch.Generator().manual_seed(1)) for n, p in model.named_parameters()}
    plain = copy.deepcopy(model)
    whole = copy.deepcopy(model)
    opt = AsFTAdamW.from_model(whole, anchors=anchors, asft_lambda=50.0, impl=impl)
    _mlp_steps(whole, opt, range(6))
    first = copy.deepcopy(model)
    wrapped = _wrap(first, saved_under)
    opt1 = AsFTAdamW.from_model(wrapped, anchors=anchors, asft_lambda=50.0, impl=impl)
    _mlp_steps(first, opt1, range(3))
    saved = copy.deepcopy(opt1.state_dict())
    resumed = copy.deepcopy(first)
    opt2 = AsFTAdamW.from_model(resumed, anchors=anchors, asft_lambda=50.0, impl=impl)
    opt2.load_state_dict(saved)
    assert opt2.param_groups[0]["param_names"][0] == "0.weight"  # its own names, not the checkpoint's
    _mlp_steps(resumed, opt2, range(3, 6))
    no_pen = AsFTAdamW.from_model(plain, anchors=anchors, asft_lambda=0.0, impl=impl)
    _mlp_steps(plain, no_pen, range(6))
    for (n, a), b, c in zip(resumed.named_parameters(), whole.parameters(), plain.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7, msg=n)
    assert max(float((b - c).abs().max()) for b, c in zip(whole.parameters(), plain.parameters())) > 1e-3


@pytest.mark.parametrize("saved_under", ["bare", "ddp", "compile"])
def test_lora_resume_under_each_wrapper_prefix_keeps_the_penalty(saved_under):
    def build():
        model, anchors = linear_model(r=4)
        with torch.no_grad():
            for n, p in model.named_parameters():
                if ".lora_B." in n:
                    p.normal_(0, 0.1, generator=torch.Generator().manual_seed(len(n)))
        return model, anchors

    def steps(model, opt, ts):
        for t in ts:
            x = torch.randn(5, IN, generator=torch.Generator().manual_seed(t), dtype=torch.float64)
            opt.zero_grad()
            model(x).square().mean().backward()
            opt.step()

    kw = dict(asft_lambda=50.0, allow_unanchored=True, lr=0.03)
    whole, anchors = build()
    steps(whole, AsFTAdamW.from_model(whole, anchors=anchors, **kw), range(6))
    plain, _ = build()
    steps(plain, AsFTAdamW.from_model(plain, anchors=anchors, **{**kw, "asft_lambda": 0.0}), range(6))
    first, _ = build()
    opt1 = AsFTAdamW.from_model(_wrap(first, saved_under), anchors=anchors, **kw)
    steps(first, opt1, range(3))
    resumed = copy.deepcopy(first)
    opt2 = AsFTAdamW.from_model(resumed, anchors=anchors, **kw)
    opt2.load_state_dict(copy.deepcopy(opt1.state_dict()))
    steps(resumed, opt2, range(3, 6))
    lora = [n for n, _ in whole.named_parameters() if "lora_" in n]
    got, want, free = (dict(m.named_parameters()) for m in (resumed, whole, plain))
    for n in lora:
        torch.testing.assert_close(got[n], want[n], rtol=1e-9, atol=1e-12, msg=n)
    assert max(float((want[n] - free[n]).abs().max()) for n in lora) > 1e-3  # λ mattered


def test_checkpoint_with_other_parameter_names_is_refused():
    model = _mlp()
    anchors = {n: torch.randn(p.shape) for n, p in model.named_parameters()}
    opt = AsFTAdamW.from_model(model, anchors=anchors)
    _mlp_steps(model, opt, range(1))
    sd = opt.state_dict()
    sd["param_groups"][0]["param_names"] = list(reversed(sd["param_groups"][0]["param_names"]))
    with pytest.raises(ValueError, match=r"cannot resume: param group 0 of the checkpoint names a parameter "
                                         r"'2.bias' where this optimizer has '0.weight'"):
        AsFTAdamW.from_model(copy.deepcopy(model), anchors=anchors).load_state_dict(sd)


@pytest.mark.parametrize("impl", IMPLS)
def test_adamw_checkpoint_keeps_the_asft_settings_and_anchors_at_the_next_step(impl):
    """A run started with torch.optim.AdamW and resumed with AsFTAdamW (a Trainer resume with
    AsFTTrainer): λ, penalty, projection, the λ=0 bias group and the anchors fingerprint stay the
    optimizer's own; W0 is taken at the first step after the load, with a warning."""
    impl = _impl(impl)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3))
    anchors = Anchors.from_tensors({n: torch.randn(p.shape) for n, p in model.named_parameters()
                                    if n.endswith("weight")})
    adamw = torch.optim.AdamW(model.parameters(), lr=0.01)
    _mlp_steps(model, adamw, range(2))
    opt = AsFTAdamW.from_model(model, anchors=anchors, asft_lambda=7.0, penalty="parallel", impl=impl)
    settings = [{k: g[k] for k in ("asft_lambda", "penalty", "projection", "impl", "asft_anchors", "param_names")}
                for g in opt.param_groups]
    assert sorted(s["asft_lambda"] for s in settings) == [0.0, 7.0]  # the bias group
    sd = adamw.state_dict()
    sd["param_groups"] = [dict(sd["param_groups"][0], params=[0, 2]), dict(sd["param_groups"][0], params=[1, 3])]
    with pytest.warns(UserWarning, match=r"the checkpoint holds optimizer state but no W0 for 2 anchored "
                                         r"parameter\(s\) \(e.g. '0.weight'"):
        opt.load_state_dict(sd)
    for g, s in zip(opt.param_groups, settings):
        assert {k: g[k] for k in s} == s
    at_load = {n: p.detach().clone() for n, p in model.named_parameters()}
    _mlp_steps(model, opt, range(2, 4))
    for n, p in model.named_parameters():
        assert ("w0" in opt.state[p]) == n.endswith("weight"), n  # the biases have no direction
        if "w0" in opt.state[p]:
            assert torch.equal(opt.state[p]["w0"].float(), at_load[n]), n
        assert int(opt.state[p]["step"]) == 4  # the moments and counts came from the checkpoint


# ----------------------------------------------------------------------------------------- arguments
def test_nothing_anchored_is_an_error_even_with_allow_unanchored():
    named = [("a", nn.Parameter(torch.randn(3)))]
    with pytest.raises(ValueError, match=r"none of the optimizer's 1 trainable parameter\(s\) has a direction "
                                         r"\(e.g. 'a'; the anchors hold 1 tensors, e.g. 'other'\)"):
        AsFTAdamW(named, anchors={"other": torch.randn(3)}, allow_unanchored=True)


def test_tensor_lr_of_two_elements_gets_torchs_message():
    named = [("a", nn.Parameter(torch.randn(3)))]
    with pytest.raises(ValueError, match=r"^Tensor lr must be 1-element$"):
        AsFTAdamW(named, anchors={"a": torch.randn(3)}, lr=torch.tensor([1e-3, 1e-3]))
    with pytest.raises(ValueError, match=r"^Tensor lr must be 1-element$"):
        torch.optim.AdamW([torch.zeros(3, requires_grad=True)], lr=torch.tensor([1e-3, 1e-3]))


def test_a_step_over_several_devices_groups_tensors_per_device():
    """Scratch buffers follow each tensor's device (device_map="auto" spreads a group over
    devices): a list over cpu and meta steps, and the cpu part equals the cpu-only step bitwise."""
    from asft_optim.functional import BoundDirection, StepTensors, asft_adamw

    def entry(device: str, n: int):
        gen = torch.Generator().manual_seed(n)
        p = torch.randn(n, generator=gen).to(device)
        return [p, torch.randn(n, generator=gen).to(device), torch.zeros(n, device=device),
                torch.zeros(n, device=device), torch.tensor(0.0), p.clone(),
                BoundDirection(torch.ones(n, device=device), 1.0 / n, 1.0), torch.zeros((), device=device)]

    def step(rows):
        t = StepTensors(*[[r[k] for r in rows] for k in range(4)], [], *[[r[k] for r in rows] for k in range(4, 8)])
        kw = dict(foreach=None, capturable=False, differentiable=False, fused=None, grad_scale=None,
                  found_inf=None, has_complex=False, decoupled_weight_decay=True, amsgrad=False, beta1=0.9,
                  beta2=0.999, lr=0.1, weight_decay=0.01, eps=1e-8, maximize=False)
        return asft_adamw(t, coef=2.0, penalty="orthogonal", impl="torch", **kw)

    mixed = [entry("cpu", 5), entry("meta", 7), entry("cpu", 9)]
    alone = [entry("cpu", 5), entry("cpu", 9)]
    dots = step(mixed)
    assert [d.device.type for d in dots] == ["cpu", "meta", "cpu"]
    dots_alone = step(alone)
    assert torch.equal(mixed[0][0], alone[0][0]) and torch.equal(mixed[2][0], alone[1][0])
    assert torch.equal(dots[0], dots_alone[0]) and torch.equal(dots[2], dots_alone[1])


@pytest.mark.parametrize("penalty, effect", [
    ("orthogonal", "with penalty='orthogonal' their penalty is a plain L2 pull towards W0 (C⊥ΔW = ΔW)"),
    ("full", "with penalty='full' their penalty is the L2 pull towards W0 that every tensor gets"),
    ("parallel", "with penalty='parallel' they get no penalty at all (C_aligned ΔW = 0): plain AdamW steps")])
def test_zero_direction_warns_once_per_tensor_name_and_says_what_the_penalty_does(penalty, effect):
    named = [("a", nn.Parameter(torch.randn(3))), ("b", nn.Parameter(torch.randn(3)))]
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        AsFTAdamW(named, anchors={"a": torch.zeros(3), "b": torch.randn(3)}, penalty=penalty)
    assert [str(w.message) for w in seen] == [f"AsFT: the direction is zero for 1 tensor(s): a; {effect}"]


def test_anchors_may_be_a_directions_file_path(tmp_path):
    named = [("a", nn.Parameter(torch.randn(3)))]
    path = Anchors.from_tensors({"a": torch.randn(3)}).save(tmp_path / "d.safetensors")
    for given in (path, str(path)):
        assert AsFTAdamW(named, anchors=given).anchors.fingerprint == Anchors.load(path).fingerprint
    with pytest.raises(TypeError, match=r"^anchors must be an Anchors, a name -> tensor mapping or the path of a "
                                        r"directions file, got int$"):
        AsFTAdamW(named, anchors=3)
