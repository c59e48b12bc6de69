"""Properties of the penalty R (hypothesis): orthogonal to d, zero for ΔW ∥ d, invariant to scaling d.
The reference, the chunked fast path and the native kernel are checked."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from asft_optim import native
from asft_optim.functional import asft_adamw_, bind_direction, partial_dots, penalty_reference

numels = st.integers(min_value=1, max_value=3000)
seeds = st.integers(min_value=0, max_value=2**31 - 1)
scales = st.floats(min_value=1e-20, max_value=1e20).flatmap(lambda a: st.sampled_from([a, -a]))


def _setup(n, seed):
    g = torch.Generator().manual_seed(seed)
    p = torch.randn(n, generator=g)
    w0 = p - torch.randn(n, generator=g) * 1e-2
    d = torch.randn(n, generator=g)
    return p, w0, d


def _fast(p, w0, bound, kind, chunk=257):
    """R from the fused path (`asft_adamw_` with g = 0, coef = 1): with beta1 = 0 and zero moments,
    the first moment after one step is exactly the penalised gradient it was given; lr = 0 keeps p."""
    m, v = torch.zeros_like(p), torch.zeros_like(p)
    dot = partial_dots([p], [w0], [bound], chunk)[0]
    asft_adamw_([p], [torch.zeros_like(p)], [m], [v], [], [torch.tensor(0.0)], [w0], [bound], [dot],
                coef=1.0, penalty=kind, chunk=chunk, foreach=False, fused=False, capturable=False,
                differentiable=False, grad_scale=None, found_inf=None, has_complex=False,
                decoupled_weight_decay=True, amsgrad=False, beta1=0.0, beta2=0.999, lr=0.0,
                weight_decay=0.0, eps=1e-8, maximize=False)
    return m.double()


def _native(p, w0, bound, kind):
    """R from the native kernel, by the same trick as `_fast` (m after one step with beta1 = 0)."""
    m, v = torch.zeros_like(p), torch.zeros_like(p)
    dots = native.dots_native([p], [w0], [bound.v])
    cs = dots * (0.0 if kind == "full" else bound.inv_nv2)
    native.asft_adamw_native_([p], [torch.zeros_like(p)], [m], [v], [w0], [bound.v], cs, [torch.tensor(0.0)],
                              lr=0.0, beta1=0.0, beta2=0.999, eps=1e-8, weight_decay=0.0, coef=1.0,
                              penalty=kind, maximize=False)
    return m.double()


def _fast_paths(p, w0, bound, kind):
    return [_fast(p, w0, bound, kind)] + ([_native(p, w0, bound, kind)] if native.available() else [])


@settings(max_examples=60, deadline=None)
@given(n=numels, seed=seeds)
def test_orthogonal_to_d(n, seed):
    p, w0, d = _setup(n, seed)
    b = bind_direction(d, p, "x")
    for r in [penalty_reference(p, w0, b, "orthogonal").double()] + _fast_paths(p, w0, b, "orthogonal"):
        dw = (p - w0).double()
        cos = float(r @ d.double()) / (float(r.norm() * d.double().norm()) + 1e-300)
        assert abs(cos) < 1e-5 or float(r.norm()) < 1e-6 * float(dw.norm())


@settings(max_examples=60, deadline=None)
@given(n=numels, seed=seeds, alpha=st.floats(min_value=-1e3, max_value=1e3).filter(lambda a: abs(a) > 1e-6))
def test_vanishes_when_update_parallel_to_d(n, seed, alpha):
    _, _, d = _setup(n, seed)
    w0 = torch.zeros(n)
    p = (alpha * d.double()).float()
    b = bind_direction(d, p, "x")
    for r in [penalty_reference(p, w0, b, "orthogonal").double()] + _fast_paths(p, w0, b, "orthogonal"):
        assert float(r.norm()) <= 1e-5 * float(p.double().norm())
    # and the parallel penalty is then the whole update
    rp = penalty_reference(p, w0, b, "parallel").double()
    assert float((rp - p.double()).norm()) <= 1e-5 * float(p.double().norm())


@settings(max_examples=60, deadline=None)
@given(n=numels, seed=seeds, k=scales)
def test_invariant_to_scaling_d(n, seed, k):
    p, w0, d = _setup(n, seed)
    b1 = bind_direction(d, p, "x")
    b2 = bind_direction(d * k, p, "x")
    for kind in ("orthogonal", "parallel"):
        r1 = penalty_reference(p, w0, b1, kind).double()
        r2 = penalty_reference(p, w0, b2, kind).double()
        scale = float((p - w0).double().norm())
        assert float((r1 - r2).norm()) <= 1e-5 * scale
        assert float((_fast(p, w0, b1, kind) - _fast(p, w0, b2, kind)).norm()) <= 1e-5 * scale


@settings(max_examples=40, deadline=None)
@given(n=numels, seed=seeds, chunk=st.integers(min_value=1, max_value=4000),
       kind=st.sampled_from(["orthogonal", "parallel", "full"]))
def test_fast_path_matches_reference(n, seed, chunk, kind):
    p, w0, d = _setup(n, seed)
    b = bind_direction(d, p, "x")
    ref = penalty_reference(p, w0, b, kind).double()
    scale = float((p - w0).abs().max())
    torch.testing.assert_close(_fast(p, w0, b, kind, chunk), ref, rtol=1e-5, atol=1e-6 * scale)
    if native.available():
        torch.testing.assert_close(_native(p, w0, b, kind), ref, rtol=1e-5, atol=1e-6 * scale)


def test_tiny_directions_do_not_underflow():
    p, w0, d = _setup(1000, 0)
    b = bind_direction(d * 1e-38, p, "x")
    ref = penalty_reference(p, w0, bind_direction(d, p, "x"), "orthogonal")
    torch.testing.assert_close(penalty_reference(p, w0, b, "orthogonal"), ref, rtol=1e-5, atol=1e-7)
    assert not b.is_null
