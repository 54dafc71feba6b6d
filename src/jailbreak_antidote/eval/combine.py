"""One report from several evaluation parts (runs split over machines or sessions).

A part is an evaluation directory (rows.jsonl, utility.jsonl) or a report directory written by
`antidote report` (summary.csv), each with the config.json of the run. Parts are combined only if they
were run with the same configuration, and a setting found in two parts must have identical numbers
there (a rerun of a setting is then a reproducibility check, not a silent choice between two results).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import InvalidParameter
from ..textfiles import csv_table, read_json_object, read_text, write_text_atomic
from .report import (
    AGREEMENT_FILE,
    JUDGES_FILE,
    SUMMARY_FILE,
    setting_label,
    summarize,
    write_plots,
    write_report,
    write_summary_csv,
)
from .runner import CONFIG_FILE, ROWS_FILE, UTILITY_FILE, stored_rows


@dataclass(frozen=True)
class Part:
    path: Path
    config: dict[str, Any]
    summary: list[dict[str, Any]]


def _optional_float(text: str) -> float | None:
    return float(text) if text != "" else None


def read_summary_csv(path: Path) -> list[dict[str, Any]]:
    """summary.csv back into the summary rows `summarize` returns."""
    try:
        _columns, rows = csv_table(read_text(path, "summary file"), path)
        return [
            dict(defense=r["defense"], alpha=float(r["alpha"]), k=_optional_float(r["k"]),
                 selector=r["selector"] or None, metric=r["metric"], scope=r["scope"], n=int(r["n"]),
                 value=_optional_float(r["value"]), ci_low=_optional_float(r["ci_low"]),
                 ci_high=_optional_float(r["ci_high"]))
            for r in rows
        ]  # fmt: skip
    except (KeyError, ValueError, TypeError) as error:
        raise InvalidParameter(
            f"{path} is not a summary.csv written by `antidote report` ({error}); rebuild it with `antidote report`"
        ) from None


def load_part(path: Path) -> Part:
    if not path.is_dir():
        raise InvalidParameter(f"{path} is not a directory; give evaluation or report directories")
    config_path = path / CONFIG_FILE
    if not config_path.is_file():
        raise InvalidParameter(
            f"{path} has no {CONFIG_FILE} (written by `antidote eval` and by `antidote report --out`), so the "
            "configuration of its numbers is unknown; report from the run's evaluation directory instead"
        )
    config = read_json_object(config_path, "run configuration")
    if stored_rows(path, ROWS_FILE) or stored_rows(path, UTILITY_FILE):
        return Part(path, config, summarize(path))
    if (path / SUMMARY_FILE).is_file():
        return Part(path, config, read_summary_csv(path / SUMMARY_FILE))
    raise InvalidParameter(f"{path} holds neither evaluation rows ({ROWS_FILE}) nor a report ({SUMMARY_FILE})")


def _settings(summary: list[dict[str, Any]]) -> dict[tuple, list[dict[str, Any]]]:
    by_setting: dict[tuple, list[dict[str, Any]]] = {}
    for row in summary:
        by_setting.setdefault((row["defense"], float(row["alpha"]), row["k"], row["selector"]), []).append(row)
    return by_setting


def _comparable(rows: list[dict[str, Any]]) -> set[tuple]:
    """A setting's numbers, rounded as summary.csv stores them (so a re-read part compares equal)."""
    return {
        (r["metric"], r["scope"], r["n"], None if r["value"] is None else round(float(r["value"]), 4)) for r in rows
    }


def combine_parts(parts: list[Part]) -> list[dict[str, Any]]:
    """The union of the parts' summaries; refuses other configurations and conflicting duplicates."""
    first = parts[0]
    for part in parts[1:]:
        differences = [
            f"{key}: {part.config.get(key)!r} in {part.path} vs {value!r} in {first.path}"
            for key, value in first.config.items()
            if part.config.get(key) != value
        ]
        if differences:
            raise InvalidParameter(
                "the parts were run with different configurations (" + "; ".join(differences) + "); "
                "only runs of the same model, antidote and generation settings can share a report"
            )
    combined: dict[tuple, tuple[Path, list[dict[str, Any]]]] = {}
    for part in parts:
        for key, rows in _settings(part.summary).items():
            if key not in combined:
                combined[key] = (part.path, rows)
                continue
            where, earlier = combined[key]
            if _comparable(earlier) != _comparable(rows):
                raise InvalidParameter(
                    f"setting {setting_label(key)!r} is in both {where} and {part.path} with different numbers: "
                    "the same configuration did not reproduce; report the parts separately and find out why"
                )
    return [row for _, rows in combined.values() for row in rows]


def build_combined_report(sources: list[Path], out_dir: Path) -> Path:
    """summary.csv, plots, report.md and config.json in `out_dir` from one or more parts."""
    parts = [load_part(path) for path in sources]
    summary = combine_parts(parts)
    out_dir.mkdir(parents=True, exist_ok=True)
    config_path = out_dir / CONFIG_FILE
    if not config_path.is_file() or read_json_object(config_path, "run configuration") != parts[0].config:
        write_text_atomic(config_path, json.dumps(parts[0].config, indent=2))
    harm_judges = {json.dumps(read_json_object(p.path / JUDGES_FILE, "judges file").get("harm"), sort_keys=True)
                   for p in parts if (p.path / JUDGES_FILE).is_file()}  # fmt: skip
    if len(harm_judges) > 1:
        raise InvalidParameter(
            "the parts were judged for harm by different judges (their judges.json differ); re-judge them with one "
            "judge (`antidote rejudge DIR --judge ...`) before combining"
        )
    for name in (AGREEMENT_FILE, JUDGES_FILE):  # judge agreement, and which harm judge made harm-DSR
        found = next((p.path / name for p in parts if (p.path / name).is_file()), None)
        if found is not None and found.resolve() != (out_dir / name).resolve():
            write_text_atomic(out_dir / name, read_text(found, name))
    write_summary_csv(summary, out_dir / SUMMARY_FILE)
    write_plots(out_dir, summary)
    agreement_path = out_dir / AGREEMENT_FILE
    loaded = read_json_object(agreement_path, "judge agreement file") if agreement_path.is_file() else None
    return write_report(out_dir, summary, loaded, combined=len(parts) > 1)
