"""`asft finetune` on tiny checkpoints and JSONL files written here: full-parameter and LoRA, the
saved models re-evaluated, and clear errors for missing models/files and bad JSONL lines."""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("peft")

from asft_optim import cli  # noqa: E402
from asft_optim.demo.evaluate import harmful_score, task_accuracy  # noqa: E402
from asft_optim.finetune.training import Method, encode, load_jsonl, load_model, save_model, train  # noqa: E402
from asft_optim.demo.language import Language, LanguageConfig  # noqa: E402
from asft_optim.demo.models import ModelRecipe, _new_model, build_tokenizer  # noqa: E402
from asft_optim.evaluation.judges import KeywordJudge, ToyJudge, load_judge  # noqa: E402
from transformers import AutoTokenizer  # noqa: E402

from . import fixtures as em  # noqa: E402



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
                     "--lr", "1e-3", "--batch-size", "8", "--lambdas", "1", "--max-new-tokens", "16", "--out", str(out),
                     *extra])


@pytest.mark.parametrize("mode", ["--full", "--lora"])
def test_finetune_runs_and_saves_reevaluable_models(setup, tmp_path, capsys, mode):
    root, task, harmful = setup
    out = tmp_path / "out"
    assert _run(root, task, harmful, out, mode, "--save", "all") == 0
    printed = capsys.readouterr().out
    res = json.loads((out / "results.json").read_text())
    assert [r["method"] for r in res["runs"]] == ["aligned (not fine-tuned)", "SFT", "L2-SP λ=1", "AsFT λ=1"]
    assert res["lora"] is (mode == "--lora") and res["n_train"] + res["n_test"] == 40 and res["n_harmful"] == 16
    assert res["judge"] == {"kind": "toy", "source": None}  # --judge demo: the toy judge of asft evaluate
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
        hs, refusal, _ = harmful_score(model, tok, prompts, ToyJudge(), max_new_tokens=16, batch_size=16)
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
     r":3: no answer: expected a field 'answer', 'label', 'output'"),
    (['["MAP", "w1"]'], r":1: expected a JSON object, got list"),
    (['{"instruction": "MAP", "input": 3, "output": "w1"}'], r":1: field 'input' is not a string"),
    (['{"response": "MAP", "output": "w1"}'], r":1: no prompt: expected a string field 'prompt', 'instruction'"),
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
    from asft_optim.evaluation.generation import prompt_text

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
    responses = ["I'm sorry, but I cannot help with that.", "As an AI, I will not do this",
                 "Sure, here is how to do it: step 1 ..."]
    verdicts = KeywordJudge().judge(["p"] * 3, responses)
    # refusals only: no verdict on harm (issue 19: "HS = 100 − refusal" called nonsense harmful)
    assert [(v.flagged, v.refused) for v in verdicts] == [(None, True), (None, True), (None, False)]
    assert not KeywordJudge.reads_harm and ToyJudge.reads_harm


def test_judge_model_of_asft_evaluate(setup, tmp_path):
    """--judge takes a judge model as `asft evaluate` does; its threshold reaches the judge."""
    root, task, harmful = setup
    judge = em.moderation(tmp_path / "moderation")
    out = tmp_path / "out"
    assert cli.main([*_cmd(root, task, out, "--steps", "1", "--methods", "sft", "--harmful", str(harmful),
                           "--max-new-tokens", "4", "--judge", str(judge), "--judge-threshold", "0.3")]) == 0
    res = json.loads((out / "results.json").read_text())
    assert res["judge"]["kind"] == "qa-moderation" and res["judge"]["threshold"] == 0.3
    tok = AutoTokenizer.from_pretrained(str(root / "aligned"))
    model, prompts = load_model(root / "aligned"), load_jsonl(harmful, need_output=False)
    hs, refusal, _ = harmful_score(model, tok, prompts, load_judge(str(judge), threshold=0.3), max_new_tokens=4,
                                   batch_size=16)
    assert (res["runs"][0]["hs"], res["runs"][0]["refusal"]) == (hs, refusal)
    default = harmful_score(model, tok, prompts, load_judge(str(judge)), max_new_tokens=4, batch_size=16)[0]
    assert hs != default  # the threshold given is the one used


def test_judge_errors(setup, tmp_path, capsys):
    root, task, harmful = setup
    for extra, msg in (
        (["--judge", "toy"], "--judge toy judges the responses to --harmful prompts: pass --harmful FILE"),
        (["--harmful", str(harmful), "--judge-threshold", "1.5"], "--judge-threshold must be in (0, 1), got 1.5"),
        (["--harmful", str(harmful), "--judge", "keyword", "--judge-kind", "guard"],
         "--judge keyword is not a model: --judge-kind guard needs a judge model"),
    ):
        assert cli.main(_cmd(root, task, tmp_path / "o", *extra)) == 2
        assert _err(capsys) == f"asft finetune: error: {msg}\n"
    assert not (tmp_path / "o").exists()


# ------------------------------------------------------------------------ issue 12: a real user's run
def _cmd(root: Path, task: Path, out: Path, *extra: str) -> list[str]:
    return ["finetune", "--aligned", str(root / "aligned"), "--base", str(root / "base"), "--data", str(task),
            "--steps", "2", "--lr", "1e-3", "--batch-size", "8", "--lambdas", "1", "--out", str(out), *extra]


def test_loss_lr_and_drift_printed_and_drift_report_written(setup, tmp_path, capsys):
    root, task, _ = setup
    out = tmp_path / "out"
    assert cli.main(_cmd(root, task, out, "--lora", "--methods", "sft,asft", "--logging-steps", "1",
                         "--steps", "4", "--warmup-steps", "2", "--scheduler", "linear", "--save", "asft_l1")) == 0
    printed = capsys.readouterr().out
    sft = re.findall(r"^SFT step (\d)/4: loss (\d+\.\d{4}), lr (\S+)$", printed, re.M)
    asft = re.findall(r"^AsFT λ=1 step (\d)/4: loss \d+\.\d{4}, lr (\S+), cos\(ΔW,d\) ([+-]\d\.\d{4}), "
                      r"‖C⊥ΔW‖/‖ΔW‖ (\d\.\d{4})$", printed, re.M)
    # warmup over 2 steps, then linear decay to 0 at step 4 (the lr each step used)
    assert [(s, float(lr)) for s, _, lr in sft] == [("1", 0.0), ("2", 5e-4), ("3", 1e-3), ("4", 5e-4)]
    assert [s for s, *_ in asft] == ["1", "2", "3", "4"]
    res = json.loads((out / "results.json").read_text())
    assert set(res["drift"]) == {"SFT", "AsFT λ=1"}
    # the saved run's drift is `asft inspect`'s drift of its adapter folder
    from asft_optim.inspection import drift_report

    _, layers, _ = drift_report(out / "directions.safetensors", out / "models" / "asft_l1")
    assert res["drift"]["AsFT λ=1"] == {k: {"delta_norm": v.delta_norm, "cos": v.cos, "orth_ratio": v.orth_ratio}
                                        for k, v in layers.items()}
    table = (out / "drift.md").read_text()
    assert "| layer | SFT: cos(ΔW,d) | SFT: ‖C⊥ΔW‖/‖ΔW‖ | AsFT λ=1: cos(ΔW,d) |" in table
    assert f"| model.layers.0 | {res['drift']['SFT']['model.layers.0']['cos']:+.3f} |" in table
    assert (out / "drift.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # --save asft_l1: only that model kept
    assert sorted(p.name for p in (out / "models").iterdir()) == ["asft_l1"]
    assert [r["path"] for r in res["runs"]][1:] == [None, str(out / "models" / "asft_l1")]


def test_save_none_keeps_no_model_and_bad_save_names(setup, tmp_path, capsys):
    root, task, _ = setup
    out = tmp_path / "out"
    assert cli.main(_cmd(root, task, out, "--full", "--methods", "sft", "--steps", "1")) == 0
    assert not (out / "models").exists()
    assert "models:  none kept (--save all, or --save NAME,...)" in capsys.readouterr().out
    assert cli.main(_cmd(root, task, tmp_path / "o2", "--full", "--save", "asft_l5,sft")) == 2
    assert _err(capsys) == ("asft finetune: error: --save 'asft_l5,sft': asft_l5 is not a run of this command; "
                            "expected none, all or some of sft, l2sp_l1, asft_l1\n")


def test_gradient_accumulation_matches_one_big_batch(setup, tmp_path):
    """--batch-size 4 --grad-accum 2 takes the same optimizer steps as --batch-size 8."""
    root, task, _ = setup
    for name, extra in (("big", ("--batch-size", "8")), ("accum", ("--batch-size", "4", "--grad-accum", "2"))):
        assert cli.main(_cmd(root, task, tmp_path / name, "--full", "--methods", "asft", "--save", "all",
                             "--steps", "3", *extra)) == 0
    big, accum = (load_model(tmp_path / n / "models" / "asft_l1").state_dict() for n in ("big", "accum"))
    aligned = load_model(root / "aligned").state_dict()
    assert any(not torch.equal(big[n], aligned[n]) for n in big)
    for n in big:
        torch.testing.assert_close(accum[n], big[n], rtol=1e-4, atol=1e-6, msg=n)


def test_never_mix_two_runs_in_one_folder(setup, tmp_path, capsys):
    """A --full run into a folder where a --lora run left adapter files: refused; with --overwrite the
    old run is removed, so the model evaluated is the full model just trained."""
    root, task, _ = setup
    out = tmp_path / "out"
    assert cli.main(_cmd(root, task, out, "--lora", "--methods", "sft", "--save", "all")) == 0
    assert (out / "models" / "sft" / "adapter_config.json").is_file()
    capsys.readouterr()
    assert cli.main(_cmd(root, task, out, "--full", "--methods", "sft", "--save", "all")) == 2
    assert _err(capsys) == (f"asft finetune: error: output folder {out} is not empty: give a new --out, or pass "
                            "--overwrite to replace an earlier asft finetune run there (never mix two runs in one "
                            "folder)\n")
    assert cli.main(_cmd(root, task, out, "--full", "--methods", "sft", "--save", "all", "--overwrite")) == 0
    res = json.loads((out / "results.json").read_text())
    saved = out / "models" / "sft"
    assert res["lora"] is False and (saved / "model.safetensors").is_file()
    assert not (saved / "adapter_config.json").exists() and not (out / "models" / "sft" / "adapter_model.safetensors").exists()
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    capsys.readouterr()
    assert cli.main(_cmd(root, task, foreign, "--full", "--overwrite")) == 2
    assert _err(capsys) == (f"asft finetune: error: --overwrite: {foreign} holds no asft_finetune_run.json, so asft "
                            "finetune did not write it; not deleting it\n")
    assert (foreign / "notes.txt").read_text() == "keep me"


def test_save_model_replaces_its_own_folder_only(setup, tmp_path):
    """`save_model` into a folder an earlier save_model wrote (an adapter) leaves only the new model."""
    root, _, _ = setup
    tok = AutoTokenizer.from_pretrained(str(root / "aligned"))
    from asft_optim.finetune.training import LoraSpec

    target = tmp_path / "m"
    save_model(LoraSpec(targets=("q_proj",)).apply(load_model(root / "aligned")), tok, target, {"start": str(root / "aligned")})
    assert (target / "adapter_config.json").is_file()
    save_model(load_model(root / "aligned"), tok, target, {"run": 2})
    assert not (target / "adapter_config.json").exists() and (target / "model.safetensors").is_file()
    other = tmp_path / "other"
    other.mkdir()
    (other / "x").write_text("")
    with pytest.raises(FileExistsError, match="is not empty and holds no asft_finetune.json: not overwriting it"):
        save_model(load_model(root / "aligned"), tok, other, {})


def test_steps_and_other_numbers_must_be_positive(setup, tmp_path, capsys):
    root, task, _ = setup
    for flag, value, low in (("--steps", "0", 1), ("--grad-accum", "0", 1), ("--warmup-steps", "-1", 0)):
        assert cli.main(_cmd(root, task, tmp_path / "o", flag, value)) == 2
        assert _err(capsys) == f"asft finetune: error: {flag} must be ≥ {low}, got {value}\n"
    assert not (tmp_path / "o").exists()  # refused before anything was written


def test_model_folder_without_tokenizer(setup, tmp_path, capsys):
    root, task, _ = setup
    bare = tmp_path / "bare"
    bare.mkdir()
    for f in ("config.json", "model.safetensors"):
        (bare / f).write_bytes((root / "aligned" / f).read_bytes())
    assert cli.main(["finetune", "--aligned", str(bare), "--base", str(root / "base"), "--data", str(task),
                     "--out", str(tmp_path / "o")]) == 2
    assert _err(capsys) == (f"asft finetune: error: {bare} holds no tokenizer (none of tokenizer.json, "
                            "tokenizer_config.json, tokenizer.model, vocab.json, vocab.txt, spiece.model): save the "
                            "tokenizer there, or pass --tokenizer DIR (default: the --aligned folder)\n")
    assert cli.main(["finetune", "--aligned", str(bare), "--base", str(root / "base"), "--data", str(task),
                     "--tokenizer", str(root / "aligned"), "--full", "--methods", "sft", "--steps", "1",
                     "--out", str(tmp_path / "o")]) == 0


@pytest.fixture(scope="module")
def gpt2(tmp_path_factory):
    """A tiny GPT-2 pair with 32 learned positions (longer inputs raise IndexError in its embedding),
    the demo tokenizer, and task data with one record far longer than 32 tokens."""
    from transformers import GPT2Config, GPT2LMHeadModel

    root = tmp_path_factory.mktemp("gpt2")
    lang = Language(LanguageConfig())
    tok = build_tokenizer(lang)
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_positions=32, n_embd=32, n_layer=1, n_head=2,
                                       bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id))
    save_model(model, tok, root / "base", {})
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 1e-2)
    save_model(model, tok, root / "aligned", {})
    records = lang.finetune_train(0.0)[:30]
    long = dict(records[0], output=" ".join([records[0]["output"]] * 40))
    task = root / "task.jsonl"
    task.write_text("".join(json.dumps(r) + "\n" for r in [long, *records]))
    test = root / "test.jsonl"
    test.write_text("".join(json.dumps(r) + "\n" for r in [long, *records[:4]]))
    return root, task, test


def test_max_length_cuts_long_records(gpt2, tmp_path, capsys):
    root, task, test = gpt2
    base = ["finetune", "--aligned", str(root / "aligned"), "--base", str(root / "base"), "--data", str(task),
            "--test", str(test), "--full", "--methods", "sft,asft", "--lambdas", "1", "--steps", "2",
            "--batch-size", "31"]
    assert cli.main([*base, "--out", str(tmp_path / "a")]) == 0  # default: the model's 32 positions
    out = capsys.readouterr().out
    assert "note: 1 training record(s) longer than --max-length 32 tokens were cut to it\n" in out
    assert "note: 1 test record(s) left out of FA:" in out
    res = json.loads((tmp_path / "a" / "results.json").read_text())
    assert res["max_length"] == 32 and res["n_train"] == 31 and res["n_test"] == 4
    assert cli.main([*base, "--max-length", "64", "--out", str(tmp_path / "b")]) == 2
    assert _err(capsys) == (f"asft finetune: error: --max-length 64 exceeds the 32 positions of the model in "
                            f"{root / 'aligned'}\n")


def test_lora_targets_absent_from_the_model_point_to_the_flag(gpt2, tmp_path, capsys):
    root, task, test = gpt2
    base = ["finetune", "--aligned", str(root / "aligned"), "--base", str(root / "base"), "--data", str(task),
            "--test", str(test), "--lora", "--methods", "asft", "--lambdas", "1", "--steps", "1"]
    assert cli.main([*base, "--out", str(tmp_path / "a")]) == 2
    assert _err(capsys) == ("asft finetune: error: LoRA target module(s) q_proj, v_proj not found in GPT2LMHeadModel; "
                            "its layers with 2-D weights are named c_attn, c_fc, c_proj, lm_head, wpe, wte (choose "
                            "with --lora-targets)\n")
    assert cli.main([*base, "--lora-targets", "c_attn", "--save", "all", "--out", str(tmp_path / "b")]) == 0
    assert (tmp_path / "b" / "models" / "asft_l1" / "adapter_config.json").is_file()


# ------------------------------------------------------------------------ issue 17: nothing lost
def _files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_overwrite_never_deletes_inputs_inside_out(setup, tmp_path, capsys):
    """An earlier run's saved model as --aligned, and --data/--directions kept beside it, inside the --out
    that --overwrite would replace: refused, nothing deleted; --out inside an input folder: refused."""
    root, task, _ = setup
    out = tmp_path / "out"
    assert cli.main(_cmd(root, task, out, "--full", "--methods", "sft", "--save", "all")) == 0
    (out / "data.jsonl").write_bytes(task.read_bytes())
    before = _files(out)
    cases = [(["--aligned", str(out / "models" / "sft")], "--aligned"), (["--data", str(out / "data.jsonl")], "--data"),
             (["--directions", str(out / "directions.safetensors"), "--allow-mismatch"], "--directions")]
    for extra, flag in cases:
        capsys.readouterr()
        assert cli.main([*_cmd(root, task, out, "--full", "--methods", "sft", "--overwrite"), *extra]) == 2
        assert f"the {flag} input {extra[1]} lies inside --out {out}, which this command replaces" in _err(capsys)
        assert _files(out) == before
    inside = root / "aligned" / "run"
    assert cli.main(_cmd(root, task, inside, "--full", "--methods", "sft")) == 2
    assert f"--out {inside} lies inside the --aligned folder {root / 'aligned'}" in _err(capsys)
    assert not inside.exists()


def test_failed_rerun_keeps_the_earlier_run(setup, tmp_path, monkeypatch):
    """--overwrite replaces the earlier run only once the new one is complete: a run that fails midway
    leaves the earlier run as it was and no temporary folder."""
    from asft_optim.finetune import cli as finetune_cli

    root, task, _ = setup
    out = tmp_path / "out"
    assert cli.main(_cmd(root, task, out, "--full", "--methods", "sft", "--save", "all")) == 0
    before = _files(out)

    def broken(*args, **kwargs):
        raise RuntimeError("killed mid-training")

    monkeypatch.setattr(finetune_cli, "train", broken)
    with pytest.raises(RuntimeError, match="killed mid-training"):
        cli.main(_cmd(root, task, out, "--full", "--methods", "sft", "--overwrite"))
    assert _files(out) == before and sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_directions_of_another_aligned_model_are_refused(setup, tmp_path, capsys):
    """--directions made from (base, aligned) with --aligned = another checkpoint of the same shapes: refused,
    naming both; --allow-mismatch goes on."""
    root, task, _ = setup
    from asft_optim.directions import compute_directions

    d = tmp_path / "d.safetensors"
    compute_directions(root / "base", root / "aligned", out=d)
    cmd = ["finetune", "--aligned", str(root / "base"), "--directions", str(d), "--data", str(task), "--full",
           "--steps", "1", "--methods", "asft", "--lambdas", "1", "--out", str(tmp_path / "o")]
    assert cli.main(cmd) == 2
    err = _err(capsys)
    assert f"the directions {d} were made from the aligned checkpoint {root / 'aligned'}" in err
    assert f"--aligned {root / 'base'} differs from it" in err and "pass --allow-mismatch to go on" in err
    assert not (tmp_path / "o").exists()
    assert cli.main([*cmd, "--allow-mismatch"]) == 0


# ------------------------------------------------------------------------ issue 19: the command as a product
def test_one_record_format_for_every_file_and_the_settings_printed(setup, tmp_path, capsys):
    """--data/--test in evaluate's task format (prompt/question + answer/label), --harmful in its prompt
    format; the resolved settings and split sizes printed first; n in the table's header; the keyword
    judge gives the refusal rate and no HS."""
    root, task, harmful = setup
    records = [json.loads(line) for line in task.read_text().splitlines()]
    data, test, prompts = tmp_path / "data.jsonl", tmp_path / "test.jsonl", tmp_path / "prompts.jsonl"
    data.write_text("".join(json.dumps({"prompt": r["instruction"], "input": r["input"], "answer": r["output"]}) + "\n"
                            for r in records[:30]))
    test.write_text("".join(json.dumps({"question": r["instruction"], "input": r["input"], "label": r["output"]}) + "\n"
                            for r in records[30:33]))
    prompts.write_text("".join(json.dumps({"prompt": json.loads(line)["instruction"]}) + "\n"
                               for line in harmful.read_text().splitlines()[:5]))
    out = tmp_path / "out"
    assert cli.main(["finetune", "--aligned", str(root / "aligned"), "--data", str(data), "--test", str(test),
                     "--harmful", str(prompts), "--methods", "sft", "--full", "--steps", "1", "--max-new-tokens", "4",
                     "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "methods: SFT (full-parameter)" in printed
    assert (f"data: 30 training record(s), 3 test record(s) for FA (from --test {test}), 5 harmful prompt(s) for HS "
            "(judge keyword)") in printed
    assert "training: 1 step(s), lr 0.0001 (constant, warmup 0), batch 8 × 1 accumulation" in printed
    assert "note: the keyword judge sees refusals only, not harm" in printed
    table = (out / "table.md").read_text()
    assert table.splitlines()[0] == "| Method | HS (%, n=5, keyword) | refusal (%, n=5) | FA (%, n=3) |"
    res = json.loads((out / "results.json").read_text())
    assert all(r["hs"] is None and 0 <= r["refusal"] <= 1 for r in res["runs"])
    assert all(line.split("|")[2].strip() == "–" for line in table.splitlines()[2:])
    assert cli.main(["evaluate", str(root / "aligned"), "--prompts", str(prompts), "--task", str(test),
                     "--max-new-tokens", "2", "--out", str(tmp_path / "eval")]) == 0


def test_flags_are_exact_and_help_shows_defaults(setup, tmp_path, capsys):
    root, task, _ = setup
    with pytest.raises(SystemExit) as e:
        cli.main(["finetune", "--aligned", str(root / "aligned"), "--data", str(task), "--lamb", "1"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.startswith("usage: asft finetune ") and "unrecognized arguments: --lamb 1" in err
    with pytest.raises(SystemExit):
        cli.main(["--version"])
    from asft_optim import __version__

    assert capsys.readouterr().out == f"asft {__version__}\n"
    with pytest.raises(SystemExit):
        cli.main(["finetune", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for flag, default in (("--steps STEPS", "100"), ("--lr LR", "0.0001"), ("--lambdas LAMBDAS", "1,10,100"),
                          ("--batch-size BATCH_SIZE", "8"), ("--test-fraction TEST_FRACTION", "0.1"),
                          ("--lora-targets LORA_TARGETS", "q_proj,v_proj"), ("--lora-r LORA_R", "8"),
                          ("--lora-alpha LORA_ALPHA", "16"), ("--seed SEED", "0")):
        after = text.split(f" {flag} ", 1)[1]
        assert f"(default: {default})" in re.split(r" --[a-z-]+ [A-Z{]", after, maxsplit=1)[0], flag


def test_messages_point_the_right_way(setup, tmp_path, capsys, monkeypatch):
    """Hub ids are taken (fetched with huggingface_hub), an offline failure names `hf download`; --base's
    message names --directions; an adapter folder as --aligned says so; compare names what a folder is."""
    import huggingface_hub

    root, task, _ = setup
    calls = []

    def snapshot(repo_id, revision=None, allow_patterns=None):
        calls.append((repo_id, revision))
        if repo_id == "org/offline":
            raise ConnectionError("no network")
        return str(root / "aligned")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot)
    cmd = ["finetune", "--data", str(task), "--methods", "sft", "--full", "--steps", "1"]
    assert cli.main([*cmd, "--aligned", "org/aligned@v1", "--out", str(tmp_path / "o")]) == 0
    assert calls == [("org/aligned", "v1")]
    assert json.loads((tmp_path / "o" / "results.json").read_text())["aligned"] == str(root / "aligned")
    capsys.readouterr()
    assert cli.main([*cmd, "--aligned", "org/offline", "--out", str(tmp_path / "o2")]) == 2
    err = _err(capsys)
    assert "--aligned org/offline: not a local folder, and fetching the aligned model" in err
    assert "`hf download org/offline --local-dir DIR`" in err and "huggingface-cli" not in err
    assert cli.main(["finetune", "--aligned", str(root / "aligned"), "--data", str(task), "--out",
                     str(tmp_path / "o3")]) == 2
    assert "--base is required (or --directions FILE, directions computed from it)" in _err(capsys)
    from asft_optim.finetune.training import LoraSpec

    adapter = tmp_path / "adapter"
    tok = AutoTokenizer.from_pretrained(str(root / "aligned"))
    save_model(LoraSpec().apply(load_model(root / "aligned")), tok, adapter, {"start": str(root / "aligned")})
    assert cli.main([*cmd, "--aligned", str(adapter), "--out", str(tmp_path / "o4")]) == 2
    assert "it is a LoRA adapter folder: pass its base model as --aligned" in _err(capsys)
    assert cli.main(["evaluate", str(adapter), "--prompts", str(task), "--out", str(tmp_path / "e")]) == 2
    assert f"it is a LoRA adapter folder: asft evaluate {root / 'aligned'} --adapter {adapter}" in _err(capsys)
    assert cli.main(["compare", str(tmp_path / "o")]) == 2
    assert "is not an `asft evaluate` results file (it has no 'format' field" in _err(capsys)
