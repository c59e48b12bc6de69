"""Measuring safety the field's way: prompts → greedy responses → a judge → HS, refusal rate, FA.

    records.py     prompts and task records (JSONL, or a `datasets` id with split)
    generation.py  prompt formats and batched greedy generation
    judges.py      QA-moderation classifier, generative guard, keyword; named judges others register
    scoring.py     task answer matching
    models.py      model + adapter loading, fingerprints
    results.py     atomic results.json / samples.jsonl
    evaluate.py    `asft evaluate`
"""

from .evaluate import evaluate
from .judges import JUDGE_KINDS, load_judge

__all__ = ["evaluate", "load_judge", "JUDGE_KINDS"]
