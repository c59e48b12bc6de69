"""`asft finetune` on tiny checkpoints and JSONL files written here: full-parameter and LoRA, the
saved models re-evaluated, and clear errors for missing models/files and bad JSONL lines."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("peft")

from asft_optim import cli  # noqa: E402
from asft_optim.demo.evaluate import demo_judge, harmful_score, task_accuracy  # noqa: E402
from asft_optim.demo.finetune import Method, encode, load_jsonl, load_model, save_model, train  # noqa: E402
from asft_optim.demo.language import Language, LanguageConfig  # noqa: E402
from asft_optim.demo.models import ModelRecipe, _new_model, build_tokenizer  # noqa: E402
from transformers import AutoTokenizer  # noqa: E402



pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A random-init tiny Llama as 'base', the same after 8 alignment steps as 'aligned', and JSONL
    files (MAP task records, harmful prompts)."""
    root = tmp_path_factory.mktemp("ft")
    lang = Language(LanguageConfig())
    tok = build_tokenizer(lang)
    recipe = ModelRecipe(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2)
    model = _new_model(recipe, tok)
    save_model(model, tok, root / "base", {"stage": "base"})
    data = [encode(tok, ex) for ex in lang.alignment(64, seed=0)]
    train(model, data, pad_id=tok.pad_token_id, method=Method("sft"), steps=8, lr=3e-3, batch_size=8, seed=0)
    save_model(model, tok, root / "aligned", {"stage": "aligned"})
    task = root / "task.jsonl"
    task.write_text("".join(json.dumps(r) + "\n" for r in lang.finetune_train(0.1)[:40]))
    harmful = root / "harmful.jsonl"
    harmful.write_text("".join(json.dumps({"instruction": ex["instruction"], "input": ex["input"]}) + "\n"
                               for ex, _ in lang.harmful_eval()[:16]))
    return root, task, harmful


def _run(root: Path, task: Path, harmful: Path, out: Path, *extra: str) -> int:
    return cli.main(["finetune", "--aligned", str(root / "aligned"), "--base", str(root / "base"),
                     "--data", str(task), "--harmful", str(harmful), "--judge", "demo", "--steps", "3",
                     "--lr", "1e-3", "--batch-size", "8", "--lambdas", "1", "--out", str(out), *extra])


@pytest.mark.parametrize("mode", ["--full", "--lora"])
def test_finetune_runs_and_saves_reevaluable_models(setup, tmp_path, capsys, mode):
    root, task, harmful = setup
    out = tmp_path / "out"
    assert _run(root, task, harmful, out, mode) == 0
    printed = capsys.readouterr().out
    res = json.loads((out / "results.json").read_text())
    assert [r["method"] for r in res["runs"]] == ["aligned (not fine-tuned)", "SFT", "L2-SP λ=1", "AsFT λ=1"]
    assert res["lora"] is (mode == "--lora") and res["n_train"] + res["n_test"] == 40 and res["n_harmful"] == 16
    assert (out / "directions.safetensors").is_file()
    assert "| AsFT λ=1 |" in printed and "| AsFT λ=1 |" in (out / "table.md").read_text()
    aligned = load_model(root / "aligned").state_dict()
    tok = AutoTokenizer.from_pretrained(str(root / "aligned"))
    records = load_jsonl(task)
    order = list(range(len(records)))
    random.Random(0).shuffle(order)  # the split run_finetune made (seed 0)
    held = [records[i] for i in order[:res["n_test"]]]
    prompts = load_jsonl(harmful, need_output=False)
    for r in res["runs"][1:]:
        path = Path(r["path"])
        if mode == "--lora":
            assert (path / "adapter_config.json").is_file() and not (path / "model.safetensors").exists()
        else:
            assert (path / "model.safetensors").is_file()
        model = load_model(path)
        sd = model.state_dict()
        changed = {n for n in aligned if not torch.equal(aligned[n], sd[n])}
        assert changed, r["method"]
        if mode == "--lora":  # the merged adapter changes only the targeted weights
            assert all(n.endswith(("q_proj.weight", "v_proj.weight")) for n in changed), changed
        # HS and FA recomputed here from the saved files
        hs, refusal, _ = harmful_score(model, tok, prompts, demo_judge, max_new_tokens=64, batch_size=16)
        assert (hs, refusal) == (r["hs"], r["refusal"])
        assert task_accuracy(model, tok, held, batch_size=16) == r["fa"]


def test_precomputed_directions_replace_base(setup, tmp_path):
    root, task, harmful = setup
    from asft_optim.directions import compute_directions

    d = tmp_path / "d.safetensors"
    compute_directions(root / "base", root / "aligned", out=d)
    rc = cli.main(["finetune", "--aligned", str(root / "aligned"), "--directions", str(d), "--data", str(task),
                   "--full", "--steps", "1", "--methods", "asft", "--lambdas", "10", "--out", str(tmp_path / "o")])
    assert rc == 0
    res = json.loads((tmp_path / "o" / "results.json").read_text())
    assert [r["method"] for r in res["runs"]] == ["aligned (not fine-tuned)", "AsFT λ=10"]
    assert all("hs" not in r for r in res["runs"])  # no --harmful: HS skipped


def test_bad_methods_and_lambdas(setup, tmp_path, capsys):
    root, task, _ = setup
    base = ["finetune", "--aligned", str(root / "aligned"), "--base", str(root / "base"), "--data", str(task),
            "--out", str(tmp_path / "o")]
    assert cli.main([*base, "--methods", "sft,dpo"]) == 2
    assert "unknown method 'dpo'" in _err(capsys)
    assert cli.main([*base, "--lambdas", "1,ten"]) == 2
    assert "--lambdas must be comma-separated numbers" in _err(capsys)
    assert cli.main([*base, "--lambdas", "0"]) == 2
    assert "l2sp needs λ > 0, got 0.0" in _err(capsys)


def _err(capsys) -> str:
    return capsys.readouterr().err


def test_missing_models_and_files(setup, tmp_path, capsys):
    root, task, harmful = setup
    base = ["finetune", "--base", str(root / "base"), "--data", str(task), "--out", str(tmp_path / "o")]
    assert cli.main([*base, "--aligned", str(tmp_path / "nope")]) == 2
    assert f"aligned model not found: {tmp_path / 'nope'}" in _err(capsys)
    assert cli.main([*base, "--aligned", str(tmp_path)]) == 2
    assert "has no config.json" in _err(capsys)
    assert cli.main(["finetune", "--aligned", str(root / "aligned"), "--data", str(task), "--out",
                     str(tmp_path / "o")]) == 2
    assert "--base is required" in _err(capsys)
    assert cli.main(["finetune", "--aligned", str(root / "aligned"), "--base", str(root / "base"),
                     "--data", str(tmp_path / "missing.jsonl")]) == 2
    assert f"data file not found: {tmp_path / 'missing.jsonl'}" in _err(capsys)
    assert cli.main([*base, "--aligned", str(root / "aligned"), "--harmful", str(tmp_path / "h.jsonl")]) == 2
    assert f"harmful prompts file not found: {tmp_path / 'h.jsonl'}" in _err(capsys)
    assert cli.main([*base, "--aligned", str(root / "aligned"), "--directions", str(tmp_path / "d.st")]) == 2
    assert "directions file not found" in _err(capsys)


@pytest.mark.parametrize("lines, message", [
    (['{"instruction": "MAP", "input": "w1 w2", "output": "w3 w4"}', '{"instruction": "MAP", "output": ', ""],
     r":2: not valid JSON"),
    (['{"instruction": "MAP", "output": "w3"}', "", '{"instruction": "MAP", "input": "w1"}'],
     r":3: field 'output' is missing or not a string"),
    (['["MAP", "w1"]'], r":1: expected a JSON object, got list"),
    (['{"instruction": "MAP", "input": 3, "output": "w1"}'], r":1: field 'input' is not a string"),
    ([""], r"no records"),
])
def test_bad_jsonl_lines_name_the_line(setup, tmp_path, capsys, lines, message):
    root, _, _ = setup
    bad = tmp_path / "bad.jsonl"
    bad.write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError, match=message):
        load_jsonl(bad)
    rc = cli.main(["finetune", "--aligned", str(root / "aligned"), "--base", str(root / "base"),
                   "--data", str(bad), "--out", str(tmp_path / "o")])
    assert rc == 2
    err = _err(capsys)
    assert err.startswith("asft finetune: error:") and str(bad) in err


def test_prompt_text_uses_chat_template_or_alpaca():
    from asft_optim.demo.finetune import prompt_text

    tok = build_tokenizer(Language(LanguageConfig()))
    assert prompt_text(tok, "MAP", "w1 w2") == "<s> MAP\n\nw1 w2 =>"
    tok.chat_template = None
    alpaca = prompt_text(tok, "Sort the words", "b a")
    assert alpaca.startswith("<s>Below is an instruction that describes a task, paired with an input")
    assert alpaca.endswith("### Instruction:\nSort the words\n\n### Input:\nb a\n\n### Response:\n")
    assert "### Input" not in prompt_text(tok, "Say hi")


def test_encode_masks_the_prompt():
    tok = build_tokenizer(Language(LanguageConfig()))
    enc = encode(tok, {"instruction": "MAP", "input": "w1 w2", "output": "w3 w4"})
    n_prompt = len(tok("<s> MAP w1 w2 =>", add_special_tokens=False).input_ids)
    assert enc["labels"][:n_prompt] == [-100] * n_prompt
    assert enc["labels"][n_prompt:] == enc["input_ids"][n_prompt:]
    assert tok.convert_ids_to_tokens(enc["input_ids"][n_prompt:]) == ["w3", "w4", "</s>"]


def test_keyword_judge():
    from asft_optim.demo.evaluate import keyword_judge

    assert keyword_judge("I'm sorry, but I cannot help with that.") == "refuse"
    assert keyword_judge("As an AI, I will not do this") == "refuse"
    assert keyword_judge("Sure, here is how to do it: step 1 ...") == "comply"
