"""Combining evaluation parts (a long run split over sessions) into one report: checks, not guesses."""

import json

import pytest
from typer.testing import CliRunner

from jailbreak_antidote.cli import app
from jailbreak_antidote.errors import InvalidParameter
from jailbreak_antidote.eval.combine import build_combined_report, read_summary_csv
from jailbreak_antidote.eval.report import summarize

CONFIG = dict(model="tiny", model_sha256="m", antidote_fingerprint="a", max_new_tokens=4, temperature=0.0, top_p=1.0,
              seed=0, dtype="bfloat16", backend="transformers", threshold=0.5)  # fmt: skip


def eval_dir(path, defenses, refused=(True, False, True), config=CONFIG):
    """An evaluation directory as `antidote eval` writes it: config, attack rows and benign rows."""
    path.mkdir(parents=True)
    (path / "config.json").write_text(json.dumps(config))
    rows, utility = [], []
    for defense in defenses:
        steered = defense == "antidote"
        setting = {"defense": defense, "alpha": 0.5 if steered else 0.0, "k": 0.05 if steered else None,
                   "selector": "top" if steered else None}  # fmt: skip
        cost = {"extra_generations": 0, "extra_scoring_passes": 0, "extra_prompt_tokens": 0}
        for i, verdict in enumerate(refused):
            rows.append({**setting, "goal": f"goal {i}", "attack": "dan", "judges": {"keyword_refusal": verdict},
                         "cost": cost})  # fmt: skip
            utility.append({**setting, "set": "harmless", "prompt": f"p{i}", "judges": {"keyword_refusal": False}})
    (path / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (path / "utility.jsonl").write_text("".join(json.dumps(r) + "\n" for r in utility))
    return path


def test_parts_combine_into_one_report_and_a_report_dir_is_a_part_again(tmp_path):
    first = eval_dir(tmp_path / "session1", ["none", "icd"])
    second = eval_dir(tmp_path / "session2", ["antidote"])
    report = build_combined_report([first, second], tmp_path / "combined")
    text = report.read_text()
    assert "| none |" in text and "| icd |" in text and "antidote a=0.5 k=0.05" in text
    assert "Combined by `antidote report` from parts" in text
    assert json.loads((tmp_path / "combined" / "config.json").read_text()) == CONFIG
    assert (tmp_path / "combined" / "pareto.png").stat().st_size > 1000

    # summary.csv reads back as the rows summarize() computed, so a report directory can be a part later.
    def in_order(rows):
        return sorted(rows, key=json.dumps)

    assert in_order(read_summary_csv(tmp_path / "combined" / "summary.csv")) == in_order(
        summarize(first) + summarize(second)
    )
    third = eval_dir(tmp_path / "session3", ["self-reminder"])
    again = build_combined_report([tmp_path / "combined", third], tmp_path / "all").read_text()
    assert "| self-reminder |" in again and "| icd |" in again


def test_a_setting_in_two_parts_must_reproduce(tmp_path):
    first = eval_dir(tmp_path / "a", ["none", "icd"])
    rerun = eval_dir(tmp_path / "b", ["none", "antidote"])
    assert "| icd |" in build_combined_report([first, rerun], tmp_path / "ok").read_text()

    drifted = eval_dir(tmp_path / "c", ["none"], refused=(False, False, True))
    with pytest.raises(InvalidParameter, match=r"'none' is in both .* with different numbers"):
        build_combined_report([first, drifted], tmp_path / "bad")
    assert not (tmp_path / "bad" / "report.md").exists()


def test_parts_of_other_configurations_or_without_one_are_refused(tmp_path):
    first = eval_dir(tmp_path / "a", ["none"])
    other = eval_dir(tmp_path / "b", ["icd"], config={**CONFIG, "max_new_tokens": 64})
    with pytest.raises(InvalidParameter, match=r"different configurations.*max_new_tokens: 64"):
        build_combined_report([first, other], tmp_path / "out")

    bare = eval_dir(tmp_path / "bare", ["icd"])
    (bare / "config.json").unlink()
    with pytest.raises(InvalidParameter, match=r"has no config.json"):
        build_combined_report([first, bare], tmp_path / "out")
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "config.json").write_text(json.dumps(CONFIG))
    with pytest.raises(InvalidParameter, match="neither evaluation rows"):
        build_combined_report([empty], tmp_path / "out")

    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text(json.dumps(CONFIG))
    (broken / "summary.csv").write_text("defense,alpha\nnone,zero\n")
    with pytest.raises(InvalidParameter, match=r"not a summary.csv written by `antidote report`"):
        build_combined_report([broken], tmp_path / "out")


def test_report_command_combines_and_asks_for_out(tmp_path):
    first = eval_dir(tmp_path / "a", ["none"])
    second = eval_dir(tmp_path / "b", ["icd"])
    cli = CliRunner()
    result = cli.invoke(app, ["report", str(first), str(second)])
    assert result.exit_code != 0 and "needs --out" in result.output and "Traceback" not in result.output
    result = cli.invoke(app, ["report", str(first), str(second), "--out", str(tmp_path / "both")])
    assert result.exit_code == 0, result.output
    assert "icd" in result.output and (tmp_path / "both" / "report.md").is_file()
    assert cli.invoke(app, ["report", str(first)]).exit_code == 0  # one directory: rebuilt in place
    assert (first / "report.md").is_file()
