"""`antidote serve` (registered in cli.py): the OpenAI-compatible server."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from . import bundled
from .cli import (
    BackendOption,
    DtypeOption,
    ModelOption,
    NoRefuseOption,
    _check,
    _load,
    app,
    err,
    friendly_errors,
    resolve_refuse_threshold,
)
from .errors import InvalidParameter

if TYPE_CHECKING:  # torch loads only when a command runs, so `--help` stays fast
    from .antidote import Antidote


def strength_defaults(
    antidote: Antidote, alpha: float | None, alpha_min: float, alpha_max: float | None
) -> tuple[float, float, float]:
    """(default alpha, smallest, largest alpha a request may ask for).

    The default is --alpha if given, else the tuned alpha `antidote tune` stored, else 0: an untuned strength
    (the fit's suggestion is only a starting point) can make ordinary answers worse than the unsteered model's
    (on SmolLM2-135M the suggested 4.4 turns a sentence about cats into "a creature of purest evil")."""
    from .steer import check_alpha

    tuned_or_zero = antidote.default_alpha if antidote.tuned else 0.0
    default = tuned_or_zero if alpha is None else check_alpha(alpha)
    low = check_alpha(alpha_min)
    top = max(antidote.alpha.get("range", [0, 0])[1], antidote.suggested_alpha, default)
    high = check_alpha(alpha_max if alpha_max is not None else top)
    if not low <= default <= high:
        which = "--alpha" if alpha is not None else ("the tuned alpha" if antidote.tuned else "the default alpha")
        raise InvalidParameter(f"{which} {default:g} is outside [--alpha-min {low:g}, --alpha-max {high:g}]; "
                               "pass an --alpha inside that range")  # fmt: skip
    return default, low, high


def strength_summary(
    antidote: Antidote, default: float, low: float, high: float, mode: str, threshold: float, explicit: bool
) -> str:
    """The startup line that says which strength requests get when they send none, and why."""
    allowed = f"requests may set alpha in [{low:g}, {high:g}]"
    gate = "" if mode == "fixed" else f", {mode} mode at threshold {threshold:g}"
    if explicit:
        return f"strength in use: alpha {default:g} (--alpha){gate}; {allowed}"
    if antidote.tuned:
        return f"strength in use: alpha {default:g}{gate}, tuned by `antidote tune`; {allowed}"
    return (
        f"strength in use: alpha 0 (unsteered): this antidote holds no tuned strength, and its fit's suggestion "
        f"({antidote.suggested_alpha:g}) is not checked against ordinary answers; run `antidote tune` on it, or "
        f"pass --alpha; {allowed}"
    )


@app.command()
@friendly_errors
def serve(
    model: ModelOption = None,
    dtype: DtypeOption = "float32",
    backend: BackendOption = "transformers",
    antidote_path: Annotated[
        Path | None,
        typer.Option("--antidote", "-a", help="A .antidote file [default: fit on the built-in set, cached]"),
    ] = None,
    no_antidote: Annotated[bool, typer.Option("--no-antidote", help="Serve the model undefended")] = False,
    alpha: Annotated[
        float | None,
        typer.Option(
            help="Default strength for requests that send none [default: the tuned alpha stored by `antidote tune`; "
            "without one, 0 (unsteered), since an untuned strength can make ordinary answers worse]"
        ),
    ] = None,
    alpha_min: Annotated[float, typer.Option(help="Smallest alpha a request may ask for")] = 0.0,
    alpha_max: Annotated[
        float | None, typer.Option(help="Largest alpha a request may ask for [default: the artifact's range top]")
    ] = None,
    mode: Annotated[
        str | None,
        typer.Option(
            help="Default mode: fixed, gated, scaled (by the harm probe) or monitor (gated, and the probe reads the "
            "answer as it is written) [default: tuned, or fixed]"
        ),
    ] = None,
    threshold: Annotated[
        float | None,
        typer.Option(help="Default harm probability from which gated mode steers [default: tuned, or 0.5]"),
    ] = None,
    positions: Annotated[
        str | None,
        typer.Option(
            help="Default positions steered: all (the paper), prompt (the prefill only) or generated; a request may "
            "set its own [default: tuned, or all]"
        ),
    ] = None,
    refuse_threshold: Annotated[
        float | None,
        typer.Option(
            help="Default harm probability from which a prompt is refused outright, without generating (needs the "
            "harm probe; the answer says finish_reason content_filter) [default: tuned, or never]"
        ),
    ] = None,
    no_refuse: NoRefuseOption = False,
    host: Annotated[str, typer.Option(help="Interface to listen on")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port")] = 8000,
    api_key: Annotated[
        str | None,
        typer.Option(
            envvar="ANTIDOTE_API_KEY", help="Require 'Authorization: Bearer KEY' on /v1/* [default: no key, open]"
        ),
    ] = None,
    max_batch: Annotated[int, typer.Option(help="Most requests decoded together in one batch")] = 16,
    max_tokens: Annotated[
        int,
        typer.Option(
            help="Most new tokens a request may ask for; a request that sends no max_tokens gets this much, or the "
            "room left in the model's context if that is less"
        ),
    ] = 1024,
    served_model_name: Annotated[
        str | None, typer.Option(help="Model id clients send and /v1/models lists [default: --model]")
    ] = None,
    request_log: Annotated[
        Path | None, typer.Option(help="Append one JSON line per request here [default: stderr]")
    ] = None,
    log_prompts: Annotated[bool, typer.Option(help="Also log prompt and answer text (off: counts only)")] = False,
    policy: Annotated[
        Path | None,
        typer.Option(
            help="TOML file of tenants (by API key or by a header), each with its default setting, allowed alpha "
            "range, override rule and optional staged rollout (docs/SERVING.md); reloaded on SIGHUP "
            "[default: one tenant with the settings above]"
        ),
    ] = None,
) -> None:
    """Serve an OpenAI-compatible chat API; each request may set its own strength with
    `{"antidote": {"alpha": 0.4}}` in the body (`extra_body` in the openai client)."""
    import uvicorn

    from .antidote import Antidote
    from .fit import builtin_antidote
    from .generate import check_control_vector
    from .server import ServerConfig, create_app
    from .server.app import server_limits
    from .server.policy import load_policy
    from .steer import check_positions

    if max_batch < 1 or max_tokens < 1:
        raise InvalidParameter("--max-batch and --max-tokens must be at least 1")
    if no_antidote and antidote_path is not None:
        raise InvalidParameter("give --antidote or --no-antidote, not both")
    steering = {"--alpha": alpha, "--alpha-max": alpha_max, "--mode": mode, "--threshold": threshold,
                "--positions": positions, "--refuse-threshold": refuse_threshold}  # fmt: skip
    given = [flag for flag, value in steering.items() if value is not None] + (["--alpha-min"] if alpha_min else [])
    if no_antidote and given:
        raise InvalidParameter(f"--no-antidote serves the model unsteered, so {', '.join(given)} would do nothing; "
                               "drop them or the --no-antidote")  # fmt: skip
    if threshold is not None and not 0 <= threshold <= 1:
        raise InvalidParameter(f"--threshold is a harm probability in [0, 1], got {threshold}")
    if positions is not None:
        check_positions(positions)
    if policy is not None:  # the file's syntax and keys before the model loads; its values once the range is known
        _precheck_policy(policy, api_key)
    antidote = Antidote.load(antidote_path) if antidote_path else None
    if antidote is not None and no_refuse:
        antidote = antidote.without_refusals()  # its best steering-only point, not the one tuned with refusals
    if antidote is not None and backend == "llamacpp":
        check_control_vector(antidote, positions)  # before the model loads
    if antidote is not None or refuse_threshold is not None:  # the built-in antidote has no probe
        refuse_threshold = resolve_refuse_threshold(antidote, refuse_threshold, no_refuse, backend)
    if model is None and antidote is not None and antidote.model.get("name") in bundled.BUNDLED:
        model = antidote.model["name"]
    lm, tokenizer = _load(model, dtype, backend)
    name = model or bundled.DEFAULT_MODEL
    if antidote is not None:
        _check(antidote, lm)
    elif not no_antidote and backend == "llamacpp":
        raise InvalidParameter("with --backend llamacpp give --antidote FILE (fit one with `antidote fit`)")
    elif not no_antidote:
        antidote = builtin_antidote(lm, tokenizer, name, log=err.print)
    tuned_mode, tuned_threshold = antidote.default_mode if antidote is not None else ("fixed", 0.5)
    mode, threshold = mode or tuned_mode, tuned_threshold if threshold is None else threshold
    if antidote is None:
        default, low, high = 0.0, 0.0, 0.0
    else:
        default, low, high = strength_defaults(antidote, alpha, alpha_min, alpha_max)
        antidote.gate(mode, threshold)  # a bad mode or threshold, or no probe for gated / scaled
    positions = positions or (antidote.default_positions if antidote is not None else "all")
    if mode != "fixed" and (antidote is None or backend == "llamacpp"):
        raise InvalidParameter("--mode gated / scaled needs an antidote with a harm probe on the transformers backend")
    config = ServerConfig(
        model_name=served_model_name or name, default_alpha=float(default), default_mode=mode,
        default_threshold=threshold, default_positions=positions, default_refuse_threshold=refuse_threshold,
        alpha_min=float(low),
        alpha_max=float(high), api_key=api_key, max_tokens=max_tokens,
        max_batch=max_batch, request_log=request_log, log_prompts=log_prompts, policy=policy,
    )  # fmt: skip
    tenants = None
    if policy is not None:
        tenants = load_policy(policy, server_limits(config, antidote, backend == "llamacpp")).labels
    err.print(f"serving {config.model_name} on http://{host}:{port}/v1", highlight=False)
    if antidote is None:
        err.print("strength in use: none (no antidote; requests may not set alpha)", highlight=False)
    else:
        summary = strength_summary(antidote, default, low, high, mode, threshold, explicit=alpha is not None)
        summary += "" if positions == "all" else f"; steering {positions} positions only"
        if refuse_threshold is not None:
            summary += f"; prompts with harm probability >= {refuse_threshold:g} are refused outright"
        err.print(summary, highlight=False)
    if tenants is not None:
        err.print(f"policy {policy}: tenants {', '.join(tenants)} (reload: kill -HUP {os.getpid()})", highlight=False)
    uvicorn.run(create_app(lm, tokenizer, antidote, config), host=host, port=port, log_level="warning")


def _precheck_policy(path: Path, api_key: str | None) -> None:
    """What can be checked in a policy file without the model: it reads, parses, has its keys in place."""
    from .server.policy import ServerLimits, Setting, load_policy

    # Wide limits: the values are checked again against the real range once the artifact is loaded.
    wide = ServerLimits(0.0, float("inf"), True, True, Setting(0.0), server_key=api_key is not None)
    load_policy(path, wide)
