"""Distributed helpers that need no second process: the flattening check, and the atomic
`torch.distributed.checkpoint` save/resume used by the same script on one process."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from asft_optim import AsFTAdamW
from asft_optim.distributed import all_reduce_dots, latest_checkpoint, load_checkpoint, save_checkpoint


def _model(seed: int) -> nn.Module:
    """Weights exactly representable in bf16, so that W0 is stored in bf16."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 1))
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(p.bfloat16().float())
    return model


def _anchors(model: nn.Module) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(5)
    return {n: torch.randn(p.shape, generator=gen) for n, p in model.named_parameters()}


def _train(model: nn.Module, opt: AsFTAdamW, steps: range) -> None:
    for step in steps:
        gen = torch.Generator().manual_seed(step)
        x, y = torch.randn(6, 4, generator=gen), torch.randn(6, 1, generator=gen)
        opt.zero_grad()
        (model(x) - y).square().mean().backward()
        opt.step()


def test_groups_flattened_by_something_else_than_zero_are_refused():
    model = _model(0)
    opt = AsFTAdamW(model.named_parameters(), anchors=_anchors(model))
    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()]).requires_grad_()
    flat.grad = torch.ones_like(flat)
    opt.param_groups[0]["params"] = [flat]  # no ZeRO bookkeeping on the original parameters
    with pytest.raises(RuntimeError, match=r"^param group 0 holds 1 tensor\(s\) but 4 parameter name\(s\): its "
                                           r"parameters were replaced after the optimizer was built by something "
                                           r"other than DeepSpeed ZeRO\."):
        opt.step()


def test_all_reduce_dots_leaves_unsharded_tensors_alone():
    params = [torch.zeros(3), torch.zeros(2, 2)]
    dots = torch.tensor([1.5, -2.0])
    assert torch.equal(all_reduce_dots(params, dots), torch.tensor([1.5, -2.0]))
    with pytest.raises(ValueError, match="2 parameters but dots has shape"):
        all_reduce_dots(params, torch.zeros(3))


def _state(model: nn.Module, opt: AsFTAdamW) -> dict[str, torch.Tensor]:
    out = {}
    for n, p in model.named_parameters():
        out[n] = p.detach().clone()
        for key in ("exp_avg", "exp_avg_sq", "w0"):
            out[f"{n}/{key}"] = opt.state[p][key].clone()
    return out


def test_checkpoint_resume_exact_and_failed_save_atomic(tmp_path, monkeypatch):
    model = _model(0)
    anchors = _anchors(model)
    opt = AsFTAdamW(model.named_parameters(), lr=1e-2, anchors=anchors)
    _train(model, opt, range(3))
    assert all(st["w0"].dtype == torch.bfloat16 for st in opt.state.values())
    first = save_checkpoint(tmp_path, 3, model, opt, extra={"next": 3})
    _train(model, opt, range(3, 4))
    from torch.distributed.checkpoint import filesystem

    def failing(self, plan, planner):
        raise OSError("disk full")

    with monkeypatch.context() as m:
        m.setattr(filesystem.FileSystemWriter, "write_data", failing)
        with pytest.raises(BaseException, match="disk full"):
            save_checkpoint(tmp_path, 4, model, opt)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "step_00000003"]
    assert latest_checkpoint(tmp_path) == first
    _train(model, opt, range(4, 6))
    expected = _state(model, opt)

    fresh = _model(1)
    fresh_opt = AsFTAdamW(fresh.named_parameters(), lr=1e-2, anchors=anchors)
    info = load_checkpoint(latest_checkpoint(tmp_path), fresh, fresh_opt)
    assert info == {"step": 3, "extra": {"next": 3}}
    _train(fresh, fresh_opt, range(3, 6))
    got = _state(fresh, fresh_opt)
    for k in expected:
        assert torch.equal(got[k], expected[k]), k
        assert got[k].dtype == expected[k].dtype, k  # W0 keeps its bf16/fp32 storage


def test_load_checkpoint_refuses_other_anchors(tmp_path):
    model = _model(0)
    opt = AsFTAdamW(model.named_parameters(), anchors=_anchors(model))
    _train(model, opt, range(2))
    path = save_checkpoint(tmp_path, 2, model, opt)
    other = {n: -d for n, d in _anchors(model).items()}
    fresh = _model(0)
    with pytest.raises(ValueError, match="anchors"):
        load_checkpoint(path, fresh, AsFTAdamW(fresh.named_parameters(), anchors=other))


def test_load_checkpoint_names_incomplete_folder(tmp_path):
    model = _model(0)
    opt = AsFTAdamW(model.named_parameters(), anchors=_anchors(model))
    with pytest.raises(FileNotFoundError, match="not a complete distributed checkpoint"):
        load_checkpoint(tmp_path, model, opt)


# ------------------------------------------------------------- W0's storage follows the saved values
def _filled(seed: int, init: str) -> nn.Module:
    """The model of `_model` with other weights: `random` fp32 values (not exact in bf16),
    `bf16_exact` random ones, `constant` 0.25 everywhere, `zeros` (an empty skeleton, as
    `to_empty()` + zero init or a model built for loading leaves it)."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 1))
    with torch.no_grad():
        for p in model.parameters():
            if init == "bf16_exact":
                p.copy_(p.bfloat16().float())
            elif init == "constant":
                p.fill_(0.25)
            elif init == "zeros":
                p.zero_()
    return model


@pytest.mark.parametrize("saved, fresh", [
    ("random", "constant"), ("random", "zeros"), ("random", "bf16_exact"), ("random", "random"),
    ("bf16_exact", "random"), ("bf16_exact", "constant")])
def test_resume_into_any_fresh_model_is_bitwise_exact(tmp_path, saved, fresh):
    """Save after 3 steps, load into a freshly built model whose values may happen to be exact in
    bf16 (so the optimizer state that `get_state_dict` initialises holds bf16 W0), train 3 more:
    parameters, moments and W0 (values and storage dtype) equal the uninterrupted run's."""
    model = _filled(0, saved)
    anchors = _anchors(model)
    opt = AsFTAdamW(model.named_parameters(), lr=1e-2, anchors=anchors)
    _train(model, opt, range(3))
    w0_saved = {n: opt.state[p]["w0"].clone() for n, p in model.named_parameters()}
    assert all(w.dtype == (torch.bfloat16 if saved == "bf16_exact" else torch.float32)
               for w in w0_saved.values())
    path = save_checkpoint(tmp_path, 3, model, opt)
    _train(model, opt, range(3, 6))
    expected = _state(model, opt)

    other = _filled(1, fresh)
    other_opt = AsFTAdamW(other.named_parameters(), lr=1e-2, anchors=anchors)
    load_checkpoint(path, other, other_opt)
    for n, p in other.named_parameters():
        w0 = other_opt.state[p]["w0"]
        assert w0.dtype == w0_saved[n].dtype and torch.equal(w0, w0_saved[n]), n
    _train(other, other_opt, range(3, 6))
    got = _state(other, other_opt)
    for k in expected:
        assert got[k].dtype == expected[k].dtype and torch.equal(got[k], expected[k]), k
