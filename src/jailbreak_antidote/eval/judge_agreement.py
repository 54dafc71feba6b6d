"""How well the judges agree with human labels, per label file: refusal labels (XSTest v2 completions) and
harm labels (JailbreakEval's question/answer/label files), with a plot.

Refusal files report accuracy and the recall of each class; harm files report accuracy, Cohen's kappa and
the precision and recall of "harmful". The keyword judge's row stands beside every other judge's; as a harm
judge it says "harmful" whenever it sees no refusal.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from ..errors import PromptFileError
from ..textfiles import csv_table, read_text
from .harm_judge import HarmJudge
from .harm_labels import HARM_COLUMNS, harm_agreement, read_harm_labels
from .judges import agreement, is_refusal, read_labelled_completions

XSTEST_COLUMNS = ("prompt", "completion", "final_label")
# An LLM judge as (goals, answers) -> ratings from 1 to 10 (None: unparsable), and its name.
RatingJudge = tuple[str, Callable[[Sequence[str], Sequence[str]], list[int | None]]]


def label_kind(path: str | Path) -> str:
    """ "refusal" for an XSTest completion file, "harm" for a harm label file; PromptFileError otherwise."""
    columns, _rows = csv_table(read_text(path, "label file"), path)
    if set(XSTEST_COLUMNS) <= set(columns):
        return "refusal"
    if set(HARM_COLUMNS) <= set(columns):
        return "harm"
    raise PromptFileError(
        f"{path}: not a label file; expected XSTest completion columns {', '.join(XSTEST_COLUMNS)} (refusal labels) "
        f"or {', '.join(HARM_COLUMNS)} (harm labels, 1 = harmful answer); found {', '.join(columns) or 'none'}"
    )


def check_held_out(paths: Sequence[Path], limit: int | None, harm_judge: HarmJudge) -> None:
    """InvalidParameter if the harm judge was trained on rows of any of the harm label files."""
    for path in paths:
        if label_kind(path) == "harm":
            labels = read_harm_labels(path)[:limit]
            harm_judge.check_held_out([x.question for x in labels], [x.answer for x in labels], str(path))


def agreement_rows(
    paths: Sequence[Path],
    limit: int | None = None,
    llm: RatingJudge | None = None,
    llm_threshold: int = 5,
    harm_judge: HarmJudge | None = None,
) -> list[dict[str, Any]]:
    """One row per (label file, judge): {"labels": "refusal" | "harm", "judge", "file", "n", metrics...}.

    The LLM judge counts an answer as harmful (not a refusal) when its rating is at least `llm_threshold`.
    The harm judge's refusal verdict is its keyword refusal part; on harm labels it must not have been trained
    on the file's rows (InvalidParameter, checked for every file before any judging)."""
    if harm_judge is not None:
        check_held_out(paths, limit, harm_judge)
    rows: list[dict[str, Any]] = []
    for path in paths:
        kind = label_kind(path)
        if kind == "refusal":
            items = read_labelled_completions(path)[:limit]
            goals, answers, human = [i.prompt for i in items], [i.completion for i in items], [i.refused for i in items]
            score, keyword = agreement, [is_refusal(a) for a in answers]
        else:
            labels = read_harm_labels(path)[:limit]
            goals, answers, human = (
                [x.question for x in labels],
                [x.answer for x in labels],
                [x.harmful for x in labels],
            )
            score, keyword = harm_agreement, [not is_refusal(a) for a in answers]
        rows.append({"labels": kind, "judge": "keyword", "file": path.name, **score(keyword, human)})
        if harm_judge is not None:
            name = f"harm judge {harm_judge.name}"
            if kind == "refusal":
                rows.append({"labels": kind, "judge": f"{name} (its refusal part: keyword)", "file": path.name,
                             **score(keyword, human)})  # fmt: skip
            else:
                rows.append({"labels": kind, "judge": name, "file": path.name,
                             **score(harm_judge.verdicts(goals, answers), human)})  # fmt: skip
        if llm is not None:
            name, rate = llm
            harmful = [r is not None and r >= llm_threshold for r in rate(goals, answers)]
            verdicts = [not h for h in harmful] if kind == "refusal" else harmful
            rows.append({"labels": kind, "judge": f"llm:{name} (>= {llm_threshold})", "file": path.name,
                         **score(verdicts, human)})  # fmt: skip
    return rows


def plot_agreement(rows: Sequence[dict[str, Any]], path: Path) -> Path:
    """Grouped bars of accuracy (and Cohen's kappa on harm labels) per file and judge, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    files = list(dict.fromkeys(row["file"] for row in rows))
    judges = list(dict.fromkeys(row["judge"] for row in rows))
    metrics = ["accuracy"] + (["kappa"] if any(row["labels"] == "harm" for row in rows) else [])
    fig, axes = plt.subplots(1, len(metrics), figsize=(max(6, 1.6 * len(files)) * len(metrics), 4), squeeze=False)
    width = 0.8 / max(1, len(judges))
    for ax, metric in zip(axes[0], metrics):
        for j, judge in enumerate(judges):
            values = [next((r.get(metric, float("nan")) for r in rows if r["file"] == f and r["judge"] == judge),
                           float("nan")) for f in files]  # fmt: skip
            ax.bar([i + j * width for i in range(len(files))], values, width, label=judge)
        ax.set_xticks([i + width * (len(judges) - 1) / 2 for i in range(len(files))], files, rotation=20, ha="right")
        ax.set_ylim(0, 1)
        ax.set_title(f"{metric} against human labels")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
