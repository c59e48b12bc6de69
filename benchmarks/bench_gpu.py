"""GPU check of the fused AsFT step: correctness on CUDA tensors, copy bandwidth, and step times.

    python benchmarks/bench_gpu.py --out DIR --section checks     # parity and one-pass c
    python benchmarks/bench_gpu.py --out DIR --section timing     # copy bandwidth, step times
    python benchmarks/bench_gpu.py --out DIR --section big        # a bf16 tensor of > 2**31 elements
    python benchmarks/bench_gpu.py --out DIR --section host       # host time per step, launches stubbed out
    python benchmarks/bench_gpu.py --out DIR --summary            # ratios and goals from what was measured
    ... --dry                                                      # tiny sizes on CPU, TRITON_INTERPRET=1

`benchmarks/gpu_check.sh` runs the sections one by one, each under its own timeout. Every result is
appended to DIR/results.jsonl (one JSON object per line) and DIR/gpu_check.txt (readable) the moment
it is measured, flushed to disk, so a section cut short by its timeout keeps what it measured; a
check that raises is recorded as failed (with its error) and the section goes on with the next one.

Providers timed side by side in one process, same shapes, each with its gradients written in place
("inplace": the same gradient tensors every step) and re-allocated ("realloc": new gradient tensors
every step, as `zero_grad(set_to_none=True)` and backward give; two sets alternate, so every address
changes and only the pointer tables are uploaded again):
  fused_adamw        torch.optim.AdamW(fused=True), fp32
  asft_triton_fp32   AsFTAdamW(impl="triton"), fp32 params, fp32 W0 and d
  asft_triton_bf16wd AsFTAdamW(impl="triton"), fp32 params whose W0 and d are bf16-exact (stored bf16)
  explicit_loss      λ‖C⊥(W - W0)‖² built with autograd each step, backward, then fused AdamW
  fused_adamw_bf16   torch.optim.AdamW(fused=True), bf16 params (torch keeps bf16 moments)
  asft_triton_bf16   AsFTAdamW(impl="triton"), bf16 params, moments, W0 and d
Byte model (bytes per parameter per step, DESIGN.md §4): AdamW 28, AsFT fp32 36, AsFT bf16 W0/d 32;
bf16 params: AdamW 14, AsFT 18 (p read and written, g read, two moments read and written, W0, d).
`predicted_ms` gives the byte model's time at a bandwidth (H200: 4.8 TB/s).

The host section times AsFTAdamW.step() with the kernel launches stubbed out (everything else on the
host runs: plan checks, pointer uploads, step counts), at the same layouts, gradients re-allocated
every step and in place. Its tensors are never written (no memory committed on a CPU): directions
all zero, optimizer state pre-filled as after a first step.

Half-precision correctness is judged per element: each step, from the kernel's own pre-step state,
against a float64 computation of that step in which every stored value is rounded once (to nearest
even; truncated under the interpreter, which truncates). Allowed: ALLOWED_ULP ulp of the stored
value, or, where the stored value cancels, 2**-18 of the magnitude of the terms that made it (fp32
math is that exact; an ulp of a cancelled result says nothing about the step). --dry exercises every
code path on tiny tensors; its timings mean nothing.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import gc
import json
import math
import os
import platform
import statistics
import sys
import time
import traceback
import warnings
from collections.abc import Callable
from pathlib import Path

DRY = "--dry" in sys.argv
if DRY:
    os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported

# E402 is silenced below: torch and triton are imported after TRITON_INTERPRET is set
import torch  # noqa: E402
import triton  # noqa: E402

import asft_optim  # noqa: E402
import asft_optim.kernels  # noqa: E402
from asft_optim import Anchors, AsFTAdamW  # noqa: E402
from asft_optim.kernels import adamw as K  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
BYTES = {"fused_adamw": 28, "asft_triton_fp32": 36, "asft_triton_bf16wd": 32, "fused_adamw_bf16": 14,
         "asft_triton_bf16": 18}
H200_TB_S = 4.8  # HBM3e bandwidth of an H200, for the byte model's predicted step times
GOALS = {"fp32_ratio": 1.35, "bf16wd_ratio": 1.20, "bf16_ratio": 1.35, "realloc_ratio": 1.05, "host_ms": 0.5,
         "copy_fraction": 0.85, "small_launches": 2,
         "small_ratio": 1.5, "explicit_speedup": 5.0}
ALLOWED_ULP = 1.0  # half-precision stored values vs the float64 step, per element
CANCEL = 2.0 ** -18  # where a result cancels: allowed error relative to the magnitude of its terms
FP32_RTOL = 1e-6  # fp32: |Δ| ≤ FP32_RTOL·(1 + |p|), the tests' criterion
SECTIONS = ("checks", "timing", "big", "host")
# 183 tensors, 494,121 blocks of 2048
LLAMA_1B = dict(target=1_000_000_000, hidden=2048, inter=5632, kv=256, vocab=32000)


def tested_copy() -> dict[str, str]:
    """Where asft_optim and its kernels were imported from; raise unless both are this checkout's
    (`asft_optim/` and `kernels/` beside this script's folder): a result must describe the code it
    was run from, not an installed copy elsewhere."""
    pkg = Path(asft_optim.__file__).resolve().parent
    ker = Path(asft_optim.kernels.__file__).resolve().parent
    if pkg != REPO / "asft_optim" or ker != REPO / "kernels":
        raise SystemExit(f"bench_gpu.py: asft_optim is imported from {pkg} and its kernels from {ker}, not from "
                         f"this checkout {REPO}: run it through benchmarks/gpu_check.sh, which puts this "
                         "checkout first on PYTHONPATH")
    return {"asft_optim": str(pkg), "kernels": str(ker)}


class Report:
    """Streams results: one JSON object per line to OUT/results.jsonl and one readable line to
    OUT/gpu_check.txt, both appended and flushed to disk as each result is measured."""

    def __init__(self, out: Path, section: str) -> None:
        out.mkdir(parents=True, exist_ok=True)
        self.section = section
        self.failed = False
        self._jsonl = open(out / "results.jsonl", "a", encoding="utf-8")
        self._txt = open(out / "gpu_check.txt", "a", encoding="utf-8")

    def record(self, kind: str, name: str, text: str, **data) -> None:
        """One result: kind is "meta", "check", "bench", "error", "section_start" or "section_end";
        a "check" carries `ok`, and ok=False marks the run as failed."""
        if kind == "error" or data.get("ok") is False:
            self.failed = True
        row = {"section": self.section, "kind": kind, "name": name,
               "time_utc": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"), **data}
        for fh, line in ((self._jsonl, json.dumps(row, default=str)), (self._txt, text)):
            fh.write(line + "\n")
            fh.flush()
            os.fsync(fh.fileno())
        print(text, flush=True)

    def guarded(self, name: str, fn: Callable[[], None]) -> None:
        """Run one check or measurement; an exception is recorded as its failure, then the next runs."""
        try:
            fn()
        except Exception as e:  # recorded and turned into a failing exit status, never dropped
            self.record("error", name, f"ERROR in {name}: {type(e).__name__}: {e}", ok=False,
                        error=f"{type(e).__name__}: {e}", traceback=traceback.format_exc(limit=8))
        finally:
            free()


class _Unhashed(Anchors):
    """In-memory anchors whose fingerprint names the tensors' keys, dtypes and shapes but does not
    hash their bytes: an in-memory `Anchors` hashes every direction through the CPU (4 GB of fp32
    directions at 1B parameters, 4.3 GB for the >2**31 tensor), which no check here needs."""

    @property
    def fingerprint(self) -> str:
        return "unhashed:" + ";".join(f"{k}:{self.dtype(k)}:{tuple(self.shape(k))}" for k in sorted(self))


def anchors_of(dirs: dict[str, torch.Tensor]) -> Anchors:
    """In-memory anchors over `dirs`, not fingerprinted (`_Unhashed`)."""
    return _Unhashed(dirs)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_ms(fn: Callable[[], None], device: torch.device, warmup: int, iters: int) -> dict[str, float]:
    """Median and 20/80% quantiles of one call's wall time in ms (CUDA events on the GPU)."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(iters):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    q = statistics.quantiles(times, n=5, method="inclusive") if len(times) > 1 else [times[0]] * 4
    return {"median_ms": statistics.median(times), "p20_ms": q[0], "p80_ms": q[-1], "iters": iters}


def launches(fn: Callable[[], None], device: torch.device) -> dict[str, int | None]:
    """Kernels one call launches: ours (`launch_counter`) and all GPU kernels (torch.profiler)."""
    before = K.launch_counter[0]
    fn()
    ours = K.launch_counter[0] - before
    total = None
    if device.type == "cuda":
        sync(device)
        from torch.profiler import ProfilerActivity, profile
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            fn()
            sync(device)
        kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA
                   and not any(w in e.name for w in ("Memcpy", "Memset"))]
        total = len(kernels)
    return {"triton_launches": ours, "gpu_kernels": total}


def free() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# ----------------------------------------------------------------------------------------- shapes
def llama_shapes(target: int, hidden: int, inter: int, kv: int, vocab: int) -> dict[str, tuple[int, ...]]:
    """Llama-like weights (attention q/k/v/o with grouped kv, gate/up/down, 2 norms per layer,
    embedding and head), as many layers as bring the total closest to `target` parameters."""
    layer = {"q_proj": (hidden, hidden), "k_proj": (kv, hidden), "v_proj": (kv, hidden),
             "o_proj": (hidden, hidden), "gate_proj": (inter, hidden), "up_proj": (inter, hidden),
             "down_proj": (hidden, inter), "input_layernorm": (hidden,),
             "post_attention_layernorm": (hidden,)}
    per_layer = sum(math.prod(s) for s in layer.values())
    outer = 2 * vocab * hidden + hidden
    n_layers = max(1, round((target - outer) / per_layer))
    shapes = {"embed_tokens": (vocab, hidden), "norm": (hidden,), "lm_head": (vocab, hidden)}
    for i in range(n_layers):
        shapes.update({f"layers.{i}.{k}": s for k, s in layer.items()})
    return shapes


def small_shapes(count: int, seed: int = 0) -> dict[str, tuple[int, ...]]:
    g = torch.Generator().manual_seed(seed)
    sizes = torch.randint(64, 8192, (count,), generator=g).tolist()
    return {f"small.{i}": (n,) for i, n in enumerate(sizes)}


def make_params(shapes, device, dtype=torch.float32, bf16_exact=False, seed=0, scale=0.02):
    g = torch.Generator(device=device).manual_seed(seed)
    out = {}
    for n, s in shapes.items():
        t = torch.randn(s, device=device, generator=g) * scale
        if bf16_exact:
            t = t.bfloat16().float()
        out[n] = torch.nn.Parameter(t.to(dtype))
    return out


def make_dirs(shapes, device, dtype=torch.float32, seed=1):
    g = torch.Generator(device=device).manual_seed(seed)
    return {n: (torch.randn(s, device=device, generator=g) * 1e-3).to(dtype) for n, s in shapes.items()}


def set_grads(params, seed=2):
    g = torch.Generator(device=next(iter(params.values())).device).manual_seed(seed)
    for p in params.values():
        p.grad = torch.randn(p.shape, device=p.device, generator=g, dtype=p.dtype) * 1e-2


# ------------------------------------------------------------------------------ float64 step oracle
def ulp(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The spacing of `dtype` at |x| (fp32; the smallest normal's spacing below it)."""
    info = torch.finfo(dtype)
    return torch.exp2(torch.floor(torch.log2(x.float().abs().clamp_min(info.tiny)))) * info.eps


def stored(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """x (float64) as the kernel stores it: fp32 math, one rounding to `dtype` (to nearest even;
    the interpreter truncates fp32 → bf16, so emulate that there)."""
    x = x.float()
    if dtype == torch.bfloat16 and K.is_interpreted():
        return (x.view(torch.int32) & -65536).view(torch.float32).to(dtype)  # exact: low bits are 0
    return x.to(dtype)


def projection(d: torch.Tensor, p: torch.Tensor, w0: torch.Tensor, chunk: int = 1 << 26) -> float:
    """c_d = ⟨d, p - W0⟩/‖d‖² in float64, in chunks (no tensor-sized float64 temporaries);
    c·v = c_d·d for any rescaling v of d."""
    fd, fp, fw = d.reshape(-1), p.reshape(-1), w0.reshape(-1)
    dot = nn2 = 0.0
    for i in range(0, fd.numel(), chunk):
        a = fd[i:i + chunk].double()
        dot += float((a * (fp[i:i + chunk].double() - fw[i:i + chunk].double())).sum())
        nn2 += float((a * a).sum())
    return dot / nn2 if nn2 > 0 else 0.0


def oracle_step(p0, g, m0, s0, w0, d, c_d, m_kernel, s_kernel, *, step, lr, wd, lam, betas, eps):
    """One AsFT AdamW step (orthogonal penalty) in float64 from the given pre-step values.

    Returns (want, terms) for (exp_avg, exp_avg_sq, param): the stored values (rounded once, see
    `stored`) and the magnitude of the terms each sums. The new param is computed from the moments
    the kernel stored (checked on their own): a one-ulp difference in a moment would otherwise move
    the update by more than an ulp of p where the second moment is tiny.
    """
    b1, b2 = betas
    dt = p0.dtype
    p64, g64, w64, d64 = p0.double(), g.double(), w0.double(), d.double()
    m064, s064 = m0.double(), s0.double()
    gt = g64 + 2.0 * lam * ((p64 - w64) - c_d * d64)
    m = m064 + (1 - b1) * (gt - m064)
    s = s064 * b2 + (1 - b2) * gt * gt
    denom = s_kernel.double().sqrt() / math.sqrt(1 - b2 ** step) + eps
    update = lr / (1 - b1 ** step) * m_kernel.double() / denom
    new_p = p64 * (1 - lr * wd) - update
    want = [stored(m, dt), stored(s, dt), stored(new_p, dt)]
    terms = [m064.abs() + (1 - b1) * (gt.abs() + m064.abs()), s, p64.abs() + update.abs()]
    return want, terms


def ulp_error(got: torch.Tensor, want: torch.Tensor, terms: torch.Tensor) -> torch.Tensor:
    """Per element |got - want| in units of the allowed error of one rounding: an ulp of the stored
    dtype at the larger of both, or CANCEL·terms where the result cancels (whichever is larger)."""
    bound = torch.maximum(ulp(torch.maximum(got.float().abs(), want.float().abs()), got.dtype),
                          terms.float() * CANCEL)
    return (got.float() - want.float()).abs() / bound


# ----------------------------------------------------------------------------------------- checks
def check_fp32_parity(rep: Report, label: str, shapes, device, steps: int = 10) -> None:
    """impl="triton" against impl="reference" over `steps` free-running steps, fp32, params of unit
    scale: max over elements of |Δ|/(FP32_RTOL·(1 + |p|)) must be ≤ 1."""
    runs = {}
    for impl in ("triton", "reference"):
        params = make_params(shapes, device, scale=1.0)
        opt = AsFTAdamW(list(params.items()), lr=1e-2, weight_decay=0.1, anchors=anchors_of(
            make_dirs(shapes, device)), asft_lambda=0.5, impl=impl)
        for t in range(steps):
            set_grads(params, seed=100 + t)
            opt.step()
        runs[impl] = params
    worst = max(float(((runs["triton"][n].detach() - runs["reference"][n].detach()).abs()
                       / (FP32_RTOL * (1 + runs["reference"][n].detach().abs()))).max()) for n in shapes)
    ok = worst <= 1.0
    rep.record("check", label, f"check {label:34s} max |Δ|/(1e-6·(1 + |p|)) {worst:.3f} (≤ 1)  "
               f"{'ok' if ok else 'FAIL'}", ok=ok, max_rel_err=worst, steps=steps, tensors=len(shapes))


def check_half_steps(rep: Report, label: str, shapes, dtype, device, steps: int = 10) -> None:
    """impl="triton" with `dtype` params over `steps` steps, each judged per element against
    `oracle_step` from the kernel's own pre-step state (exp_avg, exp_avg_sq and the param)."""
    lr, wd, lam, betas, eps = 1e-2, 0.1, 0.5, (0.9, 0.999), 1e-8
    params = make_params(shapes, device, dtype, scale=1.0)
    dirs = make_dirs(shapes, device)
    w0 = {n: p.detach().clone() for n, p in params.items()}
    opt = AsFTAdamW(list(params.items()), lr=lr, weight_decay=wd, betas=betas, eps=eps,
                    anchors=anchors_of(dirs), asft_lambda=lam, impl="triton")
    worst: dict[str, list[float]] = {n: [0.0, 0.0, 0.0] for n in shapes}  # exp_avg, exp_avg_sq, param
    for t in range(steps):
        set_grads(params, seed=300 + t)
        before = {}
        for n, p in params.items():
            st = opt.state.get(p, {})
            zero = torch.zeros_like(p.detach())
            before[n] = (p.detach().clone(), p.grad.clone(), st.get("exp_avg", zero).clone(),
                         st.get("exp_avg_sq", zero).clone())
        opt.step()
        for n, p in params.items():
            p0, g, m0, s0 = before[n]
            st = opt.state[p]
            m_k, s_k = st["exp_avg"], st["exp_avg_sq"]
            want, terms = oracle_step(p0, g, m0, s0, w0[n], dirs[n], projection(dirs[n], p0, w0[n]),
                                      m_k, s_k, step=t + 1, lr=lr, wd=wd, lam=lam, betas=betas, eps=eps)
            for k, got in enumerate((m_k, s_k, p.detach())):
                worst[n][k] = max(worst[n][k], float(ulp_error(got, want[k], terms[k]).max()))
    overall = max(max(v) for v in worst.values())
    ok = overall <= ALLOWED_ULP
    per = ", ".join(f"{n} {max(v):.2f}" for n, v in worst.items())
    rep.record("check", label, f"check {label:34s} max {overall:.2f} ulp per element (≤ {ALLOWED_ULP:g}; "
               f"per tensor: {per})  {'ok' if ok else 'FAIL'}", ok=ok, max_ulp=overall,
               allowed_ulp=ALLOWED_ULP, per_tensor_max_ulp={n: dict(zip(("exp_avg", "exp_avg_sq", "param"), v))
                                                             for n, v in worst.items()},
               steps=steps, interpreted=K.is_interpreted())


def check_one_pass_c(rep: Report, shapes, device, steps: int = 4) -> None:
    """The one-pass c (folded while the update kernel holds the new p) against an exact reduction
    before every step (`resync()`): the parameters after `steps` steps agree within FP32_RTOL."""
    runs = {}
    for exact in (False, True):
        params = make_params(shapes, device, scale=1.0)
        opt = AsFTAdamW(list(params.items()), lr=1e-2, anchors=anchors_of(make_dirs(shapes, device, seed=5)),
                        asft_lambda=2.0, impl="triton")
        for t in range(steps):
            set_grads(params, seed=200 + t)
            if exact:
                opt.resync()
            opt.step()
        runs[exact] = params
    worst = max(float(((runs[False][n].detach() - runs[True][n].detach()).abs()
                       / (FP32_RTOL * (1 + runs[True][n].detach().abs()))).max()) for n in shapes)
    bitwise = all(torch.equal(runs[False][n], runs[True][n]) for n in shapes)
    ok = worst <= 1.0
    rep.record("check", "one_pass_c", f"check one-pass c vs resync() every step: max |Δ|/(1e-6·(1 + |p|)) "
               f"{worst:.3f} (≤ 1), bitwise {bitwise}  {'ok' if ok else 'FAIL'}", ok=ok, max_rel_err=worst,
               bitwise=bitwise)


def check_big_tail(rep: Report, numel: int, device) -> None:
    """One bf16 tensor of `numel` elements (> 2**31 on the GPU), random values: two steps, its last
    2**20 elements judged per element against `oracle_step` (c from a float64 pass over all of it)."""
    n_check = min(numel, 1 << 20)
    lr, lam, betas, eps = 1e-2, 0.5, (0.9, 0.999), 1e-8
    gen = torch.Generator(device=device).manual_seed(7)
    p = torch.nn.Parameter(torch.randn(numel, device=device, dtype=torch.bfloat16, generator=gen))
    d = torch.randn(numel, device=device, dtype=torch.bfloat16, generator=gen)
    w0 = p.detach().clone()
    opt = AsFTAdamW([("big", p)], lr=lr, weight_decay=0.0, betas=betas, eps=eps, anchors=anchors_of({"big": d}),
                    asft_lambda=lam, impl="triton")
    tail = slice(numel - n_check, numel)
    for step in (1, 2):
        p.grad = torch.randn(numel, device=device, dtype=torch.bfloat16, generator=gen)
        st = opt.state.get(p, {})
        p0 = p.detach()[tail].clone()
        zero = torch.zeros_like(p0)
        m0 = st["exp_avg"][tail].clone() if st else zero
        s0 = st["exp_avg_sq"][tail].clone() if st else zero
        c_d = projection(d, p.detach(), w0) if step > 1 else 0.0
        opt.step()
        st = opt.state[p]
        m_k, s_k = st["exp_avg"][tail], st["exp_avg_sq"][tail]
        want, terms = oracle_step(p0, p.grad[tail], m0, s0, w0[tail], d[tail], c_d, m_k, s_k, step=step, lr=lr,
                                  wd=0.0, lam=lam, betas=betas, eps=eps)
        errs = [float(ulp_error(got, w, z).max()) for got, w, z in zip((m_k, s_k, p.detach()[tail]), want, terms)]
        moved = float((p.detach()[tail] != p0).float().mean())
        ok = max(errs) <= ALLOWED_ULP and moved > 0.5
        rep.record("check", f"big_tail_step{step}", f"check big tensor ({numel} elements) step {step}: last "
                   f"{n_check} within {max(errs):.2f} ulp per element (≤ {ALLOWED_ULP:g}), {moved:.0%} moved  "
                   f"{'ok' if ok else 'FAIL'}", ok=ok, numel=numel, checked=n_check,
                   max_ulp=dict(zip(("exp_avg", "exp_avg_sq", "param"), errs)), moved_fraction=moved)


def check_big_c(rep: Report, numel: int, device) -> None:
    """c over a bf16 tensor of `numel` elements, made to matter: p = 0, d = 1, g = 1 at both steps.
    Step 1 (c = 0) moves every element by the same -lr·(1 + ε), so ΔW is parallel to d and the
    orthogonal penalty of step 2 is zero only if c = ⟨v, ΔW⟩/‖v‖² is right over all elements; with
    λ = 500 a c off by 1% moves step 2's exp_avg by about ten ulp. The smallest and largest
    element of p after each step must equal the float64 step with R = 0 within ALLOWED_ULP."""
    lr, lam, betas, eps = 1e-2, 500.0, (0.9, 0.999), 1e-8
    p = torch.nn.Parameter(torch.zeros(numel, device=device, dtype=torch.bfloat16))
    d = torch.ones(numel, device=device, dtype=torch.bfloat16)
    opt = AsFTAdamW([("big", p)], lr=lr, weight_decay=0.0, betas=betas, eps=eps, anchors=anchors_of({"big": d}),
                    asft_lambda=lam, impl="triton")
    one = torch.ones(1, dtype=torch.float64)
    m, s, p_val = torch.zeros(1, dtype=torch.bfloat16), torch.zeros(1, dtype=torch.bfloat16), 0.0
    ok = True
    for step in (1, 2):
        p.grad = torch.ones(numel, device=device, dtype=torch.bfloat16)
        opt.step()
        # the same step in float64 with R = 0 (step 1: ΔW = 0; step 2: ΔW ∥ d), one rounding per stored value
        m = stored(m.double() + (1 - betas[0]) * (one - m.double()), torch.bfloat16)
        s = stored(s.double() * betas[1] + (1 - betas[1]) * one, torch.bfloat16)
        update = lr / (1 - betas[0] ** step) * m.double() / (s.double().sqrt() / math.sqrt(1 - betas[1] ** step) + eps)
        want = stored(p_val - update, torch.bfloat16)
        lo, hi = (x.float().cpu().view(1) for x in (p.detach().min(), p.detach().max()))
        err = max(float(ulp_error(x.to(torch.bfloat16), want, torch.zeros(1)).max()) for x in (lo, hi))
        p_val = float(want)
        step_ok = err <= ALLOWED_ULP
        ok &= step_ok
        rep.record("check", f"big_c_step{step}", f"check big tensor c ({numel} elements, p = 0, d = 1, λ = {lam:g}) "
                   f"step {step}: all of p in [{float(lo):.6g}, {float(hi):.6g}], want {float(want):.6g}, "
                   f"{err:.2f} ulp (≤ {ALLOWED_ULP:g})  {'ok' if step_ok else 'FAIL'}", ok=step_ok, numel=numel,
                   min=float(lo), max=float(hi), want=float(want), max_ulp=err)


# ----------------------------------------------------------------------------------------- timing
def copy_bandwidth(rep: Report, numel: int, device, iters: int) -> None:
    src = torch.randn(numel, device=device)
    dst = torch.empty_like(src)
    t = time_ms(lambda: dst.copy_(src), device, warmup=3, iters=iters)
    gbs = 2 * src.numel() * 4 / (t["median_ms"] * 1e-3) / 1e9
    rep.record("bench", "copy", f"device-to-device copy of {numel * 4 / 1e9:.2f} GB: {t['median_ms']:.3f} ms, "
               f"{gbs:.0f} GB/s", bytes=2 * numel * 4, GB_per_s=gbs, **t)


def bench_provider(rep: Report, suite: str, name: str, shapes, device, warmup: int, iters: int,
                   grads: str = "inplace") -> None:
    """Time one provider's optimizer step (explicit_loss: penalty forward + backward + step).

    grads: "inplace" (the same gradient tensors every step) or "realloc" (new ones every step: two
    sets alternate, so every gradient address changes from one step to the next)."""
    n_params = sum(math.prod(s) for s in shapes.values())
    bf16wd = name == "asft_triton_bf16wd"
    dtype = torch.bfloat16 if name.endswith("_bf16") else torch.float32
    params = make_params(shapes, device, dtype, bf16_exact=bf16wd)
    sets = []
    for seed in (2, 3) if grads == "realloc" else (2,):
        set_grads(params, seed)
        sets.append([p.grad for p in params.values()])
    d_dtype = torch.bfloat16 if bf16wd or dtype == torch.bfloat16 else torch.float32
    dirs = make_dirs(shapes, device, dtype=d_dtype)
    lam = 0.5
    extra: dict[str, object] = {"grads": grads, "param_dtype": str(dtype)}
    if name.startswith("fused_adamw"):
        opt = torch.optim.AdamW(params.values(), lr=1e-5, fused=device.type == "cuda")
        update = opt.step
    elif name.startswith("asft_triton"):
        t0 = time.perf_counter()
        opt = AsFTAdamW(list(params.items()), lr=1e-5, anchors=anchors_of(dirs), asft_lambda=lam, impl="triton")
        extra["build_s"] = time.perf_counter() - t0  # binding, once per run
        update = opt.step
    elif name == "explicit_loss":
        opt = torch.optim.AdamW(params.values(), lr=1e-5, fused=device.type == "cuda")
        w0 = {n: p.detach().clone() for n, p in params.items()}
        units = {n: d.float() / d.float().norm() for n, d in dirs.items()}

        def update() -> None:
            loss = 0.0
            for n, p in params.items():
                dw = p - w0[n]
                r = dw - (dw * units[n]).sum() * units[n]
                loss = loss + (r * r).sum()
            (lam * loss).backward()  # accumulates into the current gradient tensors
            opt.step()
    else:
        raise ValueError(f"unknown provider {name!r}")
    del dirs
    count = [0]

    def step() -> None:
        if len(sets) > 1:
            count[0] += 1
            for p, g in zip(params.values(), sets[count[0] % 2]):
                p.grad = g
        update()

    t = time_ms(step, device, warmup=warmup, iters=iters)
    res = {"suite": suite, "provider": name, "params": n_params, "tensors": len(shapes), **t,
           **launches(step, device), **extra}
    if name in BYTES:
        res["GB_per_s"] = BYTES[name] * n_params / (t["median_ms"] * 1e-3) / 1e9
        res["predicted_ms_h200"] = predicted_ms(BYTES[name], n_params)
    if name.startswith("asft_triton"):
        res["w0_dtype"] = str(opt.state[next(iter(params.values()))]["w0"].dtype)
        res["d_dtype"] = str(d_dtype)
    gbs = f"{res['GB_per_s']:7.0f} GB/s" if "GB_per_s" in res else " " * 12
    rep.record("bench", f"{suite}/{name}/{grads}", f"  {name:20s} {grads:8s} {t['median_ms']:9.3f} ms/step (p20 "
               f"{t['p20_ms']:.3f}, p80 {t['p80_ms']:.3f})  {gbs}  triton launches {res['triton_launches']}, "
               f"GPU kernels {res['gpu_kernels']}", **res)


def predicted_ms(bytes_per_param: int, n_params: int, tb_per_s: float = H200_TB_S) -> float:
    """The byte model's time of one step: bytes moved / bandwidth, in ms."""
    return bytes_per_param * n_params / (tb_per_s * 1e12) * 1e3


def bench_suite(rep: Report, suite: str, shapes, providers, device, warmup: int, iters: int,
                modes: tuple[str, ...] = ("inplace",)) -> None:
    n = sum(math.prod(s) for s in shapes.values())
    rep.record("bench_suite", suite, f"\n{suite}: {n / 1e9:.3f} B parameters in {len(shapes)} tensors",
               params=n, tensors=len(shapes))
    for name in providers:
        for mode in modes:
            rep.guarded(f"{suite}/{name}/{mode}", lambda name=name, mode=mode: bench_provider(
                rep, suite, name, shapes, device, warmup, iters, mode))


class _Stub:
    """Stands in for a Triton kernel: `kernel[grid](...)` launches nothing."""

    def __getitem__(self, grid):
        return lambda *args, **kwargs: None


def host_time(rep: Report, label: str, shapes, device, steps: int) -> None:
    """Host time of AsFTAdamW(impl="triton").step() with the kernels stubbed out (`_Stub`), fp32
    parameters, bf16 W0 and d. Gradients (modes): "realloc", new tensors from `torch.empty_like`
    before every step; "realloc_cached", new tensor objects before every step at the addresses of
    one of two preallocated sets in turn, as a caching allocator (CUDA's) serves them: on a CPU
    this leaves out the allocator's mmap/munmap of every gradient, which "realloc" pays between
    the steps and which slows the step after it (caches, TLB); "inplace", the same tensors.
    Nothing is ever written to the parameters, gradients, moments or W0 (a CPU commits no memory
    for them); the directions are views of one zero buffer (binding copies them: 2 bytes per
    parameter); the optimizer state is pre-filled as after a first step."""
    n_params = sum(math.prod(s) for s in shapes.values())
    blocks = sum(math.ceil(math.prod(s) / K.BLOCK) for s in shapes.values())
    saved = {k: getattr(K, k) for k in ("_update_kernel", "_dot_kernel", "_fold_kernel")}
    for k in saved:
        setattr(K, k, _Stub())
    try:
        params = {n: torch.nn.Parameter(torch.empty(s, device=device)) for n, s in shapes.items()}
        zeros = torch.zeros(max(math.prod(s) for s in shapes.values()), device=device, dtype=torch.bfloat16)
        dirs = {n: zeros[:math.prod(s)].view(s) for n, s in shapes.items()}  # views of one zero buffer
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # zero directions
            opt = AsFTAdamW(list(params.items()), lr=1e-5, anchors=anchors_of(dirs), impl="triton")
        del dirs, zeros
        for p in params.values():
            opt.state[p] = {"step": torch.tensor(1.0), "exp_avg": torch.empty_like(p),
                            "exp_avg_sq": torch.empty_like(p), "w0": torch.empty_like(p, dtype=torch.bfloat16)}
        cached = [{n: torch.empty_like(p) for n, p in params.items()} for _ in range(2)]
        for mode in ("realloc", "realloc_cached", "inplace"):
            times = []
            for k in range(steps + 3):
                for n, p in params.items():
                    if mode == "realloc" or p.grad is None:
                        p.grad = torch.empty_like(p)
                    elif mode == "realloc_cached":
                        p.grad = cached[k % 2][n].detach()  # a new tensor object on that memory
                sync(device)
                t0 = time.perf_counter()
                opt.step()
                sync(device)
                times.append((time.perf_counter() - t0) * 1e3)
            first, times = times[0], times[3:]
            q = statistics.quantiles(times, n=5, method="inclusive")
            res = {"suite": label, "grads": mode, "params": n_params, "tensors": len(shapes), "blocks": blocks,
                   "median_ms": statistics.median(times), "p20_ms": q[0], "p80_ms": q[-1], "first_ms": first,
                   "iters": steps, "cpu": platform.processor() or platform.machine(),
                   "load_avg_1min": os.getloadavg()[0]}
            rep.record("bench", f"host/{label}/{mode}", f"  host time per step, {label} ({len(shapes)} tensors, "
                       f"{blocks} blocks), gradients {mode}: {res['median_ms']:.3f} ms (p20 {q[0]:.3f}, p80 "
                       f"{q[-1]:.3f}; first step {first:.1f} ms; load {res['load_avg_1min']:.1f})", **res)
    finally:
        for k, v in saved.items():
            setattr(K, k, v)


# ----------------------------------------------------------------------------------------- summary
def summarize(out: Path) -> int:
    """Read OUT/results.jsonl; write OUT/gpu_check.json (every row, the ratios, goals and what is
    missing) and the summary lines of OUT/gpu_check.txt. Exit 0 only if every section ran to its
    end and every check passed."""
    path = out / "results.jsonl"
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()] \
        if path.is_file() else []
    started = {r["section"] for r in rows if r["kind"] == "section_start"}
    ended = {r["section"] for r in rows if r["kind"] == "section_end"}
    unfinished = sorted(started - ended)
    not_run = [s for s in SECTIONS if s not in started]
    checks = {r["name"]: r for r in rows if r["kind"] == "check"}
    errors = [r for r in rows if r["kind"] == "error"]
    bench = {(r["suite"], r["provider"], r.get("grads", "inplace")): r for r in rows
             if r["kind"] == "bench" and "provider" in r}
    host = {r["grads"]: r for r in rows if r["kind"] == "bench" and r["name"].startswith("host/")}
    copy = next((r for r in rows if r["kind"] == "bench" and r["name"] == "copy"), None)

    def field(suite_prefix: str, provider: str, key: str = "median_ms", grads: str = "inplace"):
        for (suite, prov, mode), r in bench.items():
            if suite.startswith(suite_prefix) and prov == provider and mode == grads:
                return r.get(key)
        return None

    def ratio(a: float | None, b: float | None) -> float | None:
        return None if a is None or b is None else a / b

    ratios = {
        "fp32_ratio": ratio(field("llama", "asft_triton_fp32"), field("llama", "fused_adamw")),
        "bf16wd_ratio": ratio(field("llama", "asft_triton_bf16wd"), field("llama", "fused_adamw")),
        "bf16_ratio": ratio(field("llama_bf16", "asft_triton_bf16"), field("llama_bf16", "fused_adamw_bf16")),
        "fp32_ratio_realloc": ratio(field("llama", "asft_triton_fp32", grads="realloc"),
                                    field("llama", "fused_adamw", grads="realloc")),
        "realloc_ratio": ratio(field("llama", "asft_triton_fp32", grads="realloc"), field("llama", "asft_triton_fp32")),
        "host_ms": host["realloc"]["median_ms"] if "realloc" in host else None,
        "copy_fraction": ratio(field("llama", "asft_triton_fp32", "GB_per_s"), copy and copy["GB_per_s"]),
        "copy_fraction_bf16wd": ratio(field("llama", "asft_triton_bf16wd", "GB_per_s"), copy and copy["GB_per_s"]),
        "small_launches": field("small", "asft_triton_fp32", "triton_launches"),
        "small_ratio": ratio(field("small", "asft_triton_fp32"), field("small", "fused_adamw")),
        "explicit_speedup": ratio(field("llama", "explicit_loss"), field("llama", "asft_triton_fp32")),
    }
    higher = ("copy_fraction", "explicit_speedup")
    met = {k: None if ratios[k] is None else (ratios[k] >= g if k in higher else ratios[k] <= g)
           for k, g in GOALS.items()}
    checks_ok = bool(checks) and all(r["ok"] for r in checks.values()) and not errors
    complete = not unfinished and not not_run
    (out / "gpu_check.json").write_text(json.dumps(
        {"rows": rows, "ratios": ratios, "goals": GOALS, "goals_met": met, "checks_ok": checks_ok,
         "sections_unfinished": unfinished, "sections_not_run": not_run, "complete": complete},
        indent=2, default=str), encoding="utf-8")
    lines = ["\nsummary:"]
    for k, v in ratios.items():
        sense = "≥" if k in higher else "≤"
        goal = f"[{sense} {GOALS[k]}]" if k in GOALS else ""
        state = "" if k not in met else {None: "not measured", True: "met", False: "NOT met"}[met[k]]
        shown = "       -" if v is None else f"{v:8.3f}"
        lines.append(f"  {k:22s} {shown} {goal} {state}")
    failed = [n for n, r in checks.items() if not r["ok"]] + [r["name"] for r in errors]
    lines.append(f"checks: {len(checks)} run, failed: {', '.join(failed) if failed else 'none'}")
    if unfinished:
        lines.append(f"sections cut short (timeout or crash): {', '.join(unfinished)}")
    if not_run:
        lines.append(f"sections not run: {', '.join(not_run)}")
    text = "\n".join(lines)
    print(text)
    with open(out / "gpu_check.txt", "a", encoding="utf-8") as fh:
        fh.write(text + "\n")
    return 0 if checks_ok and complete else 1


# ----------------------------------------------------------------------------------------- main
def run_section(rep: Report, section: str, dry: bool, device: torch.device) -> None:
    if dry:
        big_numel, llama = 3 * K.BLOCK + 77, dict(target=60_000, hidden=32, inter=96, kv=8, vocab=200)
        n_small, copy_numel, warmup, iters = 20, 1 << 16, 1, 2
    else:
        big_numel, llama = (1 << 31) + 3 * K.BLOCK + 77, LLAMA_1B
        n_small, copy_numel, warmup, iters = 1000, 1 << 30, 3, 20
    odd = {"one": (1,), "seven": (7,), "odd": (4097,), "mat": (5, 123), "many_blocks": (40 * K.BLOCK + 3,)}
    if section == "checks":
        rep.guarded("fp32 odd shapes", lambda: check_fp32_parity(rep, "fp32 odd shapes", odd, device))
        rep.guarded("bf16 odd shapes", lambda: check_half_steps(rep, "bf16 odd shapes", odd, torch.bfloat16, device))
        rep.guarded("fp16 odd shapes", lambda: check_half_steps(rep, "fp16 odd shapes", odd, torch.float16, device))
        tiny = {f"t{i}": (1 + i % 300,) for i in range(n_small)}
        rep.guarded(f"fp32 {n_small} tiny tensors",
                    lambda: check_fp32_parity(rep, f"fp32 {n_small} tiny tensors", tiny, device))
        rep.guarded("one_pass_c", lambda: check_one_pass_c(rep, odd, device))
    elif section == "timing":
        rep.guarded("copy", lambda: copy_bandwidth(rep, copy_numel, device, iters))
        both = ("inplace", "realloc")
        bench_suite(rep, "llama_1b", llama_shapes(**llama), ["fused_adamw", "asft_triton_fp32",
                                                             "asft_triton_bf16wd", "explicit_loss"],
                    device, warmup, iters, both)
        bench_suite(rep, "llama_bf16", llama_shapes(**llama), ["fused_adamw_bf16", "asft_triton_bf16"],
                    device, warmup, iters, both)
        bench_suite(rep, f"small_{n_small}", small_shapes(n_small), ["fused_adamw", "asft_triton_fp32"],
                    device, warmup, iters)
    elif section == "big":  # the > 2**31 tail first: it is what only this section checks
        rep.guarded("big_tail", lambda: check_big_tail(rep, big_numel, device))
        rep.guarded("big_c", lambda: check_big_c(rep, big_numel, device))
    elif section == "host":  # the 1B layout on any machine: nothing is written, the launches are stubbed
        rep.guarded("host", lambda: host_time(rep, "llama_1b", llama_shapes(**LLAMA_1B), device, steps=20))
    else:
        raise ValueError(f"unknown section {section!r}; expected one of {SECTIONS}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--section", choices=SECTIONS, help="what to measure (results appended to OUT)")
    ap.add_argument("--summary", action="store_true", help="ratios and goals from OUT/results.jsonl")
    ap.add_argument("--dry", action="store_true", help="tiny sizes on CPU under TRITON_INTERPRET=1")
    args = ap.parse_args()
    if args.summary == (args.section is not None):
        ap.error("give exactly one of --section or --summary")
    where = tested_copy()
    if args.summary:
        return summarize(args.out)
    if not args.dry and not torch.cuda.is_available():
        print("bench_gpu.py: no CUDA device (use --dry on CPU)", file=sys.stderr)
        return 2
    device = torch.device("cpu" if args.dry else "cuda")
    rep = Report(args.out, args.section)
    meta = {"device": "cpu (dry run)" if args.dry else torch.cuda.get_device_name(device),
            "torch": torch.__version__, "triton": triton.__version__, "python": platform.python_version(),
            "command": " ".join(sys.argv), "dry": args.dry, "BLOCK": K.BLOCK, "NUM_WARPS": K.NUM_WARPS, **where}
    rep.record("section_start", args.section, f"== section {args.section}: {meta}", **meta)
    t0 = time.perf_counter()
    run_section(rep, args.section, args.dry, device)
    rep.record("section_end", args.section, f"== section {args.section} done in {time.perf_counter() - t0:.1f} s",
               seconds=time.perf_counter() - t0)
    return 1 if rep.failed else 0


if __name__ == "__main__":
    sys.exit(main())
