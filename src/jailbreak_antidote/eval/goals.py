"""Harmful goal sets (JailbreakBench, HarmBench, AdvBench, StrongREJECT, or any prompt file)."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from ..errors import PromptFileError
from ..prompts import TEXT_FIELDS, read_prompts
from ..textfiles import csv_table, read_text


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
        columns, rows = csv_table(read_text(path, "goals file"), path)
        text_column = next((c for c in TEXT_FIELDS if c in columns), None)
        rows = [row for row in rows if (row.get(text_column) or "").strip()]  # the rows read_prompts keeps
        column = next((c for c in ("Category", "category", "SemanticCategory") if c in columns), None)
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
    columns, rows = csv_table(read_text(path, "XSTest file"), path)
    if not rows or not {"prompt", "label"} <= set(columns):
        raise PromptFileError(f"{path}: expected XSTest columns 'prompt' and 'label' (safe/unsafe)")
    groups: dict[str, list[str]] = {"safe": [], "unsafe": []}
    for row_number, row in enumerate(rows, start=2):
        label = row["label"].strip().lower()
        if label not in groups:
            raise PromptFileError(f"{path} row {row_number}: label {row['label']!r} is neither safe nor unsafe")
        if row["prompt"].strip():
            groups[label].append(row["prompt"])
    return groups["safe"], groups["unsafe"]
