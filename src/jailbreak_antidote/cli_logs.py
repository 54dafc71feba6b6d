"""`antidote logs summarize` (registered in cli.py): per-tenant / per-arm summaries of the server's request log."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer
from rich import box
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from .cli import app, err, friendly_errors, out

logs_app = typer.Typer(
    help="Read the request logs that `antidote serve --request-log PATH` writes (one JSON object per request).",
    no_args_is_help=True,
    rich_markup_mode=None,
)
app.add_typer(logs_app, name="logs")

MAX_LISTED = 10  # skipped line numbers named in a warning


def _fmt(value: float | None, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _warn_skipped(skipped: dict[str, list[int]]) -> None:
    for name, lines in skipped.items():
        listed = ", ".join(map(str, lines[:MAX_LISTED])) + (", ..." if len(lines) > MAX_LISTED else "")
        plural = "line" if len(lines) == 1 else "lines"
        err.print(f"[yellow]warning:[/] {escape(name)}: skipped {len(lines)} torn or incomplete {plural} ({listed}); "
                  "the rest is summarised", highlight=False, soft_wrap=True)  # fmt: skip


def _table(by: tuple[str, ...], groups: list[dict[str, Any]]) -> Table:
    title = f"Request log by {', '.join(by)}" if by else "Request log, all requests"
    table = Table(title=f"{title} (latency in seconds)", box=box.SIMPLE_HEAD, collapse_padding=True, pad_edge=False)
    for key in by or ("group",):
        table.add_column(key, no_wrap=True)
    for name in ("requests", "refused %\n(95% CI)", "harm\nscored", "harm score\np50/p90/p99", "latency\np50/p95",
                 "mean\ntokens"):  # fmt: skip
        table.add_column(name, justify="right")
    for row in groups:
        low, high = row["refusal_rate_ci95"]
        harm = "/".join(_fmt(row[q], 2) for q in ("harm_p50", "harm_p90", "harm_p99"))
        latency = "/".join(_fmt(row[q], 2) for q in ("latency_p50_s", "latency_p95_s"))
        refused = f"{100 * row['refusal_rate']:.1f} ({100 * low:.0f}-{100 * high:.0f})"
        table.add_row(*([escape(row[key]) for key in by] or ["all"]), str(row["requests"]), refused,
                      str(row["harm_scored"]), harm, latency, _fmt(row["mean_completion_tokens"], 1))  # fmt: skip
    return table


@logs_app.command("summarize")
@friendly_errors
def summarize(
    logs: Annotated[
        list[Path],
        typer.Argument(
            help="Request log(s): JSON-lines files from `antidote serve --request-log`; several are pooled",
            show_default=False,
        ),
    ],
    by: Annotated[
        str,
        typer.Option(
            help="Group by a comma list of tenant, arm and hour (the UTC hour of each request); '' for one row. "
            "Logs from before tenants and arms count as tenant 'default', arm 'baseline'"
        ),
    ] = "tenant,arm",
    as_json: Annotated[
        bool, typer.Option("--json", help="Print {by, groups, skipped} as JSON on stdout instead of a table")
    ] = False,
    plot: Annotated[
        Path | None,
        typer.Option(
            help="Also write a PNG here: refusal rate and harm-score p50/p90 per UTC hour, one line per tenant and arm",
            show_default=False,
        ),
    ] = None,
) -> None:
    """Requests, refusal rate, harm-score p50/p90/p99, latency p50/p95 and mean completion tokens per group.

    Lines the server did not finish (killed mid-write) or without time, refusal and latency_s are skipped
    and reported on stderr; the rest is summarised."""
    from .logs_summary import check_plot_path, parse_by, summarize_logs, write_plot

    keys = parse_by(by)
    if plot is not None:
        check_plot_path(plot)
    summary = summarize_logs(logs, keys)
    _warn_skipped(summary.skipped)
    if as_json:
        print(json.dumps(summary.as_json(), indent=2))
    else:
        # Piped output is not cut to rich's 80-column default: the table is meant to be read whole.
        (out if out.is_terminal else Console(width=160)).print(_table(summary.by, summary.groups))
    if plot is not None:
        write_plot(plot, summary.entries)
        err.print(f"wrote {escape(str(plot))}", highlight=False, soft_wrap=True)
