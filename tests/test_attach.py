"""`asft_optim.attach`: any optimizer on the explicit loss L_task + λ‖R(W − W0)‖².

For each optimizer that runs on CPU here, `attach` must equal that same optimizer stepping on the
gradient of the explicit loss (penalty differentiated by autograd in float64), over several steps
with a step where one parameter has no task gradient; λ = 0 must equal the bare optimizer bitwise;
a mid-run `state_dict()` round trip through the optimizer's own methods must continue bitwise.
"""

from __future__ import annotations

import copy
import importlib.util
import warnings
from collections.abc import Callable

import pytest
import torch
from torch import nn

from asft_optim import Anchors, AsFTAdamW, attach
from asft_optim.penalty import W0_KEY, attached
from tests.oracle import penalty as explicit_penalty
from tests.oracle import task_grads

STEPS = 6
SKIP = {3: {1}}  # step → parameters without a task gradient at that step
SHAPES = [(5, 123), (4097,), (1,), (3, 7), (100, 100)]  # the last above the foreach size: pieces
LAM = 0.5

needs_bnb = pytest.mark.skipif(importlib.util.find_spec("bitsandbytes") is None, reason="needs bitsandbytes")
needs_transformers = pytest.mark.skipif(importlib.util.find_spec("transformers") is None,
                                        reason="needs transformers")


class Net(nn.Module):
    """Parameters w0..w3 of `SHAPES` (names bind the directions)."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        for i, shape in enumerate(SHAPES):
            self.register_parameter(f"w{i}", nn.Parameter(torch.randn(shape, generator=g) * 0.1))


def directions() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(7)
    d = {f"w{i}": torch.randn(shape, generator=g, dtype=torch.float64) for i, shape in enumerate(SHAPES)}
    d["w3"].zero_()  # a zero direction: the penalty is a plain L2 pull
    return d


@pytest.mark.parametrize("penalty", ["orthogonal", "parallel", "full"])
@pytest.mark.parametrize("layout", ["dense", "transposed", "bf16_w0"])
def test_penalty_gradient_paths_agree_with_the_formula(penalty, layout):
    """grad + coef·R from the piece path (several pieces), the foreach path and the whole-tensor
    fallback (non-dense layouts) against the obvious formula in float64."""
    from asft_optim.functional import bind_direction
    from asft_optim.penalty import add_penalty_, add_penalty_foreach_, exact_dots

    g = torch.Generator().manual_seed(0)
    p = torch.randn(70, 90, generator=g)
    if layout == "transposed":
        p = torch.randn(90, 70, generator=g).T
    w0 = p + torch.randn(p.shape, generator=g) * 0.1
    if layout == "bf16_w0":
        w0 = w0.bfloat16()
    grad = torch.randn(p.shape, generator=g)
    bound = bind_direction(torch.randn(p.shape, generator=g), p, "w")
    dot = exact_dots([p], [w0], [bound])[0]
    dw, d = p.double() - w0.double(), bound.v.double()
    par = (dw * d).sum() / (d * d).sum() * d
    want = grad.double() + 0.7 * {"orthogonal": dw - par, "parallel": par, "full": dw}[penalty]
    got = grad.clone()
    add_penalty_(got, p, w0, bound, dot, 0.7, penalty, piece=1000)
    torch.testing.assert_close(got.double(), want, rtol=1e-6, atol=1e-6)
    if layout == "dense":
        batched = [grad.clone()]
        add_penalty_foreach_(batched, [p], [w0], [bound.v], [float(dot) * bound.inv_nv2], 0.7, penalty)
        torch.testing.assert_close(batched[0].double(), want, rtol=1e-6, atol=1e-6)


def _bnb(name: str, **kw) -> Callable[[list], torch.optim.Optimizer]:
    def make(params):
        import bitsandbytes as bnb
        return getattr(bnb.optim, name)(params, lr=1e-2, min_8bit_size=0, **kw)
    return make


def _adafactor(params):
    from transformers.optimization import Adafactor
    return Adafactor(params, lr=1e-2, scale_parameter=False, relative_step=False, warmup_init=False)


def _schedule_free(params):
    import schedulefree
    opt = schedulefree.AdamWScheduleFree(params, lr=1e-2, warmup_steps=0)
    opt.train()
    return opt


def _torchao(params):
    from torchao.optim import AdamW8bit
    return AdamW8bit(params, lr=1e-2, block_size=64)


# name → (factory, max |Δ| of the parameters against the explicit loss: a few fp32 ulps; 8-bit states get
# 10× that, room for one re-quantisation difference of the moments (none happens on these inputs))
OPTIMIZERS: dict[str, tuple[Callable, float]] = {
    "adamw": (lambda ps: torch.optim.AdamW(ps, lr=1e-2, weight_decay=0.1), 1e-6),
    "adamw_fused": (lambda ps: torch.optim.AdamW(ps, lr=1e-2, fused=True), 1e-6),
    "sgd_momentum": (lambda ps: torch.optim.SGD(ps, lr=1e-2, momentum=0.9, nesterov=True), 1e-6),
    "sgd_plain": (lambda ps: torch.optim.SGD(ps, lr=1e-2), 1e-6),
    "rmsprop": (lambda ps: torch.optim.RMSprop(ps, lr=1e-3), 1e-6),
    "adafactor": (_adafactor, 1e-6),
    "bnb_adamw8bit": (_bnb("AdamW8bit"), 1e-5),
    "bnb_paged_adamw8bit": (_bnb("PagedAdamW8bit"), 1e-5),
    "bnb_lion8bit": (_bnb("Lion8bit"), 1e-5),
    "schedule_free": (_schedule_free, 1e-6),
    "torchao_adamw8bit": (_torchao, 1e-5),
}
MARKS = {"adafactor": [needs_transformers], "bnb_adamw8bit": [needs_bnb], "bnb_paged_adamw8bit": [needs_bnb],
         "bnb_lion8bit": [needs_bnb],
         "schedule_free": [pytest.mark.skipif(importlib.util.find_spec("schedulefree") is None,
                                              reason="needs schedulefree")],
         "torchao_adamw8bit": [pytest.mark.skipif(importlib.util.find_spec("torchao") is None,
                                                  reason="needs torchao")]}
PARAMS = [pytest.param(k, marks=MARKS.get(k, [])) for k in OPTIMIZERS]


def run_attached(name: str, lam: float, steps: range = range(STEPS), *, net: Net | None = None,
                 opt: torch.optim.Optimizer | None = None, penalty: str = "orthogonal"):
    """Steps of the optimizer with the penalty attached (λ = None: bare), task gradients only."""
    net = Net() if net is None else net
    if opt is None:
        opt = OPTIMIZERS[name][0](list(net.parameters()))
        if lam is not None:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # the zero direction warns
                attach(opt, net, anchors=directions(), asft_lambda=lam, penalty=penalty)
    params = list(net.parameters())
    for t in steps:
        for i, (p, g) in enumerate(zip(params, task_grads(params, t))):
            p.grad = None if i in SKIP.get(t, ()) else g
        opt.step()
    return net, opt


def run_explicit(name: str, lam: float, penalty: str = "orthogonal") -> Net:
    """The same optimizer on the gradient of the explicit loss (penalty by autograd in float64)."""
    net = Net()
    params = list(net.parameters())
    w0s = [p.detach().double().clone() for p in params]
    dirs = list(directions().values())
    opt = OPTIMIZERS[name][0](params)
    for t in range(STEPS):
        for i, (p, g) in enumerate(zip(params, task_grads(params, t))):
            x = p.detach().double().requires_grad_()
            (gp,) = torch.autograd.grad(lam * explicit_penalty(x, w0s[i], dirs[i], penalty), x)
            task = torch.zeros_like(gp) if i in SKIP.get(t, ()) else g.double()
            p.grad = (task + gp).float()
        opt.step()
    return net


def _max_diff(a: Net, b: Net) -> float:
    return max(float((x.detach() - y.detach()).abs().max()) for x, y in zip(a.parameters(), b.parameters()))


@pytest.mark.parametrize("name", PARAMS)
def test_attach_equals_the_optimizer_on_the_explicit_loss(name):
    got, _ = run_attached(name, LAM)
    want = run_explicit(name, LAM)
    plain, _ = run_attached(name, None)
    diff, effect = _max_diff(got, want), _max_diff(want, plain)
    assert diff <= OPTIMIZERS[name][1], (diff, effect)
    assert effect > 50 * max(diff, OPTIMIZERS[name][1] / 10)  # the penalty moved the run: the check has teeth


@pytest.mark.parametrize("name", PARAMS)
def test_lambda_zero_is_the_bare_optimizer_bitwise(name):
    got, opt = run_attached(name, 0.0)
    bare, bare_opt = run_attached(name, None)
    for (n, a), b in zip(got.named_parameters(), bare.parameters()):
        assert torch.equal(a, b), n
        st, bare_st = opt.state[a], bare_opt.state[b]
        for key, value in bare_st.items():
            if isinstance(value, torch.Tensor) and value.dtype.is_floating_point and value.dim() > 0:
                assert torch.equal(st[key].float(), value.float()), (n, key)


@pytest.mark.parametrize("name", PARAMS)
def test_state_dict_round_trip_mid_run_continues_bitwise(name):
    whole, _ = run_attached(name, LAM)
    first, opt = run_attached(name, LAM, range(3))
    saved = copy.deepcopy(opt.state_dict())
    assert all(W0_KEY in s for s in saved["state"].values())  # W0 travels in the optimizer's own state_dict
    net = copy.deepcopy(first)  # a fresh process: new parameters, new optimizer, attach, load
    fresh = OPTIMIZERS[name][0](list(net.parameters()))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        attach(fresh, net, anchors=directions(), asft_lambda=LAM)
    fresh.load_state_dict(saved)
    resumed, _ = run_attached(name, LAM, range(3, STEPS), net=net, opt=fresh)
    for (n, a), b in zip(resumed.named_parameters(), whole.parameters()):
        assert torch.equal(a, b), n


def _attached_adamw(lam: float = LAM, net: Net | None = None, anchors=None, **kw):
    net = Net() if net is None else net
    opt = torch.optim.AdamW(net.parameters(), lr=1e-2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        handle = attach(opt, net, anchors=directions() if anchors is None else anchors, asft_lambda=lam, **kw)
    return net, opt, handle


@pytest.mark.parametrize("name", [pytest.param("adamw"), pytest.param("bnb_adamw8bit", marks=needs_bnb)])
@pytest.mark.parametrize("change", ["lambda", "anchors", "penalty"])
def test_resume_with_other_anchors_or_lambda_is_refused(name, change):
    _, opt = run_attached(name, LAM, range(2))
    saved = copy.deepcopy(opt.state_dict())
    net = Net()
    fresh = OPTIMIZERS[name][0](list(net.parameters()))
    other = directions()
    if change == "anchors":
        other["w0"] = other["w0"] * 2
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        attach(fresh, net, anchors=other, asft_lambda=LAM * (2 if change == "lambda" else 1),
               penalty="parallel" if change == "penalty" else "orthogonal")
    what = {"lambda": "asft_lambda", "anchors": "anchors", "penalty": "penalty"}[change]
    # torch's optimizers refuse at load_state_dict; bitsandbytes' (no load hooks) at the next step
    with pytest.raises(ValueError, match=f"cannot resume: .*{what}"):
        fresh.load_state_dict(saved)
        fresh.step()


@needs_bnb
def test_bnb_load_is_noticed_without_torch_hooks():
    """bitsandbytes' load_state_dict runs none of torch's hooks: W0 comes back, stored bf16 again."""
    _, opt = run_attached("bnb_adamw8bit", LAM, range(2))
    saved = copy.deepcopy(opt.state_dict())
    stored = {k: s[W0_KEY].dtype for k, s in saved["state"].items()}
    net = Net()
    fresh = OPTIMIZERS["bnb_adamw8bit"][0](list(net.parameters()))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        attach(fresh, net, anchors=directions(), asft_lambda=LAM)
    fresh.load_state_dict(saved)
    ps = list(net.parameters())
    for i, p in enumerate(ps):
        p.grad = task_grads(ps, 2)[i]
    fresh.step()
    got = {i: fresh.state[p][W0_KEY].dtype for i, p in enumerate(ps)}
    assert got == stored


def test_none_grad_rule_and_drift():
    net, opt, handle = _attached_adamw()
    params = dict(net.named_parameters())
    for t in range(3):
        for p, g in zip(params.values(), task_grads(list(params.values()), t)):
            p.grad = g
        opt.step()
    w1 = params["w1"]
    w1.grad = None
    before = w1.detach().clone()
    opt.step()  # w1 has W0 and λ > 0: it steps on the penalty alone
    assert not torch.equal(w1, before)
    drift = handle.drift()
    assert set(drift) == {f"w{i}" for i in range(len(SHAPES))}
    d = directions()["w0"]
    dw = params["w0"].detach().double() - opt.state[params["w0"]][W0_KEY].double()
    cos = float((dw * d).sum() / (dw.norm() * d.norm()))
    assert drift["w0"].cos == pytest.approx(cos, rel=1e-6)  # the bound direction is fp32 (d rounded)
    assert drift["w3"].orth_ratio == 1.0  # zero direction


def test_per_group_lambda_and_detach():
    net = Net()
    named = dict(net.named_parameters())
    groups = [{"params": [named["w0"], named["w1"]]}, {"params": [named["w2"], named["w3"]], "asft_lambda": 0.0}]
    opt = torch.optim.AdamW(groups, lr=1e-2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        handle = attach(opt, net, anchors=directions(), asft_lambda=LAM)
    assert [g["asft_lambda"] for g in opt.param_groups] == [LAM, 0.0]
    ref = Net()
    ref_named = dict(ref.named_parameters())
    ref_opt = torch.optim.AdamW([{"params": [ref_named["w0"], ref_named["w1"]]},
                                 {"params": [ref_named["w2"], ref_named["w3"]]}], lr=1e-2)
    for t in range(3):
        for ps in (list(named.values()), list(ref_named.values())):
            for p, g in zip(ps, task_grads(ps, t)):
                p.grad = g
        opt.step()
        ref_opt.step()
    assert torch.equal(named["w2"], ref_named["w2"])  # λ = 0 in its group: the bare step
    assert not torch.equal(named["w0"], ref_named["w0"])
    handle.detach()
    assert attached(opt) is None
    assert all(W0_KEY not in s for s in opt.state.values())
    assert all("asft_lambda" not in g for g in opt.param_groups)
    snap = [p.detach().clone() for p in named.values()]
    ref_snap = copy.deepcopy(ref_opt.state_dict())
    opt.load_state_dict(ref_snap)  # bare again: loads a bare optimizer's state
    for p, q in zip(named.values(), ref_named.values()):
        p.data.copy_(q)
    for ps in (list(named.values()), list(ref_named.values())):
        for p, g in zip(ps, task_grads(ps, 9)):
            p.grad = g
    opt.step()
    ref_opt.step()
    assert all(torch.equal(p, q) for p, q in zip(named.values(), ref_named.values()))
    assert snap  # parameters were captured before the load


def test_closure_sees_the_penalty():
    """step(closure): the penalty joins the gradient the closure computes."""
    net, opt, _ = _attached_adamw()
    ref, ref_opt, _ = _attached_adamw()
    for t in range(3):
        ps = list(net.parameters())

        def closure(ps=ps, t=t):
            for p, g in zip(ps, task_grads(ps, t)):
                p.grad = g
            return torch.zeros(())

        opt.step(closure)
        rps = list(ref.parameters())
        for p, g in zip(rps, task_grads(rps, t)):
            p.grad = g
        ref_opt.step()
    assert all(torch.equal(a, b) for a, b in zip(net.parameters(), ref.parameters()))


def test_refusals():
    net = Net()
    with pytest.raises(TypeError, match="AsFTAdamW"):
        attach(AsFTAdamW(net.named_parameters(), anchors=directions()), net, anchors=directions())
    opt = torch.optim.AdamW(net.parameters())
    with pytest.raises(ValueError, match="none of the optimizer"):
        attach(opt, net, anchors={"other": torch.ones(2)}, allow_unanchored=True)
    assert opt.param_groups[0].keys() == torch.optim.AdamW(Net().parameters()).param_groups[0].keys()  # untouched
    with pytest.raises(ValueError, match="no direction for 1 trainable parameter"):
        attach(opt, net, anchors={k: v for k, v in directions().items() if k != "w2"})
    with pytest.raises(ValueError, match="Invalid asft_lambda"):
        attach(opt, net, anchors=directions(), asft_lambda=-1.0)
    stray = nn.Parameter(torch.zeros(3))
    with pytest.raises(ValueError, match="does not have"):
        attach(torch.optim.AdamW([stray, *net.parameters()]), net, anchors=directions())
    _, opt2, _ = _attached_adamw(net=net)
    with pytest.raises(ValueError, match="already has"):
        attach(opt2, net, anchors=directions())


def test_allow_unanchored_and_groups_added_later():
    net = Net()
    extra = nn.Linear(2, 2)
    net.extra = extra
    opt = torch.optim.AdamW(list(Net.parameters(net))[:len(SHAPES)], lr=1e-2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        handle = attach(opt, net, anchors=directions(), asft_lambda=LAM, allow_unanchored=True)
    opt.add_param_group({"params": list(extra.parameters())})
    ps = list(net.parameters())
    for p, g in zip(ps, task_grads(ps, 0)):
        p.grad = g
    opt.step()
    assert opt.param_groups[1]["asft_param_names"] == ["extra.weight", "extra.bias"]
    assert set(handle.drift()) == {f"w{i}" for i in range(len(SHAPES))}


def test_anchors_from_a_file(tmp_path):
    path = tmp_path / "d.safetensors"
    Anchors.from_tensors(directions()).save(path)
    net, opt, handle = _attached_adamw(anchors=str(path))
    assert opt.param_groups[0]["asft_anchors"] == Anchors.load(path).fingerprint
    assert handle.anchors.fingerprint == Anchors.load(path).fingerprint


def test_deepspeed_zero_is_refused_when_the_engine_is_built_or_at_the_step():
    """ZeRO replaces the client optimizer's tensors by flat partitions: `zero.initialize` /
    `check_client` refuse an attached optimizer; a group flattened behind attach's back fails at
    the next step with a message naming the cause."""
    from asft_optim.zero import check_client

    net, opt, _ = _attached_adamw()
    with pytest.raises(ValueError, match="attach does not follow"):
        check_client(opt, {"zero_optimization": {"stage": 2}})
    flat = nn.Parameter(torch.cat([p.detach().reshape(-1) for p in net.parameters()]))
    flat.grad = torch.zeros_like(flat)
    opt.param_groups[0]["params"] = [flat]  # what ZeRO-1/2 does to each group
    with pytest.raises(RuntimeError, match="DeepSpeed ZeRO flattens"):
        opt.step()


def test_grad_scaler_unscales_before_the_penalty():
    """torch's fused AdamW takes GradScaler's scale itself; attached, it lets the scaler unscale
    first, so the penalty joins unscaled gradients (the scale is a power of two: exact)."""
    runs = []
    for scaled in (False, True):
        net = Net()
        opt = torch.optim.AdamW(net.parameters(), lr=1e-2, fused=True)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            attach(opt, net, anchors=directions(), asft_lambda=LAM)
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10)
        scaler.scale(torch.zeros(()))  # the scaler's lazy init (a loss would be scaled here)
        ps = list(net.parameters())
        for t in range(4):
            for p, g in zip(ps, task_grads(ps, t)):
                p.grad = g * 2.0 ** 10 if scaled else g
            if scaled:
                scaler.step(opt)
                scaler.update()
            else:
                opt.step()
        runs.append([p.detach().clone() for p in ps])
    assert all(torch.equal(a, b) for a, b in zip(*runs))
