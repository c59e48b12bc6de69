"""Test oracle: AdamW on the explicit loss L_task + λ‖R(W - W0)‖², differentiated by autograd in float64.

The task loss is a deterministic quadratic whose gradient at step t is X_t + W (X_t drawn from a seeded
generator), so the same gradients can be produced for the optimizer under test in any dtype.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor


def task_grads(params: list[Tensor], step: int, seed: int = 0) -> list[Tensor]:
    """∂L_task/∂W at `step` for each parameter, in the parameter's dtype: X_t + W."""
    g = torch.Generator().manual_seed(seed * 1000 + step)
    out = []
    for p in params:
        x = torch.randn(p.shape, generator=g, dtype=torch.float64)
        out.append((x + p.detach().double()).to(p.dtype))
    return out


def task_loss(params: list[Tensor], step: int, seed: int = 0, unused: set[int] = frozenset()) -> Tensor:
    """L_task = Σ ⟨X_t, W⟩ + ½‖W‖² (float64 params), leaving out the parameters at `unused`
    (their X_t is drawn all the same, so the others' stay those of `task_grads`)."""
    g = torch.Generator().manual_seed(seed * 1000 + step)
    total = torch.zeros((), dtype=torch.float64)
    for i, p in enumerate(params):
        x = torch.randn(p.shape, generator=g, dtype=torch.float64)
        if i not in unused:
            total = total + (x * p).sum() + 0.5 * (p * p).sum()
    return total


def penalty(w: Tensor, w0: Tensor, d: Tensor, kind: str) -> Tensor:
    """‖R(ΔW)‖² in float64 with R the orthogonal, parallel or full part of ΔW relative to d."""
    dw = (w - w0).reshape(-1)
    dd = d.double().reshape(-1)
    n2 = (dd * dd).sum()
    par = (dw @ dd) / n2 * dd if float(n2) > 0 else torch.zeros_like(dw)
    r = {"orthogonal": dw - par, "parallel": par, "full": dw}[kind]
    return (r * r).sum()


def run_oracle(init: list[Tensor], dirs: list[Tensor], lams: list[float], steps: int, *, kind: str = "orthogonal",
               skip: dict[int, set[int]] | None = None, maximize: bool = False, seed: int = 0,
               lr_schedule: list[float] | None = None, lam_schedule: list[float] | None = None,
               kind_schedule: list[str] | None = None, after_step: Callable[[int, list[Tensor]], None] | None = None,
               **adamw_kwargs) -> list[Tensor]:
    """Parameters after `steps` steps of float64 torch.optim.AdamW on the explicit loss.

    lams: λ per parameter. skip: step -> indices of parameters whose task gradient is None at that
    step: a parameter with λ > 0 that stepped before takes the penalty's gradient alone (AsFTAdamW's
    rule: its W0 exists), any other takes no step.
    lr_schedule: learning rate per step (overrides lr), to mirror a scheduler.
    lam_schedule, kind_schedule: λ of every parameter (overrides lams) and penalty kind, per step.
    after_step(t, ws): called after step t with the float64 parameters (to mirror an outside write).
    """
    ws = [torch.nn.Parameter(t.detach().double().clone()) for t in init]
    w0s = [t.detach().double().clone() for t in init]
    opt = torch.optim.AdamW(ws, maximize=maximize, **adamw_kwargs)
    sign = -1.0 if maximize else 1.0
    started: set[int] = set()  # parameters that have stepped (AsFTAdamW has their W0)
    for t in range(steps):
        if lr_schedule is not None:
            for group in opt.param_groups:
                group["lr"] = lr_schedule[t]
        opt.zero_grad(set_to_none=True)
        skipped = skip.get(t, set()) if skip else set()
        lams_t = [lam_schedule[t]] * len(ws) if lam_schedule is not None else lams
        kind_t = kind_schedule[t] if kind_schedule is not None else kind
        loss = task_loss(ws, t, seed, skipped)
        for i, (w, w0, d, lam) in enumerate(zip(ws, w0s, dirs, lams_t)):
            if lam and (i not in skipped or i in started):
                loss = loss + sign * lam * penalty(w, w0, d, kind_t)
        grads = torch.autograd.grad(loss, ws, allow_unused=True)
        for i, (w, g) in enumerate(zip(ws, grads)):
            if i not in skipped or (lams_t[i] and i in started):
                w.grad = torch.zeros_like(w) if g is None else g
                started.add(i)
        opt.step()
        if after_step is not None:
            with torch.no_grad():
                after_step(t, ws)
    return [w.detach() for w in ws]
