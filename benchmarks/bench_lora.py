"""LoRA penalty: AsFT's skinny-matmul gradients vs the reference code's approach.

Providers, per optimizer step over all adapted modules (penalty gradient only, no model):
  asft-vector     `lora_penalty_grads(..., projection="vector")`: one pass over d, O((out+in)·r) temporaries
  asft-reference  `lora_penalty_grads(..., projection="reference")`: the published penalty, three passes over d
  ref-materialise the reference code's approach: C = d·dᵀ/‖d‖_F materialised per module (out×out, built
                  once, held), loss λ‖B·A − C·(B·A)‖² formed explicitly and differentiated by autograd
  ref-reordered   the same with the cheaper order (B − C·B)·A (still C and out×in temporaries)

Each provider runs in its own process; "extra memory" is the peak memory minus the memory in use once
the directions and the LoRA matrices are in place (so it counts C for the ref-* providers, which hold
it): process RSS on CPU, `torch.cuda.max_memory_allocated` on CUDA. Time per step: the fastest and
the median of `--steps` steps after one warm-up step (ref-*: C's construction excluded); with
`--repeats N` the providers run round-robin N times and the best values are kept, which damps the
noise of a shared machine (the fastest step is the estimate least disturbed by other processes).

    python benchmarks/bench_lora.py --out-features 4096 --in-features 4096 --rank 8 --modules 4 --steps 3
    pytest benchmarks/bench_lora.py --benchmark-columns=min,median,rounds   # times only, one process
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable

import pytest
import torch

PROVIDERS = ("asft-vector", "asft-reference", "ref-materialise", "ref-reordered")


def _status_bytes(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024  # reported in kB
    raise RuntimeError(f"no {field} in /proc/self/status")


def _reset_peak(device: torch.device) -> None:
    """Start a new peak-memory window (Linux: writing 5 to clear_refs resets VmHWM)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    else:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")


def _memory(device: torch.device) -> tuple[int, int]:
    """(bytes in use now, peak bytes since the last `_reset_peak`)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        return torch.cuda.memory_allocated(device), torch.cuda.max_memory_allocated(device)
    return _status_bytes("VmRSS"), _status_bytes("VmHWM")


def make_inputs(out_f: int, in_f: int, rank: int, modules: int, device: torch.device):
    """Directions (out×in, fp32) and LoRA matrices A (r×in), B (out×r), A0 = A, B0 = 0 per module."""
    g = torch.Generator().manual_seed(0)
    ds = [(torch.randn(out_f, in_f, generator=g) * 1e-3).to(device) for _ in range(modules)]
    a_s = [(torch.randn(rank, in_f, generator=g) * 0.01).to(device) for _ in range(modules)]
    b_s = [(torch.randn(out_f, rank, generator=g) * 0.01).to(device) for _ in range(modules)]
    return ds, a_s, b_s


def make_step(provider: str, ds: list[torch.Tensor], a_s: list[torch.Tensor], b_s: list[torch.Tensor],
              lam: float = 0.1) -> Callable[[], None]:
    """One optimizer step's penalty gradients over all modules, by `provider` (see the module doc).

    asft-*: binds the directions (the caller may drop `ds` afterwards); ref-*: builds C per module.
    """
    from asft_optim.functional import bind_direction
    from asft_optim.lora import LoraPair, lora_penalty_grads

    out_f, in_f = ds[0].shape
    if provider.startswith("asft"):
        pair = LoraPair("m", "default", "a", "b", "m.weight", 2.0, False, (out_f, in_f))
        bounds = [bind_direction(d, d, f"d{i}") for i, d in enumerate(ds)]
        a0s = [a.clone() for a in a_s]
        b0s = [torch.zeros_like(b) for b in b_s]
        projection = provider.split("-")[1]

        def step() -> None:
            for a, b, a0, b0, bd in zip(a_s, b_s, a0s, b0s, bounds):
                lora_penalty_grads(a, b, a0, b0, bd, pair, 2 * lam, "orthogonal", projection)
        return step

    params = [(a.clone().requires_grad_(), b.clone().requires_grad_()) for a, b in zip(a_s, b_s)]
    cs = [d @ d.T / torch.linalg.norm(d) for d in ds]  # out×out per module, held for the run

    def ref_step() -> None:
        for (a, b), c in zip(params, cs):
            if provider == "ref-materialise":
                x = b @ a
                r = x - c @ x
            else:
                r = (b - c @ b) @ a
            torch.autograd.grad(lam * (r * r).sum(), [a, b])
    return ref_step


def run_provider(provider: str, out_f: int, in_f: int, rank: int, modules: int, steps: int,
                 device: str = "cpu") -> dict[str, float]:
    """Time and extra peak memory of one provider (call in a fresh process)."""
    dev = torch.device(device)
    ds, a_s, b_s = make_inputs(out_f, in_f, rank, modules, dev)
    if provider.startswith("asft"):
        step = make_step(provider, ds, a_s, b_s)
        ds.clear()  # the bound copies replace them
        _reset_peak(dev)
        base = _memory(dev)[0]
    else:
        _reset_peak(dev)
        base = _memory(dev)[0]
        step = make_step(provider, ds, a_s, b_s)
    step()  # warm-up
    times = []
    for _ in range(steps):
        _memory(dev)
        t0 = time.perf_counter()
        step()
        _memory(dev)
        times.append(time.perf_counter() - t0)
    return {"time_min_s": min(times), "time_median_s": statistics.median(times),
            "extra_bytes": max(0, _memory(dev)[1] - base)}


@pytest.mark.parametrize("provider", ["asft-vector", "asft-reference", "ref-reordered"])
def test_penalty_step(benchmark, provider):
    """Side-by-side step times in one process (pytest-benchmark): 4 modules of 2048×2048, rank 8.
    ref-materialise is left out here (seconds per round); the script covers it."""
    benchmark.group = "LoRA penalty step, 4 modules 2048x2048 r8 fp32"
    ds, a_s, b_s = make_inputs(2048, 2048, 8, 4, torch.device("cpu"))
    step = make_step(provider, ds, a_s, b_s)
    step()
    benchmark(step)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out-features", type=int, default=4096)
    ap.add_argument("--in-features", type=int, default=4096)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--modules", type=int, default=4, help="adapted modules (Llama-7B q and v: 64)")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--providers", nargs="+", default=list(PROVIDERS), choices=PROVIDERS)
    ap.add_argument("--repeats", type=int, default=1, help="round-robin runs of every provider")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, help="torch.set_num_threads in every provider process")
    ap.add_argument("--json", help="also write the results to this file")
    ap.add_argument("--provider", help=argparse.SUPPRESS)
    args = ap.parse_args()
    shape = (args.out_features, args.in_features, args.rank, args.modules, args.steps)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.provider:
        print(json.dumps(run_provider(args.provider, *shape, device=args.device)))
        return 0
    results: dict[str, dict[str, float]] = {}
    for _ in range(args.repeats):
        for provider in args.providers:
            cmd = [sys.executable, __file__, "--provider", provider, "--out-features", str(shape[0]),
                   "--in-features", str(shape[1]), "--rank", str(shape[2]), "--modules", str(shape[3]),
                   "--steps", str(shape[4]), "--device", args.device]
            if args.threads:
                cmd += ["--threads", str(args.threads)]
            done = subprocess.run(cmd, check=True, capture_output=True, text=True)
            r = json.loads(done.stdout.strip().splitlines()[-1])
            best = results.setdefault(provider, r)
            for key in r:
                best[key] = min(best[key], r[key])
    where = torch.cuda.get_device_name(args.device) if args.device.startswith("cuda") else \
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs"
    print(f"# {where}, torch {torch.__version__}, threads {torch.get_num_threads()}, "
          f"best of {args.repeats} round-robin run(s)")
    print(f"# {args.modules} modules of {args.out_features}x{args.in_features}, rank {args.rank}, fp32")
    print(f"{'provider':<16} {'fastest step (s)':>17} {'median step (s)':>16} {'extra mem (MiB)':>16}")
    for p, r in results.items():
        print(f"{p:<16} {r['time_min_s']:>17.4f} {r['time_median_s']:>16.4f} {r['extra_bytes'] / 2**20:>16.1f}")
    for mine in ("asft-vector", "asft-reference"):
        for ref in ("ref-materialise", "ref-reordered"):
            if mine in results and ref in results:
                m, r = results[mine], results[ref]
                print(f"{ref} / {mine}: time {r['time_min_s'] / m['time_min_s']:.1f}x (fastest), "
                      f"{r['time_median_s'] / m['time_median_s']:.1f}x (median); extra memory "
                      f"{r['extra_bytes'] / max(m['extra_bytes'], 1):.1f}x")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "results": results}, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
