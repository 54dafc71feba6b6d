"""jailbreak-antidote as a vLLM general plugin (entry point group `vllm.general_plugins`).

    JAILBREAK_ANTIDOTE_VLLM=m.antidote python -m vllm.entrypoints.openai.api_server --model M ...

With JAILBREAK_ANTIDOTE_VLLM naming a `.antidote` file fitted on the served model, every request is steered
at its own setting: `SamplingParams(extra_args={"antidote_alpha": 0.5})` offline, `"vllm_xargs":
{"antidote_alpha": 0.5}` over HTTP; absent fields take the artifact's tuned default (or
JAILBREAK_ANTIDOTE_VLLM_ALPHA / _POSITIONS). Without the variable the plugin does nothing. See docs/VLLM.md.
"""

from __future__ import annotations

from pathlib import Path

SUPPORTED_VLLM = ("0.32.",)  # versions whose runner internals the patches were written and tested against


def check_vllm_version(version: str) -> None:
    """Raise RuntimeError (one line: the version found, the ones supported, the fix) for an unsupported vLLM."""
    if not version.startswith(SUPPORTED_VLLM):
        raise RuntimeError(
            f"jailbreak-antidote's vLLM plugin supports vLLM {', '.join(v + 'x' for v in SUPPORTED_VLLM)}, found "
            f"{version}; install a supported one (pip install 'jailbreak-antidote[vllm]') or unset "
            "JAILBREAK_ANTIDOTE_VLLM"
        )


def use_runner_v1() -> None:
    """The patches live in vLLM's V1 model runner (the CPU build's only one; on GPUs vLLM 0.32 prefers Model
    Runner V2 when Triton is present): ask for V1, and refuse a user's explicit request for V2."""
    import os

    if os.environ.get("VLLM_USE_V2_MODEL_RUNNER", "").strip().lower() in ("1", "true"):
        raise RuntimeError(
            "jailbreak-antidote's vLLM plugin runs in the V1 model runner; unset VLLM_USE_V2_MODEL_RUNNER (or set "
            "it to 0), or unset JAILBREAK_ANTIDOTE_VLLM to serve without the antidote"
        )
    os.environ["VLLM_USE_V2_MODEL_RUNNER"] = "0"  # read later by vLLM's config, inherited by its processes


def register() -> None:
    """vLLM calls this in every process it starts. The patches are installed whenever the vLLM version is a
    supported one, and act only while JAILBREAK_ANTIDOTE_VLLM is set (read again at each use, so one process
    may start engines with and without it). Configured, a bad configuration or an unsupported vLLM stops the
    engine with one line. Idempotent: vLLM may call this more than once per process."""
    import vllm

    from .config import config_from_environment

    config = config_from_environment()
    if config is None and not vllm.__version__.startswith(SUPPORTED_VLLM):
        return  # not asked for, and could not be applied here: leave vLLM alone
    check_vllm_version(vllm.__version__)
    if config is not None:
        use_runner_v1()
    from .frontend import patch_engine_config, patch_input_processor
    from .metrics import patch_output_processor
    from .refusals import patch_refusals
    from .runner import patch_model_runners
    from .scores import patch_scheduler
    from .streaming import patch_streams

    patch_engine_config()
    patch_input_processor()
    patch_output_processor()
    patch_model_runners()
    patch_scheduler()
    patch_refusals()
    patch_streams()
    salt_compile_cache()


def salt_compile_cache() -> None:
    """vLLM keys its torch.compile caches (AOT and inductor) by its config and its own environment variables, not
    by hooks added to the model: a graph compiled without the antidote (or with another one) would be loaded
    and the steering silently lost. Add the served artifact's digest to those keys."""
    import hashlib

    import vllm.envs as envs

    from .config import config_from_environment
    from .patching import wrap_once

    def salted(original):
        def compile_factors() -> dict[str, object]:
            config = config_from_environment()
            if config is None:
                return original()
            digest = hashlib.sha256(Path(config.path).read_bytes()).hexdigest()
            return {**original(), "JAILBREAK_ANTIDOTE_VLLM": f"{digest}:hooks-v1"}

        return compile_factors

    wrap_once(envs, "compile_factors", salted)
