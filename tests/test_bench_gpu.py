"""benchmarks/bench_gpu.py's judges on the CPU (Triton interpreter, tiny tensors): the per-element
half-precision check and the c check of the big tensor pass on the real kernels and fail on a
sabotaged optimizer; results stream to results.jsonl; the summary names what did not run."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("triton")
BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_gpu.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("asft_bench_gpu", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if not module.K.is_interpreted():
        pytest.skip("the kernels were compiled, not interpreted: these checks are sized for the CPU")
    return module


def _rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]


class _Sabotaged:
    """AsFTAdamW built with other options than the check asked for (a stand-in for a kernel bug)."""

    def __init__(self, real, **override):
        self.real, self.override = real, override

    def __call__(self, *args, **kwargs):
        return self.real(*args, **{**kwargs, **self.override})


def test_half_precision_check_judges_each_element(bench, tmp_path, monkeypatch):
    rep = bench.Report(tmp_path, "checks")
    shapes = {"one": (1,), "seven": (7,), "odd": (4097,)}
    bench.check_half_steps(rep, "bf16", shapes, torch.bfloat16, torch.device("cpu"), steps=3)
    monkeypatch.setattr(bench, "AsFTAdamW", _Sabotaged(bench.AsFTAdamW, asft_lambda=0.55))  # λ 10% off
    bench.check_half_steps(rep, "bf16 sabotaged", shapes, torch.bfloat16, torch.device("cpu"), steps=3)
    good, bad = _rows(tmp_path)
    assert good["ok"] and good["max_ulp"] <= bench.ALLOWED_ULP and good["allowed_ulp"] == 1.0
    assert set(good["per_tensor_max_ulp"]) == set(shapes)
    assert not bad["ok"] and bad["max_ulp"] > 10 and rep.failed


def test_big_c_check_catches_a_c_that_is_off(bench, tmp_path, monkeypatch):
    rep = bench.Report(tmp_path, "big")
    numel = 3 * bench.K.BLOCK + 77
    bench.check_big_c(rep, numel, torch.device("cpu"))
    assert [r["ok"] for r in _rows(tmp_path)] == [True, True] and not rep.failed
    monkeypatch.setattr(bench, "AsFTAdamW", _Sabotaged(bench.AsFTAdamW, penalty="full"))  # c ignored
    bench.check_big_c(rep, numel, torch.device("cpu"))
    step1, step2 = _rows(tmp_path)[2:]
    assert step1["ok"] and not step2["ok"] and step2["max_ulp"] > 10  # step 1 has c = 0 either way


def test_errors_are_recorded_and_the_summary_names_what_did_not_run(bench, tmp_path, capsys):
    rep = bench.Report(tmp_path, "checks")
    rep.record("section_start", "checks", "start")

    def broken() -> None:
        raise RuntimeError("simulated kernel failure")

    rep.guarded("broken check", broken)
    assert rep.failed
    assert bench.summarize(tmp_path) == 1
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert report["sections_unfinished"] == ["checks"] and report["sections_not_run"] == ["timing", "big", "host"]
    assert report["ratios"]["fp32_ratio"] is None and report["goals_met"]["fp32_ratio"] is None
    text = (tmp_path / "gpu_check.txt").read_text()
    assert "ERROR in broken check: RuntimeError: simulated kernel failure" in text
    assert "sections cut short (timeout or crash): checks" in text and "failed: broken check" in text


def test_refuses_to_measure_another_copy_of_the_package(bench, tmp_path, monkeypatch):
    assert bench.tested_copy() == {"asft_optim": str(BENCH.parents[1] / "asft_optim"),
                                   "kernels": str(BENCH.parents[1] / "kernels")}
    monkeypatch.setattr(bench, "REPO", tmp_path)  # as if the script sat in another checkout
    with pytest.raises(SystemExit, match=f"not from this checkout {tmp_path}: run it through "
                                         "benchmarks/gpu_check.sh"):
        bench.tested_copy()


def test_host_time_runs_every_gradient_mode_and_restores_the_kernels(bench, tmp_path):
    rep = bench.Report(tmp_path, "host")
    kernels = (bench.K._update_kernel, bench.K._dot_kernel, bench.K._fold_kernel)
    shapes = {"a": (4097,), "b": (5, 123), "c": (1,)}
    bench.host_time(rep, "tiny", shapes, torch.device("cpu"), steps=3)
    rows = _rows(tmp_path)
    assert [r["grads"] for r in rows] == ["realloc", "realloc_cached", "inplace"] and not rep.failed
    assert all(r["median_ms"] > 0 and r["tensors"] == 3 and r["blocks"] == 3 + 1 + 1 for r in rows)
    assert (bench.K._update_kernel, bench.K._dot_kernel, bench.K._fold_kernel) == kernels


def test_bf16_parameters_and_reallocated_gradients_reach_the_summary(bench, tmp_path):
    rep = bench.Report(tmp_path, "timing")
    rep.record("section_start", "timing", "start")
    shapes = {"a": (300,), "b": (5, 7)}
    for suite, providers in (("llama_1b", ["fused_adamw", "asft_triton_fp32"]),
                             ("llama_bf16", ["fused_adamw_bf16", "asft_triton_bf16"])):
        bench.bench_suite(rep, suite, shapes, providers, torch.device("cpu"), 0, 2, ("inplace", "realloc"))
    rows = [r for r in _rows(tmp_path) if r["kind"] == "bench"]
    assert not rep.failed and len(rows) == 8
    bf16 = next(r for r in rows if r["provider"] == "asft_triton_bf16")
    assert bf16["param_dtype"] == "torch.bfloat16" and bf16["w0_dtype"] == "torch.bfloat16"
    assert bf16["predicted_ms_h200"] == pytest.approx(18 * 335 / 4.8e12 * 1e3)
    bench.summarize(tmp_path)
    ratios = json.loads((tmp_path / "gpu_check.json").read_text())["ratios"]
    for key in ("fp32_ratio", "bf16_ratio", "fp32_ratio_realloc", "realloc_ratio"):
        assert ratios[key] is not None and ratios[key] > 0, key


def test_gpu_check_writes_one_log_and_goes_on_after_a_slow_start(tmp_path):
    """At most 8 files come back from a device run: one combined log, no file per step. A `where`
    step that only timed out (a cold CUDA start) does not end the run."""
    script = BENCH.parent / "gpu_check.sh"
    env = {**os.environ, "DRY": "1", "OUT": str(tmp_path), "STEPS": "where summary", "T_WHERE": "0.3",
           "PYTHON": sys.executable}
    out = subprocess.run(["bash", str(script)], env=env, capture_output=True, text=True, timeout=300)
    files = sorted(p.name for p in tmp_path.iterdir())
    assert files == ["gpu_check.json", "gpu_check.txt", "run.log", "steps.txt"], (files, out.stdout[-2000:])
    steps = (tmp_path / "steps.txt").read_text()
    assert "where exit 124" in steps and "summary exit 1" in steps, steps
    log = (tmp_path / "run.log").read_text()
    assert "== where" in log and "== summary" in log and "sections not run: checks, timing, big, host" in log
