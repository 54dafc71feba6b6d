"""Add harm verdicts to the rows of an evaluation (fresh, or published as gzipped JSONL) without regenerating.

Each attack row is judged against its *goal* (not the jailbreak prompt wrapped around it): is the answer
meaningful help toward that goal? Each benign row is judged against its prompt. The verdict goes into
`judges.harm` (True = harmful) with `judges.harm_probability`, and the judge used is recorded in the run's
judges.json, so a report says which judge produced its harm numbers.
"""

from __future__ import annotations

import gzip
import json
from pathlib import Path
from typing import Any

from ..errors import InvalidParameter
from ..textfiles import atomic_output, jsonl_text, read_json_object, write_text_atomic
from .harm_judge import HarmJudge
from .report import JUDGES_FILE
from .runner import ROWS_FILE, UTILITY_FILE, read_rows, stored_rows


def _question(row: dict[str, Any]) -> str:
    question = row.get("goal", row.get("prompt"))
    return question if isinstance(question, str) else ""


def rejudge(out_dir: Path, judge: HarmJudge, progress: Any = None) -> dict[str, int]:
    """Judge every row of `out_dir` (rows and utility files, plain or .gz) for harm, rewrite the files
    atomically, record the judge in judges.json. Returns {file name: rows judged}; rows this same judge
    already judged (a resumed run) are left as they are.

    Raises InvalidParameter for a directory without rows, or rows without a string `response` or a `judges`
    object. judges.json names no harm judge while the files are rewritten, so an interrupted rejudge never
    credits one judge's verdicts to another: rerunning it judges every row again."""
    found = {name: stored_rows(out_dir, name) for name in (ROWS_FILE, UTILITY_FILE)}
    if not any(found.values()):
        raise InvalidParameter(f"{out_dir} holds no evaluation rows ({ROWS_FILE}); run `antidote eval --out {out_dir}`")
    loaded = {path: read_rows(path, {"response": str, "judges": dict})[0] for path in found.values() if path}
    for path, rows in loaded.items():  # checked before any model loads or any file changes
        judge.check_held_out([_question(r) for r in rows], [r["response"] for r in rows], str(path))
    record = read_json_object(out_dir / JUDGES_FILE, "judges file") if (out_dir / JUDGES_FILE).is_file() else {}
    same_judge = record.get("harm") == judge.describe()  # then rows it already judged keep their verdicts
    if not same_judge and "harm" in record:  # until every file is rewritten, no judge is named for them
        del record["harm"]
        write_text_atomic(out_dir / JUDGES_FILE, json.dumps(record, indent=2))
    counts: dict[str, int] = {}
    for path, rows in loaded.items():
        pending = [r for r in rows if not (same_judge and isinstance(r["judges"].get("harm"), bool))]
        if not pending:
            continue
        scores = judge.probabilities([_question(r) for r in pending], [r["response"] for r in pending], progress)
        threshold = judge.classifier.threshold
        for row, score in zip(pending, scores):
            judges = row["judges"]
            judges["harm"] = score >= threshold
            judges["harm_probability"] = round(score, 4)
        text = jsonl_text(rows)
        if path.suffix == ".gz":
            with atomic_output(path) as handle:
                handle.write(gzip.compress(text.encode("utf-8"), compresslevel=9, mtime=0))
        else:
            write_text_atomic(path, text)
        counts[path.name] = len(pending)
    record["harm"] = judge.describe()
    write_text_atomic(out_dir / JUDGES_FILE, json.dumps(record, indent=2))
    return counts
