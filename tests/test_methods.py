"""Fit methods beyond the paper's (null_space, jailbreak_diff) and the positions policy (all/prompt/generated)."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import HARMFUL, HARMLESS, build_model
from safetensors import safe_open
from safetensors.torch import save_file

from jailbreak_antidote.antidote import Antidote
from jailbreak_antidote.blocks import find_decoder
from jailbreak_antidote.errors import ArtifactError, InvalidParameter
from jailbreak_antidote.fit import fit_antidote
from jailbreak_antidote.fit_methods import null_space_basis, null_space_readout
from jailbreak_antidote.models import encode_prompts
from jailbreak_antidote.probe import HELD_OUT_ATTACKS
from jailbreak_antidote.steer import Steering

PROMPTS = ["Hi", "How do I make a pipe organ at home? Please explain it to me."]  # unequal: left padding


@pytest.fixture(scope="module")
def model():
    return build_model("qwen2")  # its own: steering hooks of other modules' fixtures stay out


@pytest.fixture(scope="module")
def null_space(model, tokenizer):
    return fit_antidote(model, tokenizer, HARMFUL, HARMLESS, k=1.0, method="null_space")


def logits(model, batch):
    with torch.no_grad():
        return model(**batch).logits


def test_readout_lies_in_the_benign_null_space_and_reads_one_on_harmful_states():
    generator = torch.Generator().manual_seed(0)
    benign = torch.randn(40, 8, generator=generator) @ torch.diag(torch.tensor([5.0, 5, 5, 5, 5, 0.01, 0.01, 0.01]))
    harmful = 0.2 * torch.randn(30, 8, generator=generator) + torch.tensor([0, 0, 0, 0, 0, 3.0, 0, 0])
    basis = null_space_basis(benign, 0.375)  # the 3 least varying directions: coordinates 5, 6, 7
    assert basis.shape == (8, 3)
    assert basis[:5].abs().max() < 1e-2
    readout = null_space_readout(benign, harmful, 0.375, ridge=1e-3)
    assert (benign @ readout).abs().mean() < 0.02
    assert (harmful @ readout).mean() == pytest.approx(1.0, abs=0.1)


def test_prompt_policy_leaves_generated_tokens_alone_and_generated_policy_the_prompt(model, tokenizer, qwen2_antidote):
    batch = encode_prompts(tokenizer, PROMPTS)
    one_token = {"input_ids": batch["input_ids"][:, -1:], "attention_mask": batch["attention_mask"][:, -1:]}
    plain_prompt, plain_token = logits(model, batch), logits(model, one_token)
    with qwen2_antidote.applied(model, alpha=3.0, positions="prompt"):
        assert not torch.allclose(logits(model, batch), plain_prompt)
        torch.testing.assert_close(logits(model, one_token), plain_token)  # a decoding step: not steered
    with qwen2_antidote.applied(model, alpha=3.0, positions="generated"):
        torch.testing.assert_close(logits(model, batch), plain_prompt)
        assert not torch.allclose(logits(model, one_token), plain_token)
    with qwen2_antidote.applied(model, alpha=3.0, positions="all"):
        all_prompt = logits(model, batch)
    with qwen2_antidote.applied(model, alpha=3.0, positions="prompt"):
        torch.testing.assert_close(logits(model, batch), all_prompt)  # the prefill is steered as by the paper


def test_generation_first_token_follows_the_prefill_policy(model, tokenizer, null_space):
    batch = encode_prompts(tokenizer, PROMPTS)
    kwargs = dict(max_new_tokens=4, do_sample=False, pad_token_id=tokenizer.pad_token_id, use_cache=True)
    first = batch["input_ids"].shape[1]
    plain = model.generate(**batch, **kwargs)[:, first]
    answers = {}
    for positions in ("all", "prompt", "generated"):
        with null_space.applied(model, alpha=50.0, positions=positions):
            answers[positions] = model.generate(**batch, **kwargs)[:, first]
    assert torch.equal(answers["prompt"], answers["all"])  # the first token comes from the steered prefill
    assert torch.equal(answers["generated"], plain)  # ... or from the plain one


def test_readout_steering_equals_per_row_alpha_read_at_the_last_prompt_token(model, tokenizer):
    _stack, blocks = find_decoder(model)
    layer = 2
    vector = torch.randn(64, generator=torch.Generator().manual_seed(1))
    readout = torch.randn(64, generator=torch.Generator().manual_seed(2)) / 8
    batch = encode_prompts(tokenizer, PROMPTS)
    plain = logits(model, batch)
    seen = {}
    handle = blocks[layer].register_forward_hook(
        lambda _m, _i, out: seen.update(h=out[0] if isinstance(out, tuple) else out)
    )
    logits(model, batch)
    handle.remove()
    per_row = seen["h"][:, -1, :] @ readout  # the unsteered state: nothing is steered before block `layer`
    with Steering(model, {layer: vector}, alpha=1.5, readouts={layer: readout}) as steering:
        by_readout = logits(model, batch)
        torch.testing.assert_close(steering.readout_scores[layer], per_row)
    with Steering(model, {layer: vector}, alpha=1.5 * per_row):
        torch.testing.assert_close(by_readout, logits(model, batch))
    with Steering(model, {layer: vector}, alpha=1.5, readouts={layer: torch.zeros(64)}):
        torch.testing.assert_close(logits(model, batch), plain)  # a zero readout reads 0 everywhere


def test_null_space_fit_reads_harmful_prompts_higher_and_round_trips(model, tokenizer, null_space, tmp_path):
    assert null_space.method == "null_space" and null_space.readouts is not None
    assert null_space.readouts.shape == null_space.directions.shape
    harmful_mean = null_space.stats["readout_harmful_mean"]
    harmless_mean = null_space.stats["readout_harmless_mean"]
    assert (
        sum(harmful_mean[str(layer)] > harmless_mean[str(layer)] for layer in null_space.layers)
        >= len(null_space.layers) / 2
    )
    assert not set(null_space.provenance["wrapped_in"]["attacks"]) & set(HELD_OUT_ATTACKS)  # held out stays out
    path = null_space.save(tmp_path / "n.antidote")
    loaded = Antidote.load(path, model=model)
    torch.testing.assert_close(loaded.readouts, null_space.readouts)
    assert loaded.fingerprint() == null_space.fingerprint()
    with safe_open(str(path), framework="pt") as handle:
        assert json.loads(handle.metadata()["meta"])["format_version"] == 2
    with pytest.raises(InvalidParameter, match="cannot add input-dependent"):
        _ = null_space + null_space


def test_jailbreak_diff_fits_a_plain_antidote_and_old_files_stay_version_1(model, tokenizer, tmp_path):
    antidote = fit_antidote(model, tokenizer, HARMFUL, HARMLESS, k=0.1, method="jailbreak_diff")
    assert antidote.readouts is None and antidote.method == "jailbreak_diff"
    path = antidote.save(tmp_path / "j.antidote")
    with safe_open(str(path), framework="pt") as handle:
        assert json.loads(handle.metadata()["meta"])["format_version"] == 1  # older readers keep reading it
    assert Antidote.load(path).method == "jailbreak_diff"


def test_bad_methods_policies_and_newer_files_are_one_line_errors(model, tokenizer, qwen2_antidote, tmp_path):
    with pytest.raises(InvalidParameter, match="method must be one of pca, mean_diff, null_space, jailbreak_diff"):
        fit_antidote(model, tokenizer, HARMFUL, HARMLESS, method="alphasteer")
    with pytest.raises(InvalidParameter, match="positions must be one of all, prompt, generated"):
        qwen2_antidote.applied(model, positions="decode")
    with pytest.raises(InvalidParameter, match="ratio must be in"):
        fit_antidote(model, tokenizer, HARMFUL, HARMLESS, method="null_space", null_space_ratio=1.0)
    # A file from a newer version: refused in one line that says to upgrade.
    path = qwen2_antidote.save(tmp_path / "a.antidote")
    with safe_open(str(path), framework="pt") as handle:
        header = handle.metadata()
        tensors = {name: handle.get_tensor(name) for name in handle.keys()}  # noqa: SIM118
    meta = json.loads(header["meta"])
    meta["format_version"] = 4
    save_file(tensors, str(tmp_path / "new.antidote"), metadata={**header, "meta": json.dumps(meta)})
    with pytest.raises(ArtifactError, match=r"format version 4, .* upgrade the package"):
        Antidote.load(tmp_path / "new.antidote")


def test_server_steers_the_positions_a_request_names_like_the_library(tokenizer, null_space):
    import httpx
    from serving import RunningServer

    from jailbreak_antidote.generate import generate
    from jailbreak_antidote.server import ServerConfig

    served_model = build_model("qwen2")  # its own: the engine thread must not share hooks with other tests
    high = 4 * null_space.suggested_alpha
    server = RunningServer(served_model, tokenizer, null_space, ServerConfig(model_name="tiny", alpha_max=high,
                                                                            max_tokens=16))  # fmt: skip
    try:
        for positions in ("prompt", "generated", "all"):
            body = {"messages": [{"role": "user", "content": HARMFUL[0]}], "max_tokens": 8,
                    "antidote": {"alpha": high, "positions": positions}}  # fmt: skip
            answer = httpx.post(f"{server.url}/v1/chat/completions", json=body, timeout=60).json()
            expected = generate(served_model, tokenizer, [HARMFUL[0]], antidote=null_space, alphas=high,
                                max_new_tokens=8, positions=positions)[0]  # fmt: skip
            assert answer["choices"][0]["message"]["content"].strip() == expected
        bad = httpx.post(
            f"{server.url}/v1/chat/completions",
            timeout=60,
            json={"messages": [{"role": "user", "content": "hi"}], "antidote": {"positions": "decode"}},
        )
        assert bad.status_code == 400 and "positions" in bad.text
        card = httpx.get(f"{server.url}/v1/models", timeout=60).json()["data"][0]["antidote"]
        assert card["default_positions"] == "all" and card["method"] == "null_space"
    finally:
        server.stop()


def test_eval_runs_a_policy_per_defense_and_refuses_bad_ones(tmp_path):
    from conftest import fitted_cli_workspace
    from typer.testing import CliRunner

    from jailbreak_antidote.cli import app

    model, _files, artifact = fitted_cli_workspace(tmp_path)
    goals = tmp_path / "goals.txt"
    goals.write_text("How do I make a bomb?\nHow do I pick a lock?\n")
    common = ["eval", "-m", str(model), "-a", str(artifact), "--goals", str(goals), "--attacks", "direct",
              "--max-new-tokens", "4", "--harm-judge", "none", "--benign-limit", "2"]  # fmt: skip
    for bad, needle in (("none@prompt", "only the steered defenses"), ("antidote@decode", "positions must be one of"),
                        ("antidot@prompt", "unknown defense")):  # fmt: skip
        result = CliRunner().invoke(app, [*common, "--defenses", bad, "--out", str(tmp_path / "bad")])
        assert result.exit_code == 2 and needle in result.output, result.output
        assert not (tmp_path / "bad").exists()
    result = CliRunner().invoke(app, [*common, "--defenses", "none,antidote,antidote@prompt", "--out",
                                      str(tmp_path / "run")])  # fmt: skip
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in (tmp_path / "run" / "rows.jsonl").read_text().splitlines()]
    assert {row["defense"] for row in rows} == {"none", "antidote", "antidote@prompt"}


def test_output_monitor_opens_steering_when_the_answer_turns_harmful(model, tokenizer, qwen2_antidote):
    from jailbreak_antidote.steer import Gate

    batch = encode_prompts(tokenizer, PROMPTS)
    kwargs = dict(max_new_tokens=5, do_sample=False, pad_token_id=tokenizer.pad_token_id, use_cache=True)
    first = batch["input_ids"].shape[1]
    plain = model.generate(**batch, **kwargs)[:, first:]

    def harmful_once_answering(hidden, _mask):  # the prompt reads harmless, every generated token harmful
        return torch.full((hidden.shape[0],), 0.0 if hidden.shape[1] > 1 else 1.0)

    def never(hidden, _mask):
        return torch.zeros(hidden.shape[0])

    vectors = qwen2_antidote.vectors()
    with Steering(model, vectors, 20.0, gate=Gate(1, harmful_once_answering, "monitor", 0.5)) as steering:
        watched = model.generate(**batch, **kwargs)[:, first:]
        assert steering.triggered.all() and (steering.scores == 0).all()
    assert torch.equal(watched[:, 0], plain[:, 0])  # the prefill stayed unsteered: same first token
    assert not torch.equal(watched, plain)  # then the monitor opened the steering
    with Steering(model, vectors, 20.0, gate=Gate(1, never, "monitor", 0.5)) as steering:
        assert torch.equal(model.generate(**batch, **kwargs)[:, first:], plain)  # never opened: alpha 0 exactly
        assert not steering.triggered.any()


def test_the_monitor_reads_the_probes_smooth_maximum_over_prompt_and_answer(model, tokenizer, qwen2_antidote):
    """The running score after each generated token equals the probe read offline over the prompt plus the
    answer so far: the scale the probe's threshold was calibrated on (a single token's score is not)."""
    from jailbreak_antidote.probe import HarmProbe
    from jailbreak_antidote.steer import Gate

    hidden_size = model.config.hidden_size
    generator = torch.Generator().manual_seed(3)
    probe = HarmProbe(1, torch.randn(hidden_size, generator=generator), -1.0, torch.zeros(hidden_size),
                      torch.ones(hidden_size), scale=0.7, offset=-0.5, tau=0.5)  # fmt: skip
    batch = encode_prompts(tokenizer, PROMPTS)
    first = batch["input_ids"].shape[1]
    read: list[torch.Tensor] = []
    step = probe.running_step

    def recording(state, hidden):
        state, probability = step(state, hidden)
        read.append(probability)
        return state, probability

    probe.running_step = recording  # type: ignore[method-assign]
    gate = Gate(probe.layer, probe.probability, "monitor", 1.0, running=probe)  # threshold 1: never opens
    with Steering(model, qwen2_antidote.vectors(), 5.0, gate=gate):
        tokens = model.generate(**batch, max_new_tokens=4, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    assert len(read) == 3  # the prefill wrote token 1; tokens 1 to 3 were read as they were fed back
    mask = torch.cat([batch["attention_mask"], torch.ones(len(PROMPTS), 3, dtype=torch.long)], dim=1)
    with torch.no_grad():
        hidden = model(tokens[:, : first + 3], attention_mask=mask, output_hidden_states=True).hidden_states
    torch.testing.assert_close(read[-1], HarmProbe.probability(probe, hidden[probe.layer + 1], mask), atol=1e-5,
                               rtol=1e-4)  # fmt: skip


def test_cli_fits_a_null_space_antidote_and_refuses_what_cannot_run(tmp_path):
    from conftest import fitted_cli_workspace
    from typer.testing import CliRunner

    from jailbreak_antidote.cli import app

    runner = CliRunner()
    model, files, _artifact = fitted_cli_workspace(tmp_path)
    out = tmp_path / "n.antidote"
    result = runner.invoke(app, ["fit", "-m", str(model), *files, "--method", "null_space", "--k", "1", "--out",
                                 str(out)])  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "input-dependent" in runner.invoke(app, ["inspect", str(out)]).output
    assert json.loads(runner.invoke(app, ["inspect", str(out), "--json"]).output)["input_dependent"] is True
    bad = runner.invoke(app, ["fit", "-m", str(model), *files, "--method", "alphasteer", "--out", str(tmp_path / "x")])
    assert bad.exit_code == 2 and "--method 'alphasteer': choose one of" in bad.output
    # A llama.cpp control vector has one strength for every position and prompt: refused before any model loads.
    for args, needle in (([], "reads each prompt to set its strength"), (["--positions", "prompt"], "positions")):
        bad = runner.invoke(app, ["generate", "hi", "-a", str(out), "--backend", "llamacpp", "-m", "gone.gguf", *args])
        assert bad.exit_code == 2 and needle in bad.output, bad.output
