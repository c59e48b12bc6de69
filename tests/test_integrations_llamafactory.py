"""The LLaMA-Factory launcher: its config checks (default suite) and real runs through LLaMA-Factory
(skipped where it is not installed: it pins older transformers/peft/trl and needs its own virtual
environment, see benchmarks/RESULTS.md, section Fine-tuning stacks).

LLaMA-Factory imports `torchaudio` at module level (its multimodal plugin). No torchaudio release
matches torch 2.13's CPU build, so where `import torchaudio` fails the real runs put a stand-in
module first on the path of their subprocesses (`TORCHAUDIO_STUB`): text training never calls it,
and any use of it raises. The launcher itself contains no such stand-in.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.stacks import weights

pytest.importorskip("transformers")

from asft_optim.integrations.llamafactory import AsFTKeys, main, split_config

TESTS = Path(__file__).resolve().parent
needs_llamafactory = pytest.mark.skipif(importlib.util.find_spec("llamafactory") is None,
                                        reason="LLaMA-Factory is not installed (pip install llamafactory)")

TORCHAUDIO_STUB = '''"""Test-only stand-in for torchaudio (no build matches this torch); text training never uses it."""


def __getattr__(name):
    raise ImportError(f"torchaudio.{name}: the AsFT tests' torchaudio stand-in has no audio")
'''

REFERENCE = '''
import os
import llamafactory.train.dpo.trainer as dpo
import llamafactory.train.sft.workflow as sft
from llamafactory.train.tuner import run_exp
from asft_optim.integrations import AsFTTrainerMixin


def reference(cls):
    class Reference(AsFTTrainerMixin, cls):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, anchors=os.environ["ASFT_REF_ANCHORS"],
                             asft_lambda=float(os.environ["ASFT_REF_LAMBDA"]), **kwargs)
    return Reference


sft.CustomSeq2SeqTrainer = reference(sft.CustomSeq2SeqTrainer)
dpo.CustomDPOTrainer = reference(dpo.CustomDPOTrainer)
run_exp()
'''


def _write(path: Path, config: dict) -> Path:
    path.write_text("\n".join(f"{k}: {json.dumps(v)}" for k, v in config.items()) + "\n")
    return path


def _base(root: Path, out: Path, stage: str, finetuning: str) -> dict:
    config = {"model_name_or_path": str(root / "aligned"), "stage": stage, "do_train": True,
              "finetuning_type": finetuning, "dataset": f"asft_{stage}", "dataset_dir": str(root),
              "template": "empty", "cutoff_len": 32, "output_dir": str(out), "overwrite_output_dir": True,
              "per_device_train_batch_size": 4, "gradient_accumulation_steps": 1, "learning_rate": 0.01,
              "max_steps": 4, "lr_scheduler_type": "linear", "logging_steps": 1, "save_strategy": "no",
              "report_to": "none", "seed": 0, "bf16": False, "preprocessing_num_workers": 1}
    if finetuning == "lora":
        config.update(lora_target="q_proj,v_proj", lora_rank=4, lora_alpha=8, lora_dropout=0.0)
    if stage == "dpo":
        config.update(pref_beta=0.1, pref_loss="sigmoid")
    return config


# --- the launcher's checks (no LLaMA-Factory needed) ---------------------------------------------


@pytest.fixture(scope="module")
def directions(tmp_path_factory) -> Path:
    from safetensors.torch import save_file

    path = tmp_path_factory.mktemp("lf") / "directions.safetensors"
    save_file({"w": torch.ones(2)}, path)
    return path


def test_asft_keys_are_split_off_and_checked(directions):
    config, keys = split_config({"stage": "sft", "asft_anchors": str(directions), "asft_lambda": 2,
                                 "asft_penalty": "full", "learning_rate": 1e-4, "asft_alpha": 0.5})
    assert config == {"stage": "sft", "learning_rate": 1e-4, "asft_alpha": 0.5}  # LLaMA-Factory's own key
    assert keys == AsFTKeys(anchors=str(directions), asft_lambda=2.0, penalty="full")
    assert keys.options() == {"asft_lambda": 2.0, "penalty": "full", "projection": "vector",
                              "allow_unanchored": False}
    # other optimizers are honoured (the penalty is attached), with their optim_args
    assert split_config({"optim": "adafactor", "optim_args": "scale_parameter=False",
                         "asft_anchors": str(directions)})[0]["optim"] == "adafactor"


@pytest.mark.parametrize(("extra", "message"), [
    ({"asft_anchors": None}, "asft_anchors: the AsFT launcher needs a directions file"),
    ({"asft_anchors": "/nonexistent/d.safetensors"}, "asft_anchors: directions file not found: /nonexistent/d"),
    ({"asft_lambda": -1}, "asft_lambda: expected a number ≥ 0, got -1"),
    ({"asft_penalty": "l2"}, "asft_penalty: expected one of orthogonal, parallel, full, got 'l2'"),
    ({"asft_lamda": 1.0}, "unknown AsFT key(s) asft_lamda"),
    ({"optim": "lomo"}, "TrainingArguments(optim='lomo')"),
    ({"optim": "adafactor", "deepspeed": {"zero_optimization": {"stage": 2}}}, "optim 'adafactor' under DeepSpeed"),
    ({"optim_args": "amsgrad=True"}, "optim_args='amsgrad=True' would be ignored"),
    ({"use_galore": True}, "use_galore: not with the AsFT launcher"),
    ({"use_mca": True}, "use_mca: not with the AsFT launcher"),
    ({"stage": "dpo_v2"}, "stage 'dpo_v2'"),
], ids=["no-anchors", "missing-file", "negative-lambda", "bad-penalty", "typo", "optim", "optim-deepspeed",
        "optim-args", "galore", "megatron", "stage"])
def test_bad_configs_are_refused_before_anything_loads(directions, tmp_path, capsys, extra, message):
    config = {"stage": "sft", "asft_anchors": str(directions), **extra}
    if config["asft_anchors"] is None:
        del config["asft_anchors"]
    assert main(["train", str(_write(tmp_path / "c.yaml", config))]) == 2
    assert message in capsys.readouterr().err


def test_shipped_zero3_offload_config_is_refused_with_the_key_to_add(directions, tmp_path, capsys):
    """The keys of LLaMA-Factory's examples/deepspeed/ds_z3_offload_config.json that matter here."""
    offload = {"train_batch_size": "auto", "zero_optimization": {
        "stage": 3, "offload_optimizer": {"device": "cpu", "pin_memory": True},
        "offload_param": {"device": "cpu", "pin_memory": True}, "stage3_gather_16bit_weights_on_model_save": True}}
    ds = tmp_path / "ds_z3_offload_config.json"
    ds.write_text(json.dumps(offload))
    config = {"stage": "sft", "finetuning_type": "full", "deepspeed": str(ds), "asft_anchors": str(directions)}
    assert main(["train", str(_write(tmp_path / "c.yaml", config))]) == 2
    assert '"zero_force_ds_cpu_optimizer": false' in capsys.readouterr().err
    ds.write_text(json.dumps({**offload, "zero_force_ds_cpu_optimizer": False}))
    assert split_config(config)[0]["deepspeed"] == str(ds)
    with pytest.raises(NotImplementedError, match="LoRA adapters under DeepSpeed ZeRO stage 3"):
        split_config({**config, "finetuning_type": "lora"})


# --- real runs ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def stack(tmp_path_factory) -> tuple[Path, dict[str, str]]:
    root = tmp_path_factory.mktemp("llamafactory")
    subprocess.run([sys.executable, str(TESTS / "stacks.py"), str(root)], cwd=root, check=True, capture_output=True)
    (root / "dataset_info.json").write_text(json.dumps({
        "asft_sft": {"file_name": "sft.jsonl"},
        "asft_dpo": {"file_name": "dpo.jsonl", "ranking": True,
                     "columns": {"prompt": "instruction", "query": "input", "chosen": "chosen",
                                 "rejected": "rejected"}},
    }))
    (root / "asft_reference.py").write_text(REFERENCE)
    path = [str(root)]
    probe = subprocess.run([sys.executable, "-c", "import torchaudio"], cwd=root, capture_output=True)
    if probe.returncode != 0:
        (root / "stub" / "torchaudio").mkdir(parents=True)
        (root / "stub" / "torchaudio" / "__init__.py").write_text(TORCHAUDIO_STUB)
        path.insert(0, str(root / "stub"))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": os.pathsep.join(path)}
    return root, env


def _run(env: dict[str, str], cwd: Path, *argv: str, **extra_env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *argv], cwd=cwd, env={**env, **extra_env}, capture_output=True,
                          text=True, timeout=900)


@needs_llamafactory
@pytest.mark.parametrize(("stage", "finetuning", "optim"), [
    ("sft", "full", "adamw_torch"), ("sft", "lora", "adamw_torch"), ("dpo", "lora", "adamw_torch"),
    ("sft", "lora", "adafactor")])
def test_launcher_run_equals_asft_trainer(stack, tmp_path, stage, finetuning, optim):
    root, env = stack
    ends = {}
    for lam in (10.0, 0.0):
        out = tmp_path / f"asft{lam}"
        config = {**_base(root, out, stage, finetuning), "optim": optim,
                  "asft_anchors": str(root / "directions.safetensors"),
                  "asft_lambda": lam}
        run = _run(env, root, "-m", "asft_optim.integrations.llamafactory", "train",
                   str(_write(tmp_path / f"asft{lam}.yaml", config)))
        assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
        assert "'asft/cos':" in run.stdout + run.stderr
        ends[lam] = weights(out)
        history = json.loads((out / "trainer_state.json").read_text())["log_history"]
        assert all("asft/orth_ratio" in log for log in history if "loss" in log)
    assert any(not torch.equal(ends[10.0][n], ends[0.0][n]) for n in ends[10.0])
    out = tmp_path / "reference"
    reference_config = {**_base(root, out, stage, finetuning), "optim": optim}
    run = _run(env, root, "asft_reference.py", str(_write(tmp_path / "ref.yaml", reference_config)),
               ASFT_REF_ANCHORS=str(root / "directions.safetensors"), ASFT_REF_LAMBDA="10.0")
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    reference = weights(out)
    assert reference.keys() == ends[10.0].keys()
    for name in reference:
        assert torch.equal(reference[name], ends[10.0][name]), name


@needs_llamafactory
def test_missing_directions_file_fails_the_run(stack, tmp_path):
    root, env = stack
    missing = root / "missing.safetensors"
    config = {**_base(root, tmp_path / "out", "sft", "full"), "asft_anchors": str(missing)}
    run = _run(env, root, "-m", "asft_optim.integrations.llamafactory", "train",
               str(_write(tmp_path / "c.yaml", config)))
    assert run.returncode == 2
    assert f"asft-llamafactory: error: asft_anchors: directions file not found: {missing}" in run.stderr
    assert not (tmp_path / "out").exists()
