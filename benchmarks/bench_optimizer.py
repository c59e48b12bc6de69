"""Step time of AsFTAdamW against torch.optim.AdamW on CPU, interleaved in one run, per model shape.

    pytest benchmarks/bench_optimizer.py -p no:cacheprovider --benchmark-columns=median,rounds -s
    ASFT_BENCH_THREADS=1 ASFT_BENCH_ROUNDS=9 pytest benchmarks/bench_optimizer.py ...   # a loaded machine

For each case (shape, flag set `fused=True` / `foreach=True`, layout) one AsFTAdamW (λ = 1, every
tensor anchored) and one torch AdamW with the same flags on twin parameters step alternately, 2
torch threads; each round times one step of each, so load changes on a shared machine hit both
alike (`ASFT_BENCH_THREADS`, `ASFT_BENCH_ROUNDS` change the 2 threads and 15 rounds). Printed per case
(and kept as the benchmark's extra_info): the median ms of each and the
ratio of the medians. Layouts and their bytes per parameter per step (AdamW / AsFT in one pass,
the byte floor of the ratio):

    fp32       fp32 params, grads, moments; fp32 W0 and d            28 / 36  1.29×
    bf16-w0-d  fp32 params that are bf16 values (a bf16 checkpoint
               trained in fp32: W0 kept in bf16), bf16 d             28 / 32  1.14×
    bf16       bf16 params, grads and moments (torch's default
               state for bf16 params), bf16 W0 and d                 14 / 18  1.29×

On CPU, AsFTAdamW's fp32 and bf16 tensors step through the native kernel (`asft_optim.native`)
whatever the flags; `ASFT_NATIVE=0` measures the PyTorch fallback.
"""

from __future__ import annotations

import os
import statistics
import time

import pytest
import torch

from asft_optim import AsFTAdamW, native


def llama_mix(hidden: int = 512, mlp: int = 1408, layers: int = 8, vocab: int = 8000) -> list[int]:
    """Tensor sizes of a small Llama-shaped model: embedding; per layer q, k, v, o, gate, up, down and
    two RMSNorm weights; the final norm; lm_head (34M parameters in 75 tensors by default)."""
    per_layer = [hidden * hidden] * 4 + [hidden * mlp] * 3 + [hidden] * 2
    return [vocab * hidden] + per_layer * layers + [hidden, vocab * hidden]


SHAPES: dict[str, list[int]] = {
    "1000x1k": [1000] * 1000,
    "200x50k": [50_000] * 200,
    "20x2.5M": [2_500_000] * 20,
    "llama-mix": llama_mix(),
}
FLAGS: dict[str, dict[str, bool]] = {"fused": {"fused": True}, "foreach": {"foreach": True}}
# layout → (parameter dtype, parameters rounded to bf16 values, direction dtype)
LAYOUTS: dict[str, tuple[torch.dtype, bool, torch.dtype]] = {
    "fp32": (torch.float32, False, torch.float32),
    "bf16-w0-d": (torch.float32, True, torch.bfloat16),
    "bf16": (torch.bfloat16, True, torch.bfloat16),
}
CASES = ([(shape, flags, "fp32") for shape in SHAPES for flags in FLAGS]
         + [(shape, "fused", layout) for layout in ("bf16-w0-d", "bf16") for shape in SHAPES])
ROUNDS = int(os.environ.get("ASFT_BENCH_ROUNDS", "15"))
THREADS = int(os.environ.get("ASFT_BENCH_THREADS", "2"))  # 1 on a loaded machine: 2 oversubscribe it


def _pair(sizes: list[int], flags: dict[str, bool], layout: str = "fp32"
          ) -> tuple[torch.optim.Optimizer, torch.optim.Optimizer]:
    """(AsFTAdamW, AdamW) on twin parameters with gradients set, after one warm-up step each."""
    dtype, bf16_values, d_dtype = LAYOUTS[layout]
    g = torch.Generator().manual_seed(0)
    values = [torch.randn(n, generator=g) for n in sizes]
    named = [(f"w{i}", torch.nn.Parameter((x.bfloat16() if bf16_values else x).to(dtype)))
             for i, x in enumerate(values)]
    twin = [torch.nn.Parameter(p.detach().clone()) for _, p in named]
    for (_, p), q in zip(named, twin):
        p.grad = torch.randn(p.shape, generator=g).to(dtype)
        q.grad = p.grad.clone()
    dirs = {n: (torch.randn(p.shape, generator=g) * 1e-3).to(d_dtype) for n, p in named}
    asft = AsFTAdamW(named, lr=1e-4, anchors=dirs, asft_lambda=1.0, **flags)
    adamw = torch.optim.AdamW(twin, lr=1e-4, **flags)
    asft.step()  # lazy state, W0 snapshot, native build
    adamw.step()
    return asft, adamw


@pytest.mark.parametrize("shape, flags, layout", CASES)
def test_step(benchmark, shape: str, flags: str, layout: str) -> None:
    threads = torch.get_num_threads()
    torch.set_num_threads(THREADS)
    try:
        asft, adamw = _pair(SHAPES[shape], FLAGS[flags], layout)
        times: dict[str, list[float]] = {"adamw": [], "asft": []}

        def both() -> None:
            for name, opt in (("adamw", adamw), ("asft", asft)):
                t0 = time.perf_counter()
                opt.step()
                times[name].append(time.perf_counter() - t0)

        benchmark.group = f"{shape}, {flags}, {layout}"
        benchmark.pedantic(both, rounds=ROUNDS, warmup_rounds=1, iterations=1)
    finally:
        torch.set_num_threads(threads)
    med = {k: statistics.median(v[1:]) * 1e3 for k, v in times.items()}  # v[0]: pytest-benchmark's warm-up
    ratio = med["asft"] / med["adamw"]
    path = f"native, {native.load().VECTOR} loops" if native.available() else f"fallback ({native.reason()})"
    benchmark.extra_info.update(adamw_ms=med["adamw"], asft_ms=med["asft"], ratio=ratio, path=path)
    print(f"\n{shape:>10} {flags:>8} {layout:>9}: AdamW {med['adamw']:8.2f} ms  AsFT {med['asft']:8.2f} ms  "
          f"ratio {ratio:5.2f}x  [{sum(SHAPES[shape]) / 1e6:.1f}M params, {len(SHAPES[shape])} tensors, {path}]")


# ----------------------------------------------------------------------------------- attach route
# `asft_optim.attach` on another optimizer, against that optimizer bare (same flags, twin parameters,
# interleaved as above). Bytes per fp32 parameter per step that the penalty adds, W0 and d fp32:
# the exact dot reads p, W0, d (12) and the gradient update reads g, p, W0, d and writes g (20): +32.
# torch AdamW (fused) moves 28, so 60 in all: a floor of 2.14×; bitsandbytes AdamW8bit moves p, g
# and two 1-byte moments (p r/w 8, g 4, moments r/w 4: 16), so 48: a floor of 3×. Compute on CPU
# (and bitsandbytes' CPU kernels) sits above those floors. One torch thread: on a shared, loaded
# 2-core machine two OpenMP threads time their spinning more than the step.
ATTACH_ROUTES = ("adamw_fused", "bnb_adamw8bit")
ATTACH_SHAPES = ("1000x1k", "200x50k", "llama-mix")
ATTACH_ROUNDS = 5


def _route(route: str, params: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
    if route == "adamw_fused":
        return torch.optim.AdamW(params, lr=1e-4, fused=True)
    import bitsandbytes as bnb
    return bnb.optim.AdamW8bit(params, lr=1e-4)


@pytest.mark.parametrize("route", ATTACH_ROUTES)
@pytest.mark.parametrize("shape", ATTACH_SHAPES)
def test_attach_step(benchmark, shape: str, route: str) -> None:
    """One step of `route` with the penalty attached against the bare `route`, interleaved."""
    if route.startswith("bnb"):
        pytest.importorskip("bitsandbytes")
    from asft_optim import attach

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        g = torch.Generator().manual_seed(0)
        model = torch.nn.Module()
        for i, n in enumerate(SHAPES[shape]):
            model.register_parameter(f"w{i}", torch.nn.Parameter(torch.randn(n, generator=g)))
        params = list(model.parameters())
        twin = [torch.nn.Parameter(p.detach().clone()) for p in params]
        for p, q in zip(params, twin):
            p.grad = torch.randn(p.shape, generator=g)
            q.grad = p.grad.clone()
        dirs = {n: torch.randn(p.shape, generator=g) * 1e-3 for n, p in model.named_parameters()}
        attached, bare = _route(route, params), _route(route, twin)
        attach(attached, model, anchors=dirs, asft_lambda=1.0)
        for opt in (attached, bare):  # lazy state and W0
            opt.step()
        times: dict[str, list[float]] = {"bare": [], "attached": []}

        def both() -> None:
            for name, opt in (("bare", bare), ("attached", attached)):
                t0 = time.perf_counter()
                opt.step()
                times[name].append(time.perf_counter() - t0)

        benchmark.group = f"attach {shape}, {route}"
        benchmark.pedantic(both, rounds=ATTACH_ROUNDS, warmup_rounds=1, iterations=1)
    finally:
        torch.set_num_threads(threads)
    med = {k: statistics.median(v[1:]) * 1e3 for k, v in times.items()}
    ratio = med["attached"] / med["bare"]
    benchmark.extra_info.update(bare_ms=med["bare"], attached_ms=med["attached"], ratio=ratio)
    print(f"\n{shape:>10} {route:>14}: bare {med['bare']:8.2f} ms  attached {med['attached']:8.2f} ms  "
          f"ratio {ratio:5.2f}x  [{sum(SHAPES[shape]) / 1e6:.1f}M params, {len(SHAPES[shape])} tensors]")
