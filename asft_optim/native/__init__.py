"""The AsFT AdamW step as one native pass over a list of fp32 or bf16 CPU tensors (C++, built on first use).

`asft_adamw_native_` does, per tensor, what `functional.penalised_grads_reference` followed by
torch's AdamW does, in a single read of p, g, m, s, W0 and v and a single write of p, m, s, and
returns the next step's ⟨v, p_new - W0⟩ (terms v·(p - W0) in fp32, as the penalty's own ΔW, summed
in float64); `dots_native` is the same fold without the update (its result for unchanged tensors
equals the carried one bitwise). The fold sums blocks of `BLOCK` elements, counted from each
tensor's first element in memory order, in block order: the result is the same for any number of
threads. The library carries portable loops and, where the build targets AVX-512 (`-march=native` on
such a CPU), explicit 16-lane loops that give the same bits; `load().VECTOR` names the ones in use
("avx512" or "portable"). See `build` for the build and its cache.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor

from .build import BuildInfo, NativeUnavailable, available, build_info, cache_dir, load, reason

__all__ = ["asft_adamw_native_", "step_supported_", "dots_native", "dots_supported", "available", "reason",
           "build_info", "cache_dir", "load", "BuildInfo", "NativeUnavailable", "BLOCK"]

BLOCK = 1 << 14  # elements per fold block (kBlock in asft_adamw.cpp)
_PENALTY_CODES = {"orthogonal": 0, "parallel": 1, "full": 2}  # the order of functional.PENALTIES


def asft_adamw_native_(params: Sequence[Tensor], grads: Sequence[Tensor], exp_avgs: Sequence[Tensor],
                       exp_avg_sqs: Sequence[Tensor], w0s: Sequence[Tensor], directions: Sequence[Tensor],
                       cs: Tensor, steps: Sequence[Tensor], *, lr: float, beta1: float, beta2: float,
                       eps: float, weight_decay: float, coef: float, penalty: str,
                       maximize: bool) -> Tensor:
    """One AdamW step on g̃ = g + coef·R per tensor, in place; returns ⟨v, p_new - W0⟩ per tensor.

    Args:
        params, grads, exp_avgs, exp_avg_sqs: fp32 CPU tensors, dense (any dense layout:
            contiguous, transposed, channels_last), every role with the param's shape and strides.
        w0s: W0 per tensor, fp32 or bf16, laid out like its param.
        directions: the bound direction v per tensor (`functional.BoundDirection.v`), fp32 or bf16.
        cs: float64 of shape (T,): c = ⟨v, ΔW⟩/‖v‖² per tensor (0 where c is unused).
        steps: per tensor a one-element fp32/fp64 CPU tensor, the step count before this step; the
            kernel increments it (as torch's AdamW does) and uses the new count.
        lr, beta1, beta2, eps, weight_decay, maximize: as for `torch.optim.AdamW` (decoupled decay).
        coef: ±2λ (negative under maximize; the penalty is always minimised).
        penalty: "orthogonal" (R = ΔW - c·v), "parallel" (R = c·v) or "full" (R = ΔW).
    Returns:
        float64 of shape (T,): ⟨v, p_new - W0⟩ of the values as stored, folded as `dots_native`.
    Raises:
        ValueError naming the list and index of a tensor of the wrong dtype, device, shape or layout
        (before anything is written).
        NativeUnavailable when the kernel cannot be built here (check `available()` first).
    """
    return _step(params, grads, exp_avgs, exp_avg_sqs, w0s, directions, cs, steps, lr, beta1, beta2, eps,
                 weight_decay, coef, penalty, maximize, False)[0]


def step_supported_(params: Sequence[Tensor], grads: Sequence[Tensor], exp_avgs: Sequence[Tensor],
                    exp_avg_sqs: Sequence[Tensor], w0s: Sequence[Tensor], directions: Sequence[Tensor],
                    cs: Tensor, steps: Sequence[Tensor], *, lr: float, beta1: float, beta2: float, eps: float,
                    weight_decay: float, coef: float, penalty: str, maximize: bool) -> tuple[Tensor, list[int]]:
    """`asft_adamw_native_` on the tensors it supports; the others are left untouched (state steps
    too) and their indices returned: (dots, skipped), dots[i] = 0 for a skipped i."""
    return _step(params, grads, exp_avgs, exp_avg_sqs, w0s, directions, cs, steps, lr, beta1, beta2, eps,
                 weight_decay, coef, penalty, maximize, True)


def _step(params, grads, exp_avgs, exp_avg_sqs, w0s, directions, cs, steps, lr, beta1, beta2, eps,
          weight_decay, coef, penalty, maximize, skip):
    code = _PENALTY_CODES.get(penalty)
    if code is None:
        raise ValueError(f"unknown penalty {penalty!r}; expected one of {tuple(_PENALTY_CODES)}")
    return load().asft_adamw(params, grads, exp_avgs, exp_avg_sqs, w0s, directions, cs, steps,
                             float(lr), float(beta1), float(beta2), float(eps), float(weight_decay),
                             float(coef), code, bool(maximize), skip)


def dots_native(params: Sequence[Tensor], w0s: Sequence[Tensor], directions: Sequence[Tensor]) -> Tensor:
    """⟨v, p - W0⟩ per tensor, float64 of shape (T,), with exactly `asft_adamw_native_`'s fold.

    Same layout rules as `asft_adamw_native_` for params, w0s and directions (ValueError otherwise).
    """
    return load().dots(params, w0s, directions, False)[0]


def dots_supported(params: Sequence[Tensor], w0s: Sequence[Tensor],
                   directions: Sequence[Tensor]) -> tuple[Tensor, list[int]]:
    """`dots_native` of the tensors it supports: (dots, skipped indices), dots[i] = 0 for a skipped i."""
    return load().dots(params, w0s, directions, True)
