"""Nothing stale, nothing lost: the carried ⟨v, p − W0⟩ against every path that moves a parameter.

Each class runs a schedule (λ, penalty, impl) or a write between steps, through every impl and torch's
fused / foreach / for-loop AdamW, and compares with the fp64 oracle of the explicit loss
(tests/oracle.py). DTensor (FSDP2) cases run under torchrun in tests/distributed/test_stale_dots_fsdp.py.
"""

from __future__ import annotations

import functools

import pytest
import torch
from torch import nn

from asft_optim import AsFTAdamW
from asft_optim.dot_cache import DotCache
from asft_optim.functional import partial_dots

from .oracle import run_oracle, task_grads

SHAPES = [(5, 3), (7,), ()]
LR = 0.02
STEPS = 6
FLAGS = {"fused": {"fused": True}, "foreach": {"foreach": True}, "for-loop": {"foreach": False}}
# (impl, flags) of every path; Triton takes no foreach/fused (it runs its own kernel), in the interpreter here
PATHS = [(impl, f) for impl in ("torch", "reference") for f in FLAGS] + [("triton", "default")]


def _make(dtype: torch.dtype = torch.float32, shapes=SHAPES, seed: int = 0, offset: float = 0.0):
    g = torch.Generator().manual_seed(seed)
    named = [(f"m.w{i}", nn.Parameter((torch.randn(s, generator=g, dtype=torch.float64) + offset).to(dtype)))
             for i, s in enumerate(shapes)]
    dirs = {n: torch.randn(p.shape, generator=g) * 1e-2 for n, p in named}
    return named, dirs


def _opt(named, dirs, impl: str, flags: str, **kw) -> AsFTAdamW:
    return AsFTAdamW(named, lr=LR, anchors=dirs, impl=impl, **FLAGS.get(flags, {}), **kw)


def _close(got: list[torch.Tensor], want: list[torch.Tensor], rel: float = 1e-6) -> None:
    for i, (a, b) in enumerate(zip(got, want, strict=True)):
        a, b = a.detach().double(), b.double()
        scale = max(float(b.abs().max()), 1e-30)
        err = float((a - b).abs().max())
        assert err <= rel * scale, f"tensor {i}: max abs error {err:.3e} > {rel:.0e} x max|ref| {scale:.3e}"


@functools.cache
def _oracle(lams: tuple[float, ...], kinds: tuple[str, ...], write: str | None = None) -> list[torch.Tensor]:
    named, dirs = _make()
    after = (lambda t, ws: [w.mul_(0.9) for w in ws] if t in (1, 3) else None) if write else None
    return run_oracle([p.detach() for _, p in named], list(dirs.values()), [1.0] * len(named), STEPS,
                      lam_schedule=list(lams), kind_schedule=list(kinds), after_step=after, lr=LR)


def _train(named, opt, *, lams=None, kinds=None, impls=None, write=None, module=None) -> None:
    params = [p for _, p in named]
    for t in range(STEPS):
        for group in opt.param_groups:
            if lams is not None:
                group["asft_lambda"] = lams[t]
            if kinds is not None:
                group["penalty"] = kinds[t]
            if impls is not None:
                group["impl"] = impls[t]
        for p, g in zip(params, task_grads(params, t), strict=True):
            p.grad = g
        opt.step()
        if write is not None and t in (1, 3):
            _write(write, named, module)


def _write(route: str, named, module: nn.Module | None) -> None:
    """p ← 0.9·p through `route` (each bumps the parameter's version counter)."""
    params = [p for _, p in named]
    with torch.no_grad():
        if route == "mul_":
            for p in params:
                p.mul_(0.9)
        elif route == "copy_":
            for p in params:
                p.copy_(p * 0.9)
        elif route == "_foreach_mul_":
            torch._foreach_mul_(params, 0.9)
        elif route == "load_state_dict":
            module.load_state_dict({k: v * 0.9 for k, v in module.state_dict().items()})
        else:
            raise AssertionError(route)


class _Holder(nn.Module):
    """A module that holds the named parameters (for `model.load_state_dict`)."""

    def __init__(self, named) -> None:
        super().__init__()
        self.m = nn.Module()
        for n, p in named:
            self.m.register_parameter(n.split(".")[1], p)


ORTH = ("orthogonal",) * STEPS


class TestSchedules:
    """λ, penalty and impl change between steps: a path that writes no dot must drop the old one."""

    @pytest.mark.parametrize("impl, flags", PATHS)
    @pytest.mark.parametrize("lams", [(1.0, 0.0, 0.0, 5.0, 5.0, 5.0), (0.0, 2.0, 0.0, 2.0, 0.0, 3.0)])
    def test_lambda_schedule(self, impl, flags, lams):
        named, dirs = _make()
        opt = _opt(named, dirs, impl, flags)
        _train(named, opt, lams=lams)
        _close([p for _, p in named], _oracle(lams, ORTH))

    @pytest.mark.parametrize("impl, flags", PATHS)
    @pytest.mark.parametrize("kinds", [("orthogonal", "full", "full", "orthogonal", "orthogonal", "orthogonal"),
                                       ("parallel", "full", "parallel", "orthogonal", "full", "parallel")])
    def test_penalty_schedule(self, impl, flags, kinds):
        named, dirs = _make()
        opt = _opt(named, dirs, impl, flags, asft_lambda=5.0)
        _train(named, opt, kinds=kinds)
        _close([p for _, p in named], _oracle((5.0,) * STEPS, kinds))

    @pytest.mark.parametrize("impls, flags", [
        (("torch", "reference", "reference", "torch", "torch", "torch"), "fused"),
        (("torch", "reference", "torch", "reference", "torch", "torch"), "foreach"),
        (("reference", "torch", "torch", "reference", "torch", "reference"), "for-loop"),
        (("torch", "triton", "triton", "torch", "torch", "triton"), "default"),
        (("triton", "torch", "torch", "triton", "triton", "triton"), "default"),
    ])
    def test_impl_schedule(self, impls, flags):
        named, dirs = _make()
        opt = _opt(named, dirs, impls[0], flags, asft_lambda=5.0)
        _train(named, opt, impls=impls)
        _close([p for _, p in named], _oracle((5.0,) * STEPS, ORTH))


class TestWritesBetweenSteps:
    """Writes outside the optimizer after steps 2 and 4, through every route that bumps a version."""

    @pytest.mark.parametrize("impl, flags", PATHS)
    @pytest.mark.parametrize("route", ["mul_", "copy_", "_foreach_mul_", "load_state_dict"])
    def test_write_is_noticed(self, impl, flags, route):
        named, dirs = _make()
        module = _Holder(named)
        opt = _opt(named, dirs, impl, flags, asft_lambda=5.0)
        _train(named, opt, write=route, module=module)
        _close([p for _, p in named], _oracle((5.0,) * STEPS, ORTH, write="0.9"))

    def test_resync_after_a_data_write(self):
        """`.data` bypasses every version counter: `resync()` is the documented way back."""
        named, dirs = _make()
        opt = _opt(named, dirs, "torch", "fused", asft_lambda=5.0)
        params = [p for _, p in named]
        for t in range(STEPS):
            for p, g in zip(params, task_grads(params, t), strict=True):
                p.grad = g
            opt.step()
            if t in (1, 3):
                for p in params:
                    p.data.mul_(0.9)
                opt.resync()
        _close(params, _oracle((5.0,) * STEPS, ORTH, write="0.9"))


class TestNames:
    def test_one_name_in_two_groups_is_refused(self):
        a, b = nn.Parameter(torch.randn(3)), nn.Parameter(torch.randn(3))
        with pytest.raises(ValueError, match=r"the parameter name 'w' appears twice in AsFTAdamW's param groups"):
            AsFTAdamW([{"params": [("w", a)]}, {"params": [("w", b)], "asft_lambda": 0.0}],
                      anchors={"w": torch.randn(3)})
        with pytest.raises(ValueError, match=r"the parameter name 'w' appears twice"):
            AsFTAdamW([("w", a), ("w", b)], anchors={"w": torch.randn(3)})

    def test_add_param_group_with_a_taken_name_leaves_the_optimizer_usable(self):
        a, b = nn.Parameter(torch.randn(3)), nn.Parameter(torch.randn(3))
        opt = AsFTAdamW([("w", a)], anchors={"w": torch.randn(3)})
        with pytest.raises(ValueError, match=r"'w' appears twice"):
            opt.add_param_group({"params": [("w", b)]})
        assert len(opt.param_groups) == 1
        a.grad = torch.ones(3)
        opt.step()


class TestNoneGradients:
    """A penalised parameter whose gradient is None steps on the penalty's gradient alone once it
    has W0; λ = 0 groups keep torch's skipping, bitwise."""

    SKIP = {0: {2}, 2: {0}, 3: {0, 1}}  # m.w2 joins at step 1 (no W0 before); others miss steps

    @pytest.mark.parametrize("impl, flags", PATHS)
    @pytest.mark.parametrize("set_to_none", [True, False])
    def test_penalty_steps_without_task_gradient(self, impl, flags, set_to_none):
        named, dirs = _make()
        init = [p.detach().clone() for _, p in named]
        opt = _opt(named, dirs, impl, flags, asft_lambda=5.0)
        params = [p for _, p in named]
        for t in range(STEPS):
            opt.zero_grad(set_to_none=set_to_none)
            for i, (p, g) in enumerate(zip(params, task_grads(params, t), strict=True)):
                if i not in self.SKIP.get(t, set()):
                    p.grad = g  # else None, or zeros kept by zero_grad(set_to_none=False)
            opt.step()
            if set_to_none:
                assert all(p.grad is None or i not in self.SKIP.get(t, set()) for i, p in enumerate(params))
        want = run_oracle(init, list(dirs.values()), [5.0] * 3, STEPS, skip=self.SKIP, lr=LR)
        _close(params, want)

    @pytest.mark.parametrize("flags", list(FLAGS))
    def test_lambda_zero_keeps_torch_skipping_bitwise(self, flags):
        named, dirs = _make()
        twin = [nn.Parameter(p.detach().clone()) for _, p in named]
        opt = _opt(named, dirs, "torch", flags, asft_lambda=0.0)
        ref = torch.optim.AdamW(twin, lr=LR, **FLAGS[flags])
        params = [p for _, p in named]
        for t in range(STEPS):
            for i, (p, q, g) in enumerate(zip(params, twin, task_grads(params, t), strict=True)):
                p.grad = q.grad = None if i in self.SKIP.get(t, set()) else g
            opt.step()
            ref.step()
        assert all(torch.equal(p, q) for p, q in zip(params, twin, strict=True))


class TestPrecision:
    @pytest.mark.parametrize("impl", ["torch", "reference"])
    def test_fp64_parameters_take_delta_w_in_fp64(self, impl):
        """|W| ≈ 100: ΔW taken after rounding W to fp32 would err by more than the penalty's effect."""
        named, dirs = _make(torch.float64, shapes=[(64,), (9, 7)], offset=100.0)
        init = [p.detach().clone() for _, p in named]
        opt = AsFTAdamW(named, lr=1e-3, anchors=dirs, asft_lambda=50.0, impl=impl)
        params = [p for _, p in named]
        for t in range(STEPS):
            for p, g in zip(params, task_grads(params, t), strict=True):
                p.grad = g
            opt.step()
        want = run_oracle(init, list(dirs.values()), [50.0] * 2, STEPS, lr=1e-3)
        plain = run_oracle(init, list(dirs.values()), [0.0] * 2, STEPS, lr=1e-3)
        for p, w, a in zip(params, want, plain, strict=True):
            effect = float((w - a).abs().max())
            assert effect > 0
            assert float((p - w).abs().max()) <= 1e-6 * effect

    def test_dots_fold_identically_at_one_and_two_threads(self):
        """The PyTorch fallback's fold (bf16 / fp64 parameters, amsgrad, ASFT_NATIVE=0) is fixed-order:
        the same bits whatever torch's thread count."""
        from asft_optim.functional import bind_direction
        g = torch.Generator().manual_seed(3)
        ps = [torch.randn(n, generator=g) for n in (3 * (1 << 19) + 4099, 70_001)]
        w0s = [p + torch.randn(p.shape, generator=g) * 1e-3 for p in ps]
        bounds = [bind_direction(torch.randn(p.shape, generator=g), p, "d") for p in ps]
        threads = torch.get_num_threads()
        try:
            out = []
            for n in (1, 2):
                torch.set_num_threads(n)
                out.append(partial_dots(ps, w0s, bounds))
        finally:
            torch.set_num_threads(threads)
        assert torch.equal(out[0], out[1]), (out[0] - out[1]).tolist()

    def test_fallback_steps_identical_at_one_and_two_threads(self):
        g = torch.Generator().manual_seed(4)
        results = []
        threads = torch.get_num_threads()
        try:
            for n in (1, 2):
                torch.set_num_threads(n)
                big = torch.randn(2 * (1 << 19) + 33, generator=torch.Generator().manual_seed(4))
                named = [("w", nn.Parameter(big))]
                dirs = {"w": torch.randn(named[0][1].shape, generator=torch.Generator().manual_seed(5))}
                opt = AsFTAdamW(named, lr=LR, anchors=dirs, asft_lambda=5.0, amsgrad=True)  # the PyTorch path
                for t in range(3):
                    named[0][1].grad = torch.randn(named[0][1].shape, generator=g.manual_seed(t))
                    opt.step()
                results.append(named[0][1].detach().clone())
        finally:
            torch.set_num_threads(threads)
        assert torch.equal(results[0], results[1])


class TestAdapters:
    """Two LoRA adapters trained at once on one module: the base weight moves by their sum, which a
    per-adapter penalty does not see; AsFTAdamW refuses it by name, and steps one active adapter."""

    @staticmethod
    def _model():
        peft = pytest.importorskip("peft")
        from asft_optim import Anchors
        torch.manual_seed(0)
        base = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 2))
        g = torch.Generator().manual_seed(1)
        anchors = Anchors.from_tensors({n: torch.randn(p.shape, generator=g) for n, p in base.named_parameters()})
        cfg = {"r": 2, "lora_alpha": 4, "target_modules": ["0"], "lora_dropout": 0.0}
        model = peft.get_peft_model(base, peft.LoraConfig(**cfg), adapter_name="one")
        model.add_adapter("two", peft.LoraConfig(**cfg))
        return model, anchors

    def test_two_adapters_trained_at_once_are_refused(self):
        model, anchors = self._model()
        model.base_model.set_adapter(["one", "two"])
        opt = AsFTAdamW.from_model(model, anchors=anchors, lr=1e-2)
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        model(torch.randn(3, 6)).square().sum().backward()
        with pytest.raises(NotImplementedError, match=r"LoRA module 'base_model\.model\.0': adapters 'one', 'two' all "
                                                      r"have gradients in this step"):
            opt.step()
        assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())  # nothing moved

    def test_one_active_adapter_of_two_steps(self):
        model, anchors = self._model()
        model.base_model.set_adapter(["one", "two"])
        opt = AsFTAdamW.from_model(model, anchors=anchors, lr=1e-2)
        model.base_model.set_adapter("one")  # "two" frozen: no gradient, no penalty step
        model(torch.randn(3, 6)).square().sum().backward()
        opt.step()
        assert set(opt.drift()) == {"0.weight@one"}


class TestHeldInBatches:
    """`DotCache.all_held` / `put_slots` (the Triton replay's batched checks) agree with `held` /
    `put_slot` one name at a time, after every change that makes a held slot stale (another kind of
    entry put for a name included)."""

    CHANGES = ["none", "p_written", "step_written", "step_replaced", "dot_put", "partial_put", "vector_put",
               "dropped", "invalidated", "other_view_written"]

    @pytest.mark.parametrize("change", CHANGES)
    @pytest.mark.parametrize("given", [False, True])
    def test_agrees_with_held(self, change, given):
        names = ["a", "b", "c"]
        params = [torch.zeros(3), torch.zeros(2, 2), torch.zeros(1)]
        buf = torch.zeros(3)
        steps = [buf[i] for i in range(3)]  # views of one buffer: one version counter
        dots = DotCache()
        assert dots.all_held(names, params, steps) is None  # nothing put yet
        buf.add_(1)
        if given:  # the versions as the Triton replay passes them
            dots.put_slots(names, params, steps, tuple(p._version for p in params), buf._version)
        else:
            dots.put_slots(names, params, steps)
        if change == "p_written":
            params[1].mul_(2)
        elif change == "step_written":
            steps[2].add_(0)
        elif change == "other_view_written":
            buf[0:1].add_(0)
        elif change == "step_replaced":
            steps[0] = steps[0].clone()
        elif change == "dot_put":
            dots.put("b", params[1], steps[1], torch.tensor(0.5))
        elif change == "partial_put":
            dots.put_partial("b", params[1], steps[1], torch.tensor(0.5))
        elif change == "vector_put":
            dots.put_vector(["a"], params[:1], steps[:1], torch.tensor([0.5], dtype=torch.float64))
        elif change == "dropped":
            dots.drop("c")
        elif change == "invalidated":
            dots.invalidate()
        one_by_one = all(dots.held(n, p, s) for n, p, s in zip(names, params, steps))
        assert one_by_one == (change == "none")
        for step_version in (None, buf._version):
            if change == "step_replaced" and step_version is not None:
                continue  # (a replaced step is no view of buf: the caller may not pass buf's version)
            got = dots.all_held(names, params, steps, step_version)
            assert (got is not None) == one_by_one, (change, step_version)
            assert got is None or got == tuple(p._version for p in params)
