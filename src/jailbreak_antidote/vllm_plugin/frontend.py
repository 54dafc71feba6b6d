"""The antidote in vLLM's front end (the process that takes requests): each request's antidote fields are
checked before it reaches the engine (a bad one is vLLM's validation error: HTTP 400 in the OpenAI error
format, vllm.exceptions.VLLMValidationError offline), and a steered request's prefix-cache blocks are salted
with its setting, so that a prompt prefix computed at one setting is never reused at another. Unsteered
requests (alpha 0) keep no salt of ours: their blocks are the plain model's, shared with every other
unsteered request. A client's own salt is kept in its own namespace. Gated, scaled and monitor requests,
requests that may be refused outright and steered requests of an input-dependent antidote read the whole
prompt in one engine step: they are refused (one line: the fix) by an engine that splits prompts (chunked
prefill) or pipelines layers across ranks, and read no prefix-cache blocks."""

from __future__ import annotations

import functools
from typing import Any

from ..errors import InvalidParameter
from .config import ENV_ALPHA, ENV_MODE, ENV_REFUSE, Setting, config_from_environment
from .patching import wrap_once

# How to do without what needs the whole prompt: a request's fields, the engine's environment at start.
REQUEST_FIXES = {"mode": "send antidote_mode fixed", "refuse": 'send antidote_refuse_threshold "never"',
                 "alpha": "send antidote_alpha 0"}  # fmt: skip
START_FIXES = {"mode": f"set {ENV_MODE}=fixed", "refuse": f"set {ENV_REFUSE}=never", "alpha": f"set {ENV_ALPHA}=0"}


def probe_modes_refused(vllm_config: Any) -> str | None:
    """Why this engine cannot read a prompt whole (None: it can): the harm probe pools every prompt token before
    the later blocks are steered, and an input-dependent antidote reads the prompt's last token for all of them,
    so a prompt must be read in one step, on one rank."""
    scheduler = vllm_config.scheduler_config
    if scheduler.enable_chunked_prefill or scheduler.long_prefill_token_threshold > 0:
        return ("the whole prompt is read in one engine step, and this engine splits prompts (chunked prefill): "
                "start it with --no-enable-chunked-prefill (LLM(enable_chunked_prefill=False)) and "
                "--max-num-batched-tokens at least --max-model-len")  # fmt: skip
    if vllm_config.parallel_config.pipeline_parallel_size > 1:
        return ("not applied under pipeline parallelism (the prompt's reading and the blocks it steers may sit on "
                "other ranks)")  # fmt: skip
    return None


def monitor_refused(vllm_config: Any) -> str | None:
    """Why this engine cannot apply the output monitor (None: it can): it folds one answer token per request
    and step into the running score, and speculative decoding checks several."""
    if getattr(vllm_config, "speculative_config", None) is not None:
        return "not applied with speculative decoding (several answer tokens per step); start the engine without it"
    return None


def refusal(vllm_config: Any, setting: Setting, fixes: dict[str, str]) -> str | None:
    """Why this engine cannot apply the setting, in one line naming what needs it and how to do without it
    (None: it can). `fixes`: per use ("mode", "refuse", "alpha"), the setting that turns it off."""
    refused = probe_modes_refused(vllm_config) if setting.reads_whole_prompt else None
    if refused is not None:
        uses = {"mode": setting.waits_for_probe, "refuse": setting.refuse_threshold is not None,
                "alpha": setting.input_dependent and setting.steered}  # fmt: skip
    elif setting.waits_for_probe and setting.mode == "monitor":
        refused, uses = monitor_refused(vllm_config), {"mode": True}
    if refused is None:
        return None
    names = {"mode": f"mode {setting.mode!r}", "alpha": "input-dependent steering (method null_space)",
             "refuse": f"outright refusal (from harm probability {setting.refuse_threshold or 0:g})"}  # fmt: skip
    used = [use for use, on in uses.items() if on]
    return f"{' and '.join(names[u] for u in used)}: {refused}; or {' and '.join(fixes[u] for u in used)}"


def engine_refused(vllm_config: Any) -> str | None:
    """Why the plugin cannot serve this engine at all (None: it can), in one line with the fix."""
    if vllm_config.use_v2_model_runner:
        return ("this engine runs vLLM's Model Runner V2 (forced by a feature such as watermarking), which the "
                "antidote plugin does not patch: the steering would be lost; disable that feature")  # fmt: skip
    if getattr(vllm_config.parallel_config, "use_ubatching", False):
        return ("this engine splits each step into micro-batches (--enable-dbo or --ubatch-size), whose forwards "
                "would read each other's steering: start it without them")  # fmt: skip
    return None


def streaming_input_refused(setting: Setting) -> str | None:
    """Why a chunk of a streaming-input session (one request fed in several inputs, each continuing the last
    answer) is refused (None: it is served): a session's setting, positions and probe score are taken at its
    first step, and each chunk turns the last answer into prompt, so only the unsteered model is served."""
    if not setting.steered and setting.refuse_threshold is None:
        return None
    return ("streaming-input sessions are not steered by the antidote (each input turns the last answer into "
            'prompt); send antidote_alpha 0 and antidote_refuse_threshold "never" to serve one unsteered')  # fmt: skip


def patch_engine_config() -> None:
    """Check the antidote against the model as soon as vLLM has resolved its configuration, in the process that
    starts the engine: a mismatch stops `LLM(...)` or `vllm serve` with our one-line message before any engine
    process starts (the model runner checks again when it loads the weights, as a second guard)."""
    from vllm.engine.arg_utils import EngineArgs

    wrap_once(EngineArgs, "create_engine_config", _checked_config)


def _checked_config(create):
    @functools.wraps(create)
    def create_engine_config(self, *args: Any, **kwargs: Any):
        config = config_from_environment()
        if config is not None:
            from . import use_runner_v1

            use_runner_v1()  # also when this process's first engine had no antidote
        vllm_config = create(self, *args, **kwargs)
        unsupported = engine_refused(vllm_config) if config is not None else None
        if unsupported is not None:
            raise RuntimeError(f"{unsupported}; or unset JAILBREAK_ANTIDOTE_VLLM to serve without the antidote")
        refused = refusal(vllm_config, config.default, START_FIXES) if config is not None else None
        if refused is not None:
            raise RuntimeError(f"the antidote's default {refused}")
        if config is not None:
            from ..antidote import Antidote
            from .identity import check_served_model
            from .metrics import antidote_metrics

            antidote_metrics()  # the series exist (at 0) before the first request

            model_config = vllm_config.model_config
            check_served_model(Antidote.load(config.path), model_config.model, model_config.hf_config)
        return vllm_config

    return create_engine_config


def salted(client_salt: str | None, setting: Setting) -> str | None:
    """The cache salt of a request: the client's own salt and the steering setting, in separate namespaces, so
    that no client salt can name a steered setting's blocks. Unsteered requests without a client salt keep none
    (the plain model's blocks)."""
    parts = ([f"client:{client_salt}"] if client_salt else []) + ([setting.cache_salt()] if setting.steered else [])
    return "|".join(parts) or None


def patch_input_processor() -> None:
    from vllm.v1.engine.input_processor import InputProcessor

    wrap_once(InputProcessor, "process_inputs", _checked_and_salted)


def _checked_and_salted(process):
    @functools.wraps(process)
    def process_inputs(self, request_id: str, prompt: Any, params: Any, *args: Any, **kwargs: Any):
        from vllm.exceptions import VLLMValidationError
        from vllm.sampling_params import SamplingParams

        config = config_from_environment()
        setting = None
        if config is not None and isinstance(params, SamplingParams):
            try:
                setting = config.setting(params.extra_args)
                refused = refusal(self.vllm_config, setting, REQUEST_FIXES)
                if refused is None and kwargs.get("resumable"):
                    refused = streaming_input_refused(setting)
                if refused is not None:
                    raise InvalidParameter(refused)
            except InvalidParameter as error:
                raise VLLMValidationError(str(error), parameter="vllm_xargs") from None
        if setting is not None and ((setting.steered and setting.positions != "all") or setting.reads_whole_prompt):
            # vLLM also caches blocks of generated tokens, which a later prompt (the next chat turn) may share;
            # under "prompt" or "generated" the same token is steered in one role and not in the other. A probe
            # mode's prompt blocks depend on the whole prompt's score, and the probe must read every token.
            params.skip_reading_prefix_cache = True
        request = process(self, request_id, prompt, params, *args, **kwargs)
        if setting is not None:
            from .metrics import antidote_metrics

            request.cache_salt = salted(request.cache_salt, setting)
            antidote_metrics().taken(setting)
        return request

    return process_inputs
