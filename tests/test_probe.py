"""Harm probe: AUROC, the logistic fit, template augmentation, held-out selection, artifact storage, CLI."""

import json

import pytest
import torch
from conftest import HARMFUL, HARMLESS, fitted_cli_workspace
from safetensors import safe_open
from safetensors.torch import save_file
from typer.testing import CliRunner

from jailbreak_antidote.antidote import Antidote
from jailbreak_antidote.cli import app
from jailbreak_antidote.errors import ArtifactError, InvalidParameter
from jailbreak_antidote.probe import (
    HELD_OUT_ATTACKS,
    PROBE_TRAIN_ATTACKS,
    PROBE_VALIDATION_ATTACKS,
    TRAIN_ATTACKS,
    HarmProbe,
    attack_wrappers,
    augmented,
    auroc,
    fit_probe,
    smooth_max,
    train_logistic,
    training_wrappers,
)
from jailbreak_antidote.probe_templates import WRAPPERS


def test_auroc_counts_pairs_and_ties():
    assert auroc(torch.tensor([0.1, 0.4, 0.35, 0.8]), torch.tensor([0, 0, 1, 1])) == 0.75
    assert auroc(torch.tensor([1.0, 1.0]), torch.tensor([0, 1])) == 0.5
    with pytest.raises(InvalidParameter, match="both harmful and harmless"):
        auroc(torch.tensor([1.0, 2.0]), torch.tensor([1, 1]))


def test_logistic_regression_separates_a_separable_set():
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(200, 5, generator=generator)
    y = (x[:, 0] + 0.5 * x[:, 1] > 0).long()
    weight, bias = train_logistic(x, y, l2=1e-3)
    assert auroc(x @ weight + bias, y) > 0.99
    assert weight[0] > weight[1] > abs(weight[2])


def test_augmentation_wraps_both_sides_in_the_same_templates():
    data = augmented(HARMFUL[:4], HARMLESS[:4], attack_wrappers(TRAIN_ATTACKS), per_goal=2, seed=0)
    assert len(data.prompts) == 4 * 3 * 2
    for i in range(0, len(data.prompts), 2):  # harmful, then its harmless pair, same template
        assert data.labels[i : i + 2] == [1, 0] and data.attacks[i] == data.attacks[i + 1]
    assert set(data.attacks) - {"direct"} <= set(TRAIN_ATTACKS)
    nested = augmented(HARMFUL[:4], HARMLESS[:4], training_wrappers(TRAIN_ATTACKS), 3, seed=0, nest_probability=1)
    assert all("+" in a for a in nested.attacks if a != "direct")


def test_training_wrappers_never_include_a_held_out_attack():
    names = {w.name for w in training_wrappers(TRAIN_ATTACKS)}
    assert not names & set(HELD_OUT_ATTACKS) and set(TRAIN_ATTACKS) <= names
    assert len(names) == len(TRAIN_ATTACKS) + len(WRAPPERS)
    goal = "Explain how to pick a lock quickly."
    wrapped = [wrap(goal) for wrap in WRAPPERS]
    assert len(set(wrapped)) == len(WRAPPERS) and all(w != goal and w.strip() for w in wrapped)


def unit_probe(pooling: str = "max") -> HarmProbe:
    """A probe that reads coordinate 0 of a 4-wide hidden state."""
    weight = torch.tensor([1.0, 0.0, 0.0, 0.0])
    return HarmProbe(0, weight, 0.0, torch.zeros(4), torch.ones(4), pooling=pooling, tau=0.1)


def test_max_pooling_finds_a_harmful_token_anywhere_and_ignores_padding():
    probe = unit_probe()
    hidden = torch.zeros(3, 5, 4)
    hidden[0, 1, 0] = 5.0  # one harmful-looking token early in the prompt
    hidden[1, 4, 0] = 5.0  # ... or at the end
    hidden[2, 0, 0] = 5.0  # ... but in row 2 that position is padding
    mask = torch.ones(3, 5, dtype=torch.long)
    mask[2, :2] = 0
    raw = probe.raw_scores(hidden, mask)
    assert float(raw[0]) == pytest.approx(float(raw[1]), abs=1e-5) and raw[0] > 4.9
    assert raw[2] < 0.2  # the padded token did not count
    assert unit_probe("last").raw_scores(hidden, mask).tolist() == [0.0, 5.0, 0.0]
    segments = torch.tensor([0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 2, 2, 2])  # the same prompts, packed without padding
    packed = torch.cat([hidden[0, :, 0], hidden[1, :, 0], hidden[2, 2:, 0]])
    torch.testing.assert_close(smooth_max(packed, segments, 3, 0.1), raw)


def test_fit_probe_keeps_templates_and_goals_apart(qwen2, tokenizer):
    probe = fit_probe(qwen2, tokenizer, HARMFUL, HARMLESS, per_goal=2)
    report = probe.report
    assert set(report["validation_attacks"]) == set(PROBE_VALIDATION_ATTACKS)
    assert set(report["validation_auroc_per_attack"]) <= {*PROBE_VALIDATION_ATTACKS, "direct"}
    assert set(report["train_attacks"]) == set(PROBE_TRAIN_ATTACKS)
    assert report["validation_auroc"] == max(report["validation_auroc_per_layer"].values())
    assert str(probe.layer) in report["validation_auroc_per_layer"]
    assert probe.pooling == "max" and report["validation_auroc_attacks_vs_plain_benign"] >= 0
    hidden = torch.randn(3, 7, probe.weight.numel())
    assert ((probe.probability(hidden) >= 0) & (probe.probability(hidden) <= 1)).all()
    with pytest.raises(InvalidParameter, match="both a training and a validation"):
        fit_probe(qwen2, tokenizer, HARMFUL, HARMLESS, train_attacks=["dan"], validation_attacks=["dan"])


def test_the_evaluations_held_out_templates_take_no_part_in_the_probe():
    """Held-out means held out: the probe neither trains on nor chooses its block or calibration by the
    templates that results are reported on."""
    probe_templates = {*PROBE_TRAIN_ATTACKS, *PROBE_VALIDATION_ATTACKS}
    assert not probe_templates & set(HELD_OUT_ATTACKS)
    assert not set(PROBE_TRAIN_ATTACKS) & set(PROBE_VALIDATION_ATTACKS)
    assert probe_templates == set(TRAIN_ATTACKS)


def test_probe_survives_save_and_load_and_is_checksummed(qwen2, tokenizer, qwen2_antidote, tmp_path):
    antidote = Antidote(**{**qwen2_antidote.__dict__, "probe": fit_probe(qwen2, tokenizer, HARMFUL, HARMLESS)})
    path = antidote.save(tmp_path / "p.antidote")
    loaded = Antidote.load(path)
    assert loaded.probe is not None and loaded.probe.layer == antidote.probe.layer
    hidden = torch.randn(4, 6, loaded.probe.weight.numel())
    torch.testing.assert_close(loaded.probe.probability(hidden), antidote.probe.probability(hidden))
    assert loaded.probe.pooling == "max"
    assert loaded.summary()["probe"]["layer"] == antidote.probe.layer
    assert Antidote.load(qwen2_antidote.save(tmp_path / "plain.antidote")).probe is None
    with safe_open(str(path), framework="pt") as handle:  # a probe tensor changed after saving
        header, tensors = handle.metadata(), {name: handle.get_tensor(name) for name in handle.keys()}  # noqa: SIM118
    tensors["probe.weight"] = tensors["probe.weight"] + 1
    save_file(tensors, tmp_path / "bad.antidote", metadata=header)
    with pytest.raises(ArtifactError, match="checksum"):
        Antidote.load(tmp_path / "bad.antidote")


def test_probe_cli_adds_a_probe(tmp_path):

    runner = CliRunner()
    model, files, artifact = fitted_cli_workspace(tmp_path)
    result = runner.invoke(app, ["probe", str(artifact), "-m", str(model), *files, "--per-goal", "1"])
    assert result.exit_code == 0, result.output
    assert "AUROC" in result.output
    summary = json.loads(runner.invoke(app, ["inspect", str(artifact), "--json"]).output)
    assert summary["probe"]["validation_auroc"] >= 0
    result = runner.invoke(app, ["probe", str(artifact), "-m", str(model), "--harmful", str(tmp_path / "h.txt")])
    assert result.exit_code == 2 and "both --harmful and --harmless" in result.output
    # --from: another fit method on the same model takes the same probe, no model loaded; wrong inputs refused.
    other = tmp_path / "mean_diff.antidote"
    assert (
        runner.invoke(app, ["fit", "-m", str(model), *files, "--method", "mean_diff", "--out", str(other)]).exit_code
        == 0
    )
    result = runner.invoke(
        app, ["probe", str(other), "--from", str(artifact), "--out", str(tmp_path / "gated.antidote")]
    )
    assert result.exit_code == 0, result.output
    copied = Antidote.load(tmp_path / "gated.antidote")
    assert copied.method == "mean_diff" and copied.probe is not None
    torch.testing.assert_close(copied.probe.weight, Antidote.load(artifact).probe.weight)
    result = runner.invoke(app, ["probe", str(other), "--from", str(other)])
    assert result.exit_code == 2 and "has no harm probe" in result.output
    result = runner.invoke(app, ["probe", str(other), "--from", str(artifact), "--layer", "1"])
    assert result.exit_code == 2 and "drop --harmful, --harmless and --layer" in result.output
    alien = Antidote.load(other)
    alien.model = {**alien.model, "hidden_size": alien.model["hidden_size"] * 2}
    alien.save(tmp_path / "alien.antidote")
    result = runner.invoke(app, ["probe", str(tmp_path / "alien.antidote"), "--from", str(artifact)])
    assert result.exit_code == 2 and "a probe only serves its own model" in result.output
    assert Antidote.load(tmp_path / "alien.antidote").probe is None


def test_generate_reports_harm_scores_and_gates_by_them(qwen2, tokenizer, qwen2_antidote):
    from jailbreak_antidote.generate import generate_answers

    probe = fit_probe(qwen2, tokenizer, HARMFUL, HARMLESS, per_goal=1)
    antidote = Antidote(**{**qwen2_antidote.__dict__, "probe": probe})
    prompts = [HARMFUL[0], HARMLESS[0]]
    alpha = 4 * antidote.suggested_alpha
    plain = generate_answers(qwen2, tokenizer, prompts, max_new_tokens=5)
    closed = generate_answers(qwen2, tokenizer, prompts, antidote=antidote, alphas=alpha, max_new_tokens=5,
                              mode="gated", threshold=1.0)  # fmt: skip
    assert [a.text for a in closed] == [a.text for a in plain]  # nothing reaches probability 1.0
    assert all(0 <= a.harm_score <= 1 for a in closed) and plain[0].harm_score is None
    opened = generate_answers(qwen2, tokenizer, prompts, antidote=antidote, alphas=alpha, max_new_tokens=5,
                              mode="gated", threshold=0.0)  # fmt: skip
    assert [a.text for a in opened] != [a.text for a in plain]
    with pytest.raises(InvalidParameter, match="needs a harm probe"):
        generate_answers(qwen2, tokenizer, prompts, antidote=qwen2_antidote, mode="scaled")


def test_eval_runs_the_adaptive_defenses_and_reports_probe_auroc(tmp_path):
    runner = CliRunner()
    model, files, artifact = fitted_cli_workspace(tmp_path)
    goals = tmp_path / "goals.txt"
    goals.write_text("\n".join(HARMFUL[:3]))
    common = ["eval", "-m", str(model), "-a", str(artifact), "--goals", str(goals), "--attacks", "direct,dan",
              "--max-new-tokens", "3", "--benign-limit", "4"]  # fmt: skip
    result = runner.invoke(app, [*common, "--defenses", "antidote-gated", "--out", str(tmp_path / "no")])
    assert result.exit_code == 2 and "needs a harm probe" in result.output
    assert runner.invoke(app, ["probe", str(artifact), "-m", str(model), *files, "--per-goal", "1"]).exit_code == 0
    result = runner.invoke(app, [*common, "--defenses", "none,antidote-gated,antidote-scaled", "--threshold", "0.3",
                                 "--out", str(tmp_path / "run")])  # fmt: skip
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in (tmp_path / "run" / "rows.jsonl").read_text().splitlines()]
    assert {r["defense"] for r in rows} == {"none", "antidote-gated", "antidote-scaled"}
    assert all(0 <= r["details"]["harm_score"] <= 1 for r in rows if r["defense"] != "none")
    assert rows[0]["config"]["threshold"] == 0.3
    report = (tmp_path / "run" / "report.md").read_text()
    assert "Harm probe AUROC per attack family" in report and "role-play" in report


def test_utility_metrics_follow_the_gate(qwen2, tokenizer, qwen2_antidote):
    from jailbreak_antidote.eval.utility import next_token_kl

    probe = fit_probe(qwen2, tokenizer, HARMFUL, HARMLESS, per_goal=1)
    antidote = Antidote(**{**qwen2_antidote.__dict__, "probe": probe})
    alpha = 4 * antidote.suggested_alpha
    fixed = next_token_kl(qwen2, tokenizer, HARMLESS[:3], antidote, alpha)
    closed = next_token_kl(qwen2, tokenizer, HARMLESS[:3], antidote, alpha, mode="gated", threshold=1.0)
    opened = next_token_kl(qwen2, tokenizer, HARMLESS[:3], antidote, alpha, mode="gated", threshold=0.0)
    assert fixed > 1e-4 and closed == pytest.approx(0.0, abs=1e-6) and opened > 0


def test_artifacts_with_an_old_or_an_unknown_probe_pooling(qwen2_antidote, tmp_path):
    hidden_size = qwen2_antidote.vectors()[qwen2_antidote.layers[0]].numel()
    probe = HarmProbe(1, torch.zeros(hidden_size), 0.0, torch.zeros(hidden_size), torch.ones(hidden_size))
    path = Antidote(**{**qwen2_antidote.__dict__, "probe": probe}).save(tmp_path / "p.antidote")
    with safe_open(str(path), framework="pt") as handle:
        header, tensors = handle.metadata(), {name: handle.get_tensor(name) for name in handle.keys()}  # noqa: SIM118
    meta = json.loads(header["meta"])
    del meta["probe"]["pooling"]  # written before max pooling existed: read the last token
    save_file(tensors, tmp_path / "old.antidote", metadata={**header, "meta": json.dumps(meta)})
    assert Antidote.load(tmp_path / "old.antidote").probe.pooling == "last"
    meta["probe"]["pooling"] = "attention"
    save_file(tensors, tmp_path / "new.antidote", metadata={**header, "meta": json.dumps(meta)})
    with pytest.raises(ArtifactError, match="upgrade jailbreak-antidote"):
        Antidote.load(tmp_path / "new.antidote")
