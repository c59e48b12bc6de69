"""Task accuracy: does a response match the reference answer?

    exact     whitespace-normalised equality
    contains  the answer occurs in the response (case-insensitive; SST2/AGNews-style labels)
    number    GSM8K-style: the final number of each (after "####" when present, else the last
              number in the text; thousands separators dropped) are equal
"""

from __future__ import annotations

import re

__all__ = ["MATCHES", "final_number", "matches"]

MATCHES = ("exact", "contains", "number")
_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


def _norm(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip()


def final_number(text: str) -> float | None:
    """The number after the last "####", else the last number in `text`; None when there is none."""
    tail = text.rsplit("####", 1)[1] if "####" in text else text
    found = _NUMBER.findall(tail)
    if not found:
        return None
    try:
        return float(found[0 if "####" in text else -1].replace(",", ""))
    except ValueError:
        return None


def matches(response: str, answer: str, how: str) -> bool:
    """Whether `response` answers `answer` under rule `how` (one of `MATCHES`)."""
    if how == "exact":
        return _norm(response) == _norm(answer)
    if how == "contains":
        return _norm(answer).lower() in _norm(response).lower()
    if how == "number":
        want, got = final_number(answer), final_number(response)
        return want is not None and got is not None and want == got
    raise ValueError(f"unknown --match {how!r}; expected one of {', '.join(MATCHES)}")
