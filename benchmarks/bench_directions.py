"""Throughput and peak memory of `compute_directions` on a synthetic pair of sharded checkpoints.

    python benchmarks/bench_directions.py [--gb 2] [--dtype bf16] [--dir /tmp] [--threads 1] [--no-naive]
    pytest benchmarks/bench_directions.py                  # smaller pair, ASFT_BENCH_GB (default 0.5)

The pair is Llama-shaped (hidden 2048, MLP 5632, vocab 32000; the layer count sets the size), bf16,
in ~500 MB shards with a `model.safetensors.index.json`, generated under --dir and deleted afterwards.
Wall time and CPU time (user + sys, all threads) are both reported with the 1-minute load average:
on a shared machine the wall time mostly measures the other processes. Each measurement runs in a
fresh interpreter so that its peak resident memory (VmHWM) starts from a
clean baseline (the resident memory after `import asft_optim`). Providers, side by side:

- `cat`: a plain sequential read of both checkpoints' files (`cat files > /dev/null`), the disk floor;
- `asft`: `compute_directions(base, aligned, out, dtype)`;
- `naive`: per tensor, `safe_open(...).get_tensor` on both files, subtract in fp32, keep the result
  (what a straightforward streaming loop does), then `save_file`: shows what the chunked reader saves.

When the page cache can be dropped (`/proc/sys/vm/drop_caches`, needs root), each provider runs once
cold, then `cat` and `asft` once more warm; otherwise all runs are warm and the report says so.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

HIDDEN, MLP, VOCAB = 2048, 5632, 32000
SHARD_BYTES = 500 * 2**20

_CHILD = r"""
import json, resource, sys, time
def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
kind, base, aligned, out, dtype = sys.argv[1:6]
import torch, asft_optim
from safetensors import safe_open
from safetensors.torch import save_file
baseline = status("VmRSS")
r0 = resource.getrusage(resource.RUSAGE_SELF)
t = time.perf_counter()
if kind == "asft":
    asft_optim.compute_directions(base, aligned, out, dtype=dtype, progress=False)
else:
    from asft_optim.checkpoints import open_checkpoint
    bc, ac = open_checkpoint(base), open_checkpoint(aligned)
    result = {}
    for name, info in ac.tensors.items():
        with safe_open(str(bc.tensors[name].file), "pt") as fb, safe_open(str(info.file), "pt") as fa:
            d = fa.get_tensor(name).float() - fb.get_tensor(name).float()
            result[name] = d.to(asft_optim.directions.DTYPES[dtype])
    save_file(result, out)
seconds = time.perf_counter() - t
r1 = resource.getrusage(resource.RUSAGE_SELF)
cpu = r1.ru_utime - r0.ru_utime + r1.ru_stime - r0.ru_stime
print(json.dumps({"seconds": seconds, "cpu": cpu, "baseline": baseline, "peak": status("VmHWM")}))
"""


def layers_for(gb: float) -> int:
    per_layer = 4 * HIDDEN * HIDDEN + 3 * HIDDEN * MLP
    return max(1, round((gb * 1e9 / 2 - 2 * VOCAB * HIDDEN) / per_layer))


def shapes(n_layers: int) -> dict[str, tuple[int, ...]]:
    out = {"model.embed_tokens.weight": (VOCAB, HIDDEN)}
    for i in range(n_layers):
        p = f"model.layers.{i}."
        for m in ("q_proj", "k_proj", "v_proj", "o_proj"):
            out[p + f"self_attn.{m}.weight"] = (HIDDEN, HIDDEN)
        out[p + "mlp.gate_proj.weight"] = out[p + "mlp.up_proj.weight"] = (MLP, HIDDEN)
        out[p + "mlp.down_proj.weight"] = (HIDDEN, MLP)
        out[p + "input_layernorm.weight"] = out[p + "post_attention_layernorm.weight"] = (HIDDEN,)
    out["model.norm.weight"] = (HIDDEN,)
    out["lm_head.weight"] = (VOCAB, HIDDEN)
    return out


def write_pair(root: Path, n_layers: int) -> tuple[Path, Path]:
    """Write base and aligned (= base + noise) as bf16 shards with an index; returns the two folders."""
    from safetensors.torch import save_file

    spec = shapes(n_layers)
    g = torch.Generator().manual_seed(0)
    folders = (root / "base", root / "aligned")
    for f in folders:
        f.mkdir(parents=True)
    groups: list[list[str]] = [[]]
    size = 0
    for name, shape in spec.items():
        nbytes = 2 * torch.Size(shape).numel()
        if groups[-1] and size + nbytes > SHARD_BYTES:
            groups.append([])
            size = 0
        groups[-1].append(name)
        size += nbytes
    weight_map = {}
    for i, names in enumerate(groups):
        shard = f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
        base = {n: torch.randn(spec[n], generator=g).bfloat16() for n in names}
        aligned = {n: (t.float() + 0.01 * torch.randn(spec[n], generator=g)).bfloat16() for n, t in base.items()}
        save_file(base, str(folders[0] / shard), metadata={"format": "pt"})
        save_file(aligned, str(folders[1] / shard), metadata={"format": "pt"})
        weight_map.update({n: shard for n in names})
    for f in folders:
        (f / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return folders


def drop_caches() -> bool:
    try:
        os.sync()
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return True
    except OSError:
        return False


def run_child(kind: str, base: Path, aligned: Path, out: Path, dtype: str, threads: int | None) -> dict:
    env = dict(os.environ, **({"OMP_NUM_THREADS": str(threads)} if threads else {}))  # 0/None: default
    r = subprocess.run([sys.executable, "-c", _CHILD, kind, str(base), str(aligned), str(out), dtype],
                       capture_output=True, text=True, env=env)
    if r.returncode != 0:
        raise RuntimeError(f"{kind} run failed:\n{r.stderr}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def run_cat(folders: tuple[Path, Path]) -> dict:
    files = [str(p) for f in folders for p in sorted(f.glob("*.safetensors"))]
    r0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    t = time.perf_counter()
    subprocess.run(["cat", *files], stdout=subprocess.DEVNULL, check=True)
    seconds = time.perf_counter() - t
    r1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    return {"seconds": seconds, "cpu": r1.ru_utime - r0.ru_utime + r1.ru_stime - r0.ru_stime}


def bench(gb: float, dtype: str, workdir: str, naive: bool, threads: int | None = None) -> dict:
    n_layers = layers_for(gb)
    root = Path(tempfile.mkdtemp(prefix="asft-bench-", dir=workdir))
    try:
        t = time.perf_counter()
        base, aligned = write_pair(root, n_layers)
        gen_s = time.perf_counter() - t
        spec = shapes(n_layers)
        in_bytes = sum(p.stat().st_size for f in (base, aligned) for p in f.glob("*.safetensors"))
        largest = 2 * max(torch.Size(s).numel() for s in spec.values())
        out = root / "d.safetensors"
        cold = drop_caches()
        runs: list[dict] = []

        def record(provider: str, cache: str, child: dict) -> None:
            row = {"provider": provider, "cache": cache, "seconds": child["seconds"], "cpu_s": child["cpu"],
                   "MB/s": in_bytes / child["seconds"] / 1e6, "load": os.getloadavg()[0]}
            if "peak" in child:
                row.update(baseline_MiB=child["baseline"] / 2**20, peak_MiB=child["peak"] / 2**20,
                           peak_over_baseline_x_largest=(child["peak"] - child["baseline"]) / largest)
            runs.append(row)

        if cold:
            record("cat", "cold", run_cat((base, aligned)))
            drop_caches()
            c = run_child("asft", base, aligned, out, dtype, threads)
            record("asft", "cold", c)
            if naive:
                out.unlink()
                drop_caches()
                c = run_child("naive", base, aligned, out, dtype, threads)
                record("naive", "cold", c)
        record("cat", "warm", run_cat((base, aligned)))
        out.unlink(missing_ok=True)
        c = run_child("asft", base, aligned, out, dtype, threads)
        record("asft", "warm", c)
        if naive and not cold:
            out.unlink()
            c = run_child("naive", base, aligned, out, dtype, threads)
            record("naive", "warm", c)
        return {"layers": n_layers, "tensors": len(spec), "input_GB_each": in_bytes / 2 / 1e9,
                "largest_tensor_MiB": largest / 2**20, "out_dtype": dtype, "generate_s": gen_s,
                "caches_dropped": cold, "torch_threads": threads or torch.get_num_threads(), "runs": runs}
    finally:
        shutil.rmtree(root, ignore_errors=True)


def report(res: dict) -> str:
    lines = [f"pair: {res['input_GB_each']:.2f} GB each (bf16, {res['tensors']} tensors, {res['layers']} layers), "
             f"largest tensor {res['largest_tensor_MiB']:.0f} MiB, output {res['out_dtype']}, "
             f"torch threads {res['torch_threads']}, {os.cpu_count()} CPUs, "
             f"page cache {'dropped before each cold run' if res['caches_dropped'] else 'NOT dropped: all runs warm'}",
             "",
             "| provider | cache | wall s | CPU s | input MB/s (wall) | load avg | baseline RSS MiB | peak RSS MiB "
             "| (peak-baseline)/largest |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in res["runs"]:
        mem = (f"{r['baseline_MiB']:.0f} | {r['peak_MiB']:.0f} | {r['peak_over_baseline_x_largest']:.2f}"
               if "peak_MiB" in r else "- | - | -")
        lines.append(f"| {r['provider']} | {r['cache']} | {r['seconds']:.2f} | {r['cpu_s']:.2f} | {r['MB/s']:.0f} "
                     f"| {r['load']:.1f} | {mem} |")
    return "\n".join(lines)


def test_directions_throughput(benchmark):
    """pytest-benchmark entry: one round of the whole comparison on a smaller pair."""
    gb = float(os.environ.get("ASFT_BENCH_GB", "0.5"))
    res = benchmark.pedantic(bench, args=(gb, "bf16", tempfile.gettempdir(), True, 1), rounds=1, iterations=1)
    benchmark.extra_info.update(res)
    print("\n" + report(res))
    asft = [r for r in res["runs"] if r["provider"] == "asft"]
    assert all(r["peak_over_baseline_x_largest"] < 3 for r in asft)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--gb", type=float, default=2.0, help="size of each checkpoint in GB (default 2)")
    ap.add_argument("--dtype", default="bf16", choices=["bf16", "fp32"], help="output dtype")
    ap.add_argument("--dir", default=tempfile.gettempdir(), help="where to generate the pair")
    ap.add_argument("--no-naive", action="store_true", help="skip the safe_open comparison")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads (OMP_NUM_THREADS) for the measured runs; 1 as `asft directions` uses, "
                         "0 for torch's default")
    ap.add_argument("--json", help="also write the results to this JSON file")
    args = ap.parse_args()
    free = shutil.disk_usage(args.dir).free
    need = 2.2 * args.gb * 1e9 * (2 if args.dtype == "fp32" else 1.5)
    if free < need:
        sys.exit(f"{args.dir} has {free / 1e9:.1f} GB free, the benchmark needs about {need / 1e9:.1f} GB: "
                 "lower --gb or pick another --dir")
    res = bench(args.gb, args.dtype, args.dir, not args.no_naive, args.threads)
    print(report(res))
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
