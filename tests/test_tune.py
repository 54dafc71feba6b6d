"""`antidote tune`: the choice respects the benign budget, the gated curve reuses two generations, bad input."""

import json

import pytest
from conftest import HARMFUL, HARMLESS, fitted_cli_workspace
from typer.testing import CliRunner

from jailbreak_antidote.antidote import Antidote
from jailbreak_antidote.cli import app
from jailbreak_antidote.errors import InvalidParameter
from jailbreak_antidote.probe import fit_probe
from jailbreak_antidote.tune import needed_benign, tune

BENIGN = [f"{text} Please answer briefly, version {i}." for i in range(2) for text in HARMLESS]


@pytest.fixture(scope="module")
def probed(qwen2, tokenizer, qwen2_antidote):
    return Antidote(**{**qwen2_antidote.__dict__, "probe": fit_probe(qwen2, tokenizer, HARMFUL, HARMLESS, per_goal=1)})


def test_tune_respects_the_budget_and_covers_every_mode(qwen2, tokenizer, probed):
    result = tune(qwen2, tokenizer, probed, harmful=HARMFUL[:6], benign=BENIGN, budget=0.1, factors=[1.0, 4.0],
                  max_new_tokens=4)  # fmt: skip
    choice, base = result["choice"], result["baseline"]
    assert choice["benign_refusal"] <= base["benign_refusal"] + 0.1 + 1e-9
    feasible = [p for p in result["curve"] if p["benign_refusal"] <= base["benign_refusal"] + 0.1 + 1e-9]
    assert choice["harmful_refusal"] == max(p["harmful_refusal"] for p in feasible)
    assert {p["mode"] for p in result["curve"]} == {"fixed", "scaled", "gated", "monitor"}
    gated = [p for p in result["curve"] if p["mode"] == "gated" and p["refuse_threshold"] is None]
    assert len(gated) == 2 * 19  # every threshold at every alpha, from one open-gate generation per alpha
    refusing = [p for p in result["curve"] if p["refuse_threshold"] is not None]
    assert refusing and all(p["refuse_threshold"] > (p["threshold"] or 0) for p in refusing if p["mode"] == "gated")
    assert {p["mode"] for p in refusing} == {"fixed", "scaled", "gated", "monitor"}
    assert all(p["alpha"] == 0 for p in refusing if p["mode"] == "fixed")  # the probe filter alone


def test_budget_and_benign_count_are_checked(qwen2, tokenizer, probed):
    with pytest.raises(InvalidParameter, match=r"budget must be in \[0, 1\]"):
        tune(qwen2, tokenizer, probed, budget=1.5)
    with pytest.raises(InvalidParameter, match=f"give at least {needed_benign(0.05)}"):
        tune(qwen2, tokenizer, probed, benign=BENIGN[:10], budget=0.05)


def test_tune_cli_stores_the_default(tmp_path):
    runner = CliRunner()
    model, _, artifact = fitted_cli_workspace(tmp_path)
    (tmp_path / "b.txt").write_text("\n".join(BENIGN))
    args = ["tune", str(artifact), "-m", str(model), "--harmful", str(tmp_path / "h.txt"), "--benign",
            str(tmp_path / "b.txt"), "--budget", "0.1", "--factor", "1", "--max-new-tokens", "3"]  # fmt: skip
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "chosen: mode fixed" in result.output  # no probe: fixed only
    tuned = Antidote.load(artifact).tuned
    assert tuned["mode"] == "fixed" and tuned["budget"] == 0.1 and tuned["curve"]
    assert Antidote.load(artifact).default_alpha == tuned["alpha"]
    summary = json.loads(runner.invoke(app, ["inspect", str(artifact), "--json"]).output)
    assert summary["alpha"]["tuned"]["alpha"] == tuned["alpha"]
    result = runner.invoke(app, [*args[:-6], "--budget", "0.01"])
    assert result.exit_code == 2 and "needs at least 200" in result.output


def test_tune_tries_the_positions_policies_it_is_given(tmp_path):
    runner = CliRunner()
    model, _, artifact = fitted_cli_workspace(tmp_path)
    (tmp_path / "b.txt").write_text("\n".join(BENIGN))
    args = ["tune", str(artifact), "-m", str(model), "--harmful", str(tmp_path / "h.txt"), "--benign",
            str(tmp_path / "b.txt"), "--budget", "0.1", "--factor", "1", "--factor", "8",
            "--max-new-tokens", "3"]  # fmt: skip
    result = runner.invoke(app, [*args, "--positions", "all,prompt"])
    assert result.exit_code == 0, result.output
    tuned = Antidote.load(artifact).tuned
    assert {(p["positions"], p["alpha"] > 0) for p in tuned["curve"]} == {("all", False), ("all", True),
                                                                           ("prompt", True)}  # fmt: skip
    assert Antidote.load(artifact).default_positions == tuned["positions"]
    result = runner.invoke(app, [*args, "--positions", "all,decode"])
    assert result.exit_code == 2 and "positions must be one of" in result.output


def test_tune_chooses_among_candidate_methods(tmp_path):
    runner = CliRunner()
    model, files, artifact = fitted_cli_workspace(tmp_path)
    other = tmp_path / "j.antidote"
    assert (
        runner.invoke(app, ["fit", "-m", str(model), *files, "--method", "mean_diff", "--out", str(other)]).exit_code
        == 0
    )
    (tmp_path / "b.txt").write_text("\n".join(BENIGN))
    args = ["tune", str(artifact), "--candidate", str(other), "-m", str(model), "--harmful", str(tmp_path / "h.txt"),
            "--benign", str(tmp_path / "b.txt"), "--budget", "0.1", "--factor", "1", "--factor", "8",
            "--max-new-tokens", "3"]  # fmt: skip
    refused = runner.invoke(app, args)
    assert refused.exit_code == 2 and "with --candidate give --out" in refused.output
    result = runner.invoke(app, [*args, "--out", str(tmp_path / "best.antidote")])
    assert result.exit_code == 0, result.output
    best = Antidote.load(tmp_path / "best.antidote")
    assert best.method in ("pca", "mean_diff") and f"chosen: method {best.method}" in result.output
    assert "mean" in result.output and "pca" in result.output  # one table, a row per method and point (cut to fit)
    assert Antidote.load(artifact).tuned is None  # the inputs are not modified


def test_tune_without_refusals_tries_the_steering_alone(qwen2, tokenizer, probed):
    result = tune(qwen2, tokenizer, probed, harmful=HARMFUL[:6], benign=BENIGN, budget=0.1, factors=[1.0],
                  max_new_tokens=2, refuse_thresholds=())  # fmt: skip
    assert all(p["refuse_threshold"] is None for p in result["curve"]) and result["choice"]["refuse_threshold"] is None
