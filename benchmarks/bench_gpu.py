"""GPU check of the fused AsFT step: correctness on CUDA tensors, copy bandwidth, and step times.

    python benchmarks/bench_gpu.py --out DIR          # on a CUDA machine (benchmarks/gpu_check.sh)
    python benchmarks/bench_gpu.py --out DIR --dry    # tiny sizes on CPU, TRITON_INTERPRET=1

Providers timed side by side in one process, same shapes, gradients fixed before timing:
  fused_adamw        torch.optim.AdamW(fused=True), fp32
  asft_triton_fp32   AsFTAdamW(impl="triton"), fp32 params, fp32 W0 and d
  asft_triton_bf16wd AsFTAdamW(impl="triton"), fp32 params whose W0 and d are bf16-exact (stored bf16)
  explicit_loss      λ‖C⊥(W - W0)‖² built with autograd each step, backward, then fused AdamW
Byte model (bytes per parameter per step, DESIGN.md §4): AdamW 28, AsFT fp32 36, AsFT bf16 W0/d 32.
Writes DIR/gpu_check.json (all numbers) and DIR/gpu_check.txt (the same, readable). --dry exercises
every code path on tiny tensors; its numbers mean nothing.
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
from collections.abc import Callable
from pathlib import Path

DRY = "--dry" in sys.argv
if DRY:
    os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported

import torch  # noqa: E402
import triton  # noqa: E402

from asft_optim import Anchors, AsFTAdamW  # noqa: E402
from asft_optim.kernels import adamw as K  # noqa: E402

BYTES = {"fused_adamw": 28, "asft_triton_fp32": 36, "asft_triton_bf16wd": 32}
GOALS = {"fp32_ratio": 1.35, "bf16wd_ratio": 1.20, "copy_fraction": 0.85, "small_launches": 2,
         "small_ratio": 1.5, "explicit_speedup": 5.0}


class Report:
    """Collects results; prints each line and keeps the json tree."""

    def __init__(self, out: Path) -> None:
        self.out = out
        self.data: dict = {}
        self.lines: list[str] = []

    def line(self, text: str) -> None:
        print(text, flush=True)
        self.lines.append(text)

    def save(self) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / "gpu_check.json").write_text(json.dumps(self.data, indent=2, default=str))
        (self.out / "gpu_check.txt").write_text("\n".join(self.lines) + "\n")


def anchors_of(dirs: dict[str, torch.Tensor]) -> Anchors:
    """In-memory anchors on the GPU; a fixed fingerprint skips hashing gigabytes through the CPU."""
    return Anchors.from_tensors(dirs, metadata={"fingerprint": "bench-gpu"})


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


# ----------------------------------------------------------------------------------------- checks
def ulp(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The spacing of `dtype` at |x| (fp32)."""
    info = torch.finfo(dtype)
    return torch.exp2(torch.floor(torch.log2(x.float().abs().clamp_min(info.tiny)))) * info.eps


def ulps(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """|a - b| in units of the spacing of a's dtype at max(|a|, |b|)."""
    return (a.float() - b.float()).abs() / ulp(torch.maximum(a.float().abs(), b.float().abs()), a.dtype)


def check_parity(rep: Report, label: str, shapes, dtype, device, steps: int = 10) -> bool:
    """impl="triton" against impl="reference" on `device` over `steps` steps."""
    runs = {}
    for impl in ("triton", "reference"):
        params = make_params(shapes, device, dtype, scale=1.0)
        opt = AsFTAdamW(list(params.items()), lr=1e-2, weight_decay=0.1, anchors=anchors_of(
            make_dirs(shapes, device)), asft_lambda=0.5, impl=impl)
        for t in range(steps):
            set_grads(params, seed=100 + t)
            opt.step()
        runs[impl] = params
    worst, mean_ulp = 0.0, 0.0
    for n in shapes:
        a, b = runs["triton"][n].detach(), runs["reference"][n].detach()
        if dtype == torch.float32:  # the tests' criterion: |Δ| ≤ 1e-6 + 1e-6·|p|, params of unit scale
            worst = max(worst, float(((a - b).abs() / (1e-6 + 1e-6 * b.abs())).max()))
        else:
            u = ulps(a, b)
            worst, mean_ulp = max(worst, float(u.max())), max(mean_ulp, float(u.mean()))
    judged = not (K.is_interpreted() and dtype != torch.float32)  # the interpreter truncates to bf16
    if dtype == torch.float32:
        ok = worst <= 1.0
        rep.data.setdefault("checks", {})[label] = {"max_rel_err": worst, "ok": ok}
        rep.line(f"check {label:28s} max |Δ|/(1e-6 + 1e-6·|p|) {worst:.3f} (≤ 1)  "
                 f"{'ok' if ok else 'FAIL'}")
    else:
        ok = mean_ulp <= 1.0 or not judged
        rep.data.setdefault("checks", {})[label] = {"max_ulp": worst, "mean_ulp": mean_ulp, "ok": ok,
                                                    "judged": judged}
        rep.line(f"check {label:28s} max {worst:.1f} ulp, mean {mean_ulp:.3f} ulp (mean ≤ 1)  "
                 f"{('ok' if ok else 'FAIL') if judged else 'not judged (interpreter)'}")
    return ok


def check_big_tensor(rep: Report, numel: int, device) -> bool:
    """One bf16 tensor of `numel` elements (> 2**31 on the GPU): two steps, its tail checked against
    a float64 computation of the same step, and c against a float64 dot over the whole tensor."""
    n_check = min(numel, 1 << 20)
    p = torch.nn.Parameter(torch.randn(numel, device=device, dtype=torch.bfloat16))
    d = torch.randn(numel, device=device, dtype=torch.bfloat16)
    opt = AsFTAdamW([("big", p)], lr=1e-2, weight_decay=0.0, anchors=anchors_of({"big": d}), asft_lambda=0.5,
                    impl="triton")
    del d
    gen = torch.Generator(device=device).manual_seed(7)
    tail = slice(numel - n_check, numel)
    ok = True
    for step in (1, 2):
        p.grad = torch.randn(numel, device=device, dtype=torch.bfloat16, generator=gen)
        st = opt.state.get(p, {})
        p0 = p.detach()[tail].double()
        g0 = p.grad[tail].double()
        m0 = st["exp_avg"][tail].double() if st else torch.zeros_like(p0)
        s0 = st["exp_avg_sq"][tail].double() if st else torch.zeros_like(p0)
        bound = (opt._bindings["big"].direction if "big" in opt._bindings else None)
        c = 0.0
        if st:  # exact c in float64 over the whole tensor, in chunks
            w0 = st["w0"]
            dot = sum(float((bound.v[i:i + (1 << 28)].double() * (p.detach()[i:i + (1 << 28)].double()
                      - w0[i:i + (1 << 28)].double())).sum()) for i in range(0, numel, 1 << 28))
            c = dot * bound.inv_nv2
            kernel_c = float(opt._triton.slots.buffers[p.device][opt._triton.slots.slot["big"]])
            c_err = abs(kernel_c - c) / max(abs(c), 1e-30)
            rep.data.setdefault("checks", {})["big_c_rel_err"] = c_err
            rep.line(f"check big tensor c (one pass vs float64 dot) relative error {c_err:.2e}")
            ok &= c_err <= 1e-4
        opt.step()
        if bound is None:
            bound = opt._bindings["big"].direction
        v = bound.v[tail].double()
        w0t = opt.state[p]["w0"][tail].double()
        gt = g0 + 1.0 * ((p0 - w0t) - c * v)  # coef = 2λ = 1
        m = (m0 + 0.1 * (gt - m0)).to(torch.bfloat16).double()
        s = (s0 * 0.999 + 0.001 * gt * gt).to(torch.bfloat16).double()
        update = 1e-2 / (1 - 0.9 ** step) * m / (s.sqrt() / math.sqrt(1 - 0.999 ** step) + 1e-8)
        want = (p0 - update).to(torch.bfloat16)
        got = p.detach()[tail]
        # one ulp of the result, plus one of the update (its moments are stored in bf16)
        tol = (ulp(torch.maximum(got.float().abs(), want.float().abs()), torch.bfloat16)
               + ulp(update, torch.bfloat16))
        u = (got.float() - want.float()).abs() / tol
        moved = float((p.detach()[tail].double() != p0).float().mean())
        judged = not K.is_interpreted()  # the interpreter truncates to bf16
        step_ok = (float(u.max()) <= 1.0 or not judged) and moved > 0.5
        rep.data.setdefault("checks", {})[f"big_tail_step{step}"] = {
            "numel": numel, "checked": n_check, "max_ulp": float(u.max()), "moved_fraction": moved,
            "ok": step_ok, "judged": judged}
        rep.line(f"check big tensor ({numel} elements) step {step}: last {n_check} within "
                 f"{float(u.max()):.2f} × (ulp(p) + ulp(update)), {moved:.0%} moved  "
                 f"{('ok' if step_ok else 'FAIL') if judged else 'not judged (interpreter)'}")
        ok &= step_ok
    del opt, p
    free()
    return ok


def check_one_pass_c(rep: Report, shapes, device) -> bool:
    params = make_params(shapes, device)
    opt = AsFTAdamW(list(params.items()), lr=1e-2, anchors=anchors_of(make_dirs(shapes, device)),
                    asft_lambda=0.5, impl="triton")
    for t in range(3):
        set_grads(params, seed=200 + t)
        opt.step()
    (buf,) = opt._triton.slots.buffers.values()
    one_pass = buf.clone()
    for _, table in opt._triton.tables.values():
        K.exact_c_(table, buf)
    diff = float(((buf - one_pass).abs() / one_pass.abs().clamp_min(1e-30)).max())
    bitwise = bool(torch.equal(buf, one_pass))
    ok = diff <= 1e-6
    rep.data.setdefault("checks", {})["one_pass_c"] = {"max_rel_diff": diff, "bitwise": bitwise, "ok": ok}
    rep.line(f"check one-pass c vs exact pass: max relative difference {diff:.2e}, bitwise {bitwise}  "
             f"{'ok' if ok else 'FAIL'}")
    return ok


# ----------------------------------------------------------------------------------------- timing
def copy_bandwidth(rep: Report, numel: int, device, iters: int) -> float:
    src = torch.randn(numel, device=device)
    dst = torch.empty_like(src)
    t = time_ms(lambda: dst.copy_(src), device, warmup=3, iters=iters)
    gbs = 2 * src.numel() * 4 / (t["median_ms"] * 1e-3) / 1e9
    rep.data["copy"] = {"bytes": 2 * numel * 4, **t, "GB_per_s": gbs}
    rep.line(f"device-to-device copy of {numel * 4 / 1e9:.2f} GB: {t['median_ms']:.3f} ms, {gbs:.0f} GB/s")
    del src, dst
    free()
    return gbs


def bench_provider(name: str, shapes, device, warmup: int, iters: int) -> dict:
    """Time one provider's optimizer step (explicit_loss: penalty forward + backward + step)."""
    n_params = sum(math.prod(s) for s in shapes.values())
    bf16wd = name == "asft_triton_bf16wd"
    params = make_params(shapes, device, bf16_exact=bf16wd)
    set_grads(params)
    dirs = make_dirs(shapes, device, dtype=torch.bfloat16 if bf16wd else torch.float32)
    lam = 0.5
    if name == "fused_adamw":
        opt = torch.optim.AdamW(params.values(), lr=1e-5, fused=device.type == "cuda")
        step = opt.step
    elif name.startswith("asft_triton"):
        opt = AsFTAdamW(list(params.items()), lr=1e-5, anchors=anchors_of(dirs), asft_lambda=lam,
                        impl="triton")
        step = opt.step
    elif name == "explicit_loss":
        opt = torch.optim.AdamW(params.values(), lr=1e-5, fused=device.type == "cuda")
        w0 = {n: p.detach().clone() for n, p in params.items()}
        units = {n: d.float() / d.float().norm() for n, d in dirs.items()}

        def step() -> None:
            loss = 0.0
            for n, p in params.items():
                dw = p - w0[n]
                r = dw - (dw * units[n]).sum() * units[n]
                loss = loss + (r * r).sum()
            (lam * loss).backward()
            opt.step()
    else:
        raise ValueError(f"unknown provider {name!r}")
    del dirs
    t = time_ms(step, device, warmup=warmup, iters=iters)
    res = {"params": n_params, "tensors": len(shapes), **t, **launches(step, device)}
    if name in BYTES:
        res["GB_per_s"] = BYTES[name] * n_params / (t["median_ms"] * 1e-3) / 1e9
    if name == "asft_triton_bf16wd":
        sample = next(iter(params.values()))
        res["w0_dtype"] = str(opt.state[sample]["w0"].dtype)
        res["v_dtype"] = str(opt._bindings[next(iter(params))].direction.v.dtype)
    del opt, params, step
    free()
    return res


def bench_suite(rep: Report, label: str, shapes, providers, device, warmup: int, iters: int) -> dict:
    n = sum(math.prod(s) for s in shapes.values())
    rep.line(f"\n{label}: {n / 1e9:.3f} B parameters in {len(shapes)} tensors (fp32)")
    out = {}
    for name in providers:
        r = bench_provider(name, shapes, device, warmup, iters)
        out[name] = r
        gbs = f"{r['GB_per_s']:7.0f} GB/s" if "GB_per_s" in r else " " * 12
        rep.line(f"  {name:20s} {r['median_ms']:9.3f} ms/step (p20 {r['p20_ms']:.3f}, p80 {r['p80_ms']:.3f})"
                 f"  {gbs}  triton launches {r['triton_launches']}, GPU kernels {r['gpu_kernels']}")
    rep.data.setdefault("bench", {})[label] = out
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--dry", action="store_true", help="tiny sizes on CPU under TRITON_INTERPRET=1")
    ap.add_argument("--skip-big", action="store_true", help="skip the > 2**31-element tensor")
    args = ap.parse_args()
    if not args.dry and not torch.cuda.is_available():
        print("bench_gpu.py: no CUDA device (use --dry on CPU)", file=sys.stderr)
        return 2
    device = torch.device("cpu" if args.dry else "cuda")
    rep = Report(args.out)
    rep.data["meta"] = {
        "date_utc": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "device": "cpu (dry run)" if args.dry else torch.cuda.get_device_name(device),
        "torch": torch.__version__, "triton": triton.__version__, "python": platform.python_version(),
        "command": " ".join(sys.argv), "dry": args.dry, "BLOCK": K.BLOCK, "NUM_WARPS": K.NUM_WARPS}
    rep.line(f"bench_gpu.py {rep.data['meta']}")
    if args.dry:
        big_numel, llama = 3 * K.BLOCK + 77, dict(target=60_000, hidden=32, inter=96, kv=8, vocab=200)
        n_small, copy_numel, warmup, iters = 20, 1 << 16, 1, 2
    else:
        big_numel, llama = (1 << 31) + 3 * K.BLOCK + 77, dict(target=1_000_000_000, hidden=2048, inter=5632,
                                                              kv=256, vocab=32000)
        n_small, copy_numel, warmup, iters = 1000, 1 << 30, 3, 20
    ok = True
    # --- correctness on the device
    odd = {"one": (1,), "seven": (7,), "odd": (4097,), "mat": (5, 123), "many_blocks": (40 * K.BLOCK + 3,)}
    ok &= check_parity(rep, "fp32 odd shapes", odd, torch.float32, device)
    ok &= check_parity(rep, "bf16 odd shapes", odd, torch.bfloat16, device)
    ok &= check_parity(rep, f"fp32 {n_small} tiny tensors", {f"t{i}": (1 + i % 300,) for i in range(n_small)},
                       torch.float32, device)
    ok &= check_one_pass_c(rep, odd, device)
    if not args.skip_big:
        ok &= check_big_tensor(rep, big_numel, device)
    # --- bandwidth and timings
    copy_gbs = copy_bandwidth(rep, copy_numel, device, iters)
    shapes = llama_shapes(**llama)
    big = bench_suite(rep, "llama_1b", shapes, ["fused_adamw", "asft_triton_fp32", "asft_triton_bf16wd",
                                                 "explicit_loss"], device, warmup, iters)
    small = bench_suite(rep, f"small_{n_small}", small_shapes(n_small), ["fused_adamw", "asft_triton_fp32"],
                        device, warmup, iters)
    base = big["fused_adamw"]["median_ms"]
    ratios = {
        "fp32_ratio": big["asft_triton_fp32"]["median_ms"] / base,
        "bf16wd_ratio": big["asft_triton_bf16wd"]["median_ms"] / base,
        "copy_fraction": big["asft_triton_fp32"]["GB_per_s"] / copy_gbs,
        "copy_fraction_bf16wd": big["asft_triton_bf16wd"]["GB_per_s"] / copy_gbs,
        "small_launches": small["asft_triton_fp32"]["triton_launches"],
        "small_ratio": small["asft_triton_fp32"]["median_ms"] / small["fused_adamw"]["median_ms"],
        "explicit_speedup": big["explicit_loss"]["median_ms"] / big["asft_triton_fp32"]["median_ms"],
    }
    met = {
        "fp32_ratio": ratios["fp32_ratio"] <= GOALS["fp32_ratio"],
        "bf16wd_ratio": ratios["bf16wd_ratio"] <= GOALS["bf16wd_ratio"],
        "copy_fraction": ratios["copy_fraction"] >= GOALS["copy_fraction"],
        "small_launches": ratios["small_launches"] <= GOALS["small_launches"],
        "small_ratio": ratios["small_ratio"] <= GOALS["small_ratio"],
        "explicit_speedup": ratios["explicit_speedup"] >= GOALS["explicit_speedup"],
    }
    rep.data["ratios"], rep.data["goals"], rep.data["goals_met"] = ratios, GOALS, met
    rep.line("\nratios (goal in brackets):")
    for k, v in ratios.items():
        sense = "≥" if k in ("copy_fraction", "explicit_speedup") else "≤"
        goal = f"[{sense} {GOALS[k]}]" if k in GOALS else ""
        rep.line(f"  {k:22s} {v:8.3f} {goal} {'' if k not in met else ('met' if met[k] else 'NOT met')}")
    rep.data["checks_ok"] = bool(ok)
    rep.line(f"\ncorrectness checks: {'all ok' if ok else 'FAILURES (see above)'}")
    rep.save()
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
