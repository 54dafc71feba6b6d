"""Refusing outright: a prompt whose harm probability reaches the refuse threshold is answered with a fixed
refusal instead of its generation (the probe as an input filter), everywhere the antidote runs."""

import json
from fractions import Fraction

import numpy as np
import pytest
from conftest import HARMFUL, HARMLESS, fitted_cli_workspace
from safetensors import safe_open
from safetensors.torch import save_file
from typer.testing import CliRunner

from jailbreak_antidote.antidote import Antidote
from jailbreak_antidote.cli import app
from jailbreak_antidote.errors import ArtifactError, InvalidParameter
from jailbreak_antidote.generate import REFUSAL_MESSAGE, generate_answers
from jailbreak_antidote.probe import fit_probe
from jailbreak_antidote.tune import with_refusals

PROMPTS = [*HARMFUL[:4], *HARMLESS[:4], "Explain how photosynthesis works.", "Tell me a story about a dragon."]


@pytest.fixture(scope="module")
def probed(qwen2, tokenizer, qwen2_antidote):
    return Antidote(**{**qwen2_antidote.__dict__, "probe": fit_probe(qwen2, tokenizer, HARMFUL, HARMLESS, per_goal=1)})


def _middle_score(answers) -> float:
    """A threshold that splits the prompts: some reach it, some do not."""
    scores = sorted(a.harm_score for a in answers)
    return (scores[len(scores) // 2 - 1] + scores[len(scores) // 2]) / 2


@pytest.mark.parametrize("mode", ["fixed", "gated"])
def test_refused_rows_get_the_refusal_and_the_others_their_own_answer(qwen2, tokenizer, probed, mode):
    alpha = 2 * probed.suggested_alpha
    common = dict(antidote=probed, alphas=alpha, max_new_tokens=6, batch_size=len(PROMPTS), mode=mode, threshold=0.5)
    plain = generate_answers(qwen2, tokenizer, PROMPTS, **common)
    refuse_from = _middle_score(plain)
    filtered = generate_answers(qwen2, tokenizer, PROMPTS, **common, refuse_threshold=refuse_from)
    refused = [a.refused_by_probe for a in filtered]
    assert 0 < sum(refused) < len(PROMPTS)
    for before, after in zip(plain, filtered):
        assert after.harm_score == before.harm_score  # the probe reads the prompt before anything is refused
        assert after.refused_by_probe == (before.harm_score >= refuse_from)
        # Same batch, same steering: a row the probe lets through is generated exactly as without the filter.
        assert after.text == (REFUSAL_MESSAGE if after.refused_by_probe else before.text)


def test_a_row_whose_reported_score_equals_the_threshold_is_refused(qwen2, tokenizer, probed):
    common = dict(antidote=probed, max_new_tokens=2, batch_size=len(PROMPTS), mode="gated", threshold=0.5)
    plain = generate_answers(qwen2, tokenizer, PROMPTS, **common)
    exact = plain[0].harm_score  # as reported: rounded to 4 decimals
    refused = generate_answers(qwen2, tokenizer, PROMPTS, **common, refuse_threshold=exact)
    assert [a.refused_by_probe for a in refused] == [a.harm_score >= exact for a in plain]
    assert refused[0].refused_by_probe


def test_refusing_needs_a_probe_and_a_probability(qwen2, tokenizer, qwen2_antidote, probed):
    with pytest.raises(InvalidParameter, match="refuse_threshold reads the harm probe"):
        generate_answers(qwen2, tokenizer, PROMPTS[:1], antidote=qwen2_antidote, refuse_threshold=0.5)
    with pytest.raises(InvalidParameter, match="refuse_threshold reads the harm probe"):
        generate_answers(qwen2, tokenizer, PROMPTS[:1], refuse_threshold=0.5)
    for bad in (1.5, -0.1, float("nan"), True, "0.5", 10**400):
        with pytest.raises(InvalidParameter, match=r"refuse_threshold must be a probability in \[0, 1\]"):
            generate_answers(qwen2, tokenizer, PROMPTS[:1], antidote=probed, refuse_threshold=bad)
    for good in (np.float32(1.0), Fraction(1, 1)):  # any real number type, read as a float
        assert generate_answers(qwen2, tokenizer, PROMPTS[:1], antidote=probed, refuse_threshold=good, max_new_tokens=1)


@pytest.mark.parametrize("value", ["abc", "never", float("nan"), 1.5, True, [0.5]])
def test_a_bad_tuned_refuse_threshold_in_a_file_is_refused_at_load_and_never_written(tmp_path, probed, value):
    tuned = {"mode": "gated", "alpha": 1.0, "threshold": 0.4, "positions": "all", "refuse_threshold": 0.6}
    good = Antidote(**{**probed.__dict__, "alpha": {**probed.alpha, "tuned": tuned}}).save(tmp_path / "t.antidote")
    with safe_open(str(good), framework="pt") as handle:
        header = handle.metadata()
        tensors = {name: handle.get_tensor(name) for name in handle.keys()}  # noqa: SIM118
    meta = json.loads(header["meta"])
    meta["alpha"]["tuned"]["refuse_threshold"] = value  # a hand edit: the metadata is not under the checksum
    save_file(tensors, str(tmp_path / "bad.antidote"), metadata={**header, "meta": json.dumps(meta)})
    with pytest.raises(ArtifactError, match=r"bad.antidote.*its tuned default: refuse_threshold must be"):
        Antidote.load(tmp_path / "bad.antidote")
    result = CliRunner().invoke(app, ["inspect", str(tmp_path / "bad.antidote")])
    assert result.exit_code == 2 and "run `antidote tune` on it again" in result.output
    broken = Antidote(**{**probed.__dict__, "alpha": {**probed.alpha, "tuned": {**tuned, "refuse_threshold": value}}})
    with pytest.raises(InvalidParameter, match="refuse_threshold must be"):
        broken.save(tmp_path / "never-written.antidote")
    assert not (tmp_path / "never-written.antidote").exists()


def test_tune_simulation_matches_a_real_refusing_run(qwen2, tokenizer, probed):
    """The tuner adds refusals to verdicts it already has instead of generating again: check that shortcut."""
    from jailbreak_antidote.eval.judges import is_refusal

    common = dict(antidote=probed, alphas=probed.suggested_alpha, max_new_tokens=6, batch_size=4, mode="gated",
                  threshold=0.3)  # fmt: skip
    plain = generate_answers(qwen2, tokenizer, PROMPTS, **common)
    refuse_from = _middle_score(plain)
    real = generate_answers(qwen2, tokenizer, PROMPTS, **common, refuse_threshold=refuse_from)
    simulated = with_refusals([is_refusal(a.text) for a in plain], [a.harm_score for a in plain], refuse_from)
    assert simulated == [is_refusal(a.text) for a in real]


def test_a_tuned_refuse_threshold_is_stored_as_format_3_and_is_the_default(tmp_path, probed):
    assert probed.default_refuse_threshold is None and probed.format_version() == 1
    tuned = Antidote(**{**probed.__dict__, "alpha": {**probed.alpha, "tuned": {
        "mode": "gated", "alpha": 1.0, "threshold": 0.4, "positions": "all", "refuse_threshold": 0.6}}})  # fmt: skip
    path = tuned.save(tmp_path / "t.antidote")
    with safe_open(str(path), framework="pt") as handle:
        # An older reader (versions 1 and 2) refuses it instead of serving without the refusals.
        assert json.loads(handle.metadata()["meta"])["format_version"] == 3
    assert Antidote.load(path).default_refuse_threshold == 0.6


def test_generate_cli_applies_the_tuned_refuse_threshold_unless_told_not_to(tmp_path, qwen2, tokenizer):
    runner = CliRunner()
    model, files, artifact = fitted_cli_workspace(tmp_path)
    result = runner.invoke(app, ["probe", str(artifact), "-m", str(model), *files, "--per-goal", "1"])
    assert result.exit_code == 0, result.output
    probed = Antidote.load(artifact)
    probed.alpha = {**probed.alpha, "tuned": {"mode": "gated", "alpha": probed.suggested_alpha, "threshold": 0.5,
                                              "positions": "all", "refuse_threshold": 0.0}}  # fmt: skip
    probed.save(artifact)
    base = ["generate", "-a", str(artifact), "-m", str(model), "--max-new-tokens", "3", "--out"]
    result = runner.invoke(app, [*base, str(tmp_path / "r.jsonl"), HARMFUL[0]])
    assert result.exit_code == 0, result.output
    row = json.loads((tmp_path / "r.jsonl").read_text())
    assert row["response"] == REFUSAL_MESSAGE and row["refused_by_probe"]  # every score reaches 0
    result = runner.invoke(app, [*base, str(tmp_path / "n.jsonl"), "--no-refuse", HARMFUL[0]])
    assert result.exit_code == 0, result.output
    assert "refused_by_probe" not in json.loads((tmp_path / "n.jsonl").read_text())
    result = runner.invoke(app, [*base, str(tmp_path / "x.jsonl"), "--no-refuse", "--refuse-threshold", "0.5", "hi"])
    assert result.exit_code == 2 and "not both" in result.output
    result = runner.invoke(app, [*base, str(tmp_path / "x.jsonl"), "--refuse-threshold", "2", "hi"])
    assert result.exit_code == 2 and "refuse_threshold must be a probability" in result.output
    assert not (tmp_path / "x.jsonl").exists()


def test_the_server_refuses_outright_per_request_and_streams_the_refusal(tokenizer, probed, tmp_path):
    import httpx
    from conftest import build_model
    from serving import RunningServer

    from jailbreak_antidote.server import ServerConfig

    model = build_model("qwen2")  # its own: the engine thread must not share hooks with other tests
    config = ServerConfig(model_name="tiny", alpha_max=1.0, max_tokens=16, request_log=tmp_path / "log.jsonl",
                          default_mode="gated", default_threshold=0.5, default_refuse_threshold=0.0)  # fmt: skip
    server = RunningServer(model, tokenizer, probed, config)
    try:

        def ask(antidote=None, stream=False):
            body = {"messages": [{"role": "user", "content": HARMFUL[0]}], "max_tokens": 6, "stream": stream}
            return httpx.post(f"{server.url}/v1/chat/completions", json=body | {"antidote": antidote or {}}, timeout=60)

        refused = ask().json()  # the server's default refuses from 0: every prompt
        choice = refused["choices"][0]
        assert choice["message"]["content"] == REFUSAL_MESSAGE and choice["finish_reason"] == "content_filter"
        assert refused["antidote"]["refused_by_probe"] and refused["antidote"]["refusal"]
        assert refused["usage"]["completion_tokens"] == 0
        answered = ask({"refuse_threshold": "never"}).json()
        assert answered["choices"][0]["finish_reason"] in ("stop", "length")
        assert not answered["antidote"]["refused_by_probe"] and answered["antidote"]["refuse_threshold"] is None
        assert answered["antidote"]["harm_score"] == refused["antidote"]["harm_score"]
        lines = [
            line.removeprefix("data: ") for line in ask(stream=True).text.splitlines() if line.startswith("data: ")
        ]
        chunks = [json.loads(line) for line in lines if line != "[DONE]"]
        text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
        assert text == REFUSAL_MESSAGE and chunks[-1]["choices"][0]["finish_reason"] == "content_filter"
        assert chunks[-1]["antidote"]["refused_by_probe"]
        bad = ask({"refuse_threshold": 1.5})
        message = bad.json()["error"]["message"]
        assert bad.status_code == 400 and "must be a harm probability in [0, 1]" in message
        assert message.count("refuse_threshold") == 1  # named once, not "field: field is ..."
        metrics = httpx.get(f"{server.url}/metrics").text
        assert 'antidote_probe_refusals_total{arm="baseline",tenant="default"} 2.0' in metrics
        logged = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
        assert [e["finish_reason"] for e in logged] == ["content_filter", answered["choices"][0]["finish_reason"],
                                                       "content_filter"]  # fmt: skip
    finally:
        server.stop()


def test_a_refused_row_leaves_the_rest_of_its_batch_as_it_was(tokenizer, probed):
    """Two requests decoded together: the probe refuses one; the other answers as it does alone."""
    import concurrent.futures

    from conftest import build_model
    from serving import RunningServer

    from jailbreak_antidote.server import ServerConfig

    model = build_model("qwen2")
    config = ServerConfig(model_name="tiny", alpha_max=1.0, max_tokens=16, batch_wait_s=0.5, default_mode="gated")
    server = RunningServer(model, tokenizer, probed, config)
    try:
        client = server.client()

        def ask(prompt, refuse):
            messages = [{"role": "user", "content": prompt}]
            extra = {"antidote": {"refuse_threshold": refuse}}
            response = client.chat.completions.create(model="tiny", messages=messages, max_tokens=8, extra_body=extra)
            return response.choices[0]

        alone = ask(HARMLESS[1], "never")
        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            refused, kept = pool.map(lambda args: ask(*args), [(HARMFUL[0], 0.0), (HARMLESS[1], "never")])
        assert refused.finish_reason == "content_filter" and refused.message.content == REFUSAL_MESSAGE
        assert kept.message.content == alone.message.content and kept.finish_reason == alone.finish_reason
    finally:
        server.stop()


def test_eval_refuses_outright_in_the_steered_defenses_only(tmp_path):
    runner = CliRunner()
    model, files, artifact = fitted_cli_workspace(tmp_path)
    plain = tmp_path / "plain.antidote"
    plain.write_bytes(artifact.read_bytes())
    assert runner.invoke(app, ["probe", str(artifact), "-m", str(model), *files, "--per-goal", "1"]).exit_code == 0
    goals = tmp_path / "goals.txt"
    goals.write_text("\n".join(HARMFUL[:2]))
    args = ["eval", "-m", str(model), "-a", str(artifact), "--goals", str(goals), "--attacks", "direct",
            "--defenses", "none,antidote-gated", "--max-new-tokens", "3", "--benign-limit", "2", "--harm-judge",
            "none", "--refuse-threshold", "0", "--out", str(tmp_path / "eval")]  # fmt: skip
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in (tmp_path / "eval" / "rows.jsonl").read_text().splitlines()]
    for row in rows:
        steered = row["defense"] == "antidote-gated"
        assert row["blocked"] == steered and (row["response"] == REFUSAL_MESSAGE) == steered
        assert row["config"]["refuse_threshold"] == 0.0
        assert row["judges"]["keyword_refusal"] or not steered
    reminded = runner.invoke(app, [*[{"none,antidote-gated": "antidote+self-reminder"}.get(a, a) for a in args[:-1]],
                                   str(tmp_path / "e3")])  # fmt: skip
    assert reminded.exit_code == 0, reminded.output
    rows = [json.loads(line) for line in (tmp_path / "e3" / "rows.jsonl").read_text().splitlines()]
    assert all(r["blocked"] and "harm_score" in r["details"] for r in rows)  # every steered defense, not only antidote
    unsteered_args = [{"none,antidote-gated": "none"}.get(a, a) for a in args[:-1]]
    unsteered = runner.invoke(app, [*unsteered_args, str(tmp_path / "e4")])
    assert unsteered.exit_code == 2 and "applies to the steered defenses" in unsteered.output
    assert not (tmp_path / "e4").exists()
    # Another refuse threshold is another configuration: refused in the same directory, with the difference.
    again = runner.invoke(app, [*args[:-4], "--refuse-threshold", "0.5", *args[-2:]])
    assert again.exit_code == 2 and "refuse_threshold: 0.0 there vs 0.5 now" in again.output
    fixed = [{"none,antidote-gated": "none,antidote", str(artifact): str(plain)}.get(a, a) for a in args[:-2]]
    without_probe = runner.invoke(app, [*fixed, "--out", str(tmp_path / "e2")])
    assert without_probe.exit_code == 2 and "--refuse-threshold reads the antidote's harm probe" in without_probe.output
    assert not (tmp_path / "e2").exists()


def test_serve_checks_the_refuse_threshold_before_loading_the_model(tmp_path):
    runner = CliRunner()
    _, _, artifact = fitted_cli_workspace(tmp_path)  # no probe
    missing = tmp_path / "no-such-model"  # never reached: the check comes first
    result = runner.invoke(app, ["serve", "-m", str(missing), "-a", str(artifact), "--refuse-threshold", "0.5"])
    assert result.exit_code == 2 and "--refuse-threshold reads the antidote's harm probe" in result.output
    assert "loading model" not in result.output
    result = runner.invoke(app, ["serve", "-m", str(missing), "--refuse-threshold", "0.5"])  # the built-in antidote
    assert result.exit_code == 2 and "and there is none" in result.output
    result = runner.invoke(app, ["serve", "-a", str(artifact), "--refuse-threshold", "0.5", "--no-refuse"])
    assert result.exit_code == 2 and "not both" in result.output


def test_without_refusals_serves_the_best_steering_only_point_of_the_curve(probed):
    """--no-refuse (and the vLLM plugin's REFUSE=never) must not keep the point tuned jointly with refusals,
    which is weaker alone: they take what `antidote tune --no-refuse` would have chosen from the same curve."""

    def point(mode, alpha, threshold, refuse, harmful, benign):
        return {"mode": mode, "alpha": alpha, "threshold": threshold, "positions": "all", "refuse_threshold": refuse,
                "harmful_refusal": harmful, "benign_refusal": benign}  # fmt: skip

    baseline = point("fixed", 0.0, None, None, 0.5, 0.08)
    curve = [baseline, point("gated", 1.0, 0.35, None, 0.69, 0.10), point("gated", 4.0, 0.4, None, 0.83, 0.08),
             point("fixed", 4.0, None, None, 0.88, 0.83), point("gated", 1.0, 0.35, 0.45, 0.98, 0.10)]  # fmt: skip
    tuned = {**curve[-1], "baseline": baseline, "budget": 0.05, "curve": curve}
    refusing = Antidote(**{**probed.__dict__, "alpha": {**probed.alpha, "tuned": tuned}})
    plain = refusing.without_refusals()
    assert plain.default_refuse_threshold is None and plain.default_alpha == 4.0  # not 1.0, the joint point
    assert plain.default_mode == ("gated", 0.4) and plain.tuned["curve"] == curve
    assert refusing.default_alpha == 1.0 and plain.without_refusals() is plain
