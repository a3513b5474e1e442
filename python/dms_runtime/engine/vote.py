"""Majority vote over the final answers of parallel samples ("think wider")."""

from __future__ import annotations

import re
from collections import Counter
from typing import Callable, Iterable

_BOXED = re.compile(r"\\boxed\{([^{}]*)\}")
_NUMBER = re.compile(r"-?\d+(?:[.,]\d+)*")


def extract_answer(text: str) -> str | None:
    """The last ``\\boxed{...}``, else the last number, else None."""
    boxed = _BOXED.findall(text)
    if boxed:
        return boxed[-1].strip()
    nums = _NUMBER.findall(text)
    return nums[-1].replace(",", "") if nums else None


def majority_vote(texts: Iterable[str], extract: Callable[[str], str | None] = extract_answer) -> tuple[str | None, dict[str, int]]:
    """The most common extracted answer (ties: the one seen first) and the counts of all answers."""
    answers = [a for a in (extract(t) for t in texts) if a is not None]
    counts = Counter(answers)
    if not counts:
        return None, {}
    best = max(counts.values())
    winner = next(a for a in answers if counts[a] == best)
    return winner, dict(counts)
