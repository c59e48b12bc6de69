"""The step functions alone, side by side: torch's AdamW kernels, the chunked torch path
(`functional.asft_adamw_`) and the native pass (`native.asft_adamw_native_`), λ = 1, CPU.

    python benchmarks/bench_step_functions.py --threads 2 --rounds 15
    python benchmarks/bench_step_functions.py --layout bf16 --native-only --threads 1 --cpu-time \
        --against /tmp/main_asft_adamw.cpp          # git show main:asft_optim/native/asft_adamw.cpp

Each round runs every provider once on its own copy of the tensors, in a fixed interleaved order, so
load changes on a shared machine hit all providers alike; the table gives the median ms per step
and its ratio to torch's fused AdamW on the same shape. `--layout` takes the layouts of
`bench_optimizer.py` (fp32; fp32 params with bf16 W0 and d; bf16 params and moments) and their byte
floors. `--against` builds another revision's `asft_adamw.cpp` (same flags, a cache folder of its
own under the system temp folder) and runs it as one more provider, so two kernels compare in one
process; `--portable` adds this build's portable loops (on an AVX-512 build). `--cpu-time` times the
stepping thread's CPU time (`time.thread_time`; meaningful with `--threads 1`): a loaded machine
then slows every provider by memory contention only, not by descheduling.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import torch
from torch.optim.adam import adam

from asft_optim import native
from asft_optim.functional import asft_adamw_, bind_direction, partial_dots
from asft_optim.native import build

from bench_optimizer import LAYOUTS, SHAPES  # this folder is on sys.path when the script runs


def _adam_kwargs(**flags) -> dict:
    return dict(foreach=False, fused=False, capturable=False, differentiable=False, grad_scale=None,
                found_inf=None, has_complex=False, decoupled_weight_decay=True, amsgrad=False, beta1=0.9,
                beta2=0.999, lr=1e-4, weight_decay=0.01, eps=1e-8, maximize=False) | flags


class Case:
    """One provider's tensors for one shape and layout (own copies: providers never share memory)."""

    def __init__(self, sizes: list[int], layout: str = "fp32", seed: int = 0) -> None:
        dtype, bf16_values, d_dtype = LAYOUTS[layout]
        g = torch.Generator().manual_seed(seed)
        values = [torch.randn(n, generator=g) for n in sizes]
        self.p = [(x.bfloat16() if bf16_values else x).to(dtype) for x in values]
        self.g = [torch.randn(n, generator=g).to(dtype) for n in sizes]
        self.m = [torch.zeros(n, dtype=dtype) for n in sizes]
        self.s = [torch.zeros(n, dtype=dtype) for n in sizes]
        self.steps = [torch.tensor(0.0) for _ in sizes]
        self.w0 = [(p.float() - 1e-3 * torch.randn(p.shape, generator=g)).to(d_dtype) for p in self.p]
        self.bounds = [bind_direction(torch.randn(n, generator=g).to(d_dtype), p, "w") for n, p in zip(sizes, self.p)]
        self.v = [b.v for b in self.bounds]
        self.inv = torch.tensor([b.inv_nv2 for b in self.bounds], dtype=torch.float64)
        self.dots32 = list(partial_dots(self.p, self.w0, self.bounds))
        self.dots64 = native.dots_native(self.p, self.w0, self.v) if native.available() else None

    def adamw(self, **flags) -> None:
        adam(self.p, self.g, self.m, self.s, [], self.steps, **_adam_kwargs(**flags))

    def chunked(self, **flags) -> None:
        self.dots32 = asft_adamw_(self.p, self.g, self.m, self.s, [], self.steps, self.w0, self.bounds,
                                  self.dots32, coef=2.0, penalty="orthogonal", **_adam_kwargs(**flags))

    def native(self, lib: ModuleType | None = None, portable: bool = False) -> None:
        """One native step (it increments the steps itself): this build, or `lib` (another build's
        module, called directly); `portable` forces this build's portable loops for the call."""
        cs = self.dots64 * self.inv
        if lib is None:
            here = native.load()
            here._use_portable(portable)
            try:
                self.dots64 = native.asft_adamw_native_(
                    self.p, self.g, self.m, self.s, self.w0, self.v, cs, self.steps, lr=1e-4, beta1=0.9,
                    beta2=0.999, eps=1e-8, weight_decay=0.01, coef=2.0, penalty="orthogonal", maximize=False)
            finally:
                here._use_portable(False)
        else:
            self.dots64 = lib.asft_adamw(self.p, self.g, self.m, self.s, self.w0, self.v, cs, self.steps, 1e-4, 0.9,
                                         0.999, 1e-8, 0.01, 2.0, 0, False, False)[0]


def build_other(source: str) -> ModuleType:
    """Another revision's kernel source compiled with this build's flags (cached by content)."""
    from torch.utils.cpp_extension import load
    text = Path(source).read_bytes()
    key = hashlib.sha256(text + " ".join(build.CFLAGS).encode() + torch.__version__.encode()).hexdigest()[:16]
    folder = Path(tempfile.gettempdir()) / "asft_bench_kernels" / key
    folder.mkdir(parents=True, exist_ok=True)
    copy = folder / "asft_adamw.cpp"
    copy.write_bytes(text)
    path = build._ninja_on_path()
    if path is not None:
        os.environ["PATH"] = path
    return load(f"asft_other_{key}", [str(copy)], extra_cflags=list(build.CFLAGS), build_directory=str(folder))


def providers(sizes: list[int], layout: str, native_only: bool, portable: bool,
              others: dict[str, ModuleType]) -> dict[str, Callable[[], None]]:
    names = ["adamw fused"] + ([] if native_only else ["adamw foreach", "chunked fused", "chunked foreach"])
    cases = {name: Case(sizes, layout) for name in names}
    out = {"adamw fused": lambda: cases["adamw fused"].adamw(fused=True)}
    if not native_only:
        out |= {"adamw foreach": lambda: cases["adamw foreach"].adamw(foreach=True),
                "chunked fused": lambda: cases["chunked fused"].chunked(fused=True),
                "chunked foreach": lambda: cases["chunked foreach"].chunked(foreach=True)}
    if native.available():
        mine = Case(sizes, layout)
        out[f"native ({native.load().VECTOR})"] = mine.native
        if portable:
            loose = Case(sizes, layout)
            out["native (portable)"] = lambda: loose.native(portable=True)
    for label, lib in others.items():
        other = Case(sizes, layout)
        out[label] = lambda other=other, lib=lib: other.native(lib)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--shapes", nargs="*", default=list(SHAPES), help="keys of SHAPES")
    ap.add_argument("--layout", default="fp32", choices=list(LAYOUTS))
    ap.add_argument("--native-only", action="store_true", help="only torch's fused AdamW and the native kernels")
    ap.add_argument("--portable", action="store_true", help="also this build's portable loops")
    ap.add_argument("--against", nargs="*", default=[], metavar="CPP", help="other asft_adamw.cpp sources")
    ap.add_argument("--cpu-time", action="store_true", help="time the stepping thread's CPU time")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    clock = time.thread_time if args.cpu_time else time.perf_counter
    others = {f"native ({src})": build_other(src) for src in args.against}
    print(f"torch {torch.__version__}, {args.threads} threads, {args.rounds} rounds, layout {args.layout}, "
          f"{'CPU' if args.cpu_time else 'wall'} time; native: "
          f"{native.load().VECTOR if native.available() else native.reason()}")
    for shape in args.shapes:
        sizes = SHAPES[shape]
        fns = providers(sizes, args.layout, args.native_only, args.portable, others)
        times: dict[str, list[float]] = {k: [] for k in fns}
        for _ in range(2):  # warm-up: lazy allocations, page faults
            for f in fns.values():
                f()
        for _ in range(args.rounds):
            for k, f in fns.items():
                t0 = clock()
                f()
                times[k].append(clock() - t0)
        base = statistics.median(times["adamw fused"])
        cells = [f"{k} {statistics.median(v) * 1e3:.2f} ms ({statistics.median(v) / base:.2f}x)"
                 for k, v in times.items()]
        print(f"{shape} [{sum(sizes) / 1e6:.1f}M]: " + " | ".join(cells), flush=True)


if __name__ == "__main__":
    main()
