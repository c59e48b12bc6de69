"""compute_directions / `asft directions`: exact values, names, layouts, and loud failures on bad files."""

from __future__ import annotations

import json
import logging
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from asft_optim import Anchors, compute_directions
from asft_optim.checkpoints import CheckpointError, open_checkpoint
from asft_optim.cli import main
from asft_optim.directions import ZeroDirectionWarning

transformers = pytest.importorskip("transformers")


def _config(tie: bool, intermediate: int = 64):
    return transformers.LlamaConfig(hidden_size=32, intermediate_size=intermediate, num_hidden_layers=2,
                                    num_attention_heads=4, num_key_value_heads=2, vocab_size=128,
                                    tie_word_embeddings=tie)


def _pair(tie: bool, dtype: torch.dtype = torch.float32, intermediate: int = 64):
    """A base model and an 'aligned' one: every weight moved except the norms (d = 0 there)."""
    torch.manual_seed(0)
    base = transformers.LlamaForCausalLM(_config(tie, intermediate)).to(dtype)
    aligned = transformers.LlamaForCausalLM(_config(tie, intermediate)).to(dtype)
    aligned.load_state_dict(base.state_dict())
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in aligned.named_parameters():
            if "norm" not in name:
                p.add_(torch.randn(p.shape, generator=g).to(dtype) * 0.02)
    return base, aligned


def _params(model) -> dict[str, torch.Tensor]:
    return {n: p.detach() for n, p in model.named_parameters()}


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """Checkpoints on disk: fp32 and bf16 pairs, tied and untied, sharded (several shards + index)
    and single-file."""
    root = tmp_path_factory.mktemp("ckpt")
    out = {}
    for tie in (True, False):
        for dtype in (torch.float32, torch.bfloat16):
            base, aligned = _pair(tie, dtype)
            tag = f"{'tied' if tie else 'untied'}-{str(dtype)[6:]}"
            for role, m in (("base", base), ("aligned", aligned)):
                m.save_pretrained(root / f"{role}-{tag}-sharded", max_shard_size="20KB")
                m.save_pretrained(root / f"{role}-{tag}-single")
            out[tag] = (base, aligned)
    shards = list((root / "base-tied-float32-sharded").glob("model-*.safetensors"))
    assert len(shards) > 2 and (root / "base-tied-float32-sharded" / "model.safetensors.index.json").exists()
    return root, out


def _listing(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


# ------------------------------------------------------------------------------------ exact values
@pytest.mark.parametrize("tie", [True, False])
@pytest.mark.parametrize("layout", [("sharded", "single"), ("single", "sharded"), ("file", "sharded")])
def test_fp32_exact_and_names(models, tmp_path, tie, layout):
    root, pairs = models
    tag = f"{'tied' if tie else 'untied'}-float32"
    base_m, aligned_m = pairs[tag]

    def src(role, kind):
        folder = root / f"{role}-{tag}-{'single' if kind == 'file' else kind}"
        return folder / "model.safetensors" if kind == "file" else folder

    out = tmp_path / "d.safetensors"
    with pytest.warns(ZeroDirectionWarning, match="norm"):
        anchors = compute_directions(src("base", layout[0]), src("aligned", layout[1]), out, dtype="fp32")
    written = load_file(out)
    a, b = _params(aligned_m), _params(base_m)
    assert sorted(written) == sorted(a)  # named_parameters() names; tied lm_head appears once, as in the model
    if tie:
        assert "lm_head.weight" not in written
    else:
        assert "lm_head.weight" in written
    for name in a:
        assert written[name].dtype == torch.float32
        assert torch.equal(written[name], a[name] - b[name]), name
        assert torch.equal(anchors[name], written[name])
    assert anchors.metadata["dtype"] == "fp32"
    assert anchors.metadata["base"] == str(src("base", layout[0]).resolve())
    assert anchors.metadata["aligned"] == str(src("aligned", layout[1]).resolve())
    assert Anchors.load(out, verify=True).fingerprint == anchors.fingerprint
    assert _listing(tmp_path) == ["d.safetensors"]


def _bf16_neighbours(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    bits = x.view(torch.int16)
    return (bits + 1).view(torch.bfloat16).double(), (bits - 1).view(torch.bfloat16).double()


@pytest.mark.parametrize("in_dtype", [torch.float32, torch.bfloat16])
def test_bf16_is_nearest(models, tmp_path, in_dtype):
    root, pairs = models
    tag = f"untied-{str(in_dtype)[6:]}"
    base_m, aligned_m = pairs[tag]
    with pytest.warns(ZeroDirectionWarning):
        compute_directions(root / f"base-{tag}-sharded", root / f"aligned-{tag}-single",
                           tmp_path / "d.safetensors", dtype="bf16")
    written = load_file(tmp_path / "d.safetensors")
    a, b = _params(aligned_m), _params(base_m)
    for name in a:
        got = written[name]
        assert got.dtype == torch.bfloat16
        assert torch.equal(got, (a[name].float() - b[name].float()).bfloat16()), name
        # independent check in fp64: no bf16 neighbour of the stored value is closer to the exact difference
        exact = a[name].double() - b[name].double()
        err = (got.double() - exact).abs()
        up, down = _bf16_neighbours(got)
        nz = got != 0
        assert (err[nz] <= (up - exact).abs()[nz]).all() and (err[nz] <= (down - exact).abs()[nz]).all(), name


def test_default_dtype_follows_aligned(models, tmp_path):
    root, pairs = models
    with pytest.warns(ZeroDirectionWarning):
        anchors = compute_directions(root / "base-tied-bfloat16-sharded", root / "aligned-tied-bfloat16-sharded",
                                     tmp_path / "d.safetensors")
    assert anchors.metadata["dtype"] == "as aligned"
    assert {anchors.dtype(k) for k in anchors} == {torch.bfloat16}


def test_chunking_and_in_memory_agree(models, tmp_path):
    """Pieces of 37 elements (crossing rows and tensors) give the same bytes and fingerprint as whole
    tensors; the in-memory result equals the file."""
    root, _ = models
    b, a = root / "base-untied-float32-sharded", root / "aligned-untied-float32-single"
    with pytest.warns(ZeroDirectionWarning):
        big = compute_directions(b, a, tmp_path / "big.safetensors", dtype="bf16")
        small = compute_directions(b, a, tmp_path / "small.safetensors", dtype="bf16", chunk_bytes=37 * 4)
        mem = compute_directions(b, a, dtype="bf16", chunk_bytes=37 * 4)
    assert (tmp_path / "big.safetensors").read_bytes() == (tmp_path / "small.safetensors").read_bytes()
    assert big.fingerprint == small.fingerprint == mem.fingerprint
    assert Anchors.from_tensors(dict(mem)).fingerprint == mem.fingerprint  # recomputed from the tensors
    for k in big:
        assert torch.equal(big[k], mem[k])


def test_include_exclude(models, tmp_path):
    root, pairs = models
    b, a = root / "base-untied-float32-single", root / "aligned-untied-float32-single"
    anchors = compute_directions(b, a, tmp_path / "d.safetensors", include=r"\.mlp\.", exclude=["up_proj"])
    assert sorted(anchors) == sorted(n for n in _params(pairs["untied-float32"][1])
                                     if ".mlp." in n and "up_proj" not in n)
    assert json.loads(anchors.metadata["include"]) == [r"\.mlp\."]
    with pytest.raises(CheckpointError, match="matches the include/exclude"):
        compute_directions(b, a, tmp_path / "e.safetensors", include="nothing-matches-this")
    with pytest.raises(ValueError, match="invalid regular expression"):
        compute_directions(b, a, tmp_path / "e.safetensors", include="(")
    assert _listing(tmp_path) == ["d.safetensors"]


# ------------------------------------------------------------------------------------ bad inputs
def _assert_no_output(folder: Path, before: list[str]) -> None:
    assert _listing(folder) == before, "a failed run left files behind"


def test_missing_shard_is_named(models, tmp_path):
    root, _ = models
    broken = tmp_path / "broken"
    shutil.copytree(root / "aligned-tied-float32-sharded", broken)
    victim = sorted(broken.glob("model-*.safetensors"))[1]
    victim.unlink()
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    with pytest.raises(CheckpointError, match=victim.name):
        compute_directions(root / "base-tied-float32-sharded", broken, out_dir / "d.safetensors")
    _assert_no_output(out_dir, [])


@pytest.mark.parametrize("cut", ["data", "header"])
def test_truncated_file(models, tmp_path, cut):
    root, _ = models
    bad = tmp_path / "bad.safetensors"
    raw = (root / "aligned-tied-float32-single" / "model.safetensors").read_bytes()
    bad.write_bytes(raw[: len(raw) - 100] if cut == "data" else raw[:5])
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    with pytest.raises(CheckpointError, match="truncated") as e:
        compute_directions(root / "base-tied-float32-single" / "model.safetensors", bad, out_dir / "d.safetensors")
    assert str(bad) in str(e.value)
    _assert_no_output(out_dir, [])


def test_shard_truncated_after_header_check(models, tmp_path):
    """A file that shrinks between opening and reading (e.g. a copy still in progress) fails on read."""
    root, _ = models
    folder = tmp_path / "aligned"
    shutil.copytree(root / "aligned-tied-float32-single", folder)
    ck = open_checkpoint(folder)
    f = folder / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-64])
    with pytest.raises(CheckpointError, match="truncated"):
        compute_directions(root / "base-tied-float32-single", ck, tmp_path / "d.safetensors")
    assert not list(tmp_path.glob("*.safetensors")) and not list(tmp_path.glob(".*tmp"))


def test_not_safetensors(tmp_path):
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all}")
    with pytest.raises(CheckpointError, match="not a safetensors file"):
        open_checkpoint(junk)
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(CheckpointError, match="pytorch_model.bin.*convert"):
        open_checkpoint(tmp_path / "empty")
    with pytest.raises(CheckpointError, match="not found"):
        open_checkpoint(tmp_path / "nowhere")


def test_tensor_in_one_model_only_lists_names(models, tmp_path):
    root, _ = models
    with pytest.raises(CheckpointError, match=r"only in .*aligned-untied.*'lm_head\.weight'"):
        compute_directions(root / "base-tied-float32-sharded", root / "aligned-untied-float32-sharded",
                           tmp_path / "d.safetensors")
    with pytest.warns(ZeroDirectionWarning):  # the same pair works once the extra tensor is excluded
        compute_directions(root / "base-tied-float32-sharded", root / "aligned-untied-float32-sharded",
                           tmp_path / "d.safetensors", exclude=r"^lm_head\.")
    assert _listing(tmp_path) == ["d.safetensors"]


def test_shape_mismatch_gives_both_shapes(models, tmp_path):
    root, _ = models
    other, _ = _pair(True, intermediate=48)
    other.save_pretrained(tmp_path / "other")
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    with pytest.raises(CheckpointError, match=r"mlp\.up_proj\.weight': base \[48, 32\] vs aligned \[64, 32\]"):
        compute_directions(tmp_path / "other", root / "aligned-tied-float32-single", out_dir / "d.safetensors")
    _assert_no_output(out_dir, [])


def _write(path: Path, tensors: dict[str, torch.Tensor]) -> Path:
    save_file(tensors, str(path), metadata={"format": "pt"})
    return path


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nonfinite_names_tensor_and_keeps_old_output(tmp_path, bad):
    base = {"a.weight": torch.ones(3, 4), "b.weight": torch.zeros(1000)}
    aligned = {"a.weight": torch.full((3, 4), 2.0), "b.weight": torch.arange(1000.0)}
    aligned["b.weight"][777] = bad
    b = _write(tmp_path / "b.safetensors", base)
    a = _write(tmp_path / "a.safetensors", aligned)
    out = tmp_path / "d.safetensors"
    out.write_bytes(b"previous contents")
    with pytest.raises(CheckpointError, match=r"'b\.weight'.*aligned checkpoint.*index 777"):
        compute_directions(b, a, out, chunk_bytes=256)
    assert out.read_bytes() == b"previous contents"  # the old file is untouched, no temporary left
    assert _listing(tmp_path) == ["a.safetensors", "b.safetensors", "d.safetensors"]


def test_overflow_in_output_dtype(tmp_path):
    b = _write(tmp_path / "b.safetensors", {"w": torch.tensor([1.0, -60000.0], dtype=torch.float16)})
    a = _write(tmp_path / "a.safetensors", {"w": torch.tensor([2.0, 60000.0], dtype=torch.float16)})
    with pytest.raises(CheckpointError, match=r"'w'.*overflows.*float16"):
        compute_directions(b, a, tmp_path / "d.safetensors")
    assert compute_directions(b, a, tmp_path / "d.safetensors", dtype="fp32")["w"].tolist() == [1.0, 120000.0]


def test_non_floating_skipped_with_note_and_zero_warned(tmp_path, caplog):
    b = _write(tmp_path / "b.safetensors", {"w": torch.ones(4), "same": torch.ones(2, 2),
                                            "step": torch.tensor(3), "mask": torch.ones(5, dtype=torch.bool)})
    a = _write(tmp_path / "a.safetensors", {"w": torch.full((4,), 1.5), "same": torch.ones(2, 2),
                                            "step": torch.tensor(9), "mask": torch.zeros(5, dtype=torch.bool)})
    with caplog.at_level(logging.INFO, logger="asft_optim.directions"), \
            pytest.warns(ZeroDirectionWarning, match=r"1 tensor\(s\).*'same'"):
        anchors = compute_directions(b, a, tmp_path / "d.safetensors")
    assert sorted(anchors) == ["same", "w"]
    assert json.loads(anchors.metadata["skipped"]) == ["mask", "step"]
    assert "skipped 2 non-floating" in caplog.text and "'step'" in caplog.text


def test_float_vs_int_is_an_error(tmp_path):
    b = _write(tmp_path / "b.safetensors", {"w": torch.ones(4)})
    a = _write(tmp_path / "a.safetensors", {"w": torch.ones(4, dtype=torch.int32)})
    with pytest.raises(CheckpointError, match="'w' is F32 in the base checkpoint but I32"):
        compute_directions(b, a, tmp_path / "d.safetensors")


def test_checksum_mismatch_refused_at_load(models, tmp_path):
    root, _ = models
    out = tmp_path / "d.safetensors"
    with pytest.warns(ZeroDirectionWarning):
        compute_directions(root / "base-tied-float32-single", root / "aligned-tied-float32-single", out)
    raw = bytearray(out.read_bytes())
    raw[-3] ^= 0x40  # flip a bit in the last tensor's data
    out.write_bytes(bytes(raw))
    with pytest.raises(ValueError, match="does not match the fingerprint.*verify=False"):
        Anchors.load(out)
    assert len(Anchors.load(out, verify=False)) == 20  # the caller may switch the check off


def test_model_checkpoint_is_not_a_directions_file(models):
    root, _ = models
    with pytest.raises(ValueError, match="model checkpoint, not a directions file"):
        Anchors.load(root / "aligned-tied-float32-single" / "model.safetensors")


def test_directions_file_drives_the_optimizer(models, tmp_path):
    """Names in the file bind to model.named_parameters(); the optimizer records the file's fingerprint."""
    from asft_optim import AsFTAdamW

    root, pairs = models
    anchors = compute_directions(root / "base-tied-float32-single", root / "aligned-tied-float32-single",
                                 tmp_path / "d.safetensors", dtype="bf16", exclude="norm")
    model = transformers.LlamaForCausalLM(_config(True))
    model.load_state_dict(pairs["tied-float32"][1].state_dict())
    params = [(n, p) for n, p in model.named_parameters() if "norm" not in n]
    opt = AsFTAdamW(params, lr=1e-3, anchors=Anchors.load(tmp_path / "d.safetensors"), asft_lambda=1.0)
    model(torch.randint(0, 128, (1, 8))).logits.sum().backward()
    opt.step()
    assert opt.state_dict()["param_groups"][0]["asft_anchors"] == anchors.fingerprint


# ------------------------------------------------------------------------------------ hub ids
def test_hub_offline_gives_clear_error(monkeypatch, tmp_path):
    hub = pytest.importorskip("huggingface_hub")
    monkeypatch.setattr(hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.chdir(tmp_path)  # so that 'org/...' is surely not a local folder
    with pytest.raises(CheckpointError, match=r"'asft-test-org/no-such-model'.*Hugging Face Hub failed.*offline"):
        open_checkpoint("asft-test-org/no-such-model")


def test_hub_id_resolves_through_snapshot_download(models, monkeypatch, tmp_path):
    hub = pytest.importorskip("huggingface_hub")
    root, _ = models
    snap = tmp_path / "snapshots" / "0123abcd"
    shutil.copytree(root / "aligned-tied-float32-sharded", snap)
    calls = []

    def fake_snapshot_download(repo_id, revision=None, allow_patterns=None):
        calls.append((repo_id, revision, allow_patterns))
        return str(snap)

    monkeypatch.setattr(hub, "snapshot_download", fake_snapshot_download)
    monkeypatch.chdir(tmp_path)
    ck = open_checkpoint("org/aligned@main")
    assert ck.source == "org/aligned@0123abcd" and len(ck.files) > 2
    assert calls[0] == ("org/aligned", "main", ["model.safetensors.index.json", "model.safetensors"])
    assert sorted(calls[1][2]) == sorted(p.name for p in snap.glob("model-*.safetensors"))


# ------------------------------------------------------------------------------------ CLI
def test_cli_directions(models, tmp_path, capsys):
    root, pairs = models
    out = tmp_path / "d.safetensors"
    rc = main(["directions", str(root / "base-untied-float32-sharded"), str(root / "aligned-untied-float32-single"),
               "-o", str(out), "--dtype", "bf16", "--exclude", "norm", "--no-progress"])
    assert rc == 0
    assert "wrote 16 directions" in capsys.readouterr().out
    anchors = Anchors.load(out)
    assert anchors.metadata["dtype"] == "bf16" and not any("norm" in k for k in anchors)
    rc = main(["directions", str(root / "base-tied-float32-sharded"), str(root / "aligned-untied-float32-sharded"),
               "-o", str(tmp_path / "e.safetensors"), "--no-progress"])
    assert rc == 1
    assert "error:" in capsys.readouterr().err and not (tmp_path / "e.safetensors").exists()


def test_cli_subprocess(models, tmp_path):
    root, _ = models
    exe = Path(sys.executable).parent / "asft"
    if not exe.exists():
        pytest.skip("the `asft` console script is not installed next to this interpreter")
    out = tmp_path / "d.safetensors"
    r = subprocess.run([str(exe), "directions", str(root / "base-tied-bfloat16-sharded"),
                        str(root / "aligned-tied-bfloat16-sharded"), "-o", str(out), "--dtype", "fp32"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "warning: the base and aligned checkpoints are identical on 5 tensor(s)" in r.stderr
    assert "fingerprint" in r.stdout
    assert Anchors.load(out).metadata["dtype"] == "fp32"


def test_index_and_shards_must_agree(models, tmp_path):
    root, _ = models
    folder = tmp_path / "m"
    shutil.copytree(root / "aligned-tied-float32-sharded", folder)
    index = folder / "model.safetensors.index.json"
    spec = json.loads(index.read_text())
    spec["weight_map"]["model.extra.weight"] = next(iter(spec["weight_map"].values()))
    index.write_text(json.dumps(spec))
    with pytest.raises(CheckpointError, match=r"lists 1 tensor\(s\) that its shards do not hold: 'model\.extra"):
        open_checkpoint(folder)


def test_progress_bar_counts_bytes_and_tensors(tmp_path, monkeypatch, capsys):
    import asft_optim.directions as directions

    seen = []

    class Recorder(directions.tqdm):
        def set_postfix_str(self, s="", refresh=True):
            seen.append((self.n, s))
            super().set_postfix_str(s, refresh)

    monkeypatch.setattr(directions, "tqdm", Recorder)
    b = _write(tmp_path / "b.safetensors", {"x": torch.zeros(1000), "y": torch.zeros(10)})
    a = _write(tmp_path / "a.safetensors", {"x": torch.ones(1000), "y": torch.ones(10)})
    compute_directions(b, a, tmp_path / "d.safetensors", progress=True)
    assert seen == [(0, "tensor 1/2"), (8000, "tensor 2/2")]  # bytes of both inputs read so far
    assert "7.89k" in capsys.readouterr().err  # total: 2 × 1010 × 4 B = 7.89 KiB


def test_write_failure_leaves_nothing(models, tmp_path, monkeypatch):
    """An error in the writer thread (here: a full disk on the third piece) surfaces and cleans up."""
    import errno

    import asft_optim.directions as directions

    root, _ = models
    calls = []
    real_write = directions._StreamingWriter.write

    def failing_write(self, name, piece):
        calls.append(name)
        if len(calls) == 3:
            raise OSError(errno.ENOSPC, "No space left on device")
        real_write(self, name, piece)

    monkeypatch.setattr(directions._StreamingWriter, "write", failing_write)
    with pytest.raises(OSError, match="No space left"):
        compute_directions(root / "base-tied-float32-single", root / "aligned-tied-float32-single",
                           tmp_path / "d.safetensors", chunk_bytes=4096)
    assert _listing(tmp_path) == []


_PEAK = r"""
import sys
def status(key):
    return next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith(key + ":"))
import asft_optim
base = status("VmRSS")
asft_optim.compute_directions(sys.argv[1], sys.argv[2], sys.argv[3], progress=False)
print(status("VmHWM") - base)
"""


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs /proc (Linux)")
def test_peak_memory_is_a_fraction_of_the_largest_tensor(tmp_path):
    """Streaming: a 64 MiB tensor is never held whole (peak growth < 1× it; holding base, aligned and
    the difference at once would be ≥ 3×)."""
    numel = 32 << 20
    g = torch.Generator().manual_seed(0)
    b = _write(tmp_path / "b.safetensors", {"w": torch.randn(numel, generator=g).bfloat16()})
    a = _write(tmp_path / "a.safetensors", {"w": torch.randn(numel, generator=g).bfloat16()})
    r = subprocess.run([sys.executable, "-c", _PEAK, str(b), str(a), str(tmp_path / "d.safetensors")],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    grown = int(r.stdout.strip().splitlines()[-1])
    assert grown < 2 * numel, f"peak RSS grew by {grown / 2**20:.0f} MiB for a {2 * numel / 2**20:.0f} MiB tensor"


# ------------------------------------------------------------------------------------ outputs vs inputs
def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_cli_never_writes_onto_or_into_its_inputs(models, tmp_path, capsys):
    """-o onto the aligned file, onto a shard or the index of a sharded folder, or into a checkpoint folder:
    refused, both checkpoints byte for byte as they were; beside them it works."""
    root, _ = models
    work = tmp_path / "ck"
    for name in ("base-tied-float32-sharded", "aligned-tied-float32-sharded", "aligned-tied-float32-single"):
        shutil.copytree(root / name, work / name)
    base, sharded, single = (work / n for n in ("base-tied-float32-sharded", "aligned-tied-float32-sharded",
                                                "aligned-tied-float32-single"))
    shard = sorted(sharded.glob("model-*.safetensors"))[1]
    before = _snapshot(work)
    cases = [(single / "model.safetensors", single / "model.safetensors", "is the ALIGNED input"),
             (sharded, shard, "is the ALIGNED input"),
             (sharded, sharded / "model.safetensors.index.json", "lies inside the ALIGNED folder"),
             (sharded, sharded / "directions.safetensors", "lies inside the ALIGNED folder"),
             (sharded, base / "d.safetensors", "lies inside the BASE folder")]
    for aligned, out, says in cases:
        for extra in ((), ("--overwrite",)):
            rc = main(["directions", str(base), str(aligned), "-o", str(out), "--no-progress", *extra])
            err = capsys.readouterr().err
            assert rc == 1 and "asft directions: error:" in err, (out, extra, err)
            assert says in err, (out, extra, err)
            assert _snapshot(work) == before, (out, extra)
    assert main(["directions", str(base), str(sharded), "-o", str(work / "d.safetensors"), "--no-progress"]) == 0
    with pytest.raises(ValueError, match="is the aligned input"):
        compute_directions(base, single, single / "model.safetensors")


def test_cli_refuses_an_existing_output_unless_overwrite(models, tmp_path, capsys):
    root, _ = models
    b, a = root / "base-untied-float32-single", root / "aligned-untied-float32-single"
    out = tmp_path / "d.safetensors"
    out.write_bytes(b"not mine")
    assert main(["directions", str(b), str(a), "-o", str(out), "--no-progress"]) == 1
    assert f"-o {out} exists: pass --overwrite" in capsys.readouterr().err and out.read_bytes() == b"not mine"
    assert main(["directions", str(b), str(a), "-o", str(out), "--no-progress", "--overwrite"]) == 1
    assert "is not a directions file" in capsys.readouterr().err and out.read_bytes() == b"not mine"
    out.unlink()
    assert main(["directions", str(b), str(a), "-o", str(out), "--no-progress", "--dtype", "bf16"]) == 0
    assert main(["directions", str(b), str(a), "-o", str(out), "--no-progress", "--dtype", "fp32"]) == 1
    assert Anchors.load(out).metadata["dtype"] == "bf16"
    assert main(["directions", str(b), str(a), "-o", str(out), "--no-progress", "--dtype", "fp32", "--overwrite"]) == 0
    assert Anchors.load(out).metadata["dtype"] == "fp32"
    assert (out.stat().st_mode & 0o777) == 0o666 & ~_umask()  # not tempfile's private 0600


def _umask() -> int:
    import os

    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def test_directions_record_sampled_fingerprints_of_both_checkpoints(models, tmp_path):
    """The sampled fingerprint follows the tensors, not the files: a re-sharded copy matches, another
    alignment of the same shapes does not; `check_made_from` names both checkpoints and the flag."""
    from asft_optim.directions import DirectionsMismatch, check_made_from

    root, pairs = models
    sharded, single = root / "aligned-untied-float32-sharded", root / "aligned-untied-float32-single"
    anchors = compute_directions(root / "base-untied-float32-single", single, tmp_path / "d.safetensors")
    assert anchors.metadata["aligned_sampled"] == open_checkpoint(sharded).sampled_fingerprint()
    assert anchors.metadata["base_sampled"] == open_checkpoint(root / "base-untied-float32-sharded").sampled_fingerprint()
    assert check_made_from(tmp_path / "d.safetensors", sharded) is None
    with pytest.raises(DirectionsMismatch) as e:
        check_made_from(tmp_path / "d.safetensors", root / "base-untied-float32-single", flag="--aligned")
    assert f"made from the aligned checkpoint {single}" in str(e.value)
    assert f"--aligned {root / 'base-untied-float32-single'} differs" in str(e.value) and "--allow-mismatch" in str(e.value)
    # one sampled block changed (the last 4 KiB of one tensor) is enough
    other = tmp_path / "other"
    shutil.copytree(single, other)
    info = open_checkpoint(other).tensors["model.embed_tokens.weight"]
    with open(info.file, "r+b") as f:
        f.seek(info.offset + info.nbytes - 4)
        f.write(b"\x00\x00\x80\x3f")
    assert open_checkpoint(other).sampled_fingerprint() != anchors.metadata["aligned_sampled"]
    old = tmp_path / "old.safetensors"  # a file made before the fingerprints were recorded: a note, no error
    meta = {k: v for k, v in anchors.metadata.items() if not k.endswith("_sampled")}
    Anchors.from_tensors({k: anchors[k] for k in anchors}, meta).save(old)
    assert "records no fingerprint of its aligned checkpoint" in check_made_from(old, single)
