"""Summaries of the request logs `antidote serve --request-log` writes (one JSON object per line).

A line the server did not finish (killed mid-write, or a truncated copy) or one without the keys a summary
needs is skipped and its number reported, so that one torn line never hides the rest of a log."""

from __future__ import annotations

import json
import math
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from .errors import InvalidParameter, RequestLogError
from .textfiles import atomic_output, check_output_path

GROUP_KEYS = ("tenant", "arm", "hour")
REQUIRED_KEYS = ("time", "refusal", "latency_s")
DEFAULT_TENANT = "default"  # logs written before tenants existed
DEFAULT_ARM = "baseline"  # logs written before A/B arms existed
HOUR_FORMAT = "%Y-%m-%dT%H:00Z"
_FIX = "give the JSON-lines file that `antidote serve --request-log PATH` writes"


@dataclass(frozen=True, slots=True)
class Entry:
    """The fields of one request-log line that a summary uses."""

    tenant: str
    arm: str
    hour: str  # the UTC hour of `time`, e.g. "2026-12-01T10:00Z"
    refusal: bool
    latency_s: float
    harm_score: float | None  # None in fixed mode (no probe score)
    completion_tokens: int | None


@dataclass
class LogFile:
    """The complete entries of one log and the 1-based numbers of the lines skipped as torn or incomplete."""

    path: Path
    entries: list[Entry]
    skipped: list[int] = field(default_factory=list)


@dataclass
class Summary:
    """Per-group statistics (sorted by group key) and the skipped line numbers of each file."""

    by: tuple[str, ...]
    groups: list[dict[str, Any]]
    skipped: dict[str, list[int]]
    entries: list[Entry]

    def as_json(self) -> dict[str, Any]:
        return {"by": list(self.by), "groups": self.groups, "skipped": self.skipped}


def _number(value: Any) -> float | None:
    """`value` as a finite float, or None for anything else (booleans, strings, null, NaN, an integer too large
    for a float)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    try:
        number = float(value)
    except OverflowError:
        return None
    return number if math.isfinite(number) else None


def _utc_hour(value: Any) -> str | None:
    """The UTC hour of an ISO 8601 time (a time without offset is taken as UTC), or None if it is not one."""
    if not isinstance(value, str):
        return None
    try:
        moment = datetime.fromisoformat(value)
        if moment.tzinfo is None:
            moment = moment.replace(tzinfo=UTC)
        return moment.astimezone(UTC).strftime(HOUR_FORMAT)
    except (ValueError, OverflowError):  # not a time, or one whose UTC hour falls outside the calendar
        return None


def parse_entry(raw: bytes) -> Entry | None:
    """One log line as an Entry, or None if it is not a complete JSON object with time, refusal and latency_s,
    or if a field the server writes holds what the server never writes (a harm score outside [0, 1], a
    tenant or arm that is not a non-empty string): such a line is reported, not summarised."""
    try:
        value = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        return None
    if not isinstance(value, dict) or any(key not in value for key in REQUIRED_KEYS):
        return None
    hour, latency = _utc_hour(value["time"]), _number(value["latency_s"])
    if hour is None or latency is None or latency < 0 or not isinstance(value["refusal"], bool):
        return None
    tenant, arm = value.get("tenant", DEFAULT_TENANT), value.get("arm", DEFAULT_ARM)
    if not (isinstance(tenant, str) and tenant and isinstance(arm, str) and arm):
        return None
    harm = _number(value.get("harm_score"))
    if value.get("harm_score") is not None and (harm is None or not 0 <= harm <= 1):
        return None
    tokens = _number(value.get("completion_tokens"))
    return Entry(
        tenant=tenant,
        arm=arm,
        hour=hour,
        refusal=value["refusal"],
        latency_s=latency,
        harm_score=harm,
        completion_tokens=int(tokens) if tokens is not None and tokens >= 0 else None,
    )


def read_log(path: str | Path) -> LogFile:
    """The entries of one request log, skipping (and counting) torn or incomplete lines.

    Raises RequestLogError naming the file when it is missing, a directory, unreadable, empty, or holds no
    complete entry at all."""
    path = Path(path)
    name = repr(str(path))
    if path.is_dir():
        raise RequestLogError(f"request log {name} is a directory; give the log file inside it")
    entries: list[Entry] = []
    skipped: list[int] = []
    try:
        with open(path, "rb") as handle:
            for number, raw in enumerate(handle, start=1):  # binary lines end at b"\n" only
                line = raw.removeprefix(b"\xef\xbb\xbf") if number == 1 else raw
                if not line.strip():
                    continue
                entry = parse_entry(line)
                if entry is None:
                    skipped.append(number)
                else:
                    entries.append(entry)
    except FileNotFoundError:
        raise RequestLogError(f"request log {name} does not exist; check the path ({_FIX})") from None
    except OSError as exc:
        raise RequestLogError(f"cannot read request log {name}: {exc.strerror or exc}; {_FIX}") from None
    if not entries and not skipped:
        raise RequestLogError(f"request log {name} is empty; wait for requests to be served, or {_FIX}")
    if not entries:
        raise RequestLogError(
            f"request log {name}: none of its {len(skipped)} line(s) is a complete entry (a JSON object with "
            f"{', '.join(REQUIRED_KEYS)}); {_FIX}"
        )
    return LogFile(path, entries, skipped)


def parse_by(spec: str) -> tuple[str, ...]:
    """The group keys of a comma list such as "tenant,hour" (repeats dropped); "" groups everything together."""
    names = [name.strip().lower() for name in spec.split(",") if name.strip()]
    unknown = [name for name in names if name not in GROUP_KEYS]
    if unknown:
        raise InvalidParameter(f"--by: unknown group key(s) {', '.join(map(repr, unknown))}; "
                               f"give a comma list of {', '.join(GROUP_KEYS)}")  # fmt: skip
    return tuple(dict.fromkeys(names))


def _quantiles(values: Sequence[float], qs: Sequence[float]) -> list[float | None]:
    if not values:
        return [None] * len(qs)
    return [float(q) for q in np.quantile(np.asarray(values, dtype=float), qs, method="linear")]


def group_summary(key: dict[str, str], entries: Sequence[Entry]) -> dict[str, Any]:
    """Requests, refusal rate (with its 95% Wilson interval), harm-score and latency quantiles of one group."""
    from .eval.report import wilson  # imported here: eval.report loads torch

    n = len(entries)
    refusals = sum(entry.refusal for entry in entries)
    harm = [entry.harm_score for entry in entries if entry.harm_score is not None]
    tokens = [entry.completion_tokens for entry in entries if entry.completion_tokens is not None]
    harm_p50, harm_p90, harm_p99 = _quantiles(harm, (0.5, 0.9, 0.99))
    latency_p50, latency_p95 = _quantiles([entry.latency_s for entry in entries], (0.5, 0.95))
    return {
        **key,
        "requests": n,
        "refusals": refusals,
        "refusal_rate": refusals / n,
        "refusal_rate_ci95": list(wilson(refusals, n)),
        "harm_scored": len(harm),
        "harm_p50": harm_p50,
        "harm_p90": harm_p90,
        "harm_p99": harm_p99,
        "latency_p50_s": latency_p50,
        "latency_p95_s": latency_p95,
        "mean_completion_tokens": sum(tokens) / len(tokens) if tokens else None,
    }


def summarize(entries: Iterable[Entry], by: Sequence[str]) -> list[dict[str, Any]]:
    """One summary per group of `entries` sharing the values of the keys `by`, sorted by those values."""
    groups: dict[tuple[str, ...], list[Entry]] = defaultdict(list)
    for entry in entries:
        groups[tuple(getattr(entry, key) for key in by)].append(entry)
    return [group_summary(dict(zip(by, key)), members) for key, members in sorted(groups.items())]


def summarize_logs(paths: Sequence[str | Path], by: Sequence[str] = ("tenant", "arm")) -> Summary:
    """Read every log (all are checked before any is summarised) and summarise their pooled entries."""
    by = parse_by(",".join(by))
    seen: dict[Path, str] = {}
    for path in paths:  # the same file twice would count its requests twice
        resolved = Path(path).resolve()
        if resolved in seen:
            raise RequestLogError(f"request log {str(path)!r} is the same file as {seen[resolved]!r}; give each log "
                                  "once")  # fmt: skip
        seen[resolved] = str(path)
    logs = [read_log(path) for path in paths]
    entries = [entry for log in logs for entry in log.entries]
    skipped = {str(log.path): log.skipped for log in logs if log.skipped}
    return Summary(by, summarize(entries, by), skipped, entries)


def check_plot_path(path: str | Path) -> None:
    """Raise InvalidParameter unless a PNG could be written at `path`."""
    path = Path(path)
    if path.suffix.lower() != ".png":
        raise InvalidParameter(f"--plot {str(path)!r}: the plot is a PNG image; give a path ending in .png")
    check_output_path(path)


def write_plot(path: str | Path, entries: Iterable[Entry]) -> None:
    """A PNG of the refusal rate and harm-score p50/p90 per UTC hour, one line per (tenant, arm), written
    atomically (a temporary file in the same folder, then renamed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.dates import DateFormatter

    check_plot_path(path)
    series: dict[tuple[str, str], list[dict[str, Any]]] = defaultdict(list)
    for row in summarize(entries, GROUP_KEYS):
        series[(row["tenant"], row["arm"])].append(row)
    fig, (rates, harm) = plt.subplots(2, 1, figsize=(8, 6), sharex=True)
    try:
        for (tenant, arm), rows in series.items():
            hours = [datetime.strptime(row["hour"], HOUR_FORMAT) for row in rows]
            nan = float("nan")
            (line,) = rates.plot(hours, [100 * row["refusal_rate"] for row in rows], marker="o",
                                 label=f"{tenant} / {arm}".replace("$", r"\$"))  # fmt: skip
            for q, style in (("harm_p50", "-"), ("harm_p90", "--")):
                values = [nan if row[q] is None else row[q] for row in rows]
                harm.plot(hours, values, style, marker="o", color=line.get_color())
        rates.set_ylabel("refusal rate (%)")
        rates.set_title("Refusal rate and harm score per UTC hour, by tenant / arm")
        rates.legend(fontsize=7)
        harm.set_ylabel("harm score (solid p50, dashed p90)")
        harm.set_xlabel("hour (UTC)")
        harm.set_ylim(-0.02, 1.02)
        harm.xaxis.set_major_formatter(DateFormatter("%Y-%m-%d %H:00"))
        fig.autofmt_xdate()
        fig.tight_layout()
        with atomic_output(path) as handle:
            fig.savefig(handle, format="png", dpi=120)
    finally:
        plt.close(fig)
