"""AsFTAdamW (PyTorch paths) against the float64 explicit-loss oracle and torch.optim.AdamW."""

from __future__ import annotations

import io

import pytest
import torch

from asft_optim import AsFTAdamW, native

from .oracle import run_oracle, task_grads

SHAPES = [(), (1,), (4097,), (5, 123)]


def make(shapes=SHAPES, seed=0, dtype=torch.float32, zero=()):
    """Named parameters and matching directions (the directions with indices in `zero` are 0)."""
    g = torch.Generator().manual_seed(seed)
    named, dirs = [], {}
    for i, s in enumerate(shapes):
        p = torch.nn.Parameter(torch.randn(s, generator=g).to(dtype))
        named.append((f"layer{i}.weight", p))
        d = torch.randn(s, generator=g) * 1e-2
        dirs[f"layer{i}.weight"] = torch.zeros(s) if i in zero else d
    return named, dirs


def run(opt, named, steps, seed=0, skip=None, sched=None):
    params = [p for _, p in named]
    for t in range(steps):
        gs = task_grads(params, t, seed)
        for i, (p, g) in enumerate(zip(params, gs)):
            p.grad = None if skip and i in skip.get(t, set()) else g
        opt.step()
        if sched is not None:
            sched.step()
    return [p.detach().clone() for p in params]


def close_rel(a, b, rel=1e-6):
    a, b = a.double(), b.double()
    scale = max(float(b.abs().max()) if b.numel() else 0.0, 1e-30)
    err = float((a - b).abs().max()) if b.numel() else 0.0
    assert err <= rel * scale, f"max abs error {err:.3e} > {rel:.0e} x max|ref| {scale:.3e}"


def initial(named):
    return [p.detach().clone() for _, p in named]


@pytest.mark.parametrize("impl", ["torch", "reference"])
@pytest.mark.parametrize("flags", [
    dict(),
    dict(weight_decay=0.1, amsgrad=True),
    dict(maximize=True),
    dict(foreach=True),
    dict(fused=True, weight_decay=0.0),
    dict(fused=True, lr=torch.tensor(0.02)),
])
@pytest.mark.parametrize("kind", ["orthogonal", "parallel", "full"])
def test_matches_fp64_explicit_loss(impl, flags, kind):
    named, dirs = make()
    init = initial(named)
    lr = flags.pop("lr", 0.02)
    opt = AsFTAdamW(named, lr=lr, anchors=dirs, asft_lambda=3.0, penalty=kind, impl=impl, **flags)
    got = run(opt, named, 12)
    want = run_oracle(init, list(dirs.values()), [3.0] * len(init), 12, kind=kind,
                      lr=float(lr), **flags)
    for g, w in zip(got, want):
        close_rel(g, w)
    # the penalty mattered: plain AdamW ends elsewhere
    plain = run_oracle(init, list(dirs.values()), [0.0] * len(init), 12, lr=float(lr), **flags)
    assert max(float((g.double() - p).abs().max()) for g, p in zip(got, plain)) > 1e-4


def test_groups_scheduler_closure_gradnone_frozen_noncontiguous():
    named, dirs = make()
    # a non-contiguous (transposed) parameter and a frozen one
    base = torch.randn(7, 9, generator=torch.Generator().manual_seed(3))
    nc = torch.nn.Parameter(base.t())  # shares base's transposed layout
    assert not nc.is_contiguous()
    dirs["nc.weight"] = torch.randn(9, 7) * 1e-2
    frozen = torch.nn.Parameter(torch.randn(3), requires_grad=False)
    named = named + [("nc.weight", nc)]
    init = initial(named)
    groups = [{"params": named[:3], "asft_lambda": 2.0},
              {"params": named[3:] + [("frozen", frozen)], "asft_lambda": 0.5}]
    opt = AsFTAdamW(groups, lr=0.03, anchors=dirs)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=4, gamma=0.5)
    skip = {3: {1}, 7: {4}}  # parameter 1 has grad=None at step 3, the non-contiguous one at step 7
    params = [p for _, p in named]
    for t in range(12):
        def closure(t=t):
            for i, (p, g) in enumerate(zip(params, task_grads(params, t))):
                p.grad = None if i in skip.get(t, set()) else g
            return torch.tensor(float(t))
        assert float(opt.step(closure)) == t
        sched.step()
    lrs = [0.03 * 0.5 ** (t // 4) for t in range(12)]
    want = run_oracle(init, [dirs[n] for n, _ in named], [2.0, 2.0, 2.0, 0.5, 0.5], 12, skip=skip,
                      lr_schedule=lrs, lr=0.03)
    for (_, p), w in zip(named, want):
        close_rel(p.detach(), w)
    assert "w0" not in opt.state[frozen] and frozen.grad is None


def test_zero_direction_is_l2_pull_with_warning():
    named, dirs = make(zero=(2,))
    init = initial(named)
    with pytest.warns(UserWarning, match="layer2.weight"):
        opt = AsFTAdamW(named, lr=0.02, anchors=dirs, asft_lambda=3.0)
    got = run(opt, named, 10)
    # the oracle's orthogonal penalty with d = 0 is the full L2 pull on that tensor
    want = run_oracle(init, list(dirs.values()), [3.0] * 4, 10, lr=0.02)
    for g, w in zip(got, want):
        close_rel(g, w)
    # direct check: one step from W != W0 gives g + 2λΔW for the zero-direction tensor
    p = named[2][1]
    w0 = opt.state[p]["w0"].float()
    from asft_optim.functional import penalised_grads_reference  # the obvious formula, as a gradient
    bound = opt.records.binding("layer2.weight").direction
    r = penalised_grads_reference([torch.zeros_like(p)], [p], [opt.state[p]["w0"]], [bound], 2 * 3.0, "orthogonal")[0]
    torch.testing.assert_close(r, 2 * 3.0 * (p.detach() - w0), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("flags", [dict(), dict(foreach=True), dict(foreach=False), dict(fused=True),
                                   dict(amsgrad=True, weight_decay=0.3), dict(maximize=True, fused=True),
                                   dict(fused=True, lr=torch.tensor(0.01))])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_lambda_zero_is_bitwise_adamw(flags, dtype):
    named, dirs = make(dtype=dtype)
    ref = [torch.nn.Parameter(p.detach().clone()) for _, p in named]
    opt = AsFTAdamW(named, anchors=dirs, asft_lambda=0.0, **flags)
    plain = torch.optim.AdamW(ref, **flags)
    for t in range(6):
        for (_, p), q, g in zip(named, ref, task_grads(ref, t)):
            p.grad, q.grad = g.clone(), g.clone()
        opt.step()
        plain.step()
    for (_, p), q in zip(named, ref):
        assert torch.equal(p, q)
        assert torch.equal(opt.state[p]["exp_avg"], plain.state[q]["exp_avg"])


@pytest.mark.parametrize("flags", [dict(), dict(fused=True), dict(foreach=True)])
def test_bf16_params_fast_matches_reference(flags):
    named, dirs = make(dtype=torch.bfloat16)
    twin = [(n, torch.nn.Parameter(p.detach().clone())) for n, p in named]
    fast = AsFTAdamW(named, lr=0.02, anchors=dirs, asft_lambda=3.0, impl="torch", **flags)
    # on CPU the native kernel does fused AdamW's arithmetic (fp32, one rounding on store) whatever the flags
    slow = AsFTAdamW(twin, lr=0.02, anchors=dirs, asft_lambda=3.0, impl="reference",
                     **(dict(fused=True) if native.available() else flags))
    init = initial(named)
    a, b = run(fast, named, 10), run(slow, twin, 10)
    oracle = run_oracle(init, list(dirs.values()), [3.0] * 4, 10, lr=0.02)
    for x, y, w in zip(a, b, oracle):
        ulp = 2.0 ** (torch.frexp(y.float().abs().clamp_min(1e-3))[1].float() - 8)  # bf16 spacing
        assert bool(((x.float() - y.float()).abs() <= 2 * ulp).all())
        close_rel(x, w, rel=3e-2)  # bf16 storage against the fp64 trajectory


def test_grad_untouched():
    named, dirs = make(shapes=[(300,), (20, 30)])
    opt = AsFTAdamW(named, anchors=dirs, asft_lambda=5.0, fused=True)
    run(opt, named, 2)
    grads = [p.grad.clone() for _, p in named]
    opt.step()
    for (_, p), g in zip(named, grads):
        assert torch.equal(p.grad, g)


@pytest.mark.parametrize("flags", [dict(), dict(fused=True), dict(amsgrad=True, foreach=True)])
def test_carried_dot_equals_exact_reduction(flags):
    """The torch path folds ⟨v, p_new - W0⟩ while stepping; it must equal a fresh exact pass of the same
    fold bitwise (the native kernel's where it runs, else the chunked path's), also for a tensor
    spanning several chunks and blocks and for a bf16 direction."""
    from asft_optim import native
    from asft_optim.functional import CHUNK, partial_dots
    named, dirs = make(shapes=[(3 * CHUNK + 17,), (5, 123), ()])
    dirs["layer1.weight"] = dirs["layer1.weight"].bfloat16()
    opt = AsFTAdamW(named, lr=0.02, anchors=dirs, asft_lambda=3.0, **flags)
    run(opt, named, 3)
    params = [p for _, p in named]
    w0s, bounds = [opt.state[p]["w0"] for p in params], [opt.records.binding(n).direction for n, _ in named]
    on_native = native.available() and not flags.get("amsgrad")
    exact = native.dots_native(params, w0s, [b.v for b in bounds]) if on_native else partial_dots(params, w0s, bounds)
    for (n, p), e in zip(named, exact):
        # None unless the version counter is unchanged since the step
        carried = opt.records.dots.get(n, p, opt.state[p]["step"])
        assert carried is not None and carried.dtype == (torch.float64 if on_native else torch.float32)
        assert torch.equal(carried, e)


def test_outside_writes_are_noticed():
    """In-place writes bump the version counter and force an exact c; `.data` writes need resync()."""
    named, dirs = make(shapes=[(100_000,), (5, 123)])
    twin = [(n, torch.nn.Parameter(p.detach().clone())) for n, p in named]
    fast = AsFTAdamW(named, lr=0.02, anchors=dirs, asft_lambda=3.0)
    ref = AsFTAdamW(twin, lr=0.02, anchors=dirs, asft_lambda=3.0, impl="reference")
    for t in range(8):
        for (_, p), (_, q), g in zip(named, twin, task_grads([p for _, p in named], t)):
            p.grad, q.grad = g.clone(), g.clone()
        fast.step()
        ref.step()
        if t == 2:
            with torch.no_grad():
                for (_, p), (_, q) in zip(named, twin):
                    p.add_(0.05)
                    q.add_(0.05)
        if t == 5:
            for (_, p), (_, q) in zip(named, twin):
                p.data.mul_(0.9)
                q.data.mul_(0.9)
            fast.resync()
    for (_, p), (_, q) in zip(named, twin):
        close_rel(p.detach(), q.detach())


def test_penalty_gradient_sign_under_maximize_and_w0_storage():
    # W0 of bf16-exact values is stored in bf16; others in fp32
    exact = torch.nn.Parameter(torch.randn(64).bfloat16().float())
    inexact = torch.nn.Parameter(torch.randn(64) + 1e-4)
    named = [("a", exact), ("b", inexact)]
    opt = AsFTAdamW(named, anchors={"a": torch.randn(64), "b": torch.randn(64)})
    run(opt, named, 1)
    assert opt.state[exact]["w0"].dtype == torch.bfloat16
    assert opt.state[inexact]["w0"].dtype == torch.float32


def _fresh(seed=0, **kw):
    named, dirs = make(seed=seed)
    opt = AsFTAdamW(named, lr=0.02, anchors=dirs, asft_lambda=2.0, **kw)
    return named, dirs, opt


@pytest.mark.parametrize("flags", [dict(), dict(fused=True), dict(amsgrad=True, foreach=True)])
def test_state_dict_roundtrip_bitwise(flags):
    named, dirs, opt = _fresh(**flags)
    for _, p in named[:2]:  # make two parameters bf16-exact so W0 is stored in bf16
        p.data = p.data.bfloat16().float()
    full = run(opt, named, 10)

    named2, _, opt2 = _fresh(**flags)
    for _, p in named2[:2]:
        p.data = p.data.bfloat16().float()
    params2 = [p for _, p in named2]
    for t in range(4):
        for p, g in zip(params2, task_grads(params2, t)):
            p.grad = g
        opt2.step()
    buf = io.BytesIO()
    torch.save({"model": [p.detach() for p in params2], "opt": opt2.state_dict()}, buf)
    buf.seek(0)
    ckpt = torch.load(buf, weights_only=True)

    named3, _, opt3 = _fresh(**flags)
    for (_, p), saved in zip(named3, ckpt["model"]):
        p.data.copy_(saved)
    opt3.load_state_dict(ckpt["opt"])
    params3 = [p for _, p in named3]
    assert opt3.state[params3[0]]["w0"].dtype == torch.bfloat16
    assert opt3.state[params3[3]]["w0"].dtype == torch.float32
    for t in range(4, 10):
        for p, g in zip(params3, task_grads(params3, t)):
            p.grad = g
        opt3.step()
    for a, b in zip(params3, full):
        assert torch.equal(a.detach(), b)


def test_resume_with_other_anchors_or_lambda_fails():
    named, dirs, opt = _fresh()
    run(opt, named, 2)
    sd = opt.state_dict()
    other = {k: v * 2 for k, v in dirs.items()}
    with pytest.raises(ValueError, match="anchors"):
        AsFTAdamW(make()[0], anchors=other, asft_lambda=2.0).load_state_dict(sd)
    with pytest.raises(ValueError, match="asft_lambda"):
        AsFTAdamW(make()[0], anchors=dirs, asft_lambda=1.0).load_state_dict(sd)


def test_grad_scaler_skips_inf_step():
    named, dirs, opt = _fresh(fused=True)
    model_params = [p for _, p in named]
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 8)
    for t in range(2):  # two ordinary steps through the scaler
        loss = sum(((p.float() * x).sum() for p, x in zip(model_params, task_grads(model_params, t))))
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        opt.zero_grad()
    before = {n: (p.detach().clone(), {k: v.clone() for k, v in opt.state[p].items()}) for n, p in named}
    loss = sum(p.sum() for p in model_params) * float("inf")
    scaler.scale(loss).backward()
    scaler.step(opt)
    scaler.update()
    for n, p in named:
        assert torch.equal(p.detach(), before[n][0])
        for k, v in opt.state[p].items():
            assert torch.equal(v, before[n][1][k]), k
    assert scaler.get_scale() < 2.0 ** 8


def test_drift_metrics():
    named, dirs, opt = _fresh()
    run(opt, named, 5)
    dr = opt.drift()
    assert set(dr) == {n for n, _ in named}
    for n, p in named:
        dw = (p.detach().double() - opt.state[p]["w0"].double()).reshape(-1)
        d = dirs[n].double().reshape(-1)
        cos = float(dw @ d / (dw.norm() * d.norm()))
        par = (dw @ d) / (d @ d) * d
        assert dr[n].delta_norm == pytest.approx(float(dw.norm()), rel=1e-9)
        assert dr[n].cos == pytest.approx(cos, rel=1e-6, abs=1e-9)
        assert dr[n].orth_ratio == pytest.approx(float((dw - par).norm() / dw.norm()), rel=1e-6, abs=1e-9)


def test_names_normalised_and_hooks():
    model = torch.nn.Sequential(torch.nn.Linear(3, 2))
    dirs = {f"module._orig_mod.{n}": torch.randn_like(p) for n, p in model.named_parameters()}
    opt = AsFTAdamW(model.named_parameters(), anchors=dirs)
    calls = []
    opt.register_step_pre_hook(lambda o, a, k: calls.append("pre"))
    opt.register_step_post_hook(lambda o, a, k: calls.append("post"))
    model(torch.randn(4, 3)).sum().backward()
    opt.step()
    assert calls == ["pre", "post"]
    assert set(opt.drift()) == {"0.weight", "0.bias"}


# ------------------------------------------------------------------------------------------ errors
@pytest.mark.parametrize("kw, match", [
    (dict(lr=-1.0), "Invalid learning rate: -1.0"),
    (dict(lr=float("nan")), "Invalid learning rate: nan"),
    (dict(lr=float("inf")), "Invalid learning rate: inf"),
    (dict(eps=-1e-8), "Invalid epsilon value"),
    (dict(eps=float("inf")), "Invalid epsilon value"),
    (dict(betas=(1.0, 0.999)), "Invalid beta parameter at index 0"),
    (dict(betas=(0.9, float("nan"))), "Invalid beta parameter at index 1"),
    (dict(weight_decay=-0.1), "Invalid weight_decay value"),
    (dict(weight_decay=float("nan")), "Invalid weight_decay value"),
    (dict(asft_lambda=-1.0), "Invalid asft_lambda value: -1.0"),
    (dict(asft_lambda=float("nan")), "Invalid asft_lambda value: nan"),
    (dict(asft_lambda=float("inf")), "Invalid asft_lambda value: inf"),
    (dict(penalty="sideways"), "Invalid penalty"),
    (dict(impl="cuda"), "Invalid impl"),
    (dict(differentiable=True), "differentiable"),
])
def test_bad_arguments(kw, match):
    named, dirs = make()
    with pytest.raises(ValueError, match=match.replace("(", r"\(")):
        AsFTAdamW(named, anchors=dirs, **kw)


def test_bad_parameters_and_directions():
    named, dirs = make()
    with pytest.raises(ValueError, match="empty parameter list"):
        AsFTAdamW([], anchors=dirs)
    with pytest.raises(ValueError, match="more than one parameter group"):
        AsFTAdamW([{"params": named[:2]}, {"params": named[1:]}], anchors=dirs)
    with pytest.raises(ValueError, match="by name"):
        AsFTAdamW([p for _, p in named], anchors=dirs)
    with pytest.raises(ValueError, match="complex parameters: 'c'"):
        AsFTAdamW([("c", torch.nn.Parameter(torch.randn(3, dtype=torch.complex64)))], anchors={"c": torch.randn(3)})
    bad = dict(dirs, **{"layer3.weight": torch.randn(123, 5)})
    with pytest.raises(ValueError, match=r"'layer3.weight' has shape \(123, 5\) .* shape \(5, 123\)"):
        AsFTAdamW(named, anchors=bad)
    nan = dict(dirs, **{"layer2.weight": torch.full((4097,), float("nan"))})
    with pytest.raises(ValueError, match="'layer2.weight' contains NaN or Inf"):
        AsFTAdamW(named, anchors=nan)
    missing = {k: v for k, v in dirs.items() if k not in ("layer0.weight", "layer1.weight")}
    with pytest.raises(ValueError, match="'layer0.weight', 'layer1.weight'"):
        AsFTAdamW(named, anchors=missing)
    opt = AsFTAdamW(named, anchors=missing, allow_unanchored=True)  # plain AdamW for those two
    assert set(opt.drift()) == set()
    emb = torch.nn.Embedding(5, 3, sparse=True)
    opt = AsFTAdamW(emb.named_parameters(), anchors={"weight": torch.randn(5, 3)})
    emb(torch.tensor([1, 2])).sum().backward()
    with pytest.raises(RuntimeError, match="sparse gradients \\(parameter 'weight'\\)"):
        opt.step()


def test_allow_unanchored_steps_plainly():
    named, dirs = make()
    twin = [(n, torch.nn.Parameter(p.detach().clone())) for n, p in named]
    partial = {k: v for k, v in dirs.items() if k != "layer3.weight"}
    opt = AsFTAdamW(named, anchors=partial, allow_unanchored=True, asft_lambda=2.0)
    ref = torch.optim.AdamW([p for _, p in twin])
    a = run(opt, named, 4)
    b = run(ref, twin, 4)
    assert torch.equal(a[3], b[3]) and not torch.equal(a[2], b[2])
