"""Anchors: name normalisation, in-memory and file-backed access, fingerprints."""

from __future__ import annotations

import pytest
import torch

from asft_optim import Anchors, normalize_name


@pytest.mark.parametrize("name, want", [
    ("module.layer.weight", "layer.weight"),
    ("_orig_mod.layer.weight", "layer.weight"),
    ("module._orig_mod.module.layer.weight", "layer.weight"),
    ("model._orig_mod.layers.0.weight", "model.layers.0.weight"),
    ("base_model.model.model.layers.0.q_proj.base_layer.weight", "model.layers.0.q_proj.weight"),
    ("encoder.module.weight", "encoder.module.weight"),  # only a leading `module.` is a wrapper
])
def test_normalize_name(name, want):
    assert normalize_name(name) == want


def test_lookup_save_load_roundtrip(tmp_path):
    t = {"module.a.weight": torch.randn(3, 4), "b": torch.randn(5).bfloat16()}
    a = Anchors.from_tensors(t, metadata={"source": "test"})
    assert "a.weight" in a and "_orig_mod.a.weight" in a and "c" not in a
    assert a.shape("a.weight") == (3, 4) and a.dtype("b") == torch.bfloat16
    path = a.save(tmp_path / "d.safetensors")
    b = Anchors.load(path)
    assert b.fingerprint == a.fingerprint and b.metadata["source"] == "test"
    assert torch.equal(b["a.weight"], t["module.a.weight"]) and torch.equal(b["b"], t["b"])
    assert torch.equal(b.get_slice("a.weight", 1, 3), t["module.a.weight"][1:3])
    assert not list(tmp_path.glob("*.tmp"))


def test_fingerprint_depends_on_contents(tmp_path):
    t = {"a": torch.randn(10)}
    f1 = Anchors.from_tensors(t).fingerprint
    assert f1 == Anchors.from_tensors({"a": t["a"].clone()}).fingerprint
    assert f1 != Anchors.from_tensors({"a": t["a"] * 2}).fingerprint
    assert f1 != Anchors.from_tensors({"b": t["a"]}).fingerprint


def test_colliding_and_bad_tensors():
    with pytest.raises(ValueError, match="both normalise to 'a'"):
        Anchors.from_tensors({"a": torch.zeros(1), "module.a": torch.zeros(1)})
    with pytest.raises(TypeError, match="'i' has dtype torch.int64"):
        Anchors.from_tensors({"i": torch.zeros(2, dtype=torch.long)})
    with pytest.raises(FileNotFoundError, match="nowhere.safetensors"):
        Anchors.load("nowhere.safetensors")
