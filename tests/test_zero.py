"""The DeepSpeed ZeRO kind in one process: segments from DeepSpeed's own bookkeeping objects, a
ZeRO-1/2-style flat partition stepped against the dense path, config checks (exact messages).
The 2-rank runs with real DeepSpeed engines are in tests/distributed/test_zero.py."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from asft_optim import Anchors, AsFTAdamW
from asft_optim.binding import Kind
from asft_optim.zero import Segment, check_config, find_segments, lora_refusal

tensor_fragment = pytest.importorskip("deepspeed.utils.tensor_fragment")


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 3), nn.Tanh(), nn.Linear(3, 2))


def _anchors(model: nn.Module) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(4)
    return {n: torch.randn(p.shape, generator=gen) for n, p in model.named_parameters()}


def _link(params: list[nn.Parameter], flat: torch.Tensor, start: int, size: int, offsets: list[int]) -> None:
    """What DeepSpeed's `link_hp_params` does for the rank whose partition is flat[...] =
    elements start:start+size of the concatenated group: a `_hp_mapping` per overlapping parameter."""
    for p, lp_start in zip(params, offsets):
        if lp_start < start + size and lp_start + p.numel() > start:
            p._hp_mapping = tensor_fragment.get_hp_fragment_mapping(p, lp_start, flat, {}, {}, False, 0,
                                                                    start, size)


def test_segments_come_from_deepspeed_bookkeeping():
    model = _model()
    params = list(model.parameters())  # 15, 3, 6, 2 elements: 26 in all, two partitions of 13
    offsets = [0, 15, 18, 24]
    flat = torch.zeros(13)
    _link(params, flat, 13, 13, offsets)  # rank 1's partition: elements 13..25
    segs = find_segments(flat, list(model.named_parameters()))
    assert segs == [Segment("0.weight", 0, 2, 13, torch.Size([3, 5])), Segment("0.bias", 2, 3, 0, torch.Size([3])),
                    Segment("2.weight", 5, 6, 0, torch.Size([2, 3])), Segment("2.bias", 11, 2, 0, torch.Size([2]))]
    assert find_segments(torch.zeros(13), list(model.named_parameters())) == []  # another partition


def _zero1_step(model: nn.Module, opt: AsFTAdamW, flat: torch.Tensor, state: dict, grads: list[torch.Tensor]) -> None:
    """One ZeRO-1 step on one rank holding the whole group (+ 2 padding elements), as DeepSpeed does
    it: the flat gradient, the client step on the partition, the copy back to the model."""
    flat.grad = torch.cat([g.reshape(-1) for g in grads] + [torch.zeros(2)])
    opt.step()
    with torch.no_grad():
        for p in model.parameters():
            m = p._hp_mapping
            p.view(-1)[m.lp_fragment_address.start:][:m.lp_fragment_address.numel].copy_(m.hp_fragment)


@pytest.mark.parametrize("penalty, directions", [("orthogonal", "fp32"), ("parallel", "fp32"), ("full", "fp32"),
                                                 ("orthogonal", "subnormal"), ("orthogonal", "fp64")])
def test_a_flat_partition_steps_like_the_dense_tensors(penalty, directions, monkeypatch):
    # ZeRO partitions take the chunked torch path (their dots are all-reduced fp32 partials); the
    # dense twin must take it too for a bitwise comparison, not the native CPU kernel
    from asft_optim import functional
    monkeypatch.setattr(functional, "_native_applies", lambda t, kw: False)
    dense, zero = _model(), _model()
    dirs = _anchors(dense)
    if directions == "subnormal":  # fp32 subnormals: the rescale by 2**140 must stay exact
        dirs = {n: d * 2.0 ** -140 for n, d in dirs.items()}
    if directions == "fp64":
        dirs = {n: d.double() for n, d in dirs.items()}
    anchors = Anchors.from_tensors(dirs)
    kw = dict(lr=5e-2, anchors=anchors, asft_lambda=3.0, penalty=penalty)
    ref = AsFTAdamW(dense.named_parameters(), **kw)
    opt = AsFTAdamW(zero.named_parameters(), **kw)
    params = list(zero.parameters())
    flat = torch.cat([p.detach().reshape(-1) for p in params] + [torch.zeros(2)]).requires_grad_()
    _link(params, flat, 0, flat.numel(), [0, 15, 18, 24])
    opt.param_groups[0]["params"] = [flat]
    gen = torch.Generator().manual_seed(9)
    for step in range(5):
        grads = [torch.randn(p.shape, generator=gen) for p in params]
        for p, g in zip(dense.parameters(), grads):
            p.grad = g.clone()
        ref.step()
        _zero1_step(zero, opt, flat, opt.state, grads)
        if step == 2:  # a state_dict round trip mid-run (what engine.save/load_checkpoint does)
            sd = copy.deepcopy(opt.state_dict())
            opt.load_state_dict(sd)
    for (n, p), q in zip(dense.named_parameters(), zero.parameters()):
        assert torch.equal(p.detach(), q.detach()), n  # one rank: the same folds, bitwise
    assert torch.equal(flat.detach()[-2:], torch.zeros(2))  # padding stays 0
    assert all(opt.records.binding(n).kind is Kind.ZERO for n, _ in zero.named_parameters())
    for n, d in ref.drift().items():
        assert opt.drift()[n].as_dict() == pytest.approx(d.as_dict(), rel=1e-12)


def test_zero3_parameter_binds_without_reading_its_direction():
    model = _model()
    anchors = _anchors(model)
    w = model[0].weight
    w.ds_id, w.ds_shape, w.ds_numel = 0, w.shape, w.numel()  # what ZeRO-3's zero.Init leaves
    reads = []
    a = Anchors.from_tensors(anchors)
    assert a.fingerprint  # the fingerprint reads every tensor once, when first asked for
    a.get_stored = lambda key: reads.append(key) or Anchors.get_stored(a, key)  # type: ignore[method-assign]
    opt = AsFTAdamW(model.named_parameters(), anchors=a)
    assert opt.records.binding("0.weight").kind is Kind.ZERO and opt.records.binding("0.weight").direction is None
    assert "0.weight" not in reads
    w.ds_shape = torch.Size([5, 3])
    with pytest.raises(ValueError, match=r"^direction for '0.weight' has shape \(3, 5\) but the parameter has "
                                         r"shape \(5, 3\)$"):
        AsFTAdamW(model.named_parameters(), anchors=anchors)


BASE = {"zero_optimization": {"stage": 2}, "zero_allow_untested_optimizer": True}


@pytest.mark.parametrize("config, message", [
    ({"zero_optimization": {"stage": 3}},
     'DeepSpeed ZeRO stage 3 accepts AsFTAdamW as its client optimizer only with "zero_allow_untested_optimizer": '
     "true in the DeepSpeed config (it is not in DeepSpeed's list of tested optimizers); add that key"),
    ({**BASE, "zero_optimization": {"stage": 2, "offload_optimizer": {"device": "nvme"}}},
     '"offload_optimizer": {"device": "nvme"} is not supported with AsFTAdamW: DeepSpeed swaps partitions and '
     'their state to disk; use "device": "cpu"'),
    ({**BASE, "zero_optimization": {"stage": 1, "offload_optimizer": {"device": "cpu"}}},
     'ZeRO-Offload ("offload_optimizer": {"device": "cpu"}) steps AsFTAdamW on the CPU partitions only with '
     '"zero_force_ds_cpu_optimizer": false in the DeepSpeed config; add that key'),
    ({**BASE, "zero_optimization": {"stage": 2, "elastic_checkpoint": True}},
     '"elastic_checkpoint": true is not supported with AsFTAdamW: its restore bypasses the check that a resume '
     "uses the same anchors and λ; remove the key"),
    ({**BASE, "optimizer": {"type": "AdamW"}},
     'the DeepSpeed config has an "optimizer" section: DeepSpeed would build that optimizer instead of AsFTAdamW; '
     "remove the section and pass the AsFTAdamW as the client optimizer"),
])
def test_config_errors_name_the_key(config, message):
    with pytest.raises(ValueError) as e:
        check_config(config)
    assert str(e.value) == message


def test_config_accepted_and_lora_refused():
    check_config({"zero_optimization": {"stage": 0}})
    check_config(BASE)
    check_config({**BASE, "zero_force_ds_cpu_optimizer": False,
                  "zero_optimization": {"stage": 3, "offload_optimizer": {"device": "cpu"}}})
    with pytest.raises(NotImplementedError) as e:
        check_config(BASE, has_lora=True)
    assert str(e.value) == lora_refusal(2)
    assert str(e.value).startswith("LoRA adapters under DeepSpeed ZeRO stage 2 are not supported by AsFTAdamW")


def test_original_parameters_are_held_weakly():
    """A parameter swapped out of the optimizer (accelerate does it for FSDP2) is freed."""
    import gc
    import weakref
    model = _model()
    opt = AsFTAdamW(model.named_parameters(), anchors=_anchors(model))
    old = weakref.ref(model[0].weight)
    opt.param_groups[0]["params"] = [p.detach().clone().requires_grad_() for p in opt.param_groups[0]["params"]]
    del model
    gc.collect()
    assert old() is None and opt.records.zero.param("0.weight") is None


def test_triton_groups_are_refused_under_zero():
    """ZeRO partitions never take the Triton path: refused by `check_client` when the engine is
    built, and at the step of a group ZeRO owns."""
    from asft_optim.zero import check_client
    model = _model()
    opt = AsFTAdamW(model.named_parameters(), anchors=_anchors(model), impl="triton")
    with pytest.raises(ValueError, match="impl='triton' does not step DeepSpeed ZeRO partitions"):
        check_client(opt, {"zero_optimization": {"stage": 2}, "zero_allow_untested_optimizer": True})
    params = list(model.parameters())
    flat = torch.cat([p.detach().reshape(-1) for p in params] + [torch.zeros(2)]).requires_grad_()
    _link(params, flat, 0, flat.numel(), [0, 15, 18, 24])
    opt.param_groups[0]["params"] = [flat]
    flat.grad = torch.ones_like(flat)
    before = flat.detach().clone()
    with pytest.raises(ValueError, match="impl='triton' does not step DeepSpeed ZeRO partitions"):
        opt.step()
    assert torch.equal(flat.detach(), before)
