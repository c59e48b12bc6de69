"""Bytes per parameter that AsFTAdamW holds beyond torch.optim.AdamW, measured (resident set size),
for fp32 parameters:

    python benchmarks/bench_memory.py [MILLIONS]        # parameters per case, default 32

Each case runs in a fresh process with `MALLOC_MMAP_THRESHOLD_=65536` (every tensor is its own
mapping, returned to the system when freed, so the RSS counts live tensors only): it builds the
parameters and gradients (4 tensors), reads RSS (anonymous + file-backed pages), builds the
optimizer, takes one step, collects garbage and reads RSS again. AdamW's row is the baseline (its
two fp32 moments: 8 B/param); each AsFT row reports its increase minus AdamW's measured one.

Cases: directions fp32 or bf16; W0 exact in bf16 (parameters that are bf16 values, as from a bf16
checkpoint: W0 kept in bf16) or not (W0 in fp32); directions file-backed (`Anchors.load`) or a
`{name: d}` dict from `safetensors.torch.load_file` (memory-mapped), passed inline so that the
optimizer holds the only reference.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile

_CASE = r"""
import gc, json, sys
import torch
from safetensors.torch import load_file, save_file
from asft_optim import Anchors, AsFTAdamW

def rss():
    kb = 0
    for line in open("/proc/self/status"):
        if line.startswith(("RssAnon:", "RssFile:")):
            kb += int(line.split()[1])
    return kb * 1024

kind, d_dtype, exact, source, n, path = sys.argv[1:7]
n = int(n)
torch.manual_seed(0)
sizes = [n // 4] * 4
named = []
for i, s in enumerate(sizes):
    w = torch.randn(s)
    named.append((f"w{i}", torch.nn.Parameter(w.bfloat16().float() if exact == "exact" else w)))
if kind == "asft":
    dt = {"fp32": torch.float32, "bf16": torch.bfloat16}[d_dtype]
    save_file({name: (torch.randn(p.shape) * 1e-3).to(dt) for name, p in named}, path)
for _, p in named:
    p.grad = torch.randn(p.shape)
gc.collect()
anchors = Anchors.load(path, verify=False) if kind == "asft" and source == "file" else None
before = rss()
if kind == "adamw":
    opt = torch.optim.AdamW([p for _, p in named], lr=1e-4)
else:
    opt = AsFTAdamW(named, lr=1e-4, anchors=anchors if source == "file" else load_file(path))
opt.step()
gc.collect()
print(json.dumps({"bytes_per_param": (rss() - before) / sum(sizes)}))
"""


def measure(kind: str, d_dtype: str, exact: str, source: str, n: int, path: str) -> float:
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "OMP_NUM_THREADS": "1"}
    res = subprocess.run([sys.executable, "-c", _CASE, kind, d_dtype, exact, source, str(n), path],
                         capture_output=True, text=True, env=env, timeout=1800)
    if res.returncode != 0:
        raise RuntimeError(res.stderr[-3000:])
    return json.loads(res.stdout.strip().splitlines()[-1])["bytes_per_param"]


def main(millions: int) -> None:
    n = millions * 1_000_000
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "directions.safetensors")
        adamw = measure("adamw", "-", "-", "-", n, path)
        print(f"AdamW: {adamw:.2f} B/param ({millions}M fp32 parameters)")
        print("| d | W0 | directions | AsFT extra B/param over AdamW |")
        print("|---|---|---|---|")
        for d_dtype in ("bf16", "fp32"):
            for exact in ("exact", "inexact"):
                for source in ("file", "dict"):
                    extra = measure("asft", d_dtype, exact, source, n, path) - adamw
                    w0 = "bf16 (exact)" if exact == "exact" else "fp32"
                    print(f"| {d_dtype} | {w0} | {source} | {extra:.2f} |", flush=True)


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 32)
