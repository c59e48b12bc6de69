"""The axolotl plugin against the real axolotl (0.19.0; skipped where it is not installed: it needs
its own virtual environment, see benchmarks/RESULTS.md, section Fine-tuning stacks).

`axolotl train` runs in a subprocess from a folder outside the clone (the clone's top-level
`kernels/` folder would shadow the `kernels` package that transformers imports under axolotl).
The reference run is the same axolotl run with `AsFTTrainerMixin` over axolotl's own trainer class;
every run seeds torch before axolotl adds the LoRA adapters (axolotl itself seeds only later).
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from tests.stacks import weights

# found, not imported: importing axolotl here would import transformers with the clone on sys.path
needs_axolotl = pytest.mark.skipif(importlib.util.find_spec("axolotl") is None,
                                   reason="axolotl is not installed (pip install axolotl==0.19.0, Python 3.11)")

TESTS = Path(__file__).resolve().parent

REFERENCE_PLUGIN = '''
import os
import torch
from axolotl.core.trainers.base import AxolotlTrainer
from axolotl.integrations.base import BasePlugin
from asft_optim.integrations import AsFTTrainerMixin


class ReferenceTrainer(AsFTTrainerMixin, AxolotlTrainer):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, anchors=os.environ["ASFT_REF_ANCHORS"],
                         asft_lambda=float(os.environ["ASFT_REF_LAMBDA"]), **kwargs)


class ReferencePlugin(BasePlugin):
    def get_trainer_cls(self, cfg):
        return ReferenceTrainer


class SeedPlugin(BasePlugin):
    """axolotl seeds only when its trainer is built, after the LoRA adapters are: seed before them."""

    def post_model_build(self, cfg, model):
        torch.manual_seed(cfg.seed)
'''


@pytest.fixture(scope="module")
def stack(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("axolotl")
    subprocess.run([sys.executable, str(TESTS / "stacks.py"), str(root)], cwd=root, check=True, capture_output=True)
    (root / "asft_reference.py").write_text(REFERENCE_PLUGIN)
    return root


def _config(root: Path, out: Path, *, optimizer: str, lora: bool, plugin: str, extra: str = "") -> Path:
    adapter = textwrap.dedent("""\
        adapter: lora
        lora_r: 4
        lora_alpha: 8
        lora_dropout: 0.0
        lora_target_modules: [q_proj, v_proj]
        """) if lora else ""
    text = textwrap.dedent(f"""\
        base_model: {root / "aligned"}
        plugins:
          - asft_reference.SeedPlugin
          - {plugin}
        datasets:
          - path: {root / "sft.jsonl"}
            ds_type: json
            type: completion
        dataset_prepared_path: {root / "prepared"}
        val_set_size: 0
        sequence_len: 32
        sample_packing: false
        micro_batch_size: 4
        gradient_accumulation_steps: 1
        max_steps: 4
        num_epochs: 1
        optimizer: {optimizer}
        learning_rate: 0.01
        lr_scheduler: linear
        weight_decay: 0.01
        seed: 0
        logging_steps: 1
        save_strategy: "no"
        output_dir: {out}
        bf16: false
        fp16: false
        tf32: false
        """) + adapter + extra
    out.mkdir(parents=True, exist_ok=True)
    path = out / "config.yaml"
    path.write_text(text)
    return path


def _train(root: Path, config: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "AXOLOTL_DO_NOT_TRACK": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(root),
           **(env or {})}
    return subprocess.run([sys.executable, "-m", "axolotl.cli.train", str(config)], cwd=root, env=env,
                          capture_output=True, text=True, timeout=900)


def _asft_run(root: Path, out: Path, lam: float, **kw) -> tuple[dict[str, torch.Tensor], str]:
    config = _config(root, out, plugin="asft_optim.integrations.axolotl.AsFTPlugin",
                     extra=f"asft_anchors: {root / 'directions.safetensors'}\nasft_lambda: {lam}\n", **kw)
    run = _train(root, config)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    return weights(out), run.stdout + run.stderr


@needs_axolotl
@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
@pytest.mark.parametrize("optimizer", ["adamw_torch", "adamw_bnb_8bit"])
def test_axolotl_train_with_the_plugin_equals_asft_trainer(stack, tmp_path, optimizer, lora):
    ends, log = _asft_run(stack, tmp_path / "asft", 10.0, optimizer=optimizer, lora=lora)
    assert "AsFT plugin: optimizer" in log and "'asft/cos':" in log and "'asft/orth_ratio/model.layers.0':" in log
    plain, _ = _asft_run(stack, tmp_path / "plain", 0.0, optimizer=optimizer, lora=lora)
    assert ends.keys() == plain.keys()
    assert any(not torch.equal(ends[n], plain[n]) for n in ends)
    config = _config(stack, tmp_path / "reference", optimizer=optimizer, lora=lora,
                     plugin="asft_reference.ReferencePlugin")
    run = _train(stack, config, {"ASFT_REF_ANCHORS": str(stack / "directions.safetensors"), "ASFT_REF_LAMBDA": "10.0"})
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    reference = weights(tmp_path / "reference")
    assert reference.keys() == ends.keys()
    for name in ends:
        assert torch.equal(ends[name], reference[name]), name


@needs_axolotl
@pytest.mark.parametrize(("extra", "message"), [
    ("asft_anchors: {root}/missing.safetensors\n",
     "asft_anchors: directions file not found: {root}/missing.safetensors"),
    ("asft_lambda: 1.0\n", "asft_anchors: the AsFT plugin needs a directions file"),
    ("asft_anchors: {root}/directions.safetensors\nasft_lambda: -1\n", "asft_lambda"),
], ids=["missing-file", "no-anchors", "negative-lambda"])
def test_bad_config_fails_the_run(stack, tmp_path, extra, message):
    config = _config(stack, tmp_path, optimizer="adamw_torch", lora=False,
                     plugin="asft_optim.integrations.axolotl.AsFTPlugin", extra=extra.format(root=stack))
    run = _train(stack, config)
    assert run.returncode != 0
    assert message.format(root=stack) in run.stdout + run.stderr
    assert not (tmp_path / "model.safetensors").exists()


def test_the_plugin_module_raises_runtime_error_not_import_error(monkeypatch):
    """What axolotl's PluginManager would swallow (ImportError) never leaves the plugin's module."""
    monkeypatch.delitem(sys.modules, "asft_optim.integrations.axolotl", raising=False)
    monkeypatch.setitem(sys.modules, "axolotl.integrations.base", None)  # absent or broken axolotl
    with pytest.raises(RuntimeError, match="axolotl plugin cannot be imported .*stopping rather than letting"):
        importlib.import_module("asft_optim.integrations.axolotl")


@needs_axolotl
def test_an_import_failure_stops_axolotl_instead_of_being_skipped(stack):
    """axolotl's PluginManager logs an ImportError and trains without the plugin; ours raises."""
    script = textwrap.dedent("""\
        import sys
        from axolotl.integrations.base import PluginManager
        sys.modules["asft_optim.integrations.factory"] = None  # any import inside the plugin now fails
        PluginManager.get_instance().register("asft_optim.integrations.axolotl.AsFTPlugin")
        print("registered without the plugin")
        """)
    run = subprocess.run([sys.executable, "-c", script], cwd=stack, capture_output=True, text=True, timeout=600,
                         env={**os.environ, "AXOLOTL_DO_NOT_TRACK": "1"})
    assert run.returncode != 0 and "registered without the plugin" not in run.stdout
    assert "RuntimeError: asft_optim's axolotl plugin cannot be imported" in run.stderr, run.stderr[-2000:]
    assert "stopping rather than letting axolotl train without AsFT" in run.stderr
