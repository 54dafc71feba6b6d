"""Per-tenant policies and staged rollout (`antidote serve --policy`): the file's checks, the arm assignment,
and a real server that serves each tenant by its policy, reloads it, and counts by tenant and arm."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import httpx
import pytest
import torch
from conftest import build_model
from serving import RunningServer

from jailbreak_antidote.probe import HarmProbe
from jailbreak_antidote.server import ServerConfig
from jailbreak_antidote.server.policy import (
    PolicyError,
    Rollout,
    ServerLimits,
    Setting,
    load_policy,
    parse_policy,
)

LIMITS = ServerLimits(0.0, 2.0, probe=True, any_positions=True, default=Setting(0.5, "fixed", 0.5, "all"))

POLICY = """
[tenants.acme]
api_keys = ["key-acme"]
alpha = 0.0
alpha_range = [0.0, {high}]

[tenants.acme.rollout]
name = "acme-canary"
share = 0.3
alpha = {half}
assign_by = "request"

[tenants.beta]
api_keys = ["key-beta"]
alpha = {half}
mode = "gated"
threshold = 0.5

[tenants.beta.rollout]
name = "beta-threshold"
share = 0.5
threshold = 0.2

[tenants.gamma]
api_keys = ["key-gamma"]
alpha = {high}
allow_override = false
"""


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


# ----- the file's checks -----------------------------------------------------------------------------------
def test_a_policy_file_gives_each_tenant_its_setting_range_and_rollout(tmp_path):
    policy = load_policy(write(tmp_path / "p.toml", POLICY.format(high=2.0, half=1.0)), LIMITS)
    assert policy.labels == ["acme", "beta", "gamma"]
    assert policy.keys == {"key-acme": "acme", "key-beta": "beta", "key-gamma": "gamma"}
    acme, beta, gamma = (policy.tenants[name] for name in policy.labels)
    assert acme.setting == Setting(0.0, "fixed", 0.5, "all") and acme.alpha_range == (0.0, 2.0)
    assert acme.rollout.candidate == Setting(1.0, "fixed", 0.5, "all") and acme.rollout.share == 0.3
    assert beta.setting == Setting(1.0, "gated", 0.5, "all") and beta.alpha_range == (0.0, 2.0)  # server's range
    assert beta.rollout.candidate == Setting(1.0, "gated", 0.2, "all")  # the candidate changes one field
    assert gamma.rollout is None and not gamma.allow_override


@pytest.mark.parametrize(
    "text, expected",
    [
        ("tenants = [", "not valid TOML"),
        ("", "no tenants"),
        ("[tenants.a]\napi_keys = ['k']\n[tenants.b]\napi_keys = ['k']", "listed for both tenants.a and tenants.b"),
        ("[tenants.a]\napi_keys = ['k', 'k']", "lists a key twice"),
        ("[tenants.a]\nalpha = 0.1", "tenants.a has no api_keys"),
        ("tenant_header = 'X-Tenant'\n[tenants.a]\napi_keys = ['k']", "remove api_keys"),
        ("[tenants.a]\napi_keys = ['k']\nalpha = 3.0", "alpha 3 is outside the allowed range [0, 2]"),
        ("[tenants.a]\napi_keys = ['k']\nalpha_range = [0, 5]", "must lie within the server's alpha range [0, 2]"),
        ("[tenants.a]\napi_keys = ['k']\nalpha_range = [0, 1]\n[tenants.a.rollout]\nshare = 0.1\nalpha = 1.5",
         "(the candidate): alpha 1.5 is outside the allowed range [0, 1]"),
        ("[tenants.a]\napi_keys = ['k']\n[tenants.a.rollout]\nshare = 1.5", "share of traffic in [0, 1]"),
        ("[tenants.a]\napi_keys = ['k']\n[tenants.a.rollout]\nalpha = 1.0", "share must be"),
        ("[tenants.a]\napi_keys = ['k']\nmode = 'loud'", "mode must be one of"),
        ("[tenants.a]\napi_keys = ['k']\nthreshold = 2", "threshold is a harm probability"),
        ("[tenants.a]\napi_keys = ['k']\nrefuse_threshold = 2", 'a harm probability in [0, 1] or "never"'),
        ("[tenants.a]\napi_keys = ['k']\nrefuse_threshold = 'sometimes'", "refuse_threshold is a harm probability"),
        ("[tenants.a]\napi_keys = ['k']\nrefuse_threshold = true", "refuse_threshold is a harm probability"),
        ("[tenants.a]\napi_keys = ['k']\nalpah = 1", "unknown key 'alpah' in tenants.a"),
        ("[tenants.a]\napi_keys = ['k']\nallow_override = 'no'", "allow_override must be true or false"),
        ("[tenants.a]\napi_keys = ['k']\n[tenants.a.rollout]\nshare = 0.1\nassign_by = 'ip'", "assign_by must be"),
        ("[tenants.a]\napi_keys = ['k']\nalpha = nan", "alpha must be a finite number"),
        ("[tenants.a]\napi_keys = ['k']\nalpha = " + "9" * 400, "alpha must be a finite number, got 999"),
        ("[tenants.a]\napi_keys = ['k']\nalpha = " + "9" * 5000, "not valid TOML"),
        ("[tenants.a]\napi_keys = ['k']\nalpha_range = [0, " + "9" * 400 + "]", "two finite numbers"),
        ("tenant_header = 'X-Tenant'\n[tenants.'']", "tenant name '' must be"),
        ("tenant_header = 'X-Tenant'\n[tenants.' a ']", "tenant name ' a ' must be"),
        ("tenant_header = 'X-Tenant'\n[tenants.'café']", "tenant name 'café' must be"),
        ("tenant_header = 'X-Tenant:'\n[tenants.a]", "tenant_header must be an HTTP header name"),
        ("tenant_header = 'X Tenant'\n[tenants.a]", "tenant_header must be an HTTP header name"),
        ("[tenants.a]\napi_keys = ['sk-é']", "visible ASCII"),
        ("[tenants.a]\napi_keys = [' padded ']", "visible ASCII"),
    ],
)  # fmt: skip
def test_each_bad_policy_gets_one_line_naming_the_file_the_key_and_the_fix(tmp_path, text, expected):
    path = write(tmp_path / "bad.toml", text)
    with pytest.raises(PolicyError) as caught:
        load_policy(path, LIMITS)
    message = str(caught.value)
    assert expected in message and "\n" not in message and str(path) in message


def test_a_server_key_and_tenant_keys_are_refused_together():
    guarded = dataclasses.replace(LIMITS, server_key=True)
    with pytest.raises(PolicyError, match="drop --api-key or use tenant_header"):
        parse_policy({"tenants": {"a": {"api_keys": ["k"]}}}, guarded)
    parse_policy({"tenant_header": "X-Tenant", "tenants": {"a": {}}}, guarded)  # a header policy is fine


def test_modes_and_positions_the_server_cannot_serve_are_refused():
    no_probe = dataclasses.replace(LIMITS, probe=False, any_positions=False)
    with pytest.raises(PolicyError, match="needs an antidote with a harm probe"):
        parse_policy({"tenants": {"a": {"api_keys": ["k"], "mode": "gated"}}}, no_probe)
    with pytest.raises(PolicyError, match="needs the transformers backend"):
        parse_policy({"tenants": {"a": {"api_keys": ["k"], "positions": "prompt"}}}, no_probe)
    with pytest.raises(PolicyError, match="refuse_threshold reads the harm probe"):
        parse_policy({"tenants": {"a": {"api_keys": ["k"], "refuse_threshold": 0.5}}}, no_probe)
    parse_policy({"tenants": {"a": {"api_keys": ["k"], "refuse_threshold": "never"}}}, no_probe)


def test_refuse_threshold_per_tenant_and_candidate_with_never_to_turn_a_default_off():
    refusing = dataclasses.replace(LIMITS, default=Setting(0.5, "gated", 0.4, "all", 0.7))
    policy = parse_policy({"tenants": {
        "a": {"api_keys": ["ka"]},
        "b": {"api_keys": ["kb"], "refuse_threshold": "never", "rollout": {"share": 0.1, "refuse_threshold": 0.8}},
    }}, refusing)  # fmt: skip
    assert policy.tenants["a"].setting.refuse_threshold == 0.7  # the server's default
    assert policy.tenants["b"].setting.refuse_threshold is None
    assert policy.tenants["b"].rollout.candidate.refuse_threshold == 0.8


def test_missing_and_unreadable_policy_files(tmp_path):
    with pytest.raises(PolicyError, match="does not exist"):
        load_policy(tmp_path / "nope.toml", LIMITS)
    with pytest.raises(PolicyError, match="cannot be read"):
        load_policy(tmp_path, LIMITS)
    (tmp_path / "latin1.toml").write_bytes(b"[tenants.caf\xe9]")
    with pytest.raises(PolicyError, match="UTF-8"):
        load_policy(tmp_path / "latin1.toml", LIMITS)


def test_arm_assignment_is_stable_per_unit_and_hits_its_share():
    rollout = Rollout(Setting(1.0), share=0.2, name="canary")
    arms = [rollout.arm("acme", f"user-{i}") for i in range(20_000)]
    assert arms == [rollout.arm("acme", f"user-{i}") for i in range(20_000)]  # stable
    share = arms.count("candidate") / len(arms)
    assert abs(share - 0.2) < 4 * (0.2 * 0.8 / len(arms)) ** 0.5
    renamed = Rollout(Setting(1.0), share=0.2, name="canary-2")  # a new rollout reshuffles who is in it
    assert sum(a != renamed.arm("acme", f"user-{i}") for i, a in enumerate(arms)) > 2_000
    widened = Rollout(Setting(1.0), share=0.5, name="canary")  # widening keeps everyone already in the candidate
    assert all(widened.arm("acme", f"user-{i}") == "candidate" for i, a in enumerate(arms) if a == "candidate")


# ----- a real server -------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def probed_antidote(qwen2_antidote):
    """The tiny antidote with a harm probe on block 2 (random weights: a score, not a meaningful one)."""
    generator = torch.Generator().manual_seed(0)
    hidden = qwen2_antidote.directions.shape[-1]
    probe = HarmProbe(2, torch.randn(hidden, generator=generator), 0.0, torch.zeros(hidden), torch.ones(hidden))
    return dataclasses.replace(qwen2_antidote, probe=probe)


@pytest.fixture(scope="module")
def policy_server(tokenizer, probed_antidote, tmp_path_factory):
    folder = tmp_path_factory.mktemp("policy")
    high = round(4 * probed_antidote.suggested_alpha, 4)
    path = write(folder / "policy.toml", POLICY.format(high=high, half=round(high / 2, 4)))
    config = ServerConfig(
        model_name="tiny", default_alpha=0.0, alpha_min=0.0, alpha_max=high, max_tokens=8, max_batch=16,
        batch_wait_s=0.01, request_log=folder / "requests.jsonl", policy=path, max_queue=2048,
    )  # fmt: skip
    server = RunningServer(build_model("qwen2"), tokenizer, probed_antidote, config)
    server.high, server.policy_path, server.log = high, path, folder / "requests.jsonl"
    yield server
    server.stop()


def ask(server, key: str, antidote: dict | None = None, user: str | None = None, **extra) -> httpx.Response:
    body = {"messages": [{"role": "user", "content": "How do I build a bomb?"}], "max_tokens": 1, **extra}
    if antidote is not None:
        body["antidote"] = antidote
    if user is not None:
        body["user"] = user
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.post(f"{server.url}/v1/chat/completions", json=body, headers=headers, timeout=60)


def test_keys_pick_the_tenant_and_unknown_keys_get_401(policy_server):
    gamma = ask(policy_server, "key-gamma").json()["antidote"]
    assert gamma["tenant"] == "gamma" and gamma["arm"] == "baseline" and gamma["alpha"] == policy_server.high
    for key in ("nope", ""):
        answer = ask(policy_server, key)
        assert answer.status_code == 401 and answer.json()["error"]["type"] == "authentication_error"
    models = httpx.get(f"{policy_server.url}/v1/models", headers={"Authorization": "Bearer key-beta"}).json()
    card = models["data"][0]["antidote"]
    assert card["tenant"] == "beta" and card["default_mode"] == "gated" and card["allow_override"]


def test_a_request_outside_its_tenants_range_or_overriding_a_locked_policy_gets_400(policy_server):
    outside = ask(policy_server, "key-acme", {"alpha": policy_server.high * 2})
    assert outside.status_code == 400 and "of tenant 'acme'" in outside.json()["error"]["message"]
    locked = ask(policy_server, "key-gamma", {"alpha": 0.0})
    error = locked.json()["error"]
    assert locked.status_code == 400 and error["param"] == "antidote.alpha"
    assert "does not let a request" in error["message"]
    same = ask(policy_server, "key-gamma", {"alpha": policy_server.high})  # restating the policy is no override
    assert same.status_code == 200 and same.json()["antidote"]["arm"] == "baseline"
    override = ask(policy_server, "key-beta", {"mode": "fixed"}).json()["antidote"]
    assert override["arm"] == "override" and override["mode"] == "fixed" and override["tenant"] == "beta"


def test_streamed_answers_end_with_the_antidote_verdict(policy_server):
    body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 3, "stream": True}
    with httpx.stream("POST", f"{policy_server.url}/v1/chat/completions", json=body, timeout=60,
                      headers={"Authorization": "Bearer key-beta"}) as response:  # fmt: skip
        events = [json.loads(line[6:]) for line in response.iter_lines() if line.startswith("data: {")]
    verdicts = [event["antidote"] for event in events if "antidote" in event]
    assert len(verdicts) == 1 and events[-1]["antidote"] == verdicts[0]
    assert verdicts[0]["tenant"] == "beta" and 0 <= verdicts[0]["harm_score"] <= 1
    assert isinstance(verdicts[0]["refusal"], bool)


def test_a_reload_swaps_the_policy_and_a_bad_file_keeps_the_last_good_one(policy_server, tmp_path):
    app_state = policy_server.server.config.app.state
    original = policy_server.policy_path.read_text()
    try:
        write(policy_server.policy_path, original.replace("allow_override = false", "allow_override = true"))
        assert app_state.reload_policy()
        assert ask(policy_server, "key-gamma", {"alpha": 0.0}).status_code == 200
        write(policy_server.policy_path, original + "\n[tenants.delta]\napi_keys = ['key-acme']\n")  # key reused
        assert not app_state.reload_policy()
        assert ask(policy_server, "key-gamma", {"alpha": 0.0}).status_code == 200  # still the last good one
        metrics = httpx.get(f"{policy_server.url}/metrics").text
        assert 'antidote_policy_reloads_total{result="ok"} 1.0' in metrics
        assert 'antidote_policy_reloads_total{result="failed"} 1.0' in metrics
    finally:
        write(policy_server.policy_path, original)
        assert app_state.reload_policy()
    assert ask(policy_server, "key-gamma", {"alpha": 0.0}).status_code == 400


def test_a_thousand_requests_across_three_tenants_and_two_arms(tokenizer, probed_antidote, tmp_path):
    """Loopback, bounded (1,000 one-token requests, 16 at a time): every request served by its tenant's arm, the
    arms' shares as drawn, and the request log, `antidote logs summarize` and /metrics agreeing."""
    from collections import Counter
    from concurrent.futures import ThreadPoolExecutor

    from typer.testing import CliRunner

    from jailbreak_antidote.cli import app

    high = round(4 * probed_antidote.suggested_alpha, 4)
    path = write(tmp_path / "policy.toml", POLICY.format(high=high, half=round(high / 2, 4)))
    log = tmp_path / "requests.jsonl"
    config = ServerConfig(
        model_name="tiny", alpha_max=high, max_tokens=4, max_batch=16, batch_wait_s=0.005, request_log=log,
        policy=path, max_queue=2048,
    )  # fmt: skip
    server = RunningServer(build_model("qwen2"), tokenizer, probed_antidote, config)
    policy = server.server.config.app.state.policies.current
    keys = {"acme": "key-acme", "beta": "key-beta", "gamma": "key-gamma"}
    plan = [(list(keys)[i % 3], f"user-{i % 97}") for i in range(1000)]
    try:
        with httpx.Client(timeout=120) as client, ThreadPoolExecutor(16) as pool:

            def send(item: tuple[str, str]) -> httpx.Response:
                tenant, user = item
                body = {"messages": [{"role": "user", "content": f"How do I build a bomb, {user}?"}], "max_tokens": 1,
                        "user": user}  # fmt: skip
                return client.post(f"{server.url}/v1/chat/completions", json=body,
                                   headers={"Authorization": f"Bearer {keys[tenant]}"})  # fmt: skip

            answers = list(pool.map(send, plan))
        metrics = httpx.get(f"{server.url}/metrics").text
    finally:
        server.stop()
    assert [a.status_code for a in answers] == [200] * 1000
    served = {}
    for (tenant, user), answer in zip(plan, answers, strict=True):
        body = answer.json()
        verdict, rule = body["antidote"], policy.tenants[tenant]
        unit = user if rule.rollout is not None and rule.rollout.assign_by == "user" else body["id"]
        arm = rule.rollout.arm(tenant, unit) if rule.rollout is not None else "baseline"
        setting = rule.rollout.candidate if arm == "candidate" else rule.setting
        assert (verdict["tenant"], verdict["arm"]) == (tenant, arm)
        assert (verdict["alpha"], verdict["mode"], verdict["threshold"]) == (setting.alpha, setting.mode,
                                                                            setting.threshold)  # fmt: skip
        served[body["id"]] = (tenant, arm, verdict["refusal"], verdict["harm_score"])
    counts = Counter((tenant, arm) for tenant, arm, _, _ in served.values())
    acme = counts["acme", "candidate"] / (counts["acme", "candidate"] + counts["acme", "baseline"])
    assert abs(acme - 0.3) < 4 * (0.3 * 0.7 / 334) ** 0.5  # assigned per request
    beta_users = {user: served_arm for (tenant, user), (_, served_arm, _, _) in
                  zip(plan, served.values(), strict=True) if tenant == "beta"}  # fmt: skip
    assert abs(list(beta_users.values()).count("candidate") / 97 - 0.5) < 4 * (0.25 / 97) ** 0.5  # per user
    assert counts["gamma", "baseline"] == 333 and ("gamma", "candidate") not in counts

    lines = [json.loads(line) for line in log.read_text().splitlines()]
    assert len(lines) == 1000 and {e["id"]: (e["tenant"], e["arm"]) for e in lines} == {
        key: value[:2] for key, value in served.items()
    }
    result = CliRunner().invoke(app, ["logs", "summarize", str(log), "--json"])
    assert result.exit_code == 0, result.output
    groups = {(g["tenant"], g["arm"]): g for g in json.loads(result.stdout)["groups"]}
    assert {key: g["requests"] for key, g in groups.items()} == dict(counts)
    for key, group in groups.items():
        refusals = sum(1 for t, a, refused, _ in served.values() if (t, a) == key and refused)
        scored = sum(1 for t, a, _, score in served.values() if (t, a) == key and score is not None)
        labels = f'{{arm="{key[1]}",tenant="{key[0]}"}}'
        assert group["refusals"] == refusals and group["harm_scored"] == scored
        assert f"antidote_completions_total{labels} {float(counts[key])}" in metrics
        assert f"antidote_refusals_total{labels} {float(refusals)}" in metrics
        assert f"antidote_harm_score_count{labels} {float(scored)}" in metrics


# ----- `antidote serve --policy` in its own process: start-up checks and a real SIGHUP --------------------
@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    from conftest import fitted_cli_workspace

    model, _, artifact = fitted_cli_workspace(tmp_path_factory.mktemp("serve-policy"))
    return model, artifact


LOCKED = '[tenants.a]\napi_keys = ["ka"]\nalpha = 0.0\nallow_override = {allow}\n'


@pytest.mark.parametrize(
    "text, extra, expected",
    [
        ("[tenants.a]\napi_keys = ['ka']\n[tenants.b]\napi_keys = ['ka']", [], "listed for both"),
        ("[tenants.a]\napi_keys = ['ka']\nalpha = 99", [], "alpha 99 is outside the allowed range"),
        (LOCKED.format(allow="true"), ["--api-key", "k"], "drop --api-key"),
    ],
)
def test_serve_refuses_a_bad_policy_at_start(workspace, tmp_path, text, extra, expected):
    from typer.testing import CliRunner

    from jailbreak_antidote.cli import app

    model, artifact = workspace
    policy = write(tmp_path / "policy.toml", text)
    args = ["serve", "-m", str(model), "--antidote", str(artifact), "--policy", str(policy), *extra]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2 and expected in result.output and "Traceback" not in result.output


def test_sighup_reloads_the_policy_without_dropping_requests(workspace, tmp_path):
    import signal
    import subprocess
    import sys
    import time
    from concurrent.futures import ThreadPoolExecutor

    from serving import free_port

    model, artifact = workspace
    policy = write(tmp_path / "policy.toml", LOCKED.format(allow="false"))
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    command = [sys.executable, "-m", "jailbreak_antidote", "serve", "-m", str(model), "--antidote", str(artifact),
               "--port", str(port), "--policy", str(policy), "--max-tokens", "32"]  # fmt: skip
    server = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

    def steer(max_tokens: int = 2) -> int:
        body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": max_tokens, "antidote": {"alpha": 0.01}}
        return httpx.post(f"{url}/v1/chat/completions", json=body, headers={"Authorization": "Bearer ka"},
                          timeout=60).status_code  # fmt: skip

    def reloads(result: str) -> float:
        for line in httpx.get(f"{url}/metrics", timeout=10).text.splitlines():
            if line.startswith(f'antidote_policy_reloads_total{{result="{result}"}}'):
                return float(line.split()[-1])
        return 0.0

    def after_hangup(result: str, before: float) -> None:
        server.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 30
        while reloads(result) == before:
            assert time.monotonic() < deadline, "the server did not reload"
            time.sleep(0.1)

    try:
        deadline = time.monotonic() + 120
        while True:
            assert server.poll() is None, server.stdout.read()
            try:
                if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                assert time.monotonic() < deadline, "server did not come up"
                time.sleep(0.3)
        assert steer() == 400  # the policy does not let requests set alpha
        write(policy, LOCKED.format(allow="true"))
        with ThreadPoolExecutor(8) as pool:  # requests in flight across the reload all finish
            running = [pool.submit(steer, 24) for _ in range(8)]
            after_hangup("ok", 0.0)
            statuses = [future.result() for future in running]
        assert all(status in (200, 400) for status in statuses)  # each under the old or the new policy, whole
        assert steer() == 200
        write(policy, "[tenants.a]\napi_keys = 'ka'\n")  # broken: the last good policy stays
        after_hangup("failed", 0.0)
        assert steer() == 200 and server.poll() is None
    finally:
        server.send_signal(signal.SIGINT)
        output = server.communicate(timeout=30)[0]
    assert server.returncode == 0
    assert "policy reloaded" in output and "policy reload failed, the last good policy stays in force" in output
    assert "api_keys must be a list" in output


def test_tenants_named_by_a_header_behind_one_server_key(tokenizer, qwen2_antidote, tmp_path):
    from serving import KEY

    path = write(tmp_path / "policy.toml", 'tenant_header = "X-Tenant"\n[tenants.web]\nalpha = 0.0\n'
                 "[tenants.batch]\nalpha = 0.0\nallow_override = false\n")  # fmt: skip
    config = ServerConfig(model_name="tiny", alpha_max=1.0, max_tokens=4, api_key=KEY, policy=path)
    server = RunningServer(build_model("qwen2"), tokenizer, qwen2_antidote, config)
    try:
        body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}
        assert server.post(body, headers={"X-Tenant": "web"}).json()["antidote"]["tenant"] == "web"
        for headers in ({}, {"X-Tenant": "nobody"}):
            answer = server.post(body, headers=headers)
            assert answer.status_code == 401 and "X-Tenant header" in answer.json()["error"]["message"]
        wrong_key = server.post(body, headers={"X-Tenant": "web", "Authorization": "Bearer wrong"})
        assert wrong_key.status_code == 401 and "API key" in wrong_key.json()["error"]["message"]
    finally:
        server.stop()
