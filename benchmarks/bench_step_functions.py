"""The step functions alone, side by side: torch's AdamW kernels, the chunked torch path
(`functional.asft_adamw_`) and the native pass (`native.asft_adamw_native_`), λ = 1, fp32, CPU.

    python benchmarks/bench_step_functions.py --threads 2 --rounds 15

Each round runs every provider once on its own copy of the tensors, in a fixed interleaved order, so
load changes on a shared machine hit all providers alike; the table gives the median ms per step
and its ratio to torch's fused AdamW on the same shape. Bytes per fp32 parameter: AdamW 28
(read p, g, m, s; write p, m, s), AsFT one pass 36 (+W0, v).
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
from torch.optim.adam import adam

from asft_optim import native
from asft_optim.functional import asft_adamw_, bind_direction, partial_dots

from bench_optimizer import SHAPES  # this folder is on sys.path when the script runs


def _adam_kwargs(**flags) -> dict:
    return dict(foreach=False, fused=False, capturable=False, differentiable=False, grad_scale=None,
                found_inf=None, has_complex=False, decoupled_weight_decay=True, amsgrad=False, beta1=0.9,
                beta2=0.999, lr=1e-4, weight_decay=0.01, eps=1e-8, maximize=False) | flags


class Case:
    """One provider's tensors for one shape (own copies: providers never share memory)."""

    def __init__(self, sizes: list[int], seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        self.p = [torch.randn(n, generator=g) for n in sizes]
        self.g = [torch.randn(n, generator=g) for n in sizes]
        self.m = [torch.zeros(n) for n in sizes]
        self.s = [torch.zeros(n) for n in sizes]
        self.steps = [torch.tensor(0.0) for _ in sizes]
        self.w0 = [p - 1e-3 * torch.randn(p.shape, generator=g) for p in self.p]
        self.bounds = [bind_direction(torch.randn(n, generator=g), p, "w") for n, p in zip(sizes, self.p)]
        self.v = [b.v for b in self.bounds]
        self.inv = torch.tensor([b.inv_nv2 for b in self.bounds], dtype=torch.float64)
        self.dots32 = list(partial_dots(self.p, self.w0, self.bounds))
        self.dots64 = native.dots_native(self.p, self.w0, self.v) if native.available() else None

    def adamw(self, **flags) -> None:
        adam(self.p, self.g, self.m, self.s, [], self.steps, **_adam_kwargs(**flags))

    def chunked(self, **flags) -> None:
        self.dots32 = asft_adamw_(self.p, self.g, self.m, self.s, [], self.steps, self.w0, self.bounds,
                                  self.dots32, coef=2.0, penalty="orthogonal", **_adam_kwargs(**flags))

    def native(self) -> None:  # increments the steps itself
        self.dots64 = native.asft_adamw_native_(
            self.p, self.g, self.m, self.s, self.w0, self.v, self.dots64 * self.inv, self.steps, lr=1e-4,
            beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.01, coef=2.0, penalty="orthogonal",
            maximize=False)


def providers(sizes: list[int]) -> dict[str, Callable[[], None]]:
    cases = {name: Case(sizes) for name in ("adamw fused", "adamw foreach", "chunked fused",
                                            "chunked foreach", "native")}
    out = {"adamw fused": lambda: cases["adamw fused"].adamw(fused=True),
           "adamw foreach": lambda: cases["adamw foreach"].adamw(foreach=True),
           "chunked fused": lambda: cases["chunked fused"].chunked(fused=True),
           "chunked foreach": lambda: cases["chunked foreach"].chunked(foreach=True)}
    if native.available():
        out["native"] = cases["native"].native
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--shapes", nargs="*", default=list(SHAPES), help="keys of SHAPES")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} threads, {args.rounds} rounds; native: "
          f"{'yes' if native.available() else native.reason()}")
    for shape in args.shapes:
        sizes = SHAPES[shape]
        fns = providers(sizes)
        times: dict[str, list[float]] = {k: [] for k in fns}
        for _ in range(2):  # warm-up: lazy allocations, page faults
            for f in fns.values():
                f()
        for _ in range(args.rounds):
            for k, f in fns.items():
                t0 = time.perf_counter()
                f()
                times[k].append(time.perf_counter() - t0)
        base = statistics.median(times["adamw fused"])
        cells = [f"{k} {statistics.median(v) * 1e3:.2f} ms ({statistics.median(v) / base:.2f}x)"
                 for k, v in times.items()]
        print(f"{shape} [{sum(sizes) / 1e6:.1f}M]: " + " | ".join(cells))


if __name__ == "__main__":
    main()
