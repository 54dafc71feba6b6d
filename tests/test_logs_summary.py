"""`antidote logs summarize`: request-log summaries, torn lines skipped and reported, bad input as one line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from jailbreak_antidote.cli import app
from jailbreak_antidote.errors import InvalidParameter, RequestLogError
from jailbreak_antidote.logs_summary import parse_by, read_log, summarize_logs

runner = CliRunner()


def entry(time: str, refusal: bool, latency: float, harm: float | None, tokens: int, **extra) -> str:
    line = {"time": time, "id": "chatcmpl-x", **extra, "alpha": 0.4, "mode": "gated", "threshold": 0.4,
            "harm_score": harm, "prompt_tokens": 30, "completion_tokens": tokens, "latency_s": latency,
            "finish_reason": "stop", "refusal": refusal, "stream": True}  # fmt: skip
    return json.dumps(line, ensure_ascii=False)  # as the server writes: non-ASCII text as itself


ACME_BASE = {"tenant": "acme", "arm": "baseline", "overridden": False}
ACME_CAND = {"tenant": "acme", "arm": "candidate", "overridden": False}
LINES = [
    entry("2026-12-01T10:05:00.000+00:00", False, 0.5, 0.1, 10, **ACME_BASE),  # 1
    entry("2026-12-01T10:20:00.000+00:00", True, 1.0, 0.3, 20, **ACME_BASE),  # 2
    entry("2026-12-01T10:59:59.999+00:00", False, 2.0, 0.5, 30, **ACME_BASE, prompt="hi", completion="hello"),  # 3
    "not json {",  # 4: garbage in the middle
    entry("2026-12-01T11:10:00.000+00:00", True, 0.4, 0.8, 5, **ACME_CAND),  # 5
    entry("2026-12-01T11:30:00.000+00:00", True, 0.6, None, 7, **ACME_CAND),  # 6: fixed mode, no harm score
    entry("2026-12-01T12:00:00.000+02:00", False, 0.3, 0.2, 3),  # 7: older log: no tenant/arm; 10:00 UTC
    json.dumps({"time": "2026-12-01T10:00:00+00:00", "refusal": False}),  # 8: no latency_s
    "",  # 9: blank, not counted
    '{"time": "2026-12-01T11:40:00.000+00:00", "tenant": "ac',  # 10: torn last line (server killed)
]


@pytest.fixture
def log(tmp_path: Path) -> Path:
    path = tmp_path / "requests.jsonl"
    path.write_text("\n".join(LINES), encoding="utf-8")  # no newline after the torn line
    return path


def by_key(groups: list[dict], *keys: str) -> dict[tuple, dict]:
    return {tuple(group[key] for key in keys): group for group in groups}


def test_groups_by_tenant_and_arm_match_hand_computed_values(log):
    summary = summarize_logs([log], ("tenant", "arm"))
    assert summary.skipped == {str(log): [4, 8, 10]}
    groups = by_key(summary.groups, "tenant", "arm")
    assert list(groups) == [("acme", "baseline"), ("acme", "candidate"), ("default", "baseline")]  # sorted

    base = groups[("acme", "baseline")]
    assert base["requests"] == 3 and base["refusals"] == 1
    assert base["refusal_rate"] == pytest.approx(1 / 3)
    assert base["refusal_rate_ci95"] == pytest.approx([0.0615, 0.7923], abs=1e-4)  # Wilson, z = 1.96
    assert base["harm_scored"] == 3
    # linear quantiles of 0.1, 0.3, 0.5: p90 at position 1.8 -> 0.3 + 0.8 * 0.2
    assert [base["harm_p50"], base["harm_p90"], base["harm_p99"]] == pytest.approx([0.3, 0.46, 0.496])
    assert [base["latency_p50_s"], base["latency_p95_s"]] == pytest.approx([1.0, 1.9])  # of 0.5, 1, 2
    assert base["mean_completion_tokens"] == pytest.approx(20.0)

    cand = groups[("acme", "candidate")]
    assert (cand["requests"], cand["refusals"], cand["refusal_rate"], cand["harm_scored"]) == (2, 2, 1.0, 1)
    assert [cand["harm_p50"], cand["harm_p90"], cand["harm_p99"]] == pytest.approx([0.8, 0.8, 0.8])
    assert [cand["latency_p50_s"], cand["latency_p95_s"]] == pytest.approx([0.5, 0.59])
    assert cand["mean_completion_tokens"] == pytest.approx(6.0)

    old = groups[("default", "baseline")]  # missing tenant and arm defaulted
    assert (old["requests"], old["refusal_rate"], old["harm_p50"], old["latency_p95_s"]) == (1, 0.0, 0.2, 0.3)


@pytest.mark.parametrize(
    ("by", "expected"),
    [
        (("hour",), {("2026-12-01T10:00Z",): (4, 1), ("2026-12-01T11:00Z",): (2, 2)}),  # +02:00 time -> 10Z
        (("arm",), {("baseline",): (4, 1), ("candidate",): (2, 2)}),
        (("tenant",), {("acme",): (5, 3), ("default",): (1, 0)}),
        (("arm", "hour"), {("baseline", "2026-12-01T10:00Z"): (4, 1), ("candidate", "2026-12-01T11:00Z"): (2, 2)}),
        ((), {(): (6, 3)}),
    ],
)
def test_by_subsets(log, by, expected):
    groups = by_key(summarize_logs([log], by).groups, *by)
    assert {key: (group["requests"], group["refusals"]) for key, group in groups.items()} == expected
    assert all(set(group) & {"tenant", "arm", "hour"} == set(by) for group in groups.values())


def test_parse_by():
    assert parse_by(" hour, TENANT ,tenant") == ("hour", "tenant")
    assert parse_by("") == ()
    with pytest.raises(InvalidParameter, match="'model'"):
        parse_by("tenant,model")


def test_several_logs_are_pooled_and_each_reports_its_own_skipped_lines(log, tmp_path):
    other = tmp_path / "other.jsonl"
    other.write_text(LINES[0] + "\n" + LINES[1] + "\n", encoding="utf-8")
    summary = summarize_logs([log, other], ("arm",))
    assert summary.skipped == {str(log): [4, 8, 10]}
    assert by_key(summary.groups, "arm")[("baseline",)]["requests"] == 6


def test_a_line_cut_inside_a_utf8_character_is_skipped(tmp_path):
    path = tmp_path / "log.jsonl"
    good = entry("2026-12-01T10:00:00+00:00", False, 0.1, 0.1, 1, tenant="café").encode()
    path.write_bytes(good + b"\n" + good[: good.index("é".encode()) + 1])  # killed between the bytes of é
    log = read_log(path)
    assert [e.tenant for e in log.entries] == ["café"] and log.skipped == [2]


def test_cli_table_and_skipped_warning(log):
    result = runner.invoke(app, ["logs", "summarize", str(log), "--by", "tenant,arm,hour"])
    assert result.exit_code == 0, result.output
    assert f"{log}: skipped 3 torn or incomplete lines (4, 8, 10); the rest is summarised" in result.stderr
    for text in ("acme", "candidate", "default", "2026-12-01T10:00Z", "2026-12-01T11:00Z"):
        assert text in result.stdout
    assert "warning" not in result.stdout


def test_cli_json_output_parses(log):
    result = runner.invoke(app, ["logs", "summarize", str(log), "--by", "arm", "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["by"] == ["arm"] and data["skipped"] == {str(log): [4, 8, 10]}
    assert [(g["arm"], g["requests"]) for g in data["groups"]] == [("baseline", 4), ("candidate", 2)]
    expected_keys = {"arm", "requests", "refusals", "refusal_rate", "refusal_rate_ci95", "harm_scored", "harm_p50",
                     "harm_p90", "harm_p99", "latency_p50_s", "latency_p95_s", "mean_completion_tokens"}  # fmt: skip
    assert all(set(group) == expected_keys for group in data["groups"])


def test_cli_plot_writes_a_png_atomically(log, tmp_path):
    plot = tmp_path / "plots" / "summary.png"
    result = runner.invoke(app, ["logs", "summarize", str(log), "--plot", str(plot)])
    assert result.exit_code == 0, result.output
    assert plot.read_bytes().startswith(b"\x89PNG\r\n\x1a\n") and plot.stat().st_size > 1000
    assert [p.name for p in plot.parent.iterdir()] == ["summary.png"]  # no temporary file left


def one_error_line(result) -> str:
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output and isinstance(result.exception, SystemExit)
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), result.output
    return lines[0]


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (None, "does not exist"),
        ("", "is empty"),
        ("\n  \n", "is empty"),
        ('{"time": "2026-12-01T10:00:00+00:00", "refusal": fal', "none of its 1 line(s) is a complete entry"),
        (
            "garbage\n[1, 2]\n" + json.dumps({"time": "x", "refusal": True, "latency_s": 1}),
            "none of its 3 line(s) is a complete entry",
        ),
    ],
)
def test_bad_logs_are_one_error_line(tmp_path, content, message):
    path = tmp_path / "requests.jsonl"
    if content is not None:
        path.write_text(content, encoding="utf-8")
    line = one_error_line(runner.invoke(app, ["logs", "summarize", str(path)]))
    assert message in line and str(path) in line
    with pytest.raises(RequestLogError):
        read_log(path)


def test_a_directory_is_one_error_line(tmp_path):
    assert "is a directory" in one_error_line(runner.invoke(app, ["logs", "summarize", str(tmp_path)]))


def test_unknown_by_key_is_one_error_line(log):
    line = one_error_line(runner.invoke(app, ["logs", "summarize", str(log), "--by", "tenant,model"]))
    assert "unknown group key(s) 'model'" in line and "tenant, arm, hour" in line


@pytest.mark.parametrize("name", ["summary.jpg", "summary"])
def test_a_plot_path_that_is_not_png_is_refused_before_reading(log, tmp_path, name):
    plot = tmp_path / name
    line = one_error_line(runner.invoke(app, ["logs", "summarize", str(log), "--plot", str(plot)]))
    assert "ending in .png" in line
    assert not plot.exists()


def test_a_plot_path_that_is_a_directory_is_refused(log, tmp_path):
    folder = tmp_path / "out.png"
    folder.mkdir()
    assert "is a directory" in one_error_line(
        runner.invoke(app, ["logs", "summarize", str(log), "--plot", str(folder)])
    )


def test_lines_holding_what_the_server_never_writes_are_skipped_not_crashed_on(tmp_path):
    good = entry("2026-12-01T10:05:00+00:00", False, 0.5, 0.1, 10, **ACME_BASE)
    odd = [
        entry("2026-12-01T10:05:00+00:00", False, 0.5, 0.1, 10, **ACME_BASE).replace('"latency_s": 0.5',
                                                                                    '"latency_s": ' + "9" * 400),
        entry("9999-12-31T23:30:00-01:00", False, 0.5, 0.1, 10, **ACME_BASE),  # its UTC hour is past year 9999
        entry("2026-12-01T10:05:00+00:00", False, 0.5, 5.0, 10, **ACME_BASE),  # not a probability
        entry("2026-12-01T10:05:00+00:00", False, 0.5, None, 10, **ACME_BASE).replace('"harm_score": null',
                                                                                     '"harm_score": "0.9"'),
        entry("2026-12-01T10:05:00+00:00", False, 0.5, 0.1, 10, tenant=5, arm="baseline"),
        entry("2026-12-01T10:05:00+00:00", False, 0.5, 0.1, 10, tenant="acme", arm=""),
    ]  # fmt: skip
    path = tmp_path / "odd.jsonl"
    path.write_text("\n".join([good, *odd]) + "\n", encoding="utf-8")
    summary = summarize_logs([path])
    assert summary.skipped == {str(path): [2, 3, 4, 5, 6, 7]}
    assert [g["requests"] for g in summary.groups] == [1]


def test_the_same_log_twice_is_refused(log):
    with pytest.raises(RequestLogError, match="same file"):
        summarize_logs([log, log.parent / ".." / log.parent.name / log.name])


def test_a_plot_legend_with_a_dollar_sign_is_drawn_as_text(tmp_path):
    path = tmp_path / "log.jsonl"
    path.write_text(entry("2026-12-01T10:05:00+00:00", False, 0.5, 0.1, 10, tenant="$\\foo$", arm="baseline") + "\n")
    result = runner.invoke(app, ["logs", "summarize", str(path), "--plot", str(tmp_path / "p.png")])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "p.png").stat().st_size > 0
