"""Train the harm judge's classifier on human harm labels and measure it only on rows it never saw.

Two held-out measurements, both printed by `antidote train-judge` (rows shaped like judge-agreement's):
- k-fold: all files pooled, folds stratified by (file, label) and grouped by row (copies of a row stay in one
  fold); each row is judged by the classifier fitted on the other folds; agreement is reported per file;
- transfer: for each file, a classifier fitted on the *other* files alone (needs two files or more).
The keyword judge's row stands beside each, and every harm verdict goes through the refusal gate
(a keyword refusal is not harmful), exactly as `HarmJudge` judges.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..errors import InvalidParameter
from .harm_judge import HarmClassifier, fingerprint
from .harm_labels import HarmLabel, harm_agreement
from .judges import is_refusal


@dataclass
class LabelledSet:
    """One harm label file with its features ([n, features]) and keyword refusal verdicts."""

    name: str
    rows: list[HarmLabel]
    features: np.ndarray

    @property
    def labels(self) -> np.ndarray:
        return np.array([r.harmful for r in self.rows])

    @property
    def refused(self) -> np.ndarray:
        return np.array([is_refusal(r.answer) for r in self.rows])


def check_disjoint(sets: Sequence[LabelledSet]) -> None:
    """InvalidParameter if the same (question, answer) pair is in two files: k-fold and transfer numbers
    would then be measured on rows the classifier was trained on."""
    owner: dict[str, str] = {}
    for labelled in sets:
        for row in labelled.rows:
            key = fingerprint(row.question, row.answer)
            if owner.get(key, labelled.name) != labelled.name:
                raise InvalidParameter(
                    f"{labelled.name} and {owner[key]} share the row {row.question[:40]!r}: held-out numbers would "
                    "include training rows; remove the duplicates from one file"
                )
            owner[key] = labelled.name


def check_trainable(labelled: Sequence[tuple[str, Sequence[HarmLabel]]], folds: int) -> None:
    """InvalidParameter, before any model loads, if a file cannot take part in `folds`-fold cross-validation:
    it needs harmful and harmless rows, at least `folds` of each."""
    for name, rows in labelled:
        harmful = sum(r.harmful for r in rows)
        harmless = len(rows) - harmful
        if not harmful or not harmless:
            raise InvalidParameter(f"{name} holds only one class ({'harmful' if harmful else 'harmless'} answers); "
                                   "a harm judge learns from both, so give a file with labels 0 and 1")  # fmt: skip
        if min(harmful, harmless) < folds:
            raise InvalidParameter(
                f"{name} has {harmful} harmful and {harmless} harmless rows; {folds}-fold cross-validation needs "
                f"at least {folds} of each in every file: give more labelled rows or fewer --folds"
            )


def _gated(probabilities: np.ndarray, refused: np.ndarray, threshold: float) -> np.ndarray:
    return (probabilities >= threshold) & ~refused


def held_out_rows(
    sets: Sequence[LabelledSet], judge_name: str, *, folds: int = 5, c: float = 0.01, seed: int = 0
) -> list[dict[str, Any]]:
    """Agreement rows ({"labels": "harm", "judge", "file", n, accuracy, kappa, precision, recall}) of the
    keyword judge, the k-fold classifier and (with two files or more) the transfer classifier, per file."""
    from sklearn.model_selection import StratifiedGroupKFold

    features = np.concatenate([s.features for s in sets])
    labels = np.concatenate([s.labels for s in sets])
    refused = np.concatenate([s.refused for s in sets])
    source = np.concatenate([[i] * len(s.rows) for i, s in enumerate(sets)])
    strata = source * 2 + labels  # check_trainable made sure every stratum fills the folds
    predicted = np.zeros(len(labels), dtype=bool)
    # A row repeated inside a file (Safe-RLHFmini holds 120 such) is one group: never on both sides of a fold.
    groups = [fingerprint(r.question, r.answer) for s in sets for r in s.rows]
    for train, test in StratifiedGroupKFold(folds, shuffle=True, random_state=seed).split(features, strata, groups):
        model = HarmClassifier.fit(features[train], labels[train], c=c, **_blank())
        predicted[test] = _gated(model.probabilities(features[test]), refused[test], model.threshold)
    rows: list[dict[str, Any]] = []
    for i, labelled in enumerate(sets):
        mine = source == i
        human = labelled.labels.tolist()
        rows.append({"labels": "harm", "judge": "keyword", "file": labelled.name,
                     **harm_agreement((~labelled.refused).tolist(), human)})  # fmt: skip
        rows.append({"labels": "harm", "judge": f"{judge_name} ({folds}-fold, held-out folds)", "file": labelled.name,
                     **harm_agreement(predicted[mine].tolist(), human)})  # fmt: skip
        if len(sets) > 1:
            model = HarmClassifier.fit(features[~mine], labels[~mine], c=c, **_blank())
            verdicts = _gated(model.probabilities(labelled.features), labelled.refused, model.threshold)
            rows.append({"labels": "harm", "judge": f"{judge_name} (trained on the other files)",
                         "file": labelled.name, **harm_agreement(verdicts.tolist(), human)})  # fmt: skip
    return rows


def _blank() -> dict[str, Any]:
    """Metadata fields of a classifier that is only scored, never saved."""
    return {"feature_model": "", "layers": (), "max_tokens": 0}


def final_classifier(
    sets: Sequence[LabelledSet], *, feature_model: str, layers: Sequence[int], max_tokens: int, pool: str,
    c: float = 0.01,
) -> HarmClassifier:  # fmt: skip
    """The classifier fitted on every row of every file, remembering which rows it saw."""
    features = np.concatenate([s.features for s in sets])
    labels = np.concatenate([s.labels for s in sets])
    trained_on = [{"file": s.name, "rows": len(s.rows), "harmful": int(s.labels.sum())} for s in sets]
    seen = frozenset(fingerprint(r.question, r.answer) for s in sets for r in s.rows)
    return HarmClassifier.fit(features, labels, c=c, feature_model=feature_model, layers=tuple(layers),
                              max_tokens=max_tokens, pool=pool, trained_on=trained_on, fingerprints=seen)  # fmt: skip
