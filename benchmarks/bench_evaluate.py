"""`asft evaluate` throughput on this machine: prompts per second for greedy generation and for each
judge kind (QA-moderation classifier, generative guard, keyword), from results.json's `throughput`.

Models are random Llamas built from configs (no downloads) with the tests' word-level tokenizer, so
the numbers measure the pipeline's cost at a given model size, not any real model's answers.

    python benchmarks/bench_evaluate.py --hidden 256 --layers 4 --prompts 64 --max-new-tokens 64 --batch-size 16
    pytest benchmarks/bench_evaluate.py -s      # a small size, one round
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tests import fixtures as em  # noqa: E402


def _config(tok, hidden: int, layers: int, **kw):
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=len(tok), hidden_size=hidden, intermediate_size=int(2.75 * hidden),
                       num_hidden_layers=layers, num_attention_heads=max(hidden // 64, 1),
                       num_key_value_heads=max(hidden // 64, 1), max_position_embeddings=1024,
                       bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                       tie_word_embeddings=False, **kw)


def build(root: Path, hidden: int, layers: int) -> dict[str, Path]:
    from transformers import LlamaForCausalLM, LlamaForSequenceClassification

    tok = em.tokenizer(chat=True)
    torch.manual_seed(0)
    paths = {"model": em.save(LlamaForCausalLM(_config(tok, hidden, layers)), tok, root / "model")}
    paths["moderation"] = em.save(LlamaForSequenceClassification(_config(
        tok, hidden, layers, num_labels=14, problem_type="multi_label_classification",
        id2label=dict(enumerate(em.BEAVERTAILS)))), em.tokenizer(chat=False), root / "moderation")
    paths["guard"] = em.save(LlamaForCausalLM(_config(tok, hidden, layers)), em.tokenizer(chat=False), root / "guard")
    return paths


def measure(hidden: int, layers: int, n_prompts: int, max_new_tokens: int, batch_size: int) -> list[dict]:
    from asft_optim.evaluation import evaluate

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        paths = build(root, hidden, layers)
        words = em.WORDS
        prompts = [" ".join(words[(i * 7 + k) % len(words)] for k in range(12)) for i in range(n_prompts)]
        (root / "p.jsonl").write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts))
        for judge in ("keyword", str(paths["moderation"]), str(paths["guard"])):
            t = time.perf_counter()
            res = evaluate(str(paths["model"]), root / f"out_{Path(judge).name}", prompts=str(root / "p.jsonl"),
                           judge=judge, max_new_tokens=max_new_tokens, batch_size=batch_size, show_progress=False)
            rows.append({"judge": res["judge"]["kind"], "n": res["n"], "wall_s": round(time.perf_counter() - t, 2),
                         **{k: round(v, 2) for k, v in res["throughput"].items()}})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--prompts", type=int, default=64)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--threads", type=int, default=None)
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    print(json.dumps({"machine": platform.processor() or platform.machine(), "torch_threads": torch.get_num_threads(),
                      "hidden": a.hidden, "layers": a.layers, "prompts": a.prompts,
                      "max_new_tokens": a.max_new_tokens, "batch_size": a.batch_size}))
    for row in measure(a.hidden, a.layers, a.prompts, a.max_new_tokens, a.batch_size):
        print(json.dumps(row))


def test_evaluate_throughput():
    rows = measure(hidden=64, layers=2, n_prompts=16, max_new_tokens=16, batch_size=8)
    assert [r["judge"] for r in rows] == ["keyword", "qa-moderation", "guard"]
    assert all(r["generation_prompts_per_s"] > 0 and r["judge_prompts_per_s"] > 0 for r in rows)
    print(rows)


if __name__ == "__main__":
    main()
