"""The vLLM plugin's settings: which antidote, its default strength and allowed range (from the environment),
and each request's own setting (from `SamplingParams.extra_args`, or `vllm_xargs` over HTTP).

Pure Python: read in every vLLM process (front end, engine core, workers) and tested without vLLM.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

from ..errors import InvalidParameter
from ..steer import MODES, POSITIONS

ENV_ANTIDOTE = "JAILBREAK_ANTIDOTE_VLLM"
ENV_ALPHA = "JAILBREAK_ANTIDOTE_VLLM_ALPHA"
ENV_ALPHA_MIN = "JAILBREAK_ANTIDOTE_VLLM_ALPHA_MIN"
ENV_ALPHA_MAX = "JAILBREAK_ANTIDOTE_VLLM_ALPHA_MAX"
ENV_POSITIONS = "JAILBREAK_ANTIDOTE_VLLM_POSITIONS"
ENV_MODE = "JAILBREAK_ANTIDOTE_VLLM_MODE"
ENV_THRESHOLD = "JAILBREAK_ANTIDOTE_VLLM_THRESHOLD"
# The harm probability from which a prompt is refused outright (the artifact's tuned refuse_threshold unless
# set): a number in [0, 1], or "never" (then a refusing artifact serves the best steering-only point of its tune
# curve, as `antidote serve --no-refuse`).
ENV_REFUSE = "JAILBREAK_ANTIDOTE_VLLM_REFUSE"

# Request fields: flat, so that the OpenAI server's `vllm_xargs` (a flat str -> str/number map) carries them.
FIELDS = ("antidote_alpha", "antidote_mode", "antidote_threshold", "antidote_positions", "antidote_refuse_threshold")
PROBE_MODES = ("gated", "scaled", "monitor")  # the strength depends on the harm probe read over the whole prompt
POSITIONS_CODE = {name: code for code, name in enumerate(POSITIONS)}  # the runner's per-request policy array


@dataclass(frozen=True)
class Setting:
    """One request's steering: strength alpha (0 = the unmodified model, bit for bit), positions policy, and
    mode (fixed; gated or scaled by the harm probe at `threshold`, as `steer.Gate`); and the harm probability
    from which its prompt is refused outright (None: never), as `generate_answers(refuse_threshold=)`.
    `input_dependent`: the served antidote's strength is read per prompt (method null_space)."""

    alpha: float
    positions: str = "all"
    mode: str = "fixed"
    threshold: float = 0.5
    refuse_threshold: float | None = None
    input_dependent: bool = False

    @property
    def steered(self) -> bool:
        return self.alpha != 0.0

    @property
    def waits_for_probe(self) -> bool:
        """Whether the strength depends on the probe's score of the prompt (gated or scaled, steered)."""
        return self.steered and self.mode in PROBE_MODES

    @property
    def reads_whole_prompt(self) -> bool:
        """Whether the request needs its whole prompt read in one engine step: the probe's score (its strength
        waits for it, or it may be refused outright), or an input-dependent strength (read at the prompt's
        last token, applied to every prompt token)."""
        return self.waits_for_probe or self.refuse_threshold is not None or (self.input_dependent and self.steered)

    def cache_salt(self) -> str:
        """What keeps prefix-cache blocks computed under this setting from serving another setting."""
        gate = f":{self.threshold!r}" if self.mode in ("gated", "monitor") else ""
        return f"antidote:{self.mode}{gate}:{self.alpha!r}:{self.positions}"


@dataclass(frozen=True)
class PluginConfig:
    """The served antidote and the strengths requests may ask for."""

    path: Path
    default: Setting
    alpha_min: float
    alpha_max: float
    has_probe: bool = False
    input_dependent: bool = False

    def setting(self, extra_args: dict[str, Any] | None) -> Setting:
        """The setting of a request with these extra_args; absent fields take the defaults.

        Raises InvalidParameter (one line naming the field and the fix) for an unknown antidote_* field, a
        value of the wrong type, an alpha outside [alpha_min, alpha_max], a threshold outside [0, 1], a mode or
        policy not served, or a probe mode on an antidote without a harm probe."""
        given = {k: v for k, v in (extra_args or {}).items() if k.startswith("antidote")}
        unknown = sorted(set(given) - set(FIELDS))
        if unknown:
            raise InvalidParameter(f"unknown request field {unknown[0]!r}; the antidote fields are {', '.join(FIELDS)}")
        alpha = self.default.alpha
        if "antidote_alpha" in given:
            alpha = _number(given["antidote_alpha"], "antidote_alpha")
            if not self.alpha_min <= alpha <= self.alpha_max:
                raise InvalidParameter(
                    f"antidote_alpha {alpha:g} is outside the allowed range [{self.alpha_min:g}, {self.alpha_max:g}]"
                )
        mode = str(given.get("antidote_mode", self.default.mode))
        check_mode(mode, self.has_probe, "antidote_mode")
        threshold = self.default.threshold
        if "antidote_threshold" in given:
            name = "antidote_threshold"
            threshold = check_threshold(_number(given[name], name), name)
        positions = str(given.get("antidote_positions", self.default.positions))
        if positions not in POSITIONS:
            raise InvalidParameter(f"antidote_positions must be one of {', '.join(POSITIONS)}, got {positions!r}")
        refuse = self.default.refuse_threshold
        if "antidote_refuse_threshold" in given:
            refuse = refuse_threshold(given["antidote_refuse_threshold"], "antidote_refuse_threshold", self.has_probe)
        return Setting(alpha, positions, mode, threshold, refuse, input_dependent=self.input_dependent)


def refuse_threshold(value: Any, name: str, has_probe: bool) -> float | None:
    """A refuse threshold from a request field or the environment: "never" (None) or a harm probability."""
    if value == "never":
        return None
    try:
        threshold = check_threshold(_number(value, name), name)
    except InvalidParameter:
        raise InvalidParameter(f'{name} must be a harm probability in [0, 1] or "never", got {value!r}') from None
    if not has_probe:
        fix = "unset it" if name == ENV_REFUSE else 'send "never"'
        raise InvalidParameter(
            f"{name} needs the antidote's harm probe, and this antidote has none; add one with `antidote probe`, "
            f"or {fix}"
        )
    return threshold


def check_mode(mode: str, has_probe: bool, name: str) -> str:
    if mode not in MODES:
        raise InvalidParameter(f"{name} must be one of {', '.join(MODES)}, got {mode!r}")
    if mode in PROBE_MODES and not has_probe:
        raise InvalidParameter(
            f"{name} {mode!r} needs the antidote's harm probe, and this antidote has none; add one with "
            "`antidote probe`, or use mode fixed"
        )
    return mode


def check_threshold(threshold: float, name: str) -> float:
    if not 0 <= threshold <= 1:
        raise InvalidParameter(f"{name} is a harm probability in [0, 1], got {threshold:g}")
    return threshold


def _number(value: Any, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise InvalidParameter(f"{name} must be a number, got {value!r}")
    try:
        number = float(value)
    except ValueError:
        raise InvalidParameter(f"{name} must be a number, got {value!r}") from None
    if not math.isfinite(number):
        raise InvalidParameter(f"{name} must be finite, got {value!r}")
    return number


def _env_number(name: str) -> float | None:
    raw = os.environ.get(name)
    return None if raw in (None, "") else _number(raw, name)


def config_from_environment() -> PluginConfig | None:
    """The plugin's configuration from the environment, or None when JAILBREAK_ANTIDOTE_VLLM is unset (the
    plugin then does nothing). Cached per process.

    Raises ArtifactError for a missing or unreadable file, InvalidParameter for bad numbers, a default outside
    the range, or an artifact or default this plugin cannot apply (a probe it cannot read,
    a probe mode or a refuse threshold without a probe)."""
    environment = (ENV_ALPHA, ENV_ALPHA_MIN, ENV_ALPHA_MAX, ENV_POSITIONS, ENV_MODE, ENV_THRESHOLD, ENV_REFUSE)
    return _config(os.environ.get(ENV_ANTIDOTE) or None, *(os.environ.get(name) for name in environment))


@cache
def _config(path: str | None, *_environment: str | None) -> PluginConfig | None:
    if path is None:
        return None
    from ..antidote import Antidote
    from ..cli_serve import strength_defaults

    antidote = Antidote.load(path)
    raw_refuse = os.environ.get(ENV_REFUSE) or None
    refuse = antidote.default_refuse_threshold
    if raw_refuse is not None:
        refuse = refuse_threshold(raw_refuse, ENV_REFUSE, antidote.probe is not None)
    # "never" on a refusing artifact: the point tuned jointly with refusals is weaker alone
    refusing = antidote.default_refuse_threshold is not None and refuse is None
    if refusing:
        antidote = antidote.without_refusals()
    if antidote.probe is not None and antidote.probe.pooling != "max":
        raise InvalidParameter(
            f"{path} has a harm probe read at the last prompt token (pooling {antidote.probe.pooling!r}, written by an "
            "older version), which the vLLM plugin does not read; refit it with `antidote probe` (max pooling)"
        )
    alpha = _env_number(ENV_ALPHA)
    low = _env_number(ENV_ALPHA_MIN)
    default, low, high = strength_defaults(antidote, alpha, 0.0 if low is None else low, _env_number(ENV_ALPHA_MAX))
    tuned_mode, tuned_threshold = antidote.default_mode
    mode = os.environ.get(ENV_MODE) or tuned_mode
    has_probe = antidote.probe is not None
    check_mode(mode, has_probe, ENV_MODE)
    if refusing and default == 0 and alpha is None:
        raise InvalidParameter(
            f"{path}: without its outright refusals the best point of its tune curve does not steer (alpha 0), so "
            f"this would serve the undefended model; set {ENV_ALPHA} to a steering strength, or leave "
            f"{ENV_REFUSE} unset to refuse as tuned"
        )
    threshold = _env_number(ENV_THRESHOLD)
    threshold = tuned_threshold if threshold is None else check_threshold(threshold, ENV_THRESHOLD)
    positions = os.environ.get(ENV_POSITIONS) or antidote.default_positions
    if positions not in POSITIONS:
        raise InvalidParameter(f"{ENV_POSITIONS} must be one of {', '.join(POSITIONS)}, got {positions!r}")
    input_dependent = antidote.readout_vectors() is not None
    default_setting = Setting(default, positions, mode, threshold, refuse, input_dependent=input_dependent)
    return PluginConfig(Path(path), default_setting, low, high, has_probe=has_probe, input_dependent=input_dependent)
