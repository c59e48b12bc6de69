"""AsFTAdamW ÷ torch AdamW (both fused=True) median step time on three shapes, interleaved, for
comparing two revisions of the package (bench_optimizer.py needs the native kernel, which older
revisions lack). Run from each checkout's root, on an otherwise idle machine:

    PYTHONPATH=. python benchmarks/step_ratio.py [STEPS]           # ASFT_NATIVE=0: the PyTorch fallback

Prints one line per shape: which checkout was imported, the two medians and their ratio.
"""

from __future__ import annotations

import statistics
import sys
import time

import torch

import asft_optim
from asft_optim import AsFTAdamW

SHAPES = [(1000, 1000), (200, 50_000), (20, 2_500_000)]  # tensors × elements, fp32


def _setup(kind: str, n: int, numel: int) -> torch.optim.Optimizer:
    g = torch.Generator().manual_seed(0)
    named = [(f"w{i}", torch.nn.Parameter(torch.randn(numel, generator=g))) for i in range(n)]
    for _, p in named:
        p.grad = torch.randn(numel, generator=g)
    if kind == "asft":
        dirs = {k: torch.randn(numel, generator=g) for k, _ in named}
        opt = AsFTAdamW(named, lr=1e-4, anchors=dirs, asft_lambda=1.0, fused=True)
    else:
        opt = torch.optim.AdamW([p for _, p in named], lr=1e-4, fused=True)
    opt.step()  # lazy state, W0
    return opt


def main(steps: int) -> None:
    torch.set_num_threads(2)
    for n, numel in SHAPES:
        opts = {k: _setup(k, n, numel) for k in ("asft", "adamw")}
        times: dict[str, list[float]] = {k: [] for k in opts}
        for _ in range(steps):
            for k, opt in opts.items():
                t = time.perf_counter()
                opt.step()
                times[k].append(time.perf_counter() - t)
        a, b = statistics.median(times["asft"]), statistics.median(times["adamw"])
        print(f"{asft_optim.__file__} {n}x{numel}: asft {a * 1e3:.1f} ms, adamw {b * 1e3:.1f} ms, "
              f"ratio {a / b:.2f}")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 15)
