"""The one reader of peft LoRA adapter folders (`asft_optim.adapters`): modules, scaling, shapes,
fit checks and every refusal, on small folders written here with safetensors (no peft needed)."""

import json
import math

import pytest
import torch
from safetensors.torch import save_file

from asft_optim.adapters import adapter_drift_sums, check_fits, open_adapter
from asft_optim.checkpoints import CheckpointError

P = "base_model.model.model.layers.0"


def _folder(path, tensors, **config):
    path.mkdir()
    (path / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "lora_alpha": 8, **config}))
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path / "adapter_model.safetensors"))
    return path


def _pair(module, r, inp, out, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {f"{P}.{module}.lora_A.weight": torch.randn(r, inp, generator=g),
            f"{P}.{module}.lora_B.weight": torch.randn(out, r, generator=g)}


def test_modules_scaling_and_shapes(tmp_path):
    ad = open_adapter(_folder(tmp_path / "a", {**_pair("self_attn.q_proj", 4, 6, 5), **_pair("mlp.down_proj", 2, 7, 6)},
                              use_rslora=True, alpha_pattern={"down_proj": 2}))
    got = {m.module: (m.scaling, m.weight_shape, m.fan_in_fan_out) for m in ad.modules}
    assert got == {"model.layers.0.mlp.down_proj": (2 / math.sqrt(2), (6, 7), False),
                   "model.layers.0.self_attn.q_proj": (8 / math.sqrt(4), (5, 6), False)}
    assert [m.direction for m in ad.modules] == ["model.layers.0.mlp.down_proj.weight",
                                                 "model.layers.0.self_attn.q_proj.weight"]
    fifo = open_adapter(_folder(tmp_path / "f", _pair("attn.c_attn", 2, 6, 9), fan_in_fan_out=True))
    assert fifo.modules[0].weight_shape == (6, 9) and fifo.modules[0].scaling == 4.0


def test_check_fits_and_drift_sums(tmp_path):
    tensors = _pair("self_attn.q_proj", 3, 6, 5)
    ad = open_adapter(_folder(tmp_path / "a", tensors))
    name = "model.layers.0.self_attn.q_proj.weight"
    assert check_fits(ad, {name: (5, 6)}, "m") == []
    assert check_fits(ad, {"other.weight": (5, 6)}, "m", missing_ok=True) == [name]
    with pytest.raises(ValueError) as e:
        check_fits(ad, {name: (6, 5)}, "m")
    assert str(e.value) == (f"adapter {tmp_path / 'a'} does not fit model m: '{name}' has shape (6, 5), the adapter's "
                            "update is 5×6 (an adapter made for another base model?)")
    with pytest.raises(ValueError) as e:
        check_fits(ad, {}, "m")
    assert str(e.value) == (f"adapter {tmp_path / 'a'} does not fit model m: it adapts "
                            "'model.layers.0.self_attn.q_proj', which the model does not have (an adapter made for "
                            "another base model?)")
    d = torch.randn(5, 6, dtype=torch.float64)
    lora = f"{P}.self_attn.q_proj.lora_"
    dw = (8 / 3) * tensors[lora + "B.weight"].double() @ tensors[lora + "A.weight"].double()
    xx, uu, xu, n = adapter_drift_sums(ad, ad.modules[0], lambda first, count: d[first:first + count])
    assert (xx, uu, xu) == pytest.approx((float(dw.square().sum()), float(d.square().sum()), float((dw * d).sum())),
                                         rel=1e-12) and n == 30


def test_refusals(tmp_path):
    q = _pair("self_attn.q_proj", 2, 4, 4)
    a_only = {k: v for k, v in q.items() if "lora_A" in k}
    extra = {**q, f"{P}.self_attn.q_proj.lora_B.bias": torch.zeros(4)}
    w = "adapter_model.safetensors"
    cases = {
        "missing": (None, f"adapter folder not found: {tmp_path / 'missing'}"),
        "ia3": (lambda p: _folder(p, q, peft_type="IA3"), f"{tmp_path / 'ia3'} holds a IA3 adapter; only LoRA adapters "
                                                           "are supported"),
        "lone": (lambda p: _folder(p, a_only), f"{tmp_path / 'lone' / w}: module '{P}.self_attn.q_proj' has a lora_A "
                                               "but no partner"),
        "rank": (lambda p: _folder(p, {**a_only, f"{P}.self_attn.q_proj.lora_B.weight": torch.zeros(4, 3)}),
                 f"{tmp_path / 'rank' / w}: module '{P}.self_attn.q_proj' has lora_A of shape [2, 4] but lora_B of "
                 "shape [4, 3]: their ranks differ"),
        "none": (lambda p: _folder(p, {"x.weight": torch.zeros(2)}), f"{tmp_path / 'none' / w} holds no lora_A/lora_B "
                                                                     "weights"),
    }
    for key, (make, msg) in cases.items():
        if make is not None:
            make(tmp_path / key)
        with pytest.raises(CheckpointError) as e:
            open_adapter(tmp_path / key)
        assert str(e.value) == msg, key
    (tmp_path / "noconfig").mkdir()
    with pytest.raises(CheckpointError, match="^" + f"adapter folder {tmp_path / 'noconfig'} has no "
                                                    "adapter_config.json: not a peft adapter$"):
        open_adapter(tmp_path / "noconfig")
    nofile = _folder(tmp_path / "noweights", q)
    (nofile / w).unlink()
    with pytest.raises(CheckpointError) as e:
        open_adapter(nofile)
    assert str(e.value) == f"{nofile} has adapter_config.json but no {w} (save it with safe_serialization=True)"
    # loadable by peft, but not s·B·A: refused only where that matters
    ad = open_adapter(_folder(tmp_path / "bias", extra))
    assert ad.others == (f"{P}.self_attn.q_proj.lora_B.bias",)
    with pytest.raises(CheckpointError) as e:
        ad.require_plain_lora("projected")
    assert str(e.value) == (f"{tmp_path / 'bias' / w}: tensor '{P}.self_attn.q_proj.lora_B.bias' is not a "
                            "lora_A/lora_B weight (DoRA magnitudes, embedding adapters, lora_bias and "
                            "modules_to_save cannot be projected)")
