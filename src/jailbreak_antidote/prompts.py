"""Prompt sets: the built-in calibration pairs and readers for common data-set layouts.

Readers accept JSON (a list of strings or of objects), JSONL, CSV and plain text (one prompt per line).
The text field is found by name: `prompt`, `instruction`, `goal`/`Goal` (JailbreakBench, AdvBench),
`forbidden_prompt` (StrongREJECT), `Behavior` (HarmBench), or the one given as `field`. Every prompt is
returned exactly as the file holds it (see textfiles.py); blank entries are skipped in text and CSV files.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from .errors import PromptFileError
from .textfiles import csv_table, iter_jsonl, jsonl_lines, read_text, text_lines

TEXT_FIELDS = ("prompt", "instruction", "goal", "Goal", "forbidden_prompt", "Behavior", "behavior", "text")


@dataclass(frozen=True)
class CalibrationSet:
    harmful: list[str]
    harmless: list[str]
    categories: list[str]

    def __len__(self) -> int:
        return len(self.harmful)


def builtin_calibration() -> CalibrationSet:
    """The project's own matched harmful/harmless pairs (written for this package, see data/)."""
    text = resources.files(__package__).joinpath("data/calibration.jsonl").read_text(encoding="utf-8")
    rows = [json.loads(line) for _, line in jsonl_lines(text)]
    return CalibrationSet(
        harmful=[r["harmful"] for r in rows],
        harmless=[r["harmless"] for r in rows],
        categories=[r["category"] for r in rows],
    )


def builtin_prompts(name: str) -> list[dict[str, str]]:
    """Built-in prompt lists for the demo and tests (data/demo_prompts.json): rows with kind and prompt."""
    text = resources.files(__package__).joinpath("data/demo_prompts.json").read_text(encoding="utf-8")
    return json.loads(text)[name]


def _pick_field(row: dict[str, Any], field: str | None, where: str) -> str:
    names = (field,) if field else TEXT_FIELDS
    for name in names:
        value = row.get(name)
        if isinstance(value, str) and value.strip():
            return value
        if name in row:  # the field is there, but holds no usable text
            found = "blank text" if isinstance(value, str) else f"{type(value).__name__} {value!r:.40}"
            raise PromptFileError(f"{where}: field {name!r} holds {found}, not a prompt; give it the prompt text")
    raise PromptFileError(
        f"{where}: no prompt text; expected a field named {' or '.join(repr(n) for n in names)}, "
        f"found fields {sorted(row)}"
    )


def _from_item(item: Any, field: str | None, where: str) -> str:
    if isinstance(item, str) and item.strip():
        return item
    if isinstance(item, dict):
        return _pick_field(item, field, where)
    if isinstance(item, str):
        raise PromptFileError(f"{where}: the prompt is blank (only whitespace or line breaks); remove it")
    raise PromptFileError(f"{where}: expected a string or an object with a prompt field, got {item!r:.60}")


def read_prompts(path: str | Path, field: str | None = None) -> list[str]:
    """Read prompts from a .json, .jsonl, .csv or .txt file, each exactly as the file holds it (blank ones
    skipped in text and CSV files). Raises PromptFileError with the fix."""
    path = Path(path)
    text = read_text(path, "prompt file")
    suffix = path.suffix.lower()
    if suffix == ".json":
        prompts = _read_json(text, path, field)
    elif suffix == ".jsonl":
        prompts = _read_jsonl(text, path, field)
    elif suffix == ".csv":
        prompts = _read_csv(text, path, field)
    else:  # .txt or anything else: one prompt per line
        prompts = text_lines(text)
    if not prompts:
        raise PromptFileError(f"prompt file {str(path)!r} holds no prompts")
    return prompts


def _read_json(text: str, path: Path, field: str | None) -> list[str]:
    try:
        data = json.loads(text) if text.strip() else []
    except json.JSONDecodeError as exc:
        raise PromptFileError(f"{path}: not valid JSON ({exc}); use a list of strings or objects") from None
    if isinstance(data, dict):  # {"prompts": [...]} or {"data": [...]}
        lists = [v for v in data.values() if isinstance(v, list)]
        if len(lists) != 1:
            raise PromptFileError(f"{path}: expected a JSON list of prompts (or an object holding one list)")
        data = lists[0]
    if not isinstance(data, list):
        raise PromptFileError(f"{path}: expected a JSON list of prompts")
    return [_from_item(item, field, f"{path} item {i}") for i, item in enumerate(data)]


def _read_jsonl(text: str, path: Path, field: str | None) -> list[str]:
    return [_from_item(item, field, f"{path} line {number}") for number, item in iter_jsonl(text, path)]


def _read_csv(text: str, path: Path, field: str | None) -> list[str]:
    columns, records = csv_table(text, path)
    names = (field,) if field else TEXT_FIELDS
    column = next((n for n in names if n in columns), None)
    if column is None:
        raise PromptFileError(
            f"{path}: no prompt column; expected one of {', '.join(names)}, found {', '.join(columns) or 'none'}"
        )
    return [row[column] for row in records if (row.get(column) or "").strip()]


def check_pairs(harmful: list[str], harmless: list[str], minimum: int = 8) -> None:
    """Fitting needs equally many prompts on both sides, enough to hold some out for layer selection."""
    if len(harmful) != len(harmless):
        raise PromptFileError(
            f"unequal prompt sets: {len(harmful)} harmful vs {len(harmless)} harmless; fitting pairs them "
            "one to one, so give the same number of each (trim the longer file)"
        )
    if len(harmful) < minimum:
        raise PromptFileError(
            f"too few pairs: {len(harmful)}; fitting needs at least {minimum} (a quarter is held out to rank "
            "layers); 100 or more give stable directions"
        )
