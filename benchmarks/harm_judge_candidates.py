"""The harm judge candidates of issue 18 side by side, on rows they were not trained on: accuracy per label
file for 5-fold cross-validation over the files pooled, and for transfer (trained on the other file only).

- keyword: "harmful" unless the keyword judge sees a refusal;
- tfidf: TF-IDF of (question, answer) words and bigrams + logistic regression (scikit-learn);
- hidden: logistic regression on SmolLM2-135M-Instruct hidden states (the built-in judge's features), alone;
- hidden+gate: the same, with a keyword refusal counted as not harmful (the built-in judge).

    python benchmarks/harm_judge_candidates.py ../shared/data/judge_labels/JAILJUDGEmini.csv \
        ../shared/data/judge_labels/Safe-RLHFmini.csv

The hidden states come from the cache `antidote train-judge` fills (harm-features/), so run that first or
wait for the extraction (about 25 minutes for the 5,000 rows on 2 cores). The rubric LLM judge is measured
with `antidote judge-agreement --llm-judge` (docs/EVALUATION.md).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
from sklearn.feature_extraction.text import TfidfVectorizer
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import StratifiedGroupKFold
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

sys.path.insert(0, str(Path(__file__).parent))
from _common import machine

from jailbreak_antidote.eval.harm_judge import FEATURE_MODEL, MAX_TOKENS, cached_features, default_layers, fingerprint
from jailbreak_antidote.eval.harm_labels import read_harm_labels
from jailbreak_antidote.eval.judges import is_refusal
from jailbreak_antidote.models import load_model


def tfidf_model():
    return make_pipeline(TfidfVectorizer(ngram_range=(1, 2), min_df=2, sublinear_tf=True),
                         LogisticRegression(C=4.0, max_iter=2000))  # fmt: skip


def hidden_model():
    return make_pipeline(StandardScaler(), LogisticRegression(C=0.01, max_iter=2000))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("labels", type=Path, nargs=2, help="two harm label CSVs")
    args = parser.parse_args()
    print(machine())
    model, tokenizer = load_model(FEATURE_MODEL)
    layers = default_layers(model.config.num_hidden_layers)
    names, texts, hidden, labels, refused, source, groups = [], [], [], [], [], [], []
    for index, path in enumerate(args.labels):
        rows = read_harm_labels(path)
        names.append(path.name)
        texts += [f"{r.question}\n{r.answer}" for r in rows]
        groups += [fingerprint(r.question, r.answer) for r in rows]  # copies of a row stay in one fold
        hidden.append(cached_features(model, tokenizer, FEATURE_MODEL, [r.question for r in rows],
                                      [r.answer for r in rows], layers, MAX_TOKENS))  # fmt: skip
        labels += [int(r.harmful) for r in rows]
        refused += [is_refusal(r.answer) for r in rows]
        source += [index] * len(rows)
    text_array = np.array(texts, dtype=object)
    features, y = np.concatenate(hidden), np.array(labels)
    gate, src = np.array(refused), np.array(source)
    inputs = {"tfidf": (text_array, tfidf_model), "hidden": (features, hidden_model),
              "hidden+gate": (features, hidden_model)}  # fmt: skip

    for i, name in enumerate(names):  # what each set calls harmful
        mine = src == i
        distinct = len(set(np.array(groups)[mine]))
        print(
            f"{name}: {mine.sum()} rows, {distinct} distinct; {y[mine].mean():.1%} labelled harmful; "
            f"{gate[mine].mean():.1%} keyword refusals, {y[mine & gate].mean():.1%} of them labelled harmful"
        )
    print(f"| judge | {' | '.join(f'{n} 5-fold' for n in names)} | {' | '.join(f'{n} transfer' for n in names)} |")
    print("|---" * (1 + 2 * len(names)) + "|")
    keyword = (~gate).astype(int)
    cells = [f"{(keyword[src == i] == y[src == i]).mean():.3f}" for i in range(len(names))] * 2
    print(f"| keyword | {' | '.join(cells)} |")
    for name, (x, build) in inputs.items():
        predicted = np.zeros(len(y), dtype=int)
        for train, test in StratifiedGroupKFold(5, shuffle=True, random_state=0).split(x, src * 2 + y, groups):
            predicted[test] = build().fit(x[train], y[train]).predict(x[test])
        transfer = np.zeros(len(y), dtype=int)
        for i in range(len(names)):
            transfer[src == i] = build().fit(x[src != i], y[src != i]).predict(x[src == i])
        if name.endswith("+gate"):
            predicted, transfer = predicted & ~gate, transfer & ~gate
        folds = [f"{(predicted[src == i] == y[src == i]).mean():.3f}" for i in range(len(names))]
        moved = [f"{(transfer[src == i] == y[src == i]).mean():.3f}" for i in range(len(names))]
        print(f"| {name} | {' | '.join(folds + moved)} |", flush=True)


if __name__ == "__main__":
    main()
