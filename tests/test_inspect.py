"""`asft inspect`: per-layer direction norms, fingerprint check, drift of a fine-tuned checkpoint."""

from __future__ import annotations

import math
import shutil
import warnings

import pytest
import torch
from safetensors.torch import save_file

from asft_optim import compute_directions
from asft_optim.checkpoints import CheckpointError
from asft_optim.cli import main
from asft_optim.inspection import direction_stats, drift_report
from asft_optim.metrics import drift, layer_of, per_layer, sums

from . import fixtures as em

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """base, aligned (norms unchanged, so d = 0 there), a fine-tuned model, and the directions file (fp32)."""
    root = tmp_path_factory.mktemp("inspect")
    cfg = transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, vocab_size=128,
                                   tie_word_embeddings=False)
    torch.manual_seed(0)
    base = transformers.LlamaForCausalLM(cfg)
    aligned = transformers.LlamaForCausalLM(cfg)
    aligned.load_state_dict(base.state_dict())
    tuned = transformers.LlamaForCausalLM(cfg)
    with torch.no_grad():
        for name, p in aligned.named_parameters():
            if "norm" not in name:
                p.add_(torch.randn_like(p) * 0.02)
        tuned.load_state_dict(aligned.state_dict())
        for p in tuned.parameters():
            p.add_(torch.randn_like(p) * 0.01)
    base.save_pretrained(root / "base")
    aligned.save_pretrained(root / "aligned", max_shard_size="20KB")
    tuned.save_pretrained(root / "tuned")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        compute_directions(root / "base", root / "aligned", root / "d.safetensors", dtype="fp32")
    params = {role: {n: p.detach().clone() for n, p in m.named_parameters()}
              for role, m in (("base", base), ("aligned", aligned), ("tuned", tuned))}
    return root, params


def test_direction_stats_match_the_weights(setup):
    root, P = setup
    stats = direction_stats(root / "d.safetensors")
    assert stats.fingerprint_actual == stats.fingerprint_recorded
    assert stats.aligned_source == str((root / "aligned").resolve()) and stats.aligned_error is None
    d = {n: P["aligned"][n] - P["base"][n] for n in P["aligned"]}
    layers = sorted({layer_of(n) for n in d})
    assert sorted(stats.layers) == layers
    for layer in layers:
        names = [n for n in d if layer_of(n) == layer]
        s = stats.layers[layer]
        d_norm = math.sqrt(sum(float(d[n].double().square().sum()) for n in names))
        w_norm = math.sqrt(sum(float(P["aligned"][n].double().square().sum()) for n in names))
        assert s.tensors == len(names) and s.numel == sum(d[n].numel() for n in names)
        assert s.d_norm == pytest.approx(d_norm, rel=1e-12)
        assert s.ratio == pytest.approx(d_norm / w_norm, rel=1e-12)
        assert sorted(s.zero) == sorted(n for n in names if "norm" in n)
        assert s.dtypes == {"F32"}
    assert stats.total.tensors == len(d) and len(stats.total.zero) == 5
    # layers in natural order: layers.2 would come after layers.1, not after layers.10
    assert list(stats.layers).index("model.layers.0") < list(stats.layers).index("model.layers.1")


def test_aligned_unavailable_and_override(setup, tmp_path):
    root, _ = setup
    moved = tmp_path / "d.safetensors"
    shutil.copy(root / "d.safetensors", moved)
    shutil.copytree(root / "aligned", tmp_path / "aligned-copy")
    # the recorded aligned path still works; an unreadable override leaves the ratios out with a reason
    stats = direction_stats(moved, aligned=tmp_path / "gone")
    assert stats.total.ratio is None and "not found" in stats.aligned_error
    assert all(s.ratio is None for s in stats.layers.values())
    stats2 = direction_stats(moved, aligned=tmp_path / "aligned-copy")
    assert stats2.total.ratio == pytest.approx(direction_stats(root / "d.safetensors").total.ratio, rel=1e-12)


def test_cli_inspect_table_and_fingerprint_mismatch(setup, tmp_path, capsys):
    root, _ = setup
    assert main(["inspect", str(root / "d.safetensors")]) == 0
    out = capsys.readouterr().out
    assert "matches the file's record" in out and "‖d‖/‖W_aligned‖" in out
    assert "model.layers.1" in out and "all-zero directions (5)" in out
    bad = tmp_path / "d.safetensors"
    raw = bytearray((root / "d.safetensors").read_bytes())
    raw[-1] ^= 0x01
    bad.write_bytes(bytes(raw))
    assert main(["inspect", str(bad)]) == 1
    assert "MISMATCH" in capsys.readouterr().out


def test_drift_matches_metrics(setup):
    root, P = setup
    per_tensor, layers, missing = drift_report(root / "d.safetensors", root / "tuned")
    assert missing == []
    d = {n: P["aligned"][n] - P["base"][n] for n in P["aligned"]}
    delta = {n: P["tuned"][n].double() - P["aligned"][n].double() for n in d}
    assert sorted(per_tensor) == sorted(d)
    for n in d:
        ref = drift(delta[n], d[n])
        got = per_tensor[n]
        assert got.numel == ref.numel
        for attr in ("delta_norm", "cos", "orth_ratio"):
            assert getattr(got, attr) == pytest.approx(getattr(ref, attr), rel=1e-9, abs=1e-12), (n, attr)
    ref_layers = per_layer({n: sums(delta[n], d[n]) for n in d})
    assert set(layers) == set(ref_layers)
    for k, v in ref_layers.items():
        assert layers[k].cos == pytest.approx(v.cos, rel=1e-9, abs=1e-12)
        assert layers[k].orth_ratio == pytest.approx(v.orth_ratio, rel=1e-9, abs=1e-12)


def test_drift_along_d_is_parallel(setup, tmp_path):
    """A model moved by 0.5·d (and nothing else) has cos = 1 and no orthogonal part wherever d ≠ 0."""
    root, P = setup
    moved = {n: P["aligned"][n] + 0.5 * (P["aligned"][n] - P["base"][n]) for n in P["aligned"]}
    save_file(moved, str(tmp_path / "moved.safetensors"))
    per_tensor, layers, _ = drift_report(root / "d.safetensors", tmp_path / "moved.safetensors",
                                         start=root / "aligned")
    for n, v in per_tensor.items():
        if "norm" in n:
            assert v.delta_norm == 0.0
        else:
            assert v.cos == pytest.approx(1.0, abs=1e-6) and v.orth_ratio == pytest.approx(0.0, abs=2e-3), n


def test_cli_drift_tables_and_png(setup, tmp_path, capsys):
    root, P = setup
    png = tmp_path / "drift.png"
    partial = {n: t for n, t in P["tuned"].items() if not n.startswith("lm_head")}
    save_file(partial, str(tmp_path / "partial.safetensors"))
    rc = main(["inspect", str(root / "d.safetensors"), "--model", str(tmp_path / "partial.safetensors"),
               "--start", str(root / "aligned"), "--plot", str(png)])
    assert rc == 0
    cap = capsys.readouterr()
    assert "cos(ΔW,d)" in cap.out and "model.layers.0.mlp.up_proj.weight" in cap.out
    assert "lm_head" not in cap.out and "1 direction(s) left out" in cap.err and "lm_head.weight" in cap.err
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert main(["inspect", str(root / "d.safetensors"), "--model", str(root / "tuned"), "--no-plot",
                 "--layers-only"]) == 0
    out = capsys.readouterr().out
    assert "model.layers.0.mlp" not in out and "model.layers.0 " in out


def test_inspect_errors(setup, tmp_path, capsys):
    root, P = setup
    assert main(["inspect", str(root / "base" / "model.safetensors")]) == 1
    assert "model checkpoint, not a directions file" in capsys.readouterr().err
    save_file({"x": torch.ones(2)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(CheckpointError, match="no tensor of the directions file"):
        drift_report(root / "d.safetensors", tmp_path / "other.safetensors")
    wrong = {n: t for n, t in P["tuned"].items()}
    wrong["model.norm.weight"] = torch.ones(7)
    save_file(wrong, str(tmp_path / "wrong.safetensors"))
    with pytest.raises(CheckpointError, match=r"'model\.norm\.weight'.*shape \[7\]"):
        drift_report(root / "d.safetensors", tmp_path / "wrong.safetensors")
    assert main(["inspect", str(tmp_path / "other.safetensors"), "--model", str(root / "tuned")]) == 1
    assert "error" in capsys.readouterr().err


def _check_adapter_drift(directions, folder, start: dict, merged: dict, d: dict, adapted: set[str]):
    """drift_report on the adapter folder = drift of the merged model minus the start model."""
    per_tensor, layers, missing = drift_report(directions, folder)
    assert missing == [] and set(per_tensor) == adapted
    delta = {n: merged[n].double() - start[n].double() for n in d}
    for n in adapted:
        ref = drift(delta[n], d[n])
        for attr in ("delta_norm", "cos", "orth_ratio"):
            assert getattr(per_tensor[n], attr) == pytest.approx(getattr(ref, attr), rel=1e-6, abs=1e-9), (n, attr)
    ref_layers = per_layer({n: sums(delta[n], d[n]) for n in d})
    assert set(layers) == set(ref_layers)
    for k, v in ref_layers.items():
        assert layers[k].cos == pytest.approx(v.cos, rel=1e-6, abs=1e-9), k
        assert layers[k].orth_ratio == pytest.approx(v.orth_ratio, rel=1e-6, abs=1e-9), k


@pytest.mark.parametrize("config", [
    dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
    dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], use_rslora=True,
         rank_pattern={"down_proj": 2}, alpha_pattern={"v_proj": 32}),
], ids=["plain", "rslora-patterns"])
def test_drift_of_a_lora_adapter_folder(setup, tmp_path, capsys, config):
    root, P = setup
    model = transformers.LlamaForCausalLM.from_pretrained(root / "aligned")
    merged = em.lora_adapter(model, tmp_path / "adapter", **config)
    d = {n: P["aligned"][n] - P["base"][n] for n in P["aligned"]}
    adapted = {n for n in d if n.endswith(tuple(f"{m}.weight" for m in config["target_modules"]))}
    _check_adapter_drift(root / "d.safetensors", tmp_path / "adapter", P["aligned"], merged, d, adapted)
    assert main(["inspect", str(root / "d.safetensors"), "--model", str(tmp_path / "adapter"), "--no-plot"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"LoRA adapter {tmp_path / 'adapter'}: ΔW = s·B·A for {len(adapted)} weight(s); the layer "
                          f"rows count the {sum(P['aligned'][n].numel() for n in d if n not in adapted)} parameters it "
                          "does not adapt as ΔW = 0\n")
    assert "model.layers.1.self_attn.v_proj.weight" in out and "model.layers.1.mlp.up_proj.weight" not in out


def test_drift_of_a_gpt2_adapter_fan_in_fan_out(tmp_path):
    """GPT-2's Conv1D stores its weight in×out: the adapter's ΔW is (s·B·A)ᵀ there."""
    cfg = transformers.GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=64, n_positions=16)
    torch.manual_seed(0)
    base = transformers.GPT2LMHeadModel(cfg)
    base.save_pretrained(tmp_path / "base")
    with torch.no_grad():
        for p in base.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    base.save_pretrained(tmp_path / "aligned")
    start = {n: p.detach().clone() for n, p in base.named_parameters()}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        anchors = compute_directions(tmp_path / "base", tmp_path / "aligned", tmp_path / "d.safetensors", dtype="fp32")
    merged = em.lora_adapter(base, tmp_path / "adapter", r=2, lora_alpha=4, target_modules=["c_attn"], fan_in_fan_out=True)
    d = {n: anchors[n] for n in start if n in anchors}
    _check_adapter_drift(tmp_path / "d.safetensors", tmp_path / "adapter", start, merged, d,
                         {"transformer.h.0.attn.c_attn.weight"})


def test_adapter_errors(setup, tmp_path, capsys):
    root, _ = setup
    model = transformers.LlamaForCausalLM.from_pretrained(root / "aligned")
    em.lora_adapter(model, tmp_path / "adapter", r=2, lora_alpha=4, target_modules=["q_proj"])
    capsys.readouterr()
    assert main(["inspect", str(root / "d.safetensors"), "--model", str(tmp_path / "adapter"),
                 "--start", str(root / "aligned")]) == 1
    assert capsys.readouterr().err == (f"asft inspect: error: {tmp_path / 'adapter'} is a LoRA adapter: its update "
                                       "s·B·A is ΔW itself, so --start does not apply\n")
    dora = tmp_path / "dora"
    em.lora_adapter(transformers.LlamaForCausalLM.from_pretrained(root / "aligned"), dora, r=2, lora_alpha=4,
             target_modules=["q_proj"], use_dora=True)
    capsys.readouterr()
    assert main(["inspect", str(root / "d.safetensors"), "--model", str(dora), "--no-plot"]) == 1
    assert capsys.readouterr().err == (f"asft inspect: error: {dora} holds a DoRA adapter: its update is not s·B·A, "
                                       "so it cannot be inspected\n")


def test_plot_never_overwrites_silently_nor_lands_on_an_input(setup, tmp_path, capsys):
    """--plot onto an existing file: refused unless --overwrite; onto the model file or into its folder:
    refused even with --overwrite; the inputs stay byte for byte."""
    root, P = setup
    d = str(root / "d.safetensors")
    model = tmp_path / "tuned.safetensors"
    save_file(P["tuned"], str(model))
    png = tmp_path / "drift.png"
    png.write_bytes(b"mine")
    assert main(["inspect", d, "--model", str(model), "--plot", str(png)]) == 1
    assert f"--plot {png} exists: pass --overwrite" in capsys.readouterr().err and png.read_bytes() == b"mine"
    assert main(["inspect", d, "--model", str(model), "--plot", str(png), "--overwrite"]) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    before = {p: p.read_bytes() for p in (model, root / "d.safetensors", root / "tuned" / "model.safetensors")}
    for plot, says in ((model, f"--plot {model} is the --model input"), (root / "d.safetensors", "is the DIRECTIONS input"),
                       (root / "tuned" / "drift.png", f"lies inside the --model folder {root / 'tuned'}")):
        capsys.readouterr()
        target = str(root / "tuned") if "folder" in says else str(model)
        assert main(["inspect", d, "--model", target, "--plot", str(plot), "--overwrite"]) == 1
        assert says in capsys.readouterr().err
    assert {p: p.read_bytes() for p in before} == before and not (root / "tuned" / "drift.png").exists()


def test_drift_plots_in_depth_order_without_lines_between_unrelated_layers():
    """Embeddings, blocks by number, final norm, head; lines only along consecutive blocks of one stack;
    layers nothing trained are "(not trained)" and get no marker (NaN), never a 0."""
    from asft_optim.drift_plot import layout

    names = ["lm_head", "model.norm", "model.layers.10", "model.layers.2", "model.embed_tokens", "model.layers.0",
             "model.layers.1", "vision.blocks.0", "vision.blocks.1"]
    plot = layout(names, trained=[n for n in names if ".layers." in n])
    assert plot.layers == ["model.embed_tokens", "model.layers.0", "model.layers.1", "model.layers.2",
                           "model.layers.10", "vision.blocks.0", "vision.blocks.1", "model.norm", "lm_head"]
    assert plot.segments == [[0], [1, 2, 3], [4], [5, 6], [7], [8]]
    assert plot.untrained == {"model.embed_tokens", "vision.blocks.0", "vision.blocks.1", "model.norm", "lm_head"}
    assert plot.ticks()[0] == "model.embed_tokens (not trained)" and plot.ticks()[1] == "model.layers.0"

    class Axes:  # records what `draw` hands to matplotlib
        def __init__(self):
            self.lines = []

        def plot(self, xs, ys, **style):
            self.lines.append((xs, ys, style["linestyle"]))

    from asft_optim.drift_plot import draw

    ax = Axes()
    draw(ax, plot, [float("nan") if n in plot.untrained else float(i) for i, n in enumerate(plot.layers)], marker="o")
    assert [(xs, ls) for xs, _, ls in ax.lines] == [([0], "none"), ([1, 2, 3], "-"), ([4], "none"), ([5, 6], "-"),
                                                     ([7], "none"), ([8], "none")]
    untrained = [y for xs, ys, _ in ax.lines for x, y in zip(xs, ys, strict=True) if plot.layers[x] in plot.untrained]
    assert len(untrained) == 5 and all(math.isnan(y) for y in untrained)


def test_drift_report_and_tables_in_depth_order_untrained_not_zero(setup, tmp_path, capsys):
    root, P = setup
    _, layers, _ = drift_report(root / "d.safetensors", root / "tuned")
    assert list(layers) == ["model.embed_tokens", "model.layers.0", "model.layers.1", "model.norm", "lm_head"]
    adapter = tmp_path / "ad"
    em.lora_adapter(transformers.LlamaForCausalLM.from_pretrained(root / "aligned"), adapter, target_modules=["q_proj"])
    assert main(["inspect", str(root / "d.safetensors"), "--model", str(adapter), "--no-plot", "--layers-only"]) == 0
    rows = {r.split()[0]: r.split()[1:] for r in capsys.readouterr().out.splitlines() if r.startswith(("model.", "lm_"))}
    assert list(rows) == ["model.embed_tokens", "model.layers.0", "model.layers.1", "model.norm", "lm_head"]
    assert rows["lm_head"][2:] == ["–", "–", "(not", "trained)"] and rows["model.layers.0"][-1] != "trained)"
