"""Harmful goal sets (JailbreakBench, HarmBench, AdvBench, StrongREJECT, or any prompt file)."""

from __future__ import annotations

import csv
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from ..errors import PromptFileError
from ..prompts import read_prompts


@dataclass(frozen=True)
class Goal:
    text: str
    category: str | None = None


def read_goals(path: str | Path) -> list[Goal]:
    """Goals from a prompt file; a CSV `Category`/`category` column is kept. Duplicates are an error,
    since they would silently weight some goals twice in every rate."""
    path = Path(path)
    texts = read_prompts(path)
    categories: list[str | None] = [None] * len(texts)
    if path.suffix.lower() == ".csv":
        rows = list(csv.DictReader(path.read_text(encoding="utf-8-sig").splitlines()))
        column = next((c for c in ("Category", "category", "SemanticCategory") if rows and c in rows[0]), None)
        if column is not None and len(rows) == len(texts):
            categories = [row[column] or None for row in rows]
    duplicates = [text for text, n in Counter(texts).items() if n > 1]
    if duplicates:
        raise PromptFileError(
            f"goals file {str(path)!r} repeats {len(duplicates)} goal(s), e.g. {duplicates[0][:60]!r}; "
            "remove the duplicates so every goal counts once"
        )
    return [Goal(text, category) for text, category in zip(texts, categories)]


def read_xstest(path: str | Path) -> tuple[list[str], list[str]]:
    """XSTest prompts split by their `label` column: (safe prompts, unsafe contrast prompts)."""
    path = Path(path)
    try:
        rows = list(csv.DictReader(path.read_text(encoding="utf-8-sig").splitlines()))
    except OSError as exc:
        raise PromptFileError(f"cannot read XSTest file {str(path)!r}: {exc}") from None
    if not rows or not {"prompt", "label"} <= set(rows[0]):
        raise PromptFileError(f"{path}: expected XSTest columns 'prompt' and 'label' (safe/unsafe)")
    safe = [r["prompt"].strip() for r in rows if r["label"].strip() == "safe" and r["prompt"].strip()]
    unsafe = [r["prompt"].strip() for r in rows if r["label"].strip() == "unsafe" and r["prompt"].strip()]
    return safe, unsafe
