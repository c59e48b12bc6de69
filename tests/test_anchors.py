"""Anchors: name normalisation, in-memory and file-backed access, fingerprints."""

from __future__ import annotations

import os
import re

import pytest
import torch
from safetensors.torch import save_file

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


# ----------------------------------------------------------------------- whose content is fingerprinted
def _resume_with(anchors_a: Anchors, anchors_b_factory):
    """Train one step with anchors A, save the optimizer, then build a fresh optimizer with the
    anchors `anchors_b_factory()` returns and load the saved state into it."""
    from asft_optim import AsFTAdamW

    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    opt = AsFTAdamW(model.named_parameters(), lr=1e-2, anchors=anchors_a, asft_lambda=1.0)
    model(torch.randn(2, 4)).sum().backward()
    opt.step()
    saved = opt.state_dict()
    fresh = AsFTAdamW(model.named_parameters(), lr=1e-2, anchors=anchors_b_factory(), asft_lambda=1.0)
    fresh.load_state_dict(saved)


def _two_direction_sets():
    g = torch.Generator().manual_seed(3)
    a = {"weight": torch.randn(3, 4, generator=g), "bias": torch.randn(3, generator=g)}
    b = {k: v + 1.0 for k, v in a.items()}
    return a, b


def test_in_memory_anchors_fingerprint_their_own_content(tmp_path):
    """A fingerprint passed in metadata (here the loaded file's) is never trusted for other tensors."""
    a, b = _two_direction_sets()
    loaded = Anchors.load(Anchors.from_tensors(a).save(tmp_path / "a.safetensors"))
    other = Anchors.from_tensors(b, metadata=loaded.metadata)
    assert other.fingerprint == Anchors.from_tensors(b).fingerprint != loaded.fingerprint
    assert "fingerprint" not in other.metadata and other.metadata["format"] == loaded.metadata["format"]
    assert Anchors.from_tensors(a, metadata=loaded.metadata).fingerprint == loaded.fingerprint
    with pytest.raises(ValueError, match=r"cannot resume: param group 0 of the checkpoint was made with "
                                         r"anchors \(fingerprint\)"):
        _resume_with(loaded, lambda: Anchors.from_tensors(b, metadata=loaded.metadata))


def _replace(path, tensors):
    """Put other directions at `path` the way a rerun of `asft directions` does (write, rename)."""
    Anchors.from_tensors(tensors).save(path)


def test_file_replaced_after_load_is_refused_on_every_read(tmp_path):
    a, b = _two_direction_sets()
    path = Anchors.from_tensors(a).save(tmp_path / "d.safetensors")
    loaded = Anchors.load(path)
    assert torch.equal(loaded["weight"], a["weight"])
    _replace(path, b)
    msg = (f"directions file {path} changed after Anchors.load (its inode, size or modification time "
           "differ): its directions no longer match the fingerprint recorded at load; load it again")
    with pytest.raises(RuntimeError, match="^" + re.escape(msg) + "$"):
        loaded["weight"]
    with pytest.raises(RuntimeError, match="^" + re.escape(msg) + "$"):
        loaded.get_stored("bias")
    with pytest.raises(RuntimeError, match="^" + re.escape(msg) + "$"):
        loaded.get_slice("weight", 0, 2)
    assert torch.equal(Anchors.load(path)["weight"], b["weight"])  # loading it again is fine


def test_file_rewritten_in_place_after_load_is_refused(tmp_path):
    """Same inode, same size, other bytes (an in-place overwrite): the modification time tells."""
    a, _ = _two_direction_sets()
    path = Anchors.from_tensors(a).save(tmp_path / "d.safetensors")
    loaded = Anchors.load(path)
    raw = bytearray(path.read_bytes())
    raw[-1] ^= 0x01
    st = path.stat()
    with open(path, "r+b") as f:
        f.write(bytes(raw))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))  # coarse clocks: force a change
    with pytest.raises(RuntimeError, match="changed after Anchors.load"):
        loaded.get_stored("bias")


def _routes(tmp_path):
    """Every way a resume can be handed directions B while the checkpoint was made with A:
    route -> (anchors A, a factory of the resumed run's anchors, called after A's run saved)."""
    a, b = _two_direction_sets()
    path = Anchors.from_tensors(a).save(tmp_path / "a.safetensors")
    loaded = Anchors.load(path)
    unverified = Anchors.load(path, verify=False)
    b_file = Anchors.from_tensors(b).save(tmp_path / "b.safetensors")
    # B's tensors in a file that claims A's fingerprint (metadata copied by a script)
    liar = tmp_path / "liar.safetensors"
    save_file({k: v.contiguous() for k, v in b.items()}, str(liar), metadata=dict(loaded.metadata))

    def replace_then(anchors):
        def factory():
            _replace(path, b)
            return anchors
        return factory

    return {
        "from_tensors_with_loaded_metadata": (loaded, lambda: Anchors.from_tensors(b, metadata=loaded.metadata)),
        "plain_mapping": (loaded, lambda: b),
        "other_file": (loaded, lambda: Anchors.load(b_file)),
        "file_claiming_the_fingerprint": (loaded, lambda: Anchors.load(liar)),
        "file_replaced_after_load": (loaded, replace_then(loaded)),
        "file_replaced_after_unverified_load": (unverified, replace_then(unverified)),
    }


_REFUSALS = {
    "from_tensors_with_loaded_metadata": (ValueError, r"cannot resume: param group 0 of the checkpoint was "
                                                      r"made with anchors \(fingerprint\)"),
    "plain_mapping": (ValueError, r"cannot resume: param group 0 of the checkpoint was made with anchors"),
    "other_file": (ValueError, r"cannot resume: param group 0 of the checkpoint was made with anchors"),
    "file_claiming_the_fingerprint": (ValueError, r"liar.safetensors does not match the fingerprint recorded in it"),
    "file_replaced_after_load": (RuntimeError, r"a.safetensors changed after Anchors.load"),
    "file_replaced_after_unverified_load": (RuntimeError, r"a.safetensors changed after Anchors.load"),
}


@pytest.mark.parametrize("route", sorted(_REFUSALS))
def test_resume_with_other_directions_is_refused(tmp_path, route):
    """Whatever route hands a resumed run other directions, it fails loudly instead of training
    against B under A's fingerprint."""
    anchors_a, factory = _routes(tmp_path)[route]
    err, pattern = _REFUSALS[route]
    with pytest.raises(err, match=pattern):
        _resume_with(anchors_a, factory)


def test_resume_with_the_same_directions_is_accepted(tmp_path):
    """The control: the same directions by another route (a copy in memory, the file loaded again)."""
    a, _ = _two_direction_sets()
    loaded = Anchors.load(Anchors.from_tensors(a).save(tmp_path / "a.safetensors"))
    _resume_with(loaded, lambda: Anchors.from_tensors({k: v.clone() for k, v in a.items()}))
    _resume_with(loaded, lambda: Anchors.load(tmp_path / "a.safetensors"))


def test_optimizer_holds_each_in_memory_direction_once(tmp_path):
    """A `{name: d}` dict from `safetensors.torch.load_file` (memory-mapped) passed inline: once
    bound, the optimizer's bound copy is the only copy (the file's mapping is released), and the
    anchors still give d bitwise, with the same fingerprint."""
    from safetensors.torch import load_file

    from asft_optim import AsFTAdamW
    if not os.path.exists("/proc/self/maps"):
        pytest.skip("needs /proc/self/maps")
    gen = torch.Generator().manual_seed(0)
    named = [("a.weight", torch.nn.Parameter(torch.randn(300, 40, generator=gen))),
             ("b.weight", torch.nn.Parameter(torch.randn(77, generator=gen)))]
    dirs = {"a.weight": torch.randn(300, 40, generator=gen) * 1e-3,
            "b.weight": (torch.randn(77, generator=gen) * 1e-5).bfloat16()}
    path = tmp_path / "d.safetensors"
    save_file(dirs, str(path))

    def mapped() -> bool:
        with open("/proc/self/maps") as f:
            return str(path) in f.read()

    opt = AsFTAdamW(named, anchors=load_file(str(path)))
    assert not mapped()  # the bound copies replaced the memory-mapped tensors
    for name, d in dirs.items():
        got = opt.anchors[name]
        assert got.dtype == d.dtype and torch.equal(got, d)
        assert torch.equal(opt.anchors.get_slice(name, 1, 3), d[1:3])
    assert opt.anchors.fingerprint == Anchors.from_tensors(dirs).fingerprint
    for _, p in named:
        p.grad = torch.ones_like(p)
    opt.step()
    assert torch.equal(opt.anchors["a.weight"], dirs["a.weight"])
