"""The AsFT penalty gradient in PyTorch: a slow obvious reference, the fast CPU dispatch (native
kernel, else a fast chunked path).

Notation (per parameter tensor, flattened): v is the bound direction (d rescaled by a power of two,
so that max|v| is in [1, 2) and ‖v‖² cannot underflow), `inv_nv2` = 1/‖v‖² (0 when d = 0),
ΔW = p - W0 and c = ⟨v, ΔW⟩/‖v‖². The penalised quantity R is

    "orthogonal":  R = ΔW - c·v     (= C⊥ΔW, AsFT)
    "parallel":    R = c·v          (= C_aligned ΔW, the paper's ablation / AsFT_Alt)
    "full":        R = ΔW           (L2-SP)

and the gradient handed to AdamW is g̃ = g + coef·R with coef = ±2λ (negative under `maximize`,
since AdamW negates the whole gradient there and the penalty is always minimised).
"""

from __future__ import annotations

import logging
import math
import re
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal, NamedTuple, cast

import torch
from torch import Tensor
from torch.optim.adam import adam

from . import native

__all__ = ["BoundDirection", "bind_direction", "penalty_reference", "penalised_grads_reference",
           "partial_dots", "asft_adamw", "asft_adamw_", "StepTensors", "PENALTIES", "Penalty",
           "dense_flat", "rescaled", "penalty_coef"]

Penalty = Literal["orthogonal", "parallel", "full"]
PENALTIES: tuple[str, ...] = ("orthogonal", "parallel", "full")

CHUNK = 1 << 19  # elements per piece of the fused torch path: few enough calls, pieces stay in L3
FOLD_BLOCK = 1 << 14  # elements per block of a dot's fixed-order fold (below ATen's parallel grain of 2**15)


def penalty_coef(asft_lambda: float, maximize: bool) -> float:
    """coef = ±2λ, the factor of R in g̃ = g + coef·R: negative under `maximize` (AdamW negates the
    whole gradient there, and the penalty is always minimised)."""
    return (-2.0 if maximize else 2.0) * asft_lambda


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype ΔW and the dot are computed in for a parameter of `dtype`: float64 for float64
    parameters (rounding W to fp32 first would swamp a small ΔW), else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


@dataclass
class BoundDirection:
    """A direction prepared for one parameter.

    v: the direction rescaled by 2**-k, laid out like the parameter (same shape and strides),
       on its device, in the direction's stored dtype.
    inv_nv2: 1/‖v‖² as a Python float, 0.0 for an all-zero direction (then R = ΔW: an L2 pull).
    scale: 2**k, so that d = scale·v.
    """
    v: Tensor
    inv_nv2: float
    scale: float

    @property
    def is_null(self) -> bool:
        """Whether the direction is all zero (no C⊥ to take: R = ΔW, an L2 pull)."""
        return self.inv_nv2 == 0.0

    is_zero = is_null  # the old name (kept: BoundDirection is public)


def storage_w0(w: Tensor) -> Tensor:
    """W0 in bf16 when fp32 → bf16 is exact for every element, else unchanged (same strides)."""
    if w.dtype == torch.float32:
        b = w.to(torch.bfloat16)
        if torch.equal(b.float(), w):
            return b
    return w


def rescaled(d: Tensor, out: Tensor) -> tuple[Tensor, float]:
    """out ← d·2**-k with k = ⌊log2 max|d|⌋, so that max|out| ∈ [1, 2); returns (out, 2**k).

    Exact for any d down to its dtype's smallest subnormal: the power of two is applied in two halves
    (`times_pow2`), in out's dtype when it is d's, else in float64 before the cast (the
    significands fit). An all-zero d gives out = 0 and scale 1.
    """
    amax = float(d.abs().max()) if d.numel() else 0.0
    if amax == 0.0:
        return out.zero_(), 1.0
    k = math.floor(math.log2(amax))
    if d.dtype == out.dtype:  # in place, no temporary
        times_pow2(out.copy_(d.reshape(out.shape)), -k)
    else:  # float64 d kept in float32: rescale before the cast (tiny fp64 values would flush to 0)
        out.copy_(times_pow2(d.reshape(out.shape).to(torch.float64, copy=True), -k))
    return out, math.ldexp(1.0, k)


def times_pow2(x: Tensor, k: int) -> Tensor:
    """x ← x·2**k in place, exactly, in two halves so that no power of two overflows x's dtype (2**149
    does not fit in fp32, nor 2**24 in fp16); every intermediate lies between x and the result."""
    half = k // 2
    return x.mul_(math.ldexp(1.0, half)).mul_(math.ldexp(1.0, k - half))


def direction_dtype(d: torch.dtype, param: torch.dtype) -> torch.dtype:
    """The dtype a bound direction is kept in: d's, except float64 for a lower-precision parameter
    (kept in float32: the math is fp32 on every path, and the Triton kernels take no fp64)."""
    return torch.float32 if d == torch.float64 and param != torch.float64 else d


def bind_direction(d: Tensor, like: Tensor, name: str) -> BoundDirection:
    """Check a direction against its parameter and prepare it (see `BoundDirection`).

    Raises ValueError naming `name` for a shape mismatch or a non-finite entry.
    """
    if tuple(d.shape) != tuple(like.shape):
        raise ValueError(f"direction for '{name}' has shape {tuple(d.shape)} but the parameter has "
                         f"shape {tuple(like.shape)}")
    if not d.is_floating_point():
        raise ValueError(f"direction for '{name}' has dtype {d.dtype}; expected a floating dtype")
    d = d.to(like.device)
    if not bool(torch.isfinite(d).all()):
        raise ValueError(f"direction for '{name}' contains NaN or Inf")
    v, scale = rescaled(d, torch.empty_like(like, dtype=direction_dtype(d.dtype, like.dtype)))
    nv2 = float(v.double().square().sum())
    return BoundDirection(v, 1.0 / nv2 if nv2 > 0 else 0.0, scale)


def penalty_reference(p: Tensor, w0: Tensor, bound: BoundDirection, penalty: Penalty,
                      dot: Tensor | None = None) -> Tensor:
    """R for one tensor, in fp32 (fp64 for an fp64 parameter), written the obvious way (the
    oracle's twin).

    `dot`: a precomputed ⟨v, ΔW⟩ (0-d, e.g. summed over the shards of a DTensor); computed from p
    and W0 when None.
    """
    acc = acc_dtype(p.dtype)
    dw = p.to(acc) - w0.to(acc)
    v = bound.v.to(acc)
    c = ((v * dw).sum() if dot is None else dot) * bound.inv_nv2
    if penalty == "orthogonal":
        return dw - c * v
    if penalty == "parallel":
        return c * v
    if penalty == "full":
        return dw
    raise ValueError(f"unknown penalty {penalty!r}; expected one of {PENALTIES}")


@torch.no_grad()
def penalised_grads_reference(grads: list[Tensor], params: list[Tensor], w0s: list[Tensor],
                              bounds: list[BoundDirection], coef: float, penalty: Penalty,
                              dots: Sequence[Tensor | None] | Tensor | None = None) -> list[Tensor]:
    """g̃ = g + coef·R per tensor, each a new tensor in the gradient's dtype (summed in fp32, fp64
    for fp64 parameters).

    `dots`: per tensor a precomputed ⟨v, ΔW⟩ or None (see `penalty_reference`).
    """
    dots = [None] * len(params) if dots is None else dots
    return [(g.to(acc_dtype(p.dtype)) + coef * penalty_reference(p, w0, b, penalty, dot)).to(g.dtype)
            for g, p, w0, b, dot in zip(grads, params, w0s, bounds, dots, strict=True)]


class StepTensors(NamedTuple):
    """One step's tensor lists, entry i for one tensor: the input of every implementation (torch,
    native, Triton, ZeRO partitions).

    params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs (empty without amsgrad), state_steps: as
    for torch's functional `adam` (plain tensors: a DTensor's local shard, where an implementation
    steps it). w0s: W0 per tensor. directions: the bound direction per tensor. dots: per tensor
    ⟨v, p - W0⟩ at the current p, or None to compute it here exactly; or one float64 vector of all
    of them (the native kernel's previous result, kept whole). A dot carried from the previous step
    was made by the fold of the implementation that stepped the tensor: float64 from the native
    kernel, `acc_dtype(p.dtype)` from `asft_adamw_`; a shard's is the all-reduced sum of those.
    w0s, directions and dots are empty while a group's tensors are gathered, before the penalised
    ones are chosen. names: the parameter names (empty where there are none: ZeRO segments).
    """
    params: list[Tensor]
    grads: list[Tensor]
    exp_avgs: list[Tensor]
    exp_avg_sqs: list[Tensor]
    max_exp_avg_sqs: list[Tensor]
    state_steps: list[Tensor]
    w0s: list[Tensor]
    directions: list[BoundDirection]
    dots: list[Tensor | None] | Tensor
    names: Sequence[str] = ()

    def select(self, idx: Sequence[int]) -> StepTensors:
        """Entries `idx` of every list, in that order (empty lists stay empty)."""
        return StepTensors(*[[xs[i] for i in idx] if len(xs) else xs for xs in self])  # type: ignore[arg-type]


@torch.no_grad()
def asft_adamw(t: StepTensors, *, coef: float, penalty: Penalty, impl: str,
               **adam_kwargs) -> list[Tensor | None] | Tensor | None:
    """AdamW on g̃ = g + coef·R for every tensor of `t`: the one functional entry of the PyTorch paths.

    impl "reference": the obvious formula (`penalised_grads_reference`, then torch's `adam`); returns
    None. impl "torch": per tensor the native single-pass kernel (`native.asft_adamw_native_`) where it
    applies (fp32 or bf16 CPU tensors of one dense layout, fp32/bf16 W0 and v, no amsgrad or
    capturable; any carried dot: a shard's all-reduced one, a ZeRO segment's, the fallback's fp32),
    else `asft_adamw_` per device as torch's own AdamW groups tensors. impl "native": the native
    kernel on every tensor, or an error naming the one it cannot step (`_native_only`).
    Returns the carried ⟨v, p_new - W0⟩ per tensor (0-d; float64 from the native kernel, equal bitwise
    to `native.dots_native` of the new p; `acc_dtype(p.dtype)` from `asft_adamw_`, equal to
    `partial_dots`), or
    one float64 vector of them all when the native kernel stepped every tensor.
    """
    if impl == "reference":
        grads = penalised_grads_reference(t.grads, t.params, t.w0s, t.directions, coef, penalty, t.dots)
        adam(t.params, grads, t.exp_avgs, t.exp_avg_sqs, t.max_exp_avg_sqs, t.state_steps, **adam_kwargs)
        return None
    if impl == "native":
        return _native_only(t, coef, penalty, adam_kwargs)
    if impl != "torch":
        raise ValueError(f"asft_adamw: unknown impl {impl!r}; expected 'torch', 'native' or 'reference'")
    n = len(t.params)
    out: list[Tensor | None]
    if isinstance(t.dots, Tensor):  # carried whole from the native kernel's last step
        if _native_applies(t, adam_kwargs):
            new, bad = _native_call(t, t.dots, coef, penalty, adam_kwargs)
            if not bad:
                return new
            skipped = set(bad)
            out = [None if i in skipped else d for i, d in enumerate(new.unbind())]
            t = t._replace(dots=[None] * n)
            rest = list(bad)
        else:
            t = t._replace(dots=[None] * n)
            out, rest = [None] * n, list(range(n))
    else:
        out, rest = [None] * n, list(range(n))
        if _native_applies(t, adam_kwargs):
            stepped, rest = _native_step(t, coef, penalty, adam_kwargs)
            if not rest:
                return torch.stack([d for _, d in stepped])
            for i, d in stepped:
                out[i] = d
    if not rest:
        return out
    amsgrad = adam_kwargs["amsgrad"]
    by_device: dict[torch.device, list[int]] = {}
    for i in rest:
        by_device.setdefault(t.params[i].device, []).append(i)
    for idx in by_device.values():
        sub = t.select(idx)
        if not amsgrad:
            sub = sub._replace(max_exp_avg_sqs=[])
        # a carried dot at least as precise as this path's own (a native float64 dot for fp32 p) is
        # used cast; a less precise one (fp32 for an fp64 p) is recomputed
        stale = [j for j, d in enumerate(sub.dots)
                 if d is None or (acc_dtype(sub.params[j].dtype) == torch.float64 and d.dtype != torch.float64)]
        dots = [d if d is None else d.to(acc_dtype(p.dtype)) for d, p in zip(sub.dots, sub.params)]
        if stale:
            fresh = partial_dots([sub.params[j] for j in stale], [sub.w0s[j] for j in stale],
                                 [sub.directions[j] for j in stale])
            for k, j in enumerate(stale):
                dots[j] = fresh[k].to(acc_dtype(sub.params[j].dtype))
        carried = asft_adamw_(sub.params, sub.grads, sub.exp_avgs, sub.exp_avg_sqs, sub.max_exp_avg_sqs,
                              sub.state_steps, sub.w0s, sub.directions, cast(list[Tensor], dots),  # (all filled)
                              coef=coef, penalty=penalty,
                              **adam_kwargs)
        for i, d in zip(idx, carried):
            out[i] = d
    return out


_said_path = False


def _native_applies(t: StepTensors, kw: dict) -> bool:
    """Could the native kernel step some of `t` (CPU tensors, options it implements, and it builds)?

    Says once per process which CPU path runs: a log line for the native kernel, a one-line warning
    when it is unavailable (no compiler, a failed build, ASFT_NATIVE=0).
    """
    global _said_path
    if (not t.params or kw["amsgrad"] or kw["capturable"] or kw["differentiable"] or kw["grad_scale"] is not None
            or kw["found_inf"] is not None or all(p.device.type != "cpu" for p in t.params)):
        return False
    ok = native.available()
    if not _said_path:
        _said_path = True
        if ok:
            info = native.build_info()
            assert info is not None  # available() loaded the library, which sets its build info
            logging.getLogger(__name__).info("AsFTAdamW: CPU tensors step through the native kernel (%s)",
                                             info.path)
        else:
            warnings.warn(f"AsFTAdamW: the native CPU kernel is unavailable ({native.reason()}); using the "
                          "slower PyTorch path", stacklevel=4)
    return ok


def _native_step(t: StepTensors, coef: float, penalty: Penalty, kw: dict
                 ) -> tuple[list[tuple[int, Tensor]], list[int]]:
    """The native kernel on the CPU tensors of `t` that it supports (missing dots computed by its own
    fold; carried ones of any dtype). Returns ((index, new dot as a 0-d float64 view) per stepped
    tensor, the indices of `t` left for the other path)."""
    idx = [i for i, p in enumerate(t.params) if p.device.type == "cpu"]
    other = [i for i, p in enumerate(t.params) if p.device.type != "cpu"]
    sel = t if not other else t.select(idx)
    dots = list(sel.dots)
    stale = [j for j, d in enumerate(dots) if d is None]
    if stale:  # a tensor the fold cannot read gets 0 here and is skipped by the step's own check
        fresh, _ = native.dots_supported([sel.params[j] for j in stale], [sel.w0s[j] for j in stale],
                                         [sel.directions[j].v for j in stale])
        for k, j in enumerate(stale):
            dots[j] = fresh[k]
    new, bad = _native_call(sel, torch.stack(dots).to(torch.float64), coef, penalty, kw)
    done = set(bad)
    stepped = [(i, d) for j, (i, d) in enumerate(zip(idx, new.unbind())) if j not in done]
    return stepped, sorted(other + [idx[j] for j in bad])


def _native_call(t: StepTensors, dots: Tensor, coef: float, penalty: Penalty, kw: dict) -> tuple[Tensor, list[int]]:
    """`native.step_supported_` on all of `t`, the current dots given as one float64 vector."""
    args, kwargs = _kernel_args(t, dots, coef, penalty, kw)
    return native.step_supported_(*args, **kwargs)


def _kernel_args(t: StepTensors, dots: Tensor, coef: float, penalty: Penalty, kw: dict
                 ) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """The native kernels' arguments for all of `t`: the current dots (one float64 vector) scaled to
    the rescaled direction's c, and the AdamW hyper-parameters as floats."""
    inv = torch.tensor([0.0 if penalty == "full" else b.inv_nv2 for b in t.directions], dtype=torch.float64)
    args = (t.params, t.grads, t.exp_avgs, t.exp_avg_sqs, t.w0s, [b.v for b in t.directions], dots * inv,
            t.state_steps)
    kwargs = dict(lr=float(kw["lr"]), beta1=float(kw["beta1"]), beta2=float(kw["beta2"]), eps=float(kw["eps"]),
                  weight_decay=float(kw["weight_decay"]), coef=coef, penalty=penalty, maximize=kw["maximize"])
    return args, kwargs


def _native_only(t: StepTensors, coef: float, penalty: Penalty, kw: dict) -> Tensor:
    """impl "native": `native.asft_adamw_native_` on every tensor of `t` (missing dots from its own
    fold); returns the new dots as one float64 vector.

    Raises (before anything is written): ValueError for an option the kernel does not implement or a
    tensor it cannot step (named by `t.names`, else by its index: not CPU, not fp32/bf16, a layout
    other than one dense layout shared by its state); RuntimeError when the kernel is unavailable.
    """
    for key in ("amsgrad", "capturable", "differentiable"):
        if kw[key]:
            raise ValueError(f"impl='native' does not implement {key}=True; use impl='torch'")
    if kw["grad_scale"] is not None or kw["found_inf"] is not None:
        raise ValueError("impl='native' does not take grad_scale/found_inf; use impl='torch'")
    if not native.available():
        raise RuntimeError(f"impl='native': the native CPU kernel is unavailable ({native.reason()}); use "
                           "impl='torch', which then takes the PyTorch path")
    names = list(t.names) or [f"tensor {i}" for i in range(len(t.params))]
    if isinstance(t.dots, Tensor):
        dots = t.dots.to(torch.float64)
    else:
        missing = [i for i, d in enumerate(t.dots) if d is None]
        fresh = iter(_named_native(native.dots_native, [names[i] for i in missing],
                                   [t.params[i] for i in missing], [t.w0s[i] for i in missing],
                                   [t.directions[i].v for i in missing]).unbind() if missing else ())
        dots = torch.stack([next(fresh) if d is None else d.to(torch.float64).cpu() for d in t.dots])
    args, kwargs = _kernel_args(t, dots, coef, penalty, kw)
    return _named_native(native.asft_adamw_native_, names, *args, **kwargs)


def _named_native(fn: Callable[..., Tensor], names: Sequence[str], *args: Any, **kwargs: Any) -> Tensor:
    """fn(*args, **kwargs), its ValueError ("params[i] has dtype ...", raised before anything is
    written) re-raised naming tensor i by `names[i]`."""
    try:
        return fn(*args, **kwargs)
    except ValueError as e:
        m = re.search(r"\[(\d+)\]", str(e))
        who = f"'{names[int(m[1])]}'" if m and int(m[1]) < len(names) else "a tensor"
        raise ValueError(f"impl='native' cannot step {who}: {e} (impl='torch' steps it on the PyTorch "
                         "path)") from None


def dense_flat(t: Tensor) -> Tensor | None:
    """A 1-D view of `t` in memory order if `t` is dense and non-overlapping, else None."""
    if t.is_contiguous():
        return t.view(-1)
    strides = t.stride()
    order = sorted(range(t.dim()), key=lambda i: -strides[i])
    perm = t.permute(order)
    return perm.view(-1) if perm.is_contiguous() else None


@torch.no_grad()
def partial_dots(params: list[Tensor], w0s: list[Tensor], bounds: list[BoundDirection],
                 chunk: int = CHUNK) -> Tensor:
    """⟨v, p - W0⟩ per tensor as one vector of shape (len(params),), no host sync: fp32, or fp64
    when a parameter is fp64 (its entry then folded in fp64; the others hold their fp32 values).

    For the local shards of sharded parameters: summed over ranks (one all-reduce of the whole
    vector), entry i is the dot that `asft_adamw_` needs for tensor i. Folded over pieces in the
    same fixed order as `asft_adamw_` folds its returned dots (`_fold`: the same bits at any
    thread count).
    """
    device = params[0].device if params else torch.device("cpu")
    out_dtype = torch.float64 if any(p.dtype == torch.float64 for p in params) else torch.float32
    out = torch.zeros(len(params), device=device, dtype=out_dtype)
    scratch: dict[torch.dtype, Tensor] = {}
    for i, (p, w0, b) in enumerate(zip(params, w0s, bounds, strict=True)):
        if p.numel() == 0:
            continue
        fp, fw0, fv = (dense_flat(x) for x in (p, w0, b.v))
        if fp is None or fw0 is None or fv is None or not all(x.stride() == p.stride() for x in (w0, b.v)):
            out[i] = _dot_whole(p, w0, b.v)
        else:
            acc = acc_dtype(p.dtype)
            if acc not in scratch:
                scratch[acc] = torch.empty(chunk, device=device, dtype=acc)
            out[i] = _dot_chunked(fp, fw0, fv, scratch[acc], chunk)
    return out


@torch.no_grad()
def exact_dots(params: list[Tensor], w0s: list[Tensor], bounds: list[BoundDirection]) -> Tensor:
    """⟨v, p − W0⟩ per tensor, computed now: the native kernel's fold (float64, one call for all the
    CPU tensors it supports) where it builds, else `partial_dots` (fp32; fp64 for fp64 parameters)."""
    if params and params[0].device.type == "cpu" and native.available():
        dots, skipped = native.dots_supported(params, w0s, [b.v for b in bounds])
        if skipped:
            rest = partial_dots([params[i] for i in skipped], [w0s[i] for i in skipped],
                                [bounds[i] for i in skipped])
            dots[skipped] = rest.double()
        return dots
    return partial_dots(params, w0s, bounds)


def _dot_chunked(fp: Tensor, fw0: Tensor, fv: Tensor, t: Tensor, chunk: int) -> Tensor:
    """⟨v, p - W0⟩ of flat 1-D views as a 0-d tensor in t's dtype: per-chunk fp64 sums, folded in
    chunk order (t: scratch of at least `chunk` elements in `acc_dtype(p.dtype)`)."""
    n = fp.numel()
    parts = [_dot_piece(fp[lo: lo + chunk], fw0[lo: lo + chunk], fv[lo: lo + chunk], t)
             for lo in range(0, n, chunk)]
    return (parts[0] if len(parts) == 1 else torch.stack(parts).sum()).to(t.dtype)


def _dot_whole(p: Tensor, w0: Tensor, v: Tensor) -> Tensor:
    """⟨v, p - W0⟩ of tensors of any layout (a flat copy in logical order), folded as `_dot_piece`,
    as a 0-d tensor in `acc_dtype(p.dtype)`."""
    acc = acc_dtype(p.dtype)
    return _fold(((p.to(acc) - w0.to(acc)) * v.to(acc)).reshape(-1)).to(acc)


def _delta_into(t: Tensor, p: Tensor, w0: Tensor) -> None:
    """t ← p - w0 in t's dtype (`acc_dtype(p.dtype)`; 1-D chunks)."""
    if p.dtype == t.dtype and w0.dtype == t.dtype:
        torch.sub(p, w0, out=t)
    else:
        t.copy_(p)
        t.sub_(w0)


@torch.no_grad()
def asft_adamw_(params: list[Tensor], grads: list[Tensor], exp_avgs: list[Tensor],
                exp_avg_sqs: list[Tensor], max_exp_avg_sqs: list[Tensor], state_steps: list[Tensor],
                w0s: list[Tensor], bounds: list[BoundDirection], dots: Sequence[Tensor], *, coef: float,
                penalty: Penalty, chunk: int = CHUNK, **adam_kwargs) -> list[Tensor]:
    """torch's AdamW on g̃ = g + coef·R, fused chunk by chunk so memory is streamed about once.

    Each tensor is cut into pieces of at most `chunk` elements (aligned at multiples of `chunk` from
    its start, as `partial_dots` cuts it) and pieces are batched up to `chunk` elements. Per batch:
    g̃ into a batch-sized scratch, `torch.optim.adam.adam(**adam_kwargs)` on the piece views (so
    `foreach`/`fused` pick torch's kernel), then ⟨v, p_new - W0⟩ of each piece while it is in cache.

    Args:
        params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps: as for `adam`
            (plain local tensors); each state step is incremented once.
        w0s, bounds: W0 and the bound direction per tensor.
        dots: per tensor ⟨v, p - W0⟩ at the current p (0-d, `acc_dtype(p.dtype)`): the previous
            call's return value, `partial_dots`, or for shards their all-reduced sum.
        coef: ±2λ (negative under maximize).
    Returns:
        per tensor ⟨v, p_new - W0⟩ (0-d, `acc_dtype(p.dtype)`: fp32, fp64 for fp64 parameters),
        folded over pieces exactly as `partial_dots` folds it, so it equals `partial_dots` of the
        new parameters bitwise, at any thread count.
    """
    if penalty not in PENALTIES:
        raise ValueError(f"unknown penalty {penalty!r}; expected one of {PENALTIES}")
    amsgrad = adam_kwargs["amsgrad"]
    n = len(params)
    cs = [None if penalty == "full" or b.is_null else dot * b.inv_nv2 for b, dot in zip(bounds, dots, strict=True)]
    parts: list[list[Tensor]] = [[] for _ in range(n)]
    flats: list[list[Tensor] | None] = []
    pieces: list[tuple[int, int, int]] = []
    for i, p in enumerate(params):
        xs = [p, grads[i], exp_avgs[i], exp_avg_sqs[i], w0s[i], bounds[i].v]
        if amsgrad:
            xs.append(max_exp_avg_sqs[i])
        fl = [dense_flat(x) for x in xs]
        regular = all(f is not None for f in fl) and all(x.stride() == p.stride() for x in xs)
        flats.append(cast(list[Tensor], fl) if regular else None)
        size = p.numel()
        if regular:
            pieces.extend((i, lo, min(lo + chunk, size)) for lo in range(0, size, chunk))
        else:
            pieces.append((i, 0, size))
    device = params[0].device if params else torch.device("cpu")
    tmp: dict[torch.dtype, Tensor] = {}  # acc dtype → scratch for ΔW and the dot's products
    scratch: dict[torch.dtype, Tensor] = {}
    steps = [s.clone() for s in state_steps]  # each piece steps from the same count

    def run(batch: list[tuple[int, int, int]]) -> None:
        offsets: dict[torch.dtype, int] = {}
        views: list[list[Tensor]] = [[], [], [], [], [], []]
        for i, lo, hi in batch:
            fl = flats[i]
            if fl is None:  # irregular layout: whole-tensor ops with shaped temporaries
                gpen = (grads[i].to(acc_dtype(params[i].dtype)) + coef * penalty_reference(
                    params[i], w0s[i], bounds[i], penalty, dots[i])).to(grads[i].dtype)
                row = [params[i], gpen, exp_avgs[i], exp_avg_sqs[i],
                       max_exp_avg_sqs[i] if amsgrad else None]
            else:
                fp, fg, fexp_avg, fexp_avg_sq, fw0, fdir = fl[:6]
                dt = fp.dtype
                if dt not in scratch:
                    scratch[dt] = torch.empty(chunk, device=device, dtype=dt)
                off = offsets.get(dt, 0)
                offsets[dt] = off + hi - lo
                gpen = scratch[dt][off: off + hi - lo]
                acc = acc_dtype(dt)
                if acc not in tmp:
                    tmp[acc] = torch.empty(chunk, device=device, dtype=acc)
                _penalised_piece(gpen, fg[lo:hi], fp[lo:hi], fw0[lo:hi], fdir[lo:hi], tmp[acc][: hi - lo], cs[i],
                                 coef, penalty)
                row = [fp[lo:hi], gpen, fexp_avg[lo:hi], fexp_avg_sq[lo:hi], fl[6][lo:hi] if amsgrad else None]
            for k, x in enumerate(row):
                if x is not None:
                    views[k].append(x)
            views[5].append(steps[i].clone())
        adam(views[0], views[1], views[2], views[3], views[4], views[5], **adam_kwargs)
        for i, lo, hi in batch:
            fl = flats[i]
            if fl is None:
                parts[i].append(_dot_whole(params[i], w0s[i], bounds[i].v))
            else:
                parts[i].append(_dot_piece(fl[0][lo:hi], fl[4][lo:hi], fl[5][lo:hi], tmp[acc_dtype(fl[0].dtype)]))

    batch: list[tuple[int, int, int]] = []
    size = 0
    for piece in pieces:
        if batch and size + piece[2] - piece[1] > chunk:
            run(batch)
            batch, size = [], 0
        batch.append(piece)
        size += piece[2] - piece[1]
    if batch:
        run(batch)
    for s in state_steps:
        s.add_(1)
    return [(ps[0] if len(ps) == 1 else torch.stack(ps).sum()).to(acc_dtype(p.dtype)) if ps
            else torch.zeros((), device=device, dtype=acc_dtype(p.dtype)) for p, ps in zip(params, parts)]


def _penalised_piece(out: Tensor, g: Tensor, p: Tensor, w0: Tensor, v: Tensor, t: Tensor, c: Tensor | None,
                     coef: float, penalty: Penalty) -> None:
    """out ← g + coef·R on one 1-D piece (t: scratch of the piece's length in `acc_dtype(p.dtype)`)."""
    if penalty == "parallel":
        if c is None:
            out.copy_(g)
        else:  # in t's dtype: torch.mul(v, c, out=t) would round c to a bf16/fp16 v's dtype
            (torch.mul(v, c, out=t) if v.dtype == t.dtype else t.copy_(v).mul_(c))
            torch.add(g, t, alpha=coef, out=out)
        return
    _delta_into(t, p, w0)
    if penalty == "orthogonal" and c is not None:
        t.addcmul_(v, c, value=-1.0)
    torch.add(g, t, alpha=coef, out=out)


def _dot_piece(p: Tensor, w0: Tensor, v: Tensor, scratch: Tensor) -> Tensor:
    """⟨v, p - W0⟩ of one 1-D piece as a 0-d float64 tensor: the products (p - W0)·v in the
    scratch's dtype (`acc_dtype(p.dtype)`, at least the piece's length), summed by `_fold`."""
    t = scratch[: p.numel()]
    _delta_into(t, p, w0)
    return _fold(t.mul_(v))


def _fold(x: Tensor) -> Tensor:
    """Σx of a 1-D tensor as a 0-d float64, in an order fixed by its length alone (the same bits at
    any thread count, unlike `torch.dot` or a whole-tensor sum): per block of FOLD_BLOCK elements
    (below ATen's parallel grain, a reduction over rows gives each row to one thread), then the
    block sums in block order, all in float64."""
    n = x.numel()
    if n <= FOLD_BLOCK:
        return x.sum(dtype=torch.float64)
    full = n - n % FOLD_BLOCK
    sums = x[:full].view(-1, FOLD_BLOCK).sum(1, dtype=torch.float64)
    if full < n:
        sums = torch.cat([sums, x[full:].sum(dtype=torch.float64).reshape(1)])
    return _fold(sums)
