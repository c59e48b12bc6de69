"""The fused Triton step (impl="triton") against impl="reference" and impl="torch".

By default runs the kernels in Triton's CPU interpreter (TRITON_INTERPRET=1, set before triton is
imported): correctness on small tensors, not speed. With ASFT_TEST_DEVICE=cuda the same tests run
the compiled kernels on the GPU (benchmarks/gpu_check.sh does so). The interpreter truncates
fp32 → bf16 where compiled kernels and torch round to nearest even, so half-precision runs are
compared one step at a time from a shared state (within one ulp), fp32 runs over whole
trajectories (1e-6 relative). CPU-only compiles of every kernel variant for sm_90 check registers,
spills, shared memory and vector accesses.
"""

from __future__ import annotations

import os

DEVICE = os.environ.get("ASFT_TEST_DEVICE", "cpu")
if DEVICE == "cpu":
    os.environ["TRITON_INTERPRET"] = "1"

import copy  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import textwrap  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

triton = pytest.importorskip("triton")

from asft_optim.kernels import adamw as K  # noqa: E402
from asft_optim.optimizer import AsFTAdamW  # noqa: E402
from asft_optim.triton_step import resolve_impl  # noqa: E402

from . import oracle  # noqa: E402
from .test_optimizer import close_rel  # noqa: E402

if DEVICE == "cpu" and not K.is_interpreted():  # triton was imported earlier without the interpreter
    pytest.skip("asft_optim.kernels was imported before TRITON_INTERPRET=1 was set; run this module "
                "in its own process", allow_module_level=True)

SHAPES = {"one": (1,), "seven": (7,), "odd": (4097,), "mat": (5, 123), "many_blocks": (3 * K.BLOCK + 5,)}
HALF = (torch.bfloat16, torch.float16)


def make(specs: dict[str, tuple[tuple[int, ...], torch.dtype]], impl: str, seed: int = 0,
         lam: float = 0.5, **kw) -> tuple[dict[str, torch.nn.Parameter], AsFTAdamW]:
    """Parameters (seeded, identical for every impl) and an AsFTAdamW over them."""
    g = torch.Generator().manual_seed(seed)
    params = {n: torch.nn.Parameter(torch.randn(s, generator=g).to(DEVICE, dt))
              for n, (s, dt) in specs.items()}
    dirs = {n: torch.randn(s, generator=g) for n, (s, _) in specs.items()}
    kw.setdefault("lr", 3e-2)
    opt = AsFTAdamW(list(params.items()), anchors=dirs, impl=impl, asft_lambda=lam, **kw)
    return params, opt


def set_grads(params: dict[str, torch.nn.Parameter], step: int, skip: set[str] = frozenset()) -> None:
    g = torch.Generator().manual_seed(1000 + step)
    for n, p in params.items():
        grad = torch.randn(p.shape, generator=g).to(p.device, p.dtype)
        p.grad = None if n in skip else grad


def state_of(opt: AsFTAdamW, p: torch.Tensor) -> list[torch.Tensor]:
    st = opt.state[p]
    return [st[k] for k in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq") if k in st]


def ulp(x: torch.Tensor) -> torch.Tensor:
    """The spacing of x's dtype at |x| (as fp32)."""
    info = torch.finfo(x.dtype)
    a = x.float().abs().clamp_min(info.tiny)
    return torch.exp2(torch.floor(torch.log2(a))) * info.eps


def assert_close(a: torch.Tensor, b: torch.Tensor, what: str, inputs: torch.Tensor | None = None) -> None:
    """fp32: 1e-6 relative (1e-6 absolute near 0). Half precision: within one ulp, or where the
    result cancels, within 2**-18 of `inputs` (the magnitude of the terms that made it: fp32 math
    and an fp32 c are that exact, a thousand times finer than a half-precision ulp of the terms)."""
    assert a.dtype == b.dtype, what
    if a.dtype == torch.float32:
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6, msg=lambda m: f"{what}: {m}")
        return
    err = (a.float() - b.float()).abs()
    bound = ulp(torch.maximum(a.float().abs(), b.float().abs()).to(a.dtype))
    if inputs is not None:
        bound = torch.maximum(bound, inputs.float() * 2.0**-18)
    bad = err > bound
    assert not bad.any(), (f"{what}: {int(bad.sum())} of {a.numel()} elements differ by more than one "
                           f"ulp, worst {float((err / bound).max()):.2f} ulp")


def stored(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """x (float64) as the kernel stores it: fp32, then to `dtype` (the interpreter truncates to bf16)."""
    x = x.float()
    if dtype == torch.bfloat16 and K.is_interpreted():
        return (x.view(torch.int32) & -65536).view(torch.float32).to(dtype)  # exact: low bits are 0
    return x.to(dtype)


def expected_step(opt: AsFTAdamW, name: str, p: torch.Tensor, g: torch.Tensor,
                  moments: list[torch.Tensor], w0: torch.Tensor, step: float,
                  new_moments: list[torch.Tensor]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """[p, exp_avg, exp_avg_sq(, max_exp_avg_sq)] after one step from the given pre-step values:
    float64 math, each stored value rounded once (`stored`); and for each, the magnitude of the
    terms it sums (float64, for `assert_close`). The new p is computed from `new_moments` (the
    moments the kernel stored, checked separately): a one-ulp difference in a tiny (subnormal)
    second moment would otherwise move the update by far more than an ulp of p."""
    grp = opt.param_groups[0]
    b1, b2 = grp["betas"]
    lr, lam, dt = float(grp["lr"]), grp["asft_lambda"], p.dtype
    p64, g64, w64 = p.double(), g.double(), w0.double()
    bound = opt.records.binding(name).direction
    v = bound.v.double()
    dw = p64 - w64
    c = (v * dw).sum() * bound.inv_nv2
    r = {"orthogonal": dw - c * v, "parallel": c * v, "full": dw}[grp["penalty"]]
    g64 = g64 + (-2.0 if grp["maximize"] else 2.0) * lam * r
    g64 = -g64 if grp["maximize"] else g64
    m0, s0 = moments[0].double(), moments[1].double()
    m = stored(m0 + (1 - b1) * (g64 - m0), dt)
    s = stored(s0 * b2 + (1 - b2) * g64 * g64, dt)
    out, terms = [m, s], [m0.abs() + (1 - b1) * (g64.abs() + m0.abs()), s0 * b2 + (1 - b2) * g64 * g64]
    if grp["amsgrad"]:
        s = torch.maximum(moments[2], s)
        out.append(s)
        terms.append(terms[-1])
    denom = new_moments[-1].double().sqrt() / (1 - b2 ** step) ** 0.5 + grp["eps"]
    adam = lr / (1 - b1 ** step) * new_moments[0].double() / denom
    new_p = p64 * (1 - lr * grp["weight_decay"]) - adam
    return [stored(new_p, dt)] + out, [p64.abs() + adam.abs()] + terms


def same(a: torch.Tensor, b: torch.Tensor, what: str) -> None:
    """Bitwise equal in the interpreter. Compiled, the update and the exact-pass kernels are two
    programs whose fp32 contraction may differ: there, within 1e-6 relative."""
    if K.is_interpreted():
        assert torch.equal(a, b), what
    else:
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7, msg=lambda m: f"{what}: {m}")


def run_pair(specs, steps: int = 10, skip: dict[int, set[str]] | None = None, other: str = "reference",
             **kw) -> tuple[dict, AsFTAdamW, dict, AsFTAdamW]:
    """Step a triton and an `other` optimizer side by side, comparing after every step.

    fp32 tensors run free over the whole trajectory (1e-6 relative). Half-precision tensors restart
    each step from the other run's state (then `resync()`) and are compared per step: within one ulp
    of `expected_step` (one rounding per stored value), and with `other` within one ulp on average
    (torch's half path also rounds g̃, p after the decay and the denominator: where the moment
    update cancels, single elements differ by more).
    """
    pa, oa = make(specs, "triton", **kw)
    pb, ob = make(specs, other, **kw)
    for t in range(steps):
        skipped = (skip or {}).get(t, set())
        set_grads(pa, t, skipped)
        set_grads(pb, t, skipped)
        before = {n: (pa[n].detach().clone(), None if pa[n].grad is None else pa[n].grad.clone(),
                      [x.clone() for x in state_of(oa, pa[n])]) for n in specs}
        oa.step()
        ob.step()
        resync = False
        for n in specs:
            a, b = pa[n].detach(), pb[n].detach()
            if a.dtype == torch.float32:
                assert_close(a, b, f"step {t} param {n}")
                for k, (x, y) in enumerate(zip(state_of(oa, pa[n]), state_of(ob, pb[n]), strict=True)):
                    assert_close(x, y, f"step {t} moment {k} of {n}")
                continue
            p0, g0, m0 = before[n]
            if g0 is not None:
                st = oa.state[pa[n]]
                moments = m0 if m0 else [torch.zeros_like(p0)] * (3 if "max_exp_avg_sq" in st else 2)
                want, terms = expected_step(oa, n, p0, g0, moments, st["w0"], float(st["step"]),
                                            state_of(oa, pa[n]))
                for k, (x, y, z) in enumerate(zip([a] + state_of(oa, pa[n]), want, terms, strict=True)):
                    assert_close(x, y, f"step {t} {'param' if k == 0 else f'moment {k - 1}'} of {n}", z)
                err = (a.float() - b.float()).abs().mean()
                assert float(err) <= float(ulp(b).mean()), f"step {t} {n}: mean error vs {other} {float(err)}"
            with torch.no_grad():
                pa[n].copy_(pb[n])
                for x, y in zip(state_of(oa, pa[n]), state_of(ob, pb[n])):
                    x.copy_(y)
            resync = True
        if resync:
            oa.resync()
    return pa, oa, pb, ob


def f32(shapes=SHAPES, dtype=torch.float32):
    return {n: (s, dtype) for n, s in shapes.items()}


# ----------------------------------------------------------------------------------------- parity
@pytest.mark.parametrize("penalty", ["orthogonal", "parallel", "full"])
def test_fp32_matches_reference_over_ten_steps(penalty):
    run_pair(f32(), penalty=penalty, weight_decay=0.1)


@pytest.mark.parametrize("options", [dict(amsgrad=True), dict(maximize=True), dict(weight_decay=0.0),
                                     dict(amsgrad=True, maximize=True, weight_decay=0.3)])
def test_fp32_options_match_reference_and_torch(options):
    shapes = {"odd": (4097,), "mat": (5, 123), "one": (1,)}
    run_pair(f32(shapes), **options)
    run_pair(f32(shapes), other="torch", **options)


def test_step_with_grad_none_matches_reference():
    pa, oa, _, _ = run_pair(f32(), skip={3: {"odd"}, 4: {"odd", "one"}, 0: {"mat"}})
    assert float(oa.state[pa["odd"]]["step"]) == 10  # penalty steps without a task gradient (it has W0)
    assert float(oa.state[pa["mat"]]["step"]) == 9  # no W0 at step 0: no step


@pytest.mark.parametrize("dtype", HALF)
def test_half_precision_within_one_ulp_each_step(dtype):
    # torch's fp16 path adds eps in fp16: 1e-8 flushes to 0 and its denominators can reach 0
    run_pair(f32(dtype=dtype), weight_decay=0.1, amsgrad=True, eps=1e-8 if dtype == torch.bfloat16 else 1e-4)


def test_300_tiny_tensors_in_one_launch_per_step():
    specs = {f"t{i}": ((1 + i % 13,), torch.float32) for i in range(300)}
    pa, oa, _, _ = run_pair(specs, steps=10)
    before = K.launch_counter[0]
    set_grads(pa, 99)
    oa.step()
    assert K.launch_counter[0] - before == 1  # one-block tensors write their c directly: no fold


def test_mixed_dtypes_split_into_one_launch_each():
    specs = {"a": ((300,), torch.float32), "b": ((129,), torch.bfloat16), "c": ((5, 7), torch.float16),
             "d": ((4097,), torch.float32), "e": ((33,), torch.bfloat16)}
    pa, oa, _, _ = run_pair(specs, steps=10, amsgrad=True)
    keys = {k for (gi, k) in oa.triton_cache.tables}
    assert sorted(str(k[2]) for k in keys) == ["torch.bfloat16", "torch.float16", "torch.float32"]
    counts = []
    for t in (50, 51):
        set_grads(pa, t)
        before = K.launch_counter[0]
        oa.step()
        counts.append(K.launch_counter[0] - before)
    # run_pair overwrote the half tensors and resynced: the first step runs exact passes
    # (3 dot launches + 1 fold for the two-block fp32 tensor); then 3 updates + 1 fold
    assert counts == [4 + 4, 4]


def test_unanchored_and_lambda_zero_take_plain_adamw_steps():
    specs = f32({"a": (4097,), "b": (9,)})
    pa, oa = make(specs, "triton", lam=0.0)
    pb, ob = make(specs, "torch", lam=0.0)
    for t in range(10):
        set_grads(pa, t)
        set_grads(pb, t)
        oa.step()
        ob.step()
    for n in specs:
        assert_close(pa[n].detach(), pb[n].detach(), n)


def test_tensor_lr_is_supported():
    specs = f32({"a": (4097,), "b": (5, 123)})
    run_pair(specs, steps=3, lr=torch.tensor(0.02))


# ----------------------------------------------------------------------------------------- c
def _c_values(opt: AsFTAdamW, names) -> torch.Tensor:
    cs = opt.triton_cache.slots
    (buf,) = cs.buffers.values()  # one device
    return torch.stack([buf[cs.slot[n]] for n in names]).clone()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_one_pass_c_equals_a_fresh_exact_reduction(dtype):
    specs = f32(dtype=dtype)
    pa, oa = make(specs, "triton")
    for t in range(4):
        set_grads(pa, t)
        oa.step()
    names = list(specs)
    one_pass = _c_values(oa, names)
    assert bool((one_pass != 0).all())
    for (_, table) in oa.triton_cache.tables.values():
        K.exact_c_(table, *oa.triton_cache.slots.buffers.values())
    same(_c_values(oa, names), one_pass, "c")
    for n, c in zip(names, one_pass):
        b = oa.records.binding(n).direction
        dw = pa[n].detach().double() - oa.state[pa[n]]["w0"].double()
        ref = float((b.v.double() * dw).sum() * b.inv_nv2)
        assert abs(float(c) - ref) <= 1e-5 * max(abs(ref), 1e-3), (n, float(c), ref)


def test_first_step_uses_c_zero_without_a_reduction_pass():
    pa, oa = make(f32(), "triton")
    counts = []
    for t in range(2):
        set_grads(pa, t)
        before = K.launch_counter[0]
        oa.step()
        counts.append(K.launch_counter[0] - before)
    assert counts == [2, 2]  # update + fold of the multi-block tensors; no exact pass on step 1


def test_state_dict_round_trip_continues_exactly():
    specs = f32({"odd": (4097,), "mat": (5, 123), "bf": (300,)})
    specs["bf"] = ((300,), torch.bfloat16)
    pa, oa = make(specs, "triton", amsgrad=True)
    for t in range(5):
        set_grads(pa, t)
        oa.step()
    pb, ob = make(specs, "triton", amsgrad=True)
    with torch.no_grad():
        for n in specs:
            pb[n].copy_(pa[n])
    ob.load_state_dict(copy.deepcopy(oa.state_dict()))  # state_dict() shares A's tensors
    for t in range(5, 10):
        set_grads(pa, t)
        set_grads(pb, t)
        before = K.launch_counter[0]
        oa.step()
        one = K.launch_counter[0] - before
        before = K.launch_counter[0]
        ob.step()
        # the first step after the load adds the exact passes: fp32 dot + fold, bf16 dot
        assert K.launch_counter[0] - before == one + (3 if t == 5 else 0)
        for n in specs:
            same(pa[n].detach(), pb[n].detach(), f"step {t} {n}")
            for x, y in zip(state_of(oa, pa[n]), state_of(ob, pb[n])):
                same(x, y, f"step {t} moments of {n}")


@pytest.mark.parametrize("impl", ["triton", "torch"])
def test_outside_writes_are_noticed_on_every_impl(impl):
    """An in-place write between steps (`model.load_state_dict`, `p.add_`) bumps the version counter
    and forces an exact c on every impl, with or without resync(); a write through `.data`
    bypasses the counter and needs resync() (without it the stale c shows)."""
    specs = f32({"odd": (4097,), "mat": (5, 123)})
    results = {}
    for run_impl, how in (("reference", "inplace"), (impl, "inplace"), (impl, "data+resync"), (impl, "data")):
        p, o = make(specs, run_impl)
        for t in range(10):
            if t == 4:
                with torch.no_grad():
                    for x in p.values():
                        (x if how == "inplace" else x.data).add_(0.25)
                if how == "data+resync":
                    o.resync()
            set_grads(p, t)
            o.step()
        results[(run_impl, how)] = p
    for n in specs:
        ref = results[("reference", "inplace")][n].detach()
        assert_close(results[(impl, "inplace")][n].detach(), ref, n)
        assert_close(results[(impl, "data+resync")][n].detach(), ref, n)
        stale = results[(impl, "data")][n].detach()
        assert not torch.allclose(stale, ref, rtol=1e-5, atol=1e-5), f"{n}: the stale c went unnoticed"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_two_identical_runs_are_bitwise_identical(dtype):
    runs = []
    for _ in range(2):
        p, o = make(f32(dtype=dtype), "triton", amsgrad=True)
        for t in range(4):
            set_grads(p, t)
            o.step()
        runs.append(p)
    for n in SHAPES:
        assert torch.equal(runs[0][n], runs[1][n]), n


# ----------------------------------------------------------------------------------------- carried c
def _oracle_schedule(init: list[torch.Tensor], dirs: list[torch.Tensor], lams: list[float], kinds: list[str],
                     lr: float) -> list[torch.Tensor]:
    """float64 AdamW on L_task + λ_t‖R_t(W - W0)‖², λ_t and the penalty kind R_t chosen per step."""
    ws = [torch.nn.Parameter(t.detach().double().clone()) for t in init]
    w0s = [t.detach().double().clone() for t in init]
    opt = torch.optim.AdamW(ws, lr=lr)
    for t, (lam, kind) in enumerate(zip(lams, kinds, strict=True)):
        loss = oracle.task_loss(ws, t) + sum(lam * oracle.penalty(w, w0, d, kind) for w, w0, d in zip(ws, w0s, dirs))
        for w, g in zip(ws, torch.autograd.grad(loss, ws)):
            w.grad = g
        opt.step()
    return [w.detach() for w in ws]


SCHEDULES = {  # per step: the group options set before it
    "lambda 1,0,0,5,5,5": [dict(asft_lambda=x) for x in (1.0, 0.0, 0.0, 5.0, 5.0, 5.0)],
    "penalty orth,full,orth": [dict(penalty=x) for x in ("orthogonal", "full", "full", "orthogonal",
                                                          "orthogonal", "orthogonal")],
    "impl torch,triton": [dict(impl=x) for x in ("torch", "torch", "triton", "triton", "triton", "triton")],
    "impl triton,torch,triton": [dict(impl=x) for x in ("triton", "triton", "torch", "triton", "triton", "triton")],
}


@pytest.mark.parametrize("schedule", list(SCHEDULES))
def test_lambda_penalty_and_impl_schedules_match_the_fp64_oracle(schedule):
    """Every launch that moves p either leaves c current in its slot or drops the carried dot:
    a λ = 0 or penalty="full" launch refreshes no c, and the kernels write p without bumping its
    version, so a later penalised step must not trust the slot; nor may the Triton path read its
    slot after another impl moved p (nor the other impl read a dot from before the Triton steps)."""
    specs = f32({"odd": (4097,), "mat": (5, 123)})
    params, opt = make(specs, "triton", lam=1.0, lr=0.02)
    init = [p.detach().clone() for p in params.values()]
    dirs = [opt.records.binding(n).direction.v.double() for n in specs]
    group = opt.param_groups[0]
    for t, options in enumerate(SCHEDULES[schedule]):
        group.update(options)
        for p, g in zip(params.values(), oracle.task_grads(list(params.values()), t)):
            if p.grad is None:
                p.grad = g
            else:
                p.grad.copy_(g)  # in place: the Triton path replays its plan where it can
        opt.step()
    steps = SCHEDULES[schedule]
    want = _oracle_schedule(init, dirs, [o.get("asft_lambda", 1.0) for o in steps],
                            [o.get("penalty", "orthogonal") for o in steps], lr=0.02)
    for n, w in zip(specs, want):
        close_rel(params[n].detach(), w)


@pytest.mark.filterwarnings("ignore:invalid value encountered in divide:RuntimeWarning")  # the masked lanes
def test_eps_zero_keeps_the_masked_tail_lanes_out_of_the_dot():
    """eps = 0: the masked lanes past a tensor's end compute 0/0; they must add nothing to c."""
    pa, oa, _, _ = run_pair(f32({"odd": (4097,), "seven": (7,)}), steps=3, eps=0.0)
    assert all(bool(p.isfinite().all()) for p in pa.values())


@pytest.mark.parametrize("key", ["exp_avg", "exp_avg_sq", "max_exp_avg_sq", "w0", "step"])
def test_a_replaced_state_tensor_is_noticed_by_the_cached_plan(key):
    """`opt.state[p][key] = new` between steps (checkpoint tools, EMA code): the plan must read and
    write the new tensor. The old one is then overwritten, as a caching allocator reuses memory.
    Gradients are written in place, so that nothing else forces a rebuild of the plan."""
    specs = f32({"odd": (4097,), "mat": (5, 123)})
    runs = {}
    for impl in ("triton", "reference"):
        params, opt = make(specs, impl, amsgrad=True)
        grads = {n: torch.zeros_like(p) for n, p in params.items()}
        olds = []  # kept alive: a stale plan writes into them, not into freed memory
        for t in range(6):
            if t == 3:
                for p in params.values():
                    olds.append(opt.state[p][key])
                    opt.state[p][key] = olds[-1].clone()
                    olds[-1].fill_(7.0)
            set_grads(params, t)
            for n, p in params.items():
                p.grad = grads[n].copy_(p.grad)
            opt.step()
        runs[impl] = params, opt
    (pa, oa), (pb, ob) = runs["triton"], runs["reference"]
    for n in specs:
        assert_close(pa[n].detach(), pb[n].detach(), f"param {n}")
        for k in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq", "step"):
            assert_close(oa.state[pa[n]][k], ob.state[pb[n]][k], f"{k} of {n}")


def test_gradients_reallocated_every_step_reuse_the_block_tables(monkeypatch):
    """torch's zero_grad(set_to_none=True) gives new gradient tensors every step: the block tables
    are built once (they depend on the shapes only), the plan is replayed with a new pointer table."""
    built, gathered = [], []
    monkeypatch.setattr("asft_optim.kernels.make_table",
                        lambda *a, _f=K.make_table, **k: built.append(1) or _f(*a, **k))
    monkeypatch.setattr(AsFTAdamW, "_init_group",  # torch's lazy-state hook: once per full setup
                        lambda self, *a, _f=AsFTAdamW._init_group: gathered.append(self) or _f(self, *a))
    specs = f32({"odd": (4097,), "mat": (5, 123), "one": (1,)})
    pa, oa = make(specs, "triton")
    pb, ob = make(specs, "reference")
    for t in range(5):
        set_grads(pa, t)  # new tensors
        set_grads(pb, t)
        oa.step()
        ob.step()
        for n in specs:
            assert_close(pa[n].detach(), pb[n].detach(), f"step {t} {n}")
    assert len(built) == 1 and sum(o is oa for o in gathered) == 1, (len(built), len(gathered))


def test_an_unaligned_tensor_gets_a_launch_of_its_own(monkeypatch):
    """A parameter at an odd address (a view into a larger buffer) must not cost the other tensors
    their vector hints: it is stepped in its own launch, the rest in an aligned one."""
    launched = []
    real = K.fused_step_
    monkeypatch.setattr("asft_optim.kernels.fused_step_",
                        lambda table, *a, **k: launched.append((table.aligned, table.numels.tolist()))
                        or real(table, *a, **k))
    g = torch.Generator().manual_seed(0)
    base = torch.randn(4098, generator=g)
    params = {"odd": torch.nn.Parameter(base[1:]), "mat": torch.nn.Parameter(torch.randn(5, 123, generator=g)),
              "one": torch.nn.Parameter(torch.randn(1, generator=g))}
    assert params["odd"].data_ptr() % 16
    dirs = {n: torch.randn(p.shape, generator=g) for n, p in params.items()}
    opt = AsFTAdamW(list(params.items()), lr=0.02, anchors=dirs, impl="triton")
    ref = {n: torch.nn.Parameter(p.detach().clone()) for n, p in params.items()}
    ref_opt = AsFTAdamW(list(ref.items()), lr=0.02, anchors=dirs, impl="reference")
    for t in range(3):
        set_grads(params, t)
        set_grads(ref, t)
        opt.step()
        ref_opt.step()
    assert sorted(launched[:2]) == [(False, [4097]), (True, [615, 1])], launched
    for n in params:
        assert_close(params[n].detach(), ref[n].detach(), n)


def test_every_launch_runs_under_a_guard_for_its_tensors_device(monkeypatch):
    """Triton launches on the current CUDA device: each launcher makes the tensors' device current
    first (`_on`), whichever device is current (device_map="auto" puts layers on cuda:1...)."""
    assert isinstance(K._on(torch.device("cuda", 1)), torch.cuda.device) and K._on(torch.device("cuda", 1)).idx == 1
    entered: list[torch.device] = []
    inside = [False]

    class Guard:
        def __init__(self, device):
            self.device = device

        def __enter__(self):
            entered.append(self.device)
            inside[0] = True

        def __exit__(self, *exc):
            inside[0] = False

    class Kernel:
        def __init__(self, real):
            self.real = real

        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                assert inside[0], "a kernel launched outside the device guard"
                return self.real[grid](*args, **kwargs)
            return launch

    monkeypatch.setattr(K, "_on", Guard)
    for name in ("_update_kernel", "_dot_kernel", "_fold_kernel"):
        monkeypatch.setattr(K, name, Kernel(getattr(K, name)))
    params, opt = make(f32({"odd": (4097,), "one": (1,)}), "triton")
    for t in range(3):
        set_grads(params, t)
        if t == 2:
            opt.resync()  # the exact pass too
        opt.step()
    assert entered and set(entered) == {params["odd"].device}


@pytest.mark.skipif(DEVICE != "cuda" or torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_parameters_on_a_second_gpu_step_there():
    specs = f32({"odd": (4097,), "mat": (5, 123)})
    pa, oa = make(specs, "triton")
    pb, ob = make(specs, "reference")
    with torch.no_grad():
        for p in list(pa.values()) + list(pb.values()):
            p.data = p.data.to("cuda:1")
    torch.cuda.set_device(0)
    for t in range(3):
        set_grads(pa, t)
        set_grads(pb, t)
        oa.step()
        ob.step()
    for n in specs:
        assert_close(pa[n].detach(), pb[n].detach(), n)


# ----------------------------------------------------------------------------------------- errors
@pytest.mark.parametrize("flag", ["foreach", "fused", "capturable"])
def test_torch_kernel_flags_with_triton_raise(flag):
    p, o = make(f32({"a": (8,)}), "triton", **{flag: True})
    set_grads(p, 0)
    with pytest.raises(ValueError, match=f"cannot honour {flag}=True"):
        o.step()


def test_triton_on_cpu_without_the_interpreter_raises():
    code = textwrap.dedent("""
        import os, torch
        os.environ.pop("TRITON_INTERPRET", None)
        from asft_optim.optimizer import AsFTAdamW
        p = torch.nn.Parameter(torch.ones(3))
        o = AsFTAdamW([("w", p)], anchors={"w": torch.ones(3)}, impl="triton")
        p.grad = torch.ones(3)
        try:
            o.step()
        except ValueError as e:
            print("ValueError:", e)
        """)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert "ValueError: impl='triton' runs on CUDA tensors" in out.stdout, out.stdout + out.stderr


def test_default_impl_is_triton_on_cuda_and_torch_elsewhere():
    p, o = make(f32({"a": (8,)}), None)
    assert resolve_impl(o.param_groups[0], False) == ("triton" if DEVICE == "cuda" else "torch")
    p, o = make(f32({"a": (8,)}), None, fused=True)  # an explicit torch kernel keeps the torch path
    assert resolve_impl(o.param_groups[0], False) == "torch"


# ----------------------------------------------------------------------------------------- PTX
_PTX_SCRIPT = """
import json, os, re, subprocess, sys, tempfile
import triton, triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.backends.nvidia.compiler import get_ptxas
from triton.compiler import ASTSource
from asft_optim.kernels import adamw as K

T = {"fp32": tl.float32, "bf16": tl.bfloat16, "fp16": tl.float16}
POINTERS = {"table": "*i64", "grad_table": "*i64", "numels": "*i64", "blk_tensor": "*i32", "blk_start": "*i64",
            "c_buf": "*fp32", "cslot": "*i32", "inv_nv2": "*fp32", "steps": "*fp32", "partials": "*fp32"}
target = GPUTarget("cuda", 90, 32)
backend = triton.compiler.make_backend(target)


def compile_variant(kernel, p, m, wv, aligned=True, pen=True, amsgrad=False, per_tensor=False):
    fn = getattr(K, kernel)
    sig = {name: "constexpr" for name in fn.arg_names}
    sig.update({k: v for k, v in POINTERS.items() if k in fn.arg_names})
    vec = 16 // max(4 if x == "fp32" else 2 for x in (p, m, wv))
    const = dict(P_DTYPE=T[p], W0_DTYPE=T[wv], V_DTYPE=T[wv], ALIGNED=aligned, VEC=vec, BLOCK=K.BLOCK)
    const = {k: v for k, v in const.items() if k in fn.arg_names}
    if kernel == "_update_kernel":
        for name in ("coef", "decay", "omb1", "beta2", "omb2", "eps", "step_size", "bc2_sqrt"):
            sig[name] = "fp32"
        const.update(G_DTYPE=T[p], M_DTYPE=T[m], PENALTY=0, HAS_PEN=pen, AMSGRAD=amsgrad, MAXIMIZE=False,
                     PER_TENSOR_STEP=per_tensor)
    attrs = {(i,): [["tt.divisibility", 16]] for i, name in enumerate(fn.arg_names) if name in POINTERS}
    options = backend.parse_options({"num_warps": K.NUM_WARPS})
    cc = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=const, attrs=attrs), target=target,
                        options=options.__dict__)
    ptx = cc.asm["ptx"]
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "k.ptx")
        with open(path, "w") as fh:
            fh.write(ptx)
        out = subprocess.run([get_ptxas(90).path, "-v", "--gpu-name", "sm_90a", path, "-o", os.path.join(d, "k.o")],
                             capture_output=True, text=True, check=True)
    info = out.stdout + out.stderr
    count = lambda pat: len(re.findall(pat, ptx))
    return {"registers": int(re.search(r"Used (\\d+) registers", info).group(1)),
            "spill_bytes": sum(int(x) for x in re.findall(r"(\\d+) bytes spill", info)),
            "shared_bytes": cc.metadata.shared, "local": bool(re.search(r"\\.local\\b", ptx)),
            "ld128": count(r"ld\\.global(?:\\.\\w+)*\\.v4\\.b32"), "ld64": count(r"ld\\.global(?:\\.\\w+)*\\.v2\\.b32"),
            "st128": count(r"st\\.global(?:\\.\\w+)*\\.v4\\.b32"), "st64": count(r"st\\.global(?:\\.\\w+)*\\.v2\\.b32")}


variants = json.loads(sys.argv[1])
print(json.dumps({"triton": triton.__version__,
                  "variants": {name: compile_variant(**kw) for name, kw in variants.items()}}))
"""

# name → (kernel, param dtype, moment dtype, W0/direction dtype, options): what real training compiles
PTX_VARIANTS = {
    "fp32": dict(kernel="_update_kernel", p="fp32", m="fp32", wv="fp32"),
    "fp32 p, bf16 W0/v": dict(kernel="_update_kernel", p="fp32", m="fp32", wv="bf16"),
    "fp32 p, bf16 W0/v, amsgrad, per-tensor steps": dict(kernel="_update_kernel", p="fp32", m="fp32", wv="bf16",
                                                         amsgrad=True, per_tensor=True),
    "bf16 p, fp32 moments, bf16 W0/v": dict(kernel="_update_kernel", p="bf16", m="fp32", wv="bf16"),
    "bf16 p, fp32 moments, no penalty": dict(kernel="_update_kernel", p="bf16", m="fp32", wv="bf16", pen=False),
    "bf16": dict(kernel="_update_kernel", p="bf16", m="bf16", wv="bf16"),
    "fp32, unaligned": dict(kernel="_update_kernel", p="fp32", m="fp32", wv="fp32", aligned=False),
    "dot fp32": dict(kernel="_dot_kernel", p="fp32", m="fp32", wv="fp32"),
    "dot fp32 p, bf16 W0/v": dict(kernel="_dot_kernel", p="fp32", m="fp32", wv="bf16"),
}


def compile_ptx(extra_path: str | None = None) -> dict:
    """Compile every `PTX_VARIANTS` entry for sm_90a on the CPU (no GPU needed) with the installed
    Triton, or with the one in `extra_path` (a `pip install --target` folder) first on the path;
    ptxas -v gives registers and spills, the compiled metadata the shared memory."""
    import json
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    if extra_path:
        rest = [x for x in env.get("PYTHONPATH", "").split(os.pathsep) if x]
        env["PYTHONPATH"] = os.pathsep.join([extra_path, *rest])
    out = subprocess.run([sys.executable, "-c", _PTX_SCRIPT, json.dumps(PTX_VARIANTS)], env=env, capture_output=True,
                         text=True, timeout=600)
    if out.returncode != 0:
        pytest.fail(f"compiling for sm_90 failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


TRITON_BUILDS = ["installed"] + ([os.environ["ASFT_PTX_TRITON"]] if os.environ.get("ASFT_PTX_TRITON") else [])


@pytest.mark.parametrize("build", TRITON_BUILDS)
def test_compiled_variants_keep_registers_shared_memory_and_vectors(build):
    """Per compiled variant (sm_90a): no spills, no local memory; the mixed-dtype and all-16-bit
    variants use the registers and shared memory of the all-fp32 one (a 16-byte hint on a bf16
    stream beside fp32 ones once cost 120-128 registers and 8 KB of shared memory for a layout
    conversion); aligned streams move in vectors of VEC elements (128-bit fp32 accesses, 64-bit
    bf16 ones beside fp32, 128-bit where all are 16-bit). ASFT_PTX_TRITON=FOLDER also checks the
    Triton installed in FOLDER (e.g. `pip install --target FOLDER triton==3.6.0`)."""
    res = compile_ptx(None if build == "installed" else build)
    got = res["variants"]
    base, dot = got["fp32"], got["dot fp32"]
    per_thread = K.BLOCK // (32 * K.NUM_WARPS)
    for name, r in got.items():
        where = f"triton {res['triton']}, {name}: {r}"
        assert r["spill_bytes"] == 0 and not r["local"], where
        if "unaligned" in name:
            continue
        ref = dot if name.startswith("dot") else base
        assert r["registers"] <= ref["registers"] + 8 and r["shared_bytes"] <= ref["shared_bytes"], where
        spec = PTX_VARIANTS[name]
        widths = [4 if x == "fp32" else 2 for x in (spec["p"], spec["m"], spec["wv"])]
        vec = 16 // max(widths)
        streams = {"p": spec["p"], "w0": spec["wv"], "v": spec["wv"]}
        if spec["kernel"] == "_update_kernel":
            streams.update(g=spec["p"], m=spec["m"], sq=spec["m"])
            if not spec.get("pen", True):
                del streams["w0"], streams["v"]
        loads = {128: 0, 64: 0}
        for dtype in streams.values():
            loads[vec * (32 if dtype == "fp32" else 16)] += per_thread // vec
        assert r["ld128"] >= loads[128] and r["ld64"] >= loads[64], (loads, where)


# ----------------------------------------------------------------------------------------- plan
def test_cached_plan_skips_the_setup_and_stays_exact(monkeypatch):
    """From step 2 on the step replays the launch plan (no `_init_group`): a new gradient tensor,
    `.data` reassigned, or a grad=None step (which takes its penalty step on a fresh zero gradient)
    only move addresses (the pointer table is uploaded again). All along, parameters and step
    counts match the reference."""
    calls = []
    original = AsFTAdamW._init_group
    monkeypatch.setattr(AsFTAdamW, "_init_group", lambda self, *a: calls.append(self) or original(self, *a))
    specs = f32({"odd": (4097,), "mat": (5, 123)})
    pa, oa = make(specs, "triton", amsgrad=True)
    pb, ob = make(specs, "reference", amsgrad=True)
    for t in range(10):
        set_grads(pb, t, {"mat"} if t == 5 else set())
        for n, p in pa.items():
            if t == 5 and n == "mat":
                p.grad = None
            elif p.grad is None or t == 7:  # a new gradient tensor
                p.grad = pb[n].grad.clone()
            else:
                p.grad.copy_(pb[n].grad)
        if t == 8:
            with torch.no_grad():
                pa["odd"].data = pa["odd"].data.clone()
        before = sum(o is oa for o in calls)
        oa.step()
        ob.step()
        rebuilt = sum(o is oa for o in calls) > before
        assert rebuilt == (t == 0), t
        for n in specs:
            assert_close(pa[n].detach(), pb[n].detach(), f"step {t} {n}")
            assert float(oa.state[pa[n]]["step"]) == float(ob.state[pb[n]]["step"])
    sd = oa.state_dict()  # step counts are views of one buffer: they save and load like any tensor
    assert [float(s["step"]) for s in sd["state"].values()] == [10.0, 10.0]  # grad=None: a penalty step


@pytest.mark.parametrize("key", ["exp_avg", "exp_avg_sq", "max_exp_avg_sq", "w0", "direction", "param"])
def test_new_storage_under_the_same_tensor_object_is_noticed_by_the_cached_plan(key):
    """`t.data = new` keeps the tensor object and its version counter but moves its memory: the
    plan must read and write the new memory (it reads every address at every step, not the
    objects' identity). The old memory is then overwritten, as a caching allocator reuses it."""
    specs = f32({"odd": (4097,), "mat": (5, 123)})
    runs = {}
    for impl in ("triton", "reference"):
        params, opt = make(specs, impl, amsgrad=True)
        grads = {n: torch.zeros_like(p) for n, p in params.items()}
        olds = []  # kept alive: a stale plan writes into them, not into freed memory
        for t in range(5):
            if t == 3:
                for n, p in params.items():
                    x = {"param": p, "direction": opt.records.binding(n).direction.v}.get(key)
                    x = opt.state[p][key] if x is None else x
                    olds.append(x.data)
                    with torch.no_grad():
                        x.data = olds[-1].clone()
                    olds[-1].fill_(7.0)  # (the values moved unchanged: every carried c stays exact)
            set_grads(params, t)
            for n, p in params.items():
                p.grad = grads[n].copy_(p.grad)
            opt.step()
        runs[impl] = params, opt
    (pa, oa), (pb, ob) = runs["triton"], runs["reference"]
    for n in specs:
        assert_close(pa[n].detach(), pb[n].detach(), f"param {n}")
        for k in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq"):
            assert_close(oa.state[pa[n]][k], ob.state[pb[n]][k], f"{k} of {n}")


def test_a_gradient_with_other_strides_leaves_the_cached_plan(monkeypatch):
    """A new gradient of the parameter's shape but other strides (a transposed copy) cannot be
    walked with the parameter's layout: the step is rebuilt (the gradient copied to p's strides),
    and a plan is replayed again once the gradients are laid out like p."""
    calls = []
    original = AsFTAdamW._init_group
    monkeypatch.setattr(AsFTAdamW, "_init_group", lambda self, *a: calls.append(self) or original(self, *a))
    specs = f32({"odd": (4097,), "mat": (5, 123)})
    pa, oa = make(specs, "triton")
    pb, ob = make(specs, "reference")
    for t in range(6):
        set_grads(pb, t)
        for n, p in pa.items():
            g = pb[n].grad.clone()
            p.grad = g.t().contiguous().t() if t == 3 and n == "mat" else g
        assert t != 3 or pa["mat"].grad.stride() != pa["mat"].stride()
        before = sum(o is oa for o in calls)
        oa.step()
        ob.step()
        # (a step whose table points at a copied gradient keeps no plan: step 4 builds the next one)
        assert (sum(o is oa for o in calls) > before) == (t in (0, 3, 4)), t
        for n in specs:
            assert_close(pa[n].detach(), pb[n].detach(), f"step {t} {n}")
