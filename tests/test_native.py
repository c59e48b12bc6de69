"""The native CPU step (`asft_optim.native`): against the reference formula + torch's AdamW and the
fp64 explicit-loss oracle, its fold, its determinism, its layouts and errors, its build cache and the
fallback when it cannot be built; and that AsFTAdamW really runs it where a compiler exists."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch
from torch.optim.adam import adam

from asft_optim import AsFTAdamW, native
from asft_optim.functional import bind_direction, penalised_grads_reference

from .oracle import run_oracle, task_grads
from .test_optimizer import close_rel

HAS_COMPILER = shutil.which(os.environ.get("CXX", "c++")) is not None
needs_native = pytest.mark.skipif(not native.available(), reason=f"native kernel unavailable: {native.reason()}")

B = native.BLOCK
SHAPES = [(), (1,), (4097,), (5, 123), (3 * B + 17,)]
HP = dict(lr=0.02, beta1=0.9, beta2=0.999, eps=1e-8)


def test_native_runs_where_a_compiler_exists(monkeypatch):
    """CI's clean machine has gcc: there the kernel must build and AsFTAdamW must step through it."""
    if not HAS_COMPILER:
        pytest.skip("no C++ compiler on this machine")
    assert os.environ.get("ASFT_NATIVE", "1") != "0", "ASFT_NATIVE=0 is set: the fallback is forced"
    assert native.available(), native.reason()
    assert native.load().BLOCK == B
    named = [("a", torch.nn.Parameter(torch.randn(300))), ("b", torch.nn.Parameter(torch.randn(4, 5)))]
    opt = AsFTAdamW(named, anchors={"a": torch.randn(300), "b": torch.randn(4, 5)})
    calls = []
    real = native.step_supported_

    def spy(*args, **kw):
        calls.append(len(args[0]))
        return real(*args, **kw)

    monkeypatch.setattr(native, "step_supported_", spy)
    for t in range(2):
        for (_, p), g in zip(named, task_grads([p for _, p in named], t)):
            p.grad = g
        opt.step()
    assert calls == [2, 2]
    assert all(opt.records.dots.get(n, p, opt.state[p]["step"]).dtype == torch.float64 for n, p in named)


# ------------------------------------------------------------------------------ the function
STORAGE = {"fp32": (torch.float32, torch.float32), "bf16": (torch.bfloat16, torch.bfloat16),
           "bf16-fp32-moments": (torch.bfloat16, torch.float32)}  # (params and grads, moments)


def _tensors(shapes, seed=0, w0_dtype=torch.float32, v_dtype=torch.float32, layout="contiguous", storage="fp32"):
    """(p, g, m, s, w0, bound) per shape; `layout` "transposed" / "channels_last" for 2-D / 4-D;
    `storage` a key of STORAGE."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for shape in shapes:
        def new(scale=1.0, shape=shape):
            x = torch.randn(shape, generator=g) * scale
            if layout == "transposed" and x.dim() == 2:
                x = x.t().contiguous().t()
            if layout == "channels_last" and x.dim() == 4:
                x = x.contiguous(memory_format=torch.channels_last)
            return x
        p = new()
        w0 = (p - new(1e-2)).to(w0_dtype) if w0_dtype == torch.float32 else p.to(w0_dtype)
        if w0_dtype != torch.float32:  # p bf16-exact at W0, then moved away from it
            p = w0.float() + new(1e-2)
        bound = bind_direction(new().to(v_dtype), p, "x")
        pt, mt = STORAGE[storage]
        out.append((p.to(pt), new().to(pt), (new().abs() * 1e-2).to(mt), (new().abs() * 1e-4).to(mt), w0, bound))
    return out


def _native_steps(ts, n_steps, *, kind, maximize, weight_decay, coef=3.0):
    """n_steps of the native function on copies of `ts`; returns (params, dots per step)."""
    p = [x[0].clone(memory_format=torch.preserve_format) for x in ts]
    m = [x[2].clone(memory_format=torch.preserve_format) for x in ts]
    s = [x[3].clone(memory_format=torch.preserve_format) for x in ts]
    w0s, bounds = [x[4] for x in ts], [x[5] for x in ts]
    steps = [torch.tensor(0.0) for _ in ts]
    inv = torch.tensor([0.0 if kind == "full" else b.inv_nv2 for b in bounds], dtype=torch.float64)
    dots = native.dots_native(p, w0s, [b.v for b in bounds])
    history = []
    for _ in range(n_steps):
        dots = native.asft_adamw_native_(p, [x[1] for x in ts], m, s, w0s, [b.v for b in bounds], dots * inv, steps,
                                         **HP, weight_decay=weight_decay, coef=-coef if maximize else coef,
                                         penalty=kind, maximize=maximize)
        history.append(dots)
    assert [float(x) for x in steps] == [float(n_steps)] * len(ts)
    return p, m, s, history


def _reference_steps(ts, n_steps, *, kind, maximize, weight_decay, coef=3.0):
    """The same with `penalised_grads_reference` and torch's for-loop AdamW."""
    p = [x[0].clone(memory_format=torch.preserve_format) for x in ts]
    m = [x[2].clone(memory_format=torch.preserve_format) for x in ts]
    s = [x[3].clone(memory_format=torch.preserve_format) for x in ts]
    steps = [torch.tensor(0.0) for _ in ts]
    for _ in range(n_steps):
        g = penalised_grads_reference([x[1] for x in ts], p, [x[4] for x in ts], [x[5] for x in ts],
                                      -coef if maximize else coef, kind)
        adam(p, g, m, s, [], steps, foreach=False, fused=False, capturable=False, differentiable=False,
             grad_scale=None, found_inf=None, has_complex=False, decoupled_weight_decay=True, amsgrad=False,
             beta1=HP["beta1"], beta2=HP["beta2"], lr=HP["lr"], weight_decay=weight_decay, eps=HP["eps"],
             maximize=maximize)
    return p, m, s


@needs_native
@pytest.mark.parametrize("maximize", [False, True])
@pytest.mark.parametrize("kind", ["orthogonal", "parallel", "full"])
@pytest.mark.parametrize("w0_dtype, v_dtype", [(torch.float32, torch.float32), (torch.bfloat16, torch.float32),
                                               (torch.float32, torch.bfloat16), (torch.bfloat16, torch.bfloat16)])
def test_matches_reference_and_torch_adamw(kind, maximize, w0_dtype, v_dtype):
    ts = _tensors(SHAPES, w0_dtype=w0_dtype, v_dtype=v_dtype)
    got_p, got_m, got_s, history = _native_steps(ts, 4, kind=kind, maximize=maximize, weight_decay=0.1)
    want_p, want_m, want_s = _reference_steps(ts, 4, kind=kind, maximize=maximize, weight_decay=0.1)
    for a, b in zip(got_p + got_m + got_s, want_p + want_m + want_s):
        close_rel(a, b, rel=1e-6)
    # the returned dot is ⟨v, p_new − W0⟩ of the stored values: fp32 terms (one rounding each of
    # p − W0 and of the product) summed in fp64, so within 2⁻²³·Σ|terms| of the fp64 reduction
    for p, (_, _, _, _, w0, b), d in zip(got_p, ts, history[-1]):
        terms = b.v.double() * (p.double() - w0.double())
        assert abs(float(d) - float(terms.sum())) <= 2.0 ** -23 * float(terms.abs().sum()) + 1e-300


def _emulated_step(p, g, m, s, w0, v, c, step, *, lr, beta1, beta2, eps, weight_decay, coef, penalty, maximize):
    """The kernel's formula (see asft_adamw.cpp), each operation correctly rounded to fp32 (done in
    float64 and rounded: exact for + - * / and sqrt), then stored in the tensors' dtypes by torch's
    cast (round to nearest even)."""
    def r(x):
        return x.float().double()

    def f(x: float) -> float:  # a hyper-parameter as the kernel casts it
        return float(torch.tensor(x, dtype=torch.float32))

    pf, wf, vf, mf, sf, gf = (x.double() for x in (p, w0, v, m, s, g))
    dw = r(pf - wf)
    rr = {"orthogonal": r(dw - r(f(c) * vf)), "parallel": r(f(c) * vf), "full": dw}[penalty]
    gt = r(gf + r(f(coef) * rr)).to(g.dtype).double() * (-1.0 if maximize else 1.0)
    w1 = f(1.0 - beta1)
    m_new = r(mf + r(w1 * r(gt - mf))) if abs(w1) < 0.5 else r(gt - r(r(gt - mf) * f(1.0 - w1)))
    s_new = r(r(sf * f(beta2)) + r(r(f(1.0 - beta2) * gt) * gt))
    denom = r(r(r(s_new.sqrt()) / f(math.sqrt(1.0 - beta2 ** step))) + f(eps))
    p_new = r(r(pf * f(1.0 - lr * weight_decay)) + r(r(f(-(lr / (1.0 - beta1 ** step))) * m_new) / denom))
    return p_new.to(p.dtype), m_new.to(m.dtype), s_new.to(s.dtype)


@needs_native
@pytest.mark.parametrize("storage", list(STORAGE))
@pytest.mark.parametrize("kind, maximize, beta1, w0_dtype, v_dtype", [
    ("orthogonal", False, 0.9, torch.float32, torch.float32), ("parallel", True, 0.9, torch.bfloat16, torch.float32),
    ("full", False, 0.3, torch.float32, torch.bfloat16), ("orthogonal", True, 0.3, torch.bfloat16, torch.bfloat16)])
def test_each_element_is_the_formula_rounded_once_on_store(storage, kind, maximize, beta1, w0_dtype, v_dtype):
    """Bitwise, per element, for fp32 and bf16 storage: fp32 math in torch's for-loop order, g̃ in the
    gradient's dtype, one round-to-nearest-even into p, m and s (as torch casts); both lerp branches."""
    ts = _tensors([(4097,), (5, 123), (B + 17,)], w0_dtype=w0_dtype, v_dtype=v_dtype, storage=storage)
    hp = dict(lr=0.02, beta1=beta1, beta2=0.999, eps=1e-8, weight_decay=0.1, coef=-3.0 if maximize else 3.0)
    p, m, s = ([x[k].clone() for x in ts] for k in (0, 2, 3))
    steps = [torch.tensor(4.0) for _ in ts]
    inv = torch.tensor([b.inv_nv2 for *_, b in ts], dtype=torch.float64)
    cs = native.dots_native(p, [x[4] for x in ts], [x[5].v for x in ts]) * inv
    native.asft_adamw_native_(p, [x[1] for x in ts], m, s, [x[4] for x in ts], [x[5].v for x in ts], cs, steps, **hp,
                              penalty=kind, maximize=maximize)
    for i, (p0, g, m0, s0, w0, b) in enumerate(ts):
        want = _emulated_step(p0, g, m0, s0, w0, b.v, float(cs[i]), 5, **hp, penalty=kind, maximize=maximize)
        for got, exp in zip((p[i], m[i], s[i]), want):
            assert got.dtype == exp.dtype and torch.equal(got, exp)
    assert not torch.equal(p[0], ts[0][0])


@needs_native
@pytest.mark.parametrize("layout, shapes", [("transposed", [(7, 9), (5, 123)]),
                                            ("channels_last", [(2, 3, 4, 5), (1, 8, 3, 3)])])
def test_layouts(layout, shapes):
    ts = _tensors(shapes, layout=layout)
    assert not ts[0][0].is_contiguous()
    got_p, _, _, history = _native_steps(ts, 3, kind="orthogonal", maximize=False, weight_decay=0.0)
    want_p, _, _ = _reference_steps(ts, 3, kind="orthogonal", maximize=False, weight_decay=0.0)
    for a, b in zip(got_p, want_p):
        assert a.stride() == b.stride()
        close_rel(a, b, rel=1e-6)
    assert torch.equal(history[-1], native.dots_native(got_p, [x[4] for x in ts], [x[5].v for x in ts]))


@needs_native
@pytest.mark.parametrize("kind, maximize, weight_decay", [("orthogonal", False, 0.0), ("parallel", True, 0.1),
                                                          ("full", False, 0.3), ("orthogonal", True, 0.01)])
def test_matches_fp64_explicit_loss(kind, maximize, weight_decay):
    """12 steps of the function as an optimizer loop on the oracle's task = AdamW on the explicit loss."""
    g = torch.Generator().manual_seed(1)
    shapes = [(), (1,), (4097,), (5, 123), (2 * B + 5,)]
    init = [torch.randn(s, generator=g) for s in shapes]
    dirs = [torch.randn(s, generator=g) * 1e-2 for s in shapes]
    dirs[1] = torch.zeros(1)  # a zero direction: c = 0
    p = [x.clone() for x in init]
    m, s = [torch.zeros_like(x) for x in p], [torch.zeros_like(x) for x in p]
    bounds = [bind_direction(d, x, "x") for d, x in zip(dirs, p)]
    inv = torch.tensor([0.0 if kind == "full" else b.inv_nv2 for b in bounds], dtype=torch.float64)
    steps = [torch.tensor(0.0) for _ in p]
    dots = native.dots_native(p, init, [b.v for b in bounds])
    lam = 1.5
    for t in range(12):
        dots = native.asft_adamw_native_(p, task_grads(p, t), m, s, init, [b.v for b in bounds], dots * inv, steps,
                                         lr=0.02, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=weight_decay,
                                         coef=(-2.0 if maximize else 2.0) * lam, penalty=kind, maximize=maximize)
    want = run_oracle(init, dirs, [lam] * len(p), 12, kind=kind, maximize=maximize, lr=0.02, weight_decay=weight_decay)
    for a, b in zip(p, want):
        close_rel(a, b)
    plain = run_oracle(init, dirs, [0.0] * len(p), 12, maximize=maximize, lr=0.02, weight_decay=weight_decay)
    assert max(float((a.double() - b).abs().max()) for a, b in zip(p, plain)) > 1e-4


@needs_native
@pytest.mark.parametrize("storage", list(STORAGE))
def test_carried_dot_equals_fresh_fold_and_is_thread_count_independent(storage):
    """Bitwise, for fp32 and bf16 storage: the dot returned by a step = `dots_native` of the result,
    and 1 vs 2 threads give the same parameters, moments and dots (blocks are folded in block order,
    not thread order)."""
    shapes = [(5 * B + 3,), (B,), (B + 1,), (1,), (), (0,), (64, 300), (3 * B + 37,)]
    ts = _tensors([s for s in shapes], v_dtype=torch.bfloat16, w0_dtype=torch.float32, storage=storage)
    threads = torch.get_num_threads()
    runs = []
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            runs.append(_native_steps(ts, 3, kind="orthogonal", maximize=False, weight_decay=0.1))
    finally:
        torch.set_num_threads(threads)
    (p1, m1, s1, h1), (p2, m2, s2, h2) = runs
    for a, b in zip(p1 + m1 + s1, p2 + m2 + s2):
        assert torch.equal(a, b)
    assert all(torch.equal(a, b) for a, b in zip(h1, h2))
    fresh = native.dots_native(p1, [x[4] for x in ts], [x[5].v for x in ts])
    assert torch.equal(h1[-1], fresh) and fresh.dtype == torch.float64 and fresh.shape == (len(shapes),)
    assert float(fresh[5]) == 0.0  # an empty tensor


def _bits(x):
    """x's bit patterns as integers (NaN payloads and signed zeros compare exactly)."""
    return x.view({torch.float64: torch.int64, torch.float32: torch.int32, torch.bfloat16: torch.int16}[x.dtype])


@needs_native
@pytest.mark.skipif(native.available() and native.load().VECTOR == "portable",
                    reason="this build has only the portable loops")
@pytest.mark.parametrize("storage", list(STORAGE))
def test_vector_loops_give_the_portable_loops_bits(storage):
    """The AVX-512 loops (tails of 1-15 elements, masked) against the portable ones, bitwise: every
    penalty, both lerp branches, maximize, fp32/bf16 W0 and v, with NaN, ±inf, ±0 and subnormals in
    every input."""
    lib = native.load()
    shapes = [(1,), (15,), (16,), (17,), (3, 37), (B + 5,)]
    special = torch.tensor([float("nan"), float("inf"), -float("inf"), 0.0, -0.0, 1e-40, -3e-39, 3e38])
    cases = [(kind, beta1, maximize, w0_dtype, v_dtype) for kind in ("orthogonal", "parallel", "full")
             for beta1, maximize in ((0.9, False), (0.3, True))
             for w0_dtype in (torch.float32, torch.bfloat16) for v_dtype in (torch.float32, torch.bfloat16)]
    for j, (kind, beta1, maximize, w0_dtype, v_dtype) in enumerate(cases):
        ts = _tensors(shapes, seed=j, w0_dtype=w0_dtype, v_dtype=v_dtype, storage=storage)
        roles = [[x[k].clone() for x in ts] for k in range(5)] + [[x[5].v.clone() for x in ts]]
        for k, xs in enumerate(roles):  # p, g, m, s, W0, v: a different special value per role and tensor
            for i, x in enumerate(xs):
                if x.numel() > 3:
                    x.view(-1)[(k + i) % 3] = special[(k + 2 * i) % len(special)]
        runs = []
        for portable in (True, False):
            p, m, s = ([x.clone() for x in roles[k]] for k in (0, 2, 3))
            steps = [torch.tensor(2.0) for _ in ts]
            lib._use_portable(portable)
            try:
                dots = [native.dots_native(p, roles[4], roles[5])]
                cs = torch.linspace(-0.5, 0.5, len(ts), dtype=torch.float64)
                for _ in range(2):
                    dots.append(native.asft_adamw_native_(p, roles[1], m, s, roles[4], roles[5], cs, steps, lr=0.02,
                                                          beta1=beta1, beta2=0.999, eps=1e-8, weight_decay=0.1,
                                                          coef=-3.0 if maximize else 3.0, penalty=kind,
                                                          maximize=maximize))
            finally:
                lib._use_portable(False)
            runs.append(p + m + s + dots)
        for a, b in zip(*runs):
            assert torch.equal(_bits(a), _bits(b)), (kind, beta1, maximize, w0_dtype, v_dtype)
    assert any(bool(x.isnan().any()) for x in runs[0]) and any(bool(x.isfinite().all()) for x in runs[0][:len(ts)])


@needs_native
def test_no_allocation_proportional_to_the_model():
    """After a first call, a step allocates only its (T,) result: tensor memory does not grow."""
    ts = _tensors([(4 * B,), (B,)])
    _native_steps(ts, 1, kind="orthogonal", maximize=False, weight_decay=0.0)
    import resource
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    big = _tensors([(2_000_000,)])
    _native_steps(big, 1, kind="orthogonal", maximize=False, weight_decay=0.0)  # first touch of the big arrays
    mid = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    p, m, s, _ = _native_steps(big, 5, kind="orthogonal", maximize=False, weight_decay=0.0)
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    assert after - mid < 4 * 2_000_000 / 1024, (before, mid, after)  # < one fp32 copy (KiB)


@needs_native
def test_errors_name_the_tensor():
    ts = _tensors([(3, 4), (5,)])
    p, g, m, s, w0 = ([x[k].clone() for x in ts] for k in range(5))
    v = [x[5].v for x in ts]
    cs, steps = torch.zeros(2, dtype=torch.float64), [torch.tensor(0.0), torch.tensor(0.0)]
    kw = dict(**HP, weight_decay=0.0, coef=2.0, penalty="orthogonal", maximize=False)

    def call(**over):
        args = dict(params=p, grads=g, exp_avgs=m, exp_avg_sqs=s, w0s=w0, directions=v, cs=cs, steps=steps) | over
        native.asft_adamw_native_(*args.values(), **kw)

    with pytest.raises(ValueError,
                       match=r"^asft_adamw_native_: params\[1\] has dtype Half, expected Float or BFloat16$"):
        call(params=[p[0], p[1].half()])
    with pytest.raises(ValueError, match=r"^asft_adamw_native_: grads\[0\] has dtype BFloat16, params\[0\] has Float$"):
        call(grads=[g[0].bfloat16(), g[1]])
    with pytest.raises(ValueError, match=r"^asft_adamw_native_: exp_avgs\[1\] has dtype BFloat16, expected Float$"):
        call(exp_avgs=[m[0], m[1].bfloat16()])  # bf16 moments only with bf16 params
    with pytest.raises(ValueError,
                       match=r"^asft_adamw_native_: exp_avg_sqs\[0\] has dtype Float, exp_avgs\[0\] has BFloat16$"):
        call(params=[p[0].bfloat16(), p[1]], grads=[g[0].bfloat16(), g[1]], exp_avgs=[m[0].bfloat16(), m[1]])
    with pytest.raises(ValueError,
                       match=r"^asft_adamw_native_: grads\[0\] has strides \(1, 3\), params\[0\] has \(4, 1\)$"):
        call(grads=[g[0].t().contiguous().t(), g[1]])
    with pytest.raises(ValueError,
                       match=r"^asft_adamw_native_: params\[0\] is not dense \(shape \(3, 2\), strides \(4, 2\)\)$"):
        call(params=[p[0][:, ::2], p[1]], grads=[g[0][:, ::2], g[1]], exp_avgs=[m[0][:, ::2], m[1]],
             exp_avg_sqs=[s[0][:, ::2], s[1]], w0s=[w0[0][:, ::2], w0[1]], directions=[v[0][:, ::2], v[1]])
    with pytest.raises(ValueError, match=r"^asft_adamw_native_: w0s\[1\] has dtype Half, expected Float or BFloat16$"):
        call(w0s=[w0[0], w0[1].half()])
    with pytest.raises(ValueError,
                       match=r"^asft_adamw_native_: directions\[1\] has shape \(1, 5\), params\[1\] has \(5,\)$"):
        call(directions=[v[0], v[1].reshape(1, 5)])
    with pytest.raises(ValueError, match=r"^asft_adamw_native_: exp_avgs has 1 tensors, params has 2$"):
        call(exp_avgs=m[:1])
    with pytest.raises(ValueError,
                       match=r"^asft_adamw_native_: cs must be a contiguous float64 cpu tensor of shape \(2,\)$"):
        call(cs=torch.zeros(2))
    with pytest.raises(ValueError, match="unknown penalty 'sideways'"):
        native.asft_adamw_native_(p, g, m, s, w0, v, cs, steps, **(kw | dict(penalty="sideways")))
    with pytest.raises(ValueError, match=r"^dots_native: params\[0\] has dtype Half, expected Float or BFloat16$"):
        native.dots_native([p[0].half()], [w0[0]], [v[0]])
    # nothing was written by the refused calls
    assert all(torch.equal(a, x[0]) for a, x in zip(p, ts)) and [float(x) for x in steps] == [0.0, 0.0]


@needs_native
def test_skip_mode_leaves_unsupported_tensors_alone():
    ts = _tensors([(10,), (6,)])
    p, g, m, s, w0 = ([x[k].clone() for x in ts] for k in range(5))
    p[1], g[1], m[1], s[1] = p[1].half(), g[1].half(), m[1].half(), s[1].half()
    half = p[1].clone()
    steps = [torch.tensor(0.0), torch.tensor(0.0)]
    dots, skipped = native.step_supported_(p, g, m, s, w0, [x[5].v for x in ts], torch.zeros(2, dtype=torch.float64),
                                           steps, **HP, weight_decay=0.0, coef=2.0, penalty="full", maximize=False)
    assert skipped == [1] and torch.equal(p[1], half) and [float(x) for x in steps] == [1.0, 0.0]
    assert not torch.equal(p[0], ts[0][0]) and float(dots[1]) == 0.0


# ------------------------------------------------------------------------------ the optimizer
@needs_native
def test_optimizer_mixed_dtypes_and_changing_tensors():
    """One group with fp32 (native) and fp64 (fallback) parameters, a tensor that joins late, tensors
    that skip steps (per-tensor step counts): every tensor follows the fp64 oracle."""
    g = torch.Generator().manual_seed(2)
    shapes = [(4097,), (5, 123), (1,), (), (33,), (2 * B + 1,)]
    dtypes = [torch.float32, torch.float32, torch.float32, torch.float32, torch.float64, torch.float32]
    named = [(f"w{i}", torch.nn.Parameter(torch.randn(s, generator=g).to(dt)))
             for i, (s, dt) in enumerate(zip(shapes, dtypes))]
    dirs = {n: torch.randn(p.shape, generator=g) * 1e-2 for n, p in named}
    init = [p.detach().clone() for _, p in named]
    opt = AsFTAdamW(named, lr=0.02, anchors=dirs, asft_lambda=2.0, fused=True)
    params = [p for _, p in named]
    skip = {0: {5}, 1: {5}, 4: {0, 3}, 7: {1}}  # w5 joins at step 2; others miss a step
    for t in range(10):
        for i, (p, gr) in enumerate(zip(params, task_grads(params, t))):
            p.grad = None if i in skip.get(t, set()) else gr
        opt.step()
    want = run_oracle(init, list(dirs.values()), [2.0] * len(init), 10, skip=skip, lr=0.02)
    for p, w in zip(params, want):
        close_rel(p.detach(), w)
    carried = {n: opt.records.dots.get(n, p, opt.state[p]["step"]) for n, p in named}
    # fp64 w4 carries the fallback's fp64 fold (ΔW in fp64), fp32 w0 the native kernel's float64 dot
    assert carried["w4"].dtype == torch.float64 and carried["w0"].dtype == torch.float64


def _spy_native(monkeypatch) -> list[int]:
    """Record the number of tensors each native step call receives (and steps)."""
    calls: list[int] = []
    real = native.step_supported_

    def spy(*args, **kw):
        dots, skipped = real(*args, **kw)
        calls.append(len(args[0]) - len(skipped))
        return dots, skipped

    monkeypatch.setattr(native, "step_supported_", spy)
    return calls


@needs_native
@pytest.mark.parametrize("layout", ["bf16 params", "bf16 W0 and d"])
def test_optimizer_steps_bf16_layouts_natively(layout, monkeypatch):
    """bf16 parameters (bf16 moments) and fp32 parameters with bf16 W0 and directions (a bf16
    checkpoint fine-tuned in fp32) step through the kernel, every tensor every step, and follow the
    fp64 oracle: bf16 storage within its rounding, fp32 at 1e-6; bf16 parameters equal the reference
    path with fused AdamW (fp32 math, one rounding on store) to 2 bf16 ulps."""
    gen = torch.Generator().manual_seed(3)
    shapes = [(4097,), (5, 123), (1,), (), (2 * B + 5,)]
    init = [torch.randn(s, generator=gen).bfloat16() for s in shapes]
    dirs = {f"w{i}": (torch.randn(s, generator=gen) * 1e-2).bfloat16() for i, s in enumerate(shapes)}
    dtype = torch.bfloat16 if layout == "bf16 params" else torch.float32
    named = [(f"w{i}", torch.nn.Parameter(x.to(dtype, copy=True))) for i, x in enumerate(init)]
    twin = [(n, torch.nn.Parameter(p.detach().clone())) for n, p in named]
    calls = _spy_native(monkeypatch)
    opt = AsFTAdamW(named, lr=0.02, anchors=dirs, asft_lambda=2.0, weight_decay=0.1)
    params = [p for _, p in named]
    for t in range(10):
        for p, g in zip(params, task_grads(params, t)):
            p.grad = g
        opt.step()
    assert calls == [len(shapes)] * 10
    assert all(opt.state[p]["w0"].dtype == torch.bfloat16 for p in params)
    want = run_oracle([x.double() for x in init], list(dirs.values()), [2.0] * len(init), 10, lr=0.02,
                      weight_decay=0.1)
    for p, w in zip(params, want):
        close_rel(p.detach(), w, rel=3e-2 if dtype == torch.bfloat16 else 1e-6)
    if dtype == torch.bfloat16:
        ref = AsFTAdamW(twin, lr=0.02, anchors=dirs, asft_lambda=2.0, weight_decay=0.1, impl="reference", fused=True)
        for t in range(10):
            for (_, p), g in zip(twin, task_grads([p for _, p in twin], t)):
                p.grad = g
            ref.step()
        for p, (_, q) in zip(params, twin):
            ulp = 2.0 ** (torch.frexp(q.detach().float().abs().clamp_min(1e-3))[1].float() - 8)
            assert bool(((p.detach().float() - q.detach().float()).abs() <= 2 * ulp).all())


@needs_native
def test_zero_partition_segments_step_natively_like_the_dense_tensors(monkeypatch):
    """A DeepSpeed ZeRO flat partition (one rank holding the whole group): every segment steps
    through the kernel with its tensor's reduced (fp32) dot, like the dense twin's native step."""
    from .test_zero import _anchors, _link, _model, _zero1_step
    dense, zero = _model(), _model()
    anchors = _anchors(dense)
    kw = dict(lr=5e-2, anchors=anchors, asft_lambda=3.0)
    ref = AsFTAdamW(dense.named_parameters(), **kw)
    opt = AsFTAdamW(zero.named_parameters(), **kw)
    params = list(zero.parameters())
    flat = torch.cat([p.detach().reshape(-1) for p in params] + [torch.zeros(2)]).requires_grad_()
    _link(params, flat, 0, flat.numel(), [0, 15, 18, 24])
    opt.param_groups[0]["params"] = [flat]
    calls = _spy_native(monkeypatch)
    gen = torch.Generator().manual_seed(9)
    for _ in range(5):
        grads = [torch.randn(p.shape, generator=gen) for p in params]
        for p, g in zip(dense.parameters(), grads):
            p.grad = g.clone()
        ref.step()
        _zero1_step(zero, opt, flat, opt.state, grads)
    assert calls == [4] * 10  # dense, then the partition's 4 segments, each step
    for p, q in zip(dense.parameters(), zero.parameters()):
        close_rel(q.detach(), p.detach(), rel=1e-6)  # c from an fp32 sum: the last bits may differ


_FSDP2 = textwrap.dedent("""
    import json, os, socket
    import torch, torch.distributed as dist
    from torch import nn
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import distribute_tensor
    from asft_optim import AsFTAdamW, native
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=0, world_size=1)
    calls = []
    real = native.step_supported_
    def spy(*args, **kw):
        dots, skipped = real(*args, **kw)
        calls.append(len(args[0]) - len(skipped))
        return dots, skipped
    native.step_supported_ = spy
    def build(shard):
        torch.manual_seed(0)
        m = nn.Sequential(nn.Linear(300, 70), nn.Tanh(), nn.Linear(70, 5))
        if shard:
            fully_shard(m)
        return m
    dense, sharded = build(False), build(True)
    gen = torch.Generator().manual_seed(1)
    dirs = {n: torch.randn(p.shape, generator=gen) * 1e-2 for n, p in dense.named_parameters()}
    opts = [AsFTAdamW(m.named_parameters(), lr=0.05, anchors=dirs, asft_lambda=2.0) for m in (dense, sharded)]
    for t in range(4):
        gens = torch.Generator().manual_seed(10 + t)
        grads = [torch.randn(p.shape, generator=gens) for p in dense.parameters()]
        for p, q, g in zip(dense.parameters(), sharded.parameters(), grads):
            p.grad = g.clone()
            q.grad = distribute_tensor(g.clone(), q.device_mesh, q.placements)
        for opt in opts:
            opt.step()
    same = all(torch.equal(p.detach(), q.detach().full_tensor())
               for p, q in zip(dense.parameters(), sharded.parameters()))
    kinds = sorted({b.kind.value for b in opts[1].records.bindings.values()})
    print(json.dumps({"calls": calls, "same": same, "kinds": kinds}))
    dist.destroy_process_group()
    os._exit(0)
""")


@needs_native
def test_fsdp2_shards_step_natively_like_the_dense_tensors():
    """FSDP2 (one gloo rank, DTensor shards): every shard steps through the kernel with its
    all-reduced carried dot, bitwise like the dense twin."""
    out = _run(_FSDP2)
    assert out["kinds"] == ["shard"]
    assert out["calls"] == [4, 4] * 4 and out["same"]


def test_optimizer_with_native_disabled_warns_once_and_matches(tmp_path):
    """ASFT_NATIVE=0 (as on a machine without a compiler): one warning line, the exact fallback path."""
    script = textwrap.dedent("""
        import json, warnings
        import torch
        from asft_optim import AsFTAdamW, native
        named = [("a", torch.nn.Parameter(torch.randn(50))), ("b", torch.nn.Parameter(torch.randn(3, 4)))]
        opt = AsFTAdamW(named, anchors={"a": torch.randn(50), "b": torch.randn(3, 4)})
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for _ in range(3):
                for _, p in named:
                    p.grad = torch.ones_like(p)
                opt.step()
        print(json.dumps({"available": native.available(), "reason": native.reason(),
                          "warnings": [str(w.message) for w in caught],
                          "dtypes": [str(opt.records.dots.get(n, p, opt.state[p]["step"]).dtype) for n, p in named]}))
    """)
    out = _run(script, ASFT_NATIVE="0", ASFT_NATIVE_CACHE=str(tmp_path))
    assert out["available"] is False and out["reason"] == "disabled by ASFT_NATIVE=0"
    assert out["warnings"] == ["AsFTAdamW: the native CPU kernel is unavailable (disabled by ASFT_NATIVE=0); "
                               "using the slower PyTorch path"]
    assert out["dtypes"] == ["torch.float32", "torch.float32"]


# ------------------------------------------------------------------------------ the build
def _run(script: str, **env) -> dict:
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600,
                         env={**os.environ, "OMP_NUM_THREADS": "1", **env})
    assert res.returncode == 0, res.stderr[-3000:]
    return json.loads(res.stdout.strip().splitlines()[-1])


_INFO = textwrap.dedent("""
    import json
    from asft_optim import native
    ok = native.available()
    info = native.build_info()
    print(json.dumps({"available": ok, "reason": native.reason(),
                      "built": info.built if info else None, "path": str(info.path) if info else None}))
""")


@needs_native
def test_second_process_reuses_the_build():
    so = native.build_info().path
    mtime = so.stat().st_mtime_ns
    out = _run(_INFO, ASFT_NATIVE_CACHE=str(native.cache_dir().parent))
    assert out == {"available": True, "reason": None, "built": False, "path": str(so)}
    assert so.stat().st_mtime_ns == mtime


def test_no_compiler_falls_back_with_one_clear_line(tmp_path):
    out = _run(_INFO, CXX="/nonexistent", ASFT_NATIVE_CACHE=str(tmp_path), ASFT_NATIVE="1")
    assert out == {"available": False, "reason": "no C++ compiler (CXX='/nonexistent' not found)",
                   "built": None, "path": None}


@pytest.mark.slow
@pytest.mark.skipif(not HAS_COMPILER, reason="no C++ compiler")
def test_concurrent_first_use_builds_once(tmp_path):
    """Two processes starting on an empty cache: one compiles, the other waits on the lock and loads."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "ASFT_NATIVE_CACHE": str(tmp_path)}
    procs = [subprocess.Popen([sys.executable, "-c", _INFO], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, env=env) for _ in range(2)]
    outs = [json.loads(p.communicate(timeout=600)[0].strip().splitlines()[-1]) for p in procs]
    assert sorted(o["built"] for o in outs) == [False, True] and all(o["available"] for o in outs)
    assert outs[0]["path"] == outs[1]["path"]


def test_unchanged_groups_skip_checks_yet_notice_late_gradients_and_swapped_parameters():
    """Binding and W0 checks are skipped for a group unchanged since its last check: a frozen
    parameter that gains a gradient after several steps is bound then (W0 = its value then), one
    without a direction is refused then, and a parameter object put into the group gets its own W0."""
    g = torch.Generator().manual_seed(5)
    named = [(f"w{i}", torch.nn.Parameter(torch.randn(33, generator=g))) for i in range(3)]
    late = torch.nn.Parameter(torch.randn(9, generator=g), requires_grad=False)
    stray = torch.nn.Parameter(torch.randn(4, generator=g), requires_grad=False)
    dirs = {n: torch.randn(p.shape, generator=g) for n, p in named + [("late", late)]}
    opt = AsFTAdamW(named + [("late", late), ("stray", stray)], lr=0.01, anchors=dirs)
    for _ in range(3):
        for _, p in named:
            p.grad = torch.randn(p.shape, generator=g)
        opt.step()
    assert opt.records.binding("late") is None and late not in opt.state
    late.requires_grad_(True)
    late.grad = torch.randn(9, generator=g)
    at_join = late.detach().clone()
    opt.step()
    assert opt.records.binding("late").anchored and torch.equal(opt.state[late]["w0"], at_join)
    new = torch.nn.Parameter(torch.randn(33, generator=g))
    new.grad = torch.randn(33, generator=g)
    opt.param_groups[0]["params"][0] = new
    before = new.detach().clone()
    opt.step()
    assert torch.equal(opt.state[new]["w0"], before) and not torch.equal(new.detach(), before)
    stray.requires_grad_(True)
    stray.grad = torch.randn(4, generator=g)
    with pytest.raises(ValueError, match=r"^no direction for 1 trainable parameter\(s\) \(they gained gradients "
                                         r"after the optimizer was built\): 'stray'\. "):
        opt.step()
