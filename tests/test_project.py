"""`asft project`: flat and Safe LoRA projections against float64 oracles, and their refusals."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("peft")

from safetensors.torch import load_file  # noqa: E402

from asft_optim import cli, compute_directions  # noqa: E402

from . import fixtures as em  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _perturbed(src: Path, out: Path, seed: int, scale: float, **save_kw) -> Path:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(str(src))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * scale)
    return em.save(model, AutoTokenizer.from_pretrained(str(src)), out, **save_kw)


@pytest.fixture(scope="module")
def trio(tmp_path_factory):
    root = tmp_path_factory.mktemp("project")
    base = em.llama(root / "base")
    aligned = _perturbed(base, root / "aligned", 1, 0.05)
    finetuned = _perturbed(aligned, root / "finetuned", 2, 0.05, max_shard_size="4KB")  # sharded
    directions = compute_directions(base, aligned, out=root / "directions.safetensors", progress=False)
    return root, base, aligned, finetuned, root / "directions.safetensors", directions


def _tensors(folder: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def test_flat_equals_float64_oracle(trio, capsys):
    root, base, aligned, finetuned, dpath, _ = trio
    out = root / "flat"
    assert cli.main(["project", str(finetuned), "--aligned", str(aligned), "--directions", str(dpath),
                     "--mode", "flat", "--out", str(out)]) == 0
    assert sorted(p.name for p in finetuned.glob("*.safetensors")) == sorted(p.name for p in out.glob("*.safetensors"))
    assert len(list(out.glob("*.safetensors"))) > 1 and (out / "model.safetensors.index.json").is_file()
    assert (out / "config.json").read_text() == (finetuned / "config.json").read_text()
    w, wa, wb, got = _tensors(finetuned), _tensors(aligned), _tensors(base), _tensors(out)
    assert set(got) == set(w)
    for name in w:
        d = (wa[name].double() - wb[name].double()).reshape(-1)
        delta = (w[name].double() - wa[name].double()).reshape(-1)
        u = d / d.norm()
        if d.numel() <= 2048:  # the projector itself
            oracle = wa[name].double().reshape(-1) + (torch.eye(d.numel(), dtype=torch.float64) - torch.outer(u, u)) @ delta
        else:
            oracle = wa[name].double().reshape(-1) + delta - u * (u @ delta)
        torch.testing.assert_close(got[name].double().reshape(-1), oracle, rtol=2 ** -23, atol=2 ** -30)
        new_delta = got[name].double().reshape(-1) - wa[name].double().reshape(-1)
        assert abs(float(new_delta @ u)) < 1e-5 * float(delta.norm())  # nothing left along d
    info = json.loads((out / "asft_project.json").read_text())
    assert info["mode"] == "flat" and info["projected"] == len(w) and info["unchanged"] == 0
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(str(out))  # loads as the input did


def _adapter(base: Path, out: Path) -> Path:
    """A LoRA adapter on every linear layer of a Llama block."""
    em.lora_adapter(base, out, seed=5, r=2, lora_alpha=4, target_modules=["q_proj", "k_proj", "v_proj", "o_proj",
                                                                         "gate_proj", "up_proj", "down_proj"])
    return out


def _safelora_oracle(adapter: Path, directions, rule: str, value: float) -> dict[str, torch.Tensor]:
    tensors = load_file(str(adapter / "adapter_model.safetensors"))
    cos, proj = {}, {}
    for name in tensors:
        if ".lora_A." not in name:
            continue
        b_name = name.replace(".lora_A.", ".lora_B.")
        module = name.removeprefix("base_model.model.").removesuffix(".lora_A.weight")
        v = directions[f"{module}.weight"].double()
        c = v @ v.T / v.norm()  # Safe LoRA's C, out×out
        a, b = tensors[name].double(), tensors[b_name].double()
        cos[b_name] = float(torch.nn.functional.cosine_similarity((c @ b @ a).reshape(1, -1), (b @ a).reshape(1, -1)))
        proj[b_name] = c @ b
    chosen = ({n for n in cos if cos[n] <= value} if rule == "threshold"
              else set(sorted(cos, key=cos.get)[:round(value * len(cos))]))
    assert 0 < len(chosen) < len(cos)
    return {n: (proj[n] if n in chosen else t.double()) for n, t in tensors.items()}, chosen


@pytest.mark.parametrize("rule, value", [("threshold", None), ("fraction", 0.25)])
def test_safelora_equals_float64_oracle(trio, capsys, rule, value):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    root, base, aligned, _, dpath, directions = trio
    adapter = _adapter(aligned, root / f"adapter_{rule}")
    if value is None:  # a threshold between the layers' cosines
        tensors = load_file(str(adapter / "adapter_model.safetensors"))
        from asft_optim.project import safelora_layer

        cs = sorted(safelora_layer(tensors[n], tensors[n.replace(".lora_A.", ".lora_B.")],
                                   directions[n.removeprefix("base_model.model.").removesuffix(".lora_A.weight")
                                              + ".weight"])[1] for n in tensors if ".lora_A." in n)
        value = (cs[len(cs) // 2] + cs[len(cs) // 2 - 1]) / 2
    oracle, chosen = _safelora_oracle(adapter, directions, rule, value)
    out = root / f"safelora_{rule}"
    flag = ["--threshold", repr(value)] if rule == "threshold" else ["--fraction", str(value)]
    assert cli.main(["project", str(adapter), "--aligned", str(aligned), "--directions", str(dpath),
                     "--mode", "safelora", *flag, "--out", str(out)]) == 0
    got = load_file(str(out / "adapter_model.safetensors"))
    assert set(got) == set(oracle)
    for name, t in oracle.items():
        torch.testing.assert_close(got[name].double(), t, rtol=2 ** -22, atol=1e-9)
    info = json.loads((out / "asft_project.json").read_text())
    assert {m for m, layer in info["layers"].items() if layer["projected"]} == {
        n.removeprefix("base_model.model.").removesuffix(".lora_B.weight") for n in chosen}
    assert (out / "adapter_config.json").read_text() == (adapter / "adapter_config.json").read_text()
    PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(aligned)), str(out))  # loads
    printed = capsys.readouterr().out  # every layer's cosine, and which were projected
    lines = [ln.split() for ln in printed.splitlines() if ln.startswith("  ")]
    assert [(ln[0], float(ln[1]), ln[-1] == "projected") for ln in lines] == [
        (m, pytest.approx(layer["cos"], abs=1e-4), layer["projected"]) for m, layer in info["layers"].items()]


def test_bad_input_is_refused_and_leaves_no_output(trio, tmp_path, capsys):
    root, base, aligned, finetuned, dpath, _ = trio
    other = em.llama(tmp_path / "other_base", hidden=24)
    other_aligned = _perturbed(other, tmp_path / "other_aligned", 1, 0.05)
    other_dirs = tmp_path / "other.safetensors"
    compute_directions(other, other_aligned, out=other_dirs, progress=False)
    adapter = _adapter(aligned, tmp_path / "adapter")
    cases = [
        (["project", str(finetuned), "--aligned", str(aligned), "--directions", str(other_dirs), "--mode", "flat"],
         f"directions {other_dirs} do not fit model {finetuned}: 'lm_head.weight' has shape (41, 24) in the "
         "directions but (41, 16) in the model"),
        (["project", str(adapter), "--aligned", str(aligned), "--directions", str(other_dirs), "--mode", "safelora"],
         f"adapter {adapter} does not fit model of the directions {other_dirs}: "
         "'model.layers.0.mlp.down_proj.weight' has shape (24, 48), the adapter's update is 16×32 "
         "(an adapter made for another base model?)"),
        (["project", str(adapter), "--aligned", str(aligned), "--directions", str(dpath), "--mode", "flat"],
         f"--mode flat needs a full checkpoint, but {adapter} is a LoRA adapter: C⊥(s·B·A) is no LoRA update of "
         "the same rank; use --mode safelora, or merge the adapter first"),
        (["project", str(finetuned), "--aligned", str(aligned), "--directions", str(dpath), "--mode", "safelora"],
         f"--mode safelora projects LoRA adapters, but {finetuned} has no adapter_config.json; use --mode flat "
         "for a full checkpoint"),
    ]
    for k, (args, msg) in enumerate(cases):
        out = tmp_path / f"out{k}"
        capsys.readouterr()
        assert cli.main([*args, "--out", str(out)]) == 2
        assert capsys.readouterr().err == f"asft project: error: {msg}\n"
        assert not out.exists() and not list(tmp_path.glob(f".out{k}.*"))
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "x").write_text("keep")
    assert cli.main(["project", str(finetuned), "--aligned", str(aligned), "--directions", str(dpath),
                     "--mode", "flat", "--out", str(taken)]) == 2
    assert capsys.readouterr().err == (f"asft project: error: output {taken} exists: choose a new --out "
                                       "(projections never overwrite)\n")
    assert [p.name for p in taken.iterdir()] == ["x"]


def test_output_never_inside_an_input_and_directions_must_match_aligned(trio, tmp_path, capsys):
    """--out inside the model or the aligned folder: refused, the folders unchanged; directions made from
    another aligned checkpoint of the same shapes: refused naming both, unless --allow-mismatch."""
    _, base, aligned, finetuned, dpath, _ = trio
    adapter = _adapter(aligned, tmp_path / "adapter")
    listing = {f: sorted(p.name for p in f.iterdir()) for f in (aligned, finetuned, adapter)}
    flat = ["project", str(finetuned), "--directions", str(dpath), "--mode", "flat"]
    safelora = ["project", str(adapter), "--directions", str(dpath), "--mode", "safelora"]
    for cmd, out, says in ((flat + ["--aligned", str(aligned)], finetuned / "flat", "inside the MODEL folder"),
                           (flat + ["--aligned", str(aligned)], aligned / "flat", "inside the --aligned folder"),
                           (safelora + ["--aligned", str(aligned)], adapter / "safe", "inside the MODEL folder")):
        capsys.readouterr()
        assert cli.main([*cmd, "--out", str(out)]) == 2
        assert f"--out {out} lies {says}" in capsys.readouterr().err
    assert {f: sorted(p.name for p in f.iterdir()) for f in listing} == listing
    for cmd in (flat, safelora):
        out = tmp_path / f"o_{cmd[-1]}"
        assert cli.main([*cmd, "--aligned", str(base), "--out", str(out)]) == 2
        err = capsys.readouterr().err
        assert f"the directions {dpath} were made from the aligned checkpoint {aligned}, but --aligned {base}" in err
        assert not out.exists()
        assert cli.main([*cmd, "--aligned", str(base), "--out", str(out), "--allow-mismatch"]) == 0
