"""Human harm labels for judging judges: files of (question, answer, label) with 1 = the answer is harmful.

The layout is JailbreakEval's (`JAILJUDGEmini.csv`, `Safe-RLHFmini.csv`, ThuCCSLab/JailbreakEval `data/`):
columns `question`, `answer`, `label`. Agreement is reported as the field does for harm judges: accuracy,
Cohen's kappa, and precision and recall of the "harmful" class.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from ..errors import PromptFileError
from ..textfiles import csv_table, read_text

HARM_COLUMNS = ("question", "answer", "label")


@dataclass(frozen=True)
class HarmLabel:
    question: str
    answer: str
    harmful: bool  # the human label: 1 = the answer gives meaningful help toward a harmful goal


def read_harm_labels(path: str | Path) -> list[HarmLabel]:
    """Rows of a harm label file (CSV: question, answer, label in {0, 1}).

    Raises PromptFileError naming the file (and row) for missing columns, labels other than 0/1, empty
    answers or an empty file."""
    path = Path(path)
    columns, records = csv_table(read_text(path, "harm label file"), path)
    missing = [c for c in HARM_COLUMNS if c not in columns]
    if missing:
        raise PromptFileError(
            f"{path}: missing column(s) {', '.join(missing)}; a harm label file has columns question, answer, "
            f"label (1 = harmful answer, 0 = not), found {', '.join(columns) or 'none'}"
        )
    labels: list[HarmLabel] = []
    for row_number, record in enumerate(records, start=2):  # row 1 is the header
        label = (record.get("label") or "").strip()
        if label not in ("0", "1"):
            raise PromptFileError(f"{path} row {row_number}: label {label!r} is not 0 or 1 (1 = harmful answer)")
        answer = record.get("answer") or ""
        if not answer.strip():
            raise PromptFileError(f"{path} row {row_number}: the answer is empty; every labelled row needs one")
        labels.append(HarmLabel(record.get("question") or "", answer, label == "1"))
    if not labels:
        raise PromptFileError(f"harm label file {str(path)!r} holds no rows")
    return labels


def harm_agreement(predicted: Sequence[bool], human: Sequence[bool]) -> dict[str, float]:
    """Agreement of a harm judge with human labels (True = harmful): n, accuracy, Cohen's kappa, and
    precision and recall of "harmful" (0 where undefined: no predicted or no labelled harmful answers)."""
    from sklearn.metrics import accuracy_score, cohen_kappa_score, precision_score, recall_score

    if len(predicted) != len(human):
        raise ValueError(f"{len(predicted)} verdicts for {len(human)} labels")
    if not human:
        return {"n": 0, "accuracy": 0.0, "kappa": 0.0, "precision": 0.0, "recall": 0.0}
    y_true, y_pred = [int(h) for h in human], [int(p) for p in predicted]
    single_class = len(set(y_true) | set(y_pred)) < 2  # kappa is undefined (nan) when only one class occurs
    return {
        "n": len(y_true),
        "accuracy": float(accuracy_score(y_true, y_pred)),
        "kappa": 1.0 if single_class else float(cohen_kappa_score(y_true, y_pred)),
        "precision": float(precision_score(y_true, y_pred, zero_division=0)),
        "recall": float(recall_score(y_true, y_pred, zero_division=0)),
    }
