"""Refusing outright (engine-core process): a request whose prompt's harm score reaches its refuse threshold
is answered with the fixed refusal instead of its first generated token, and ends in that same step, as
`generate_answers(refuse_threshold=)` and `antidote serve` answer it (generate.REFUSAL_MESSAGE).

The score arrives with the output of the step that read the prompt (runner.py, held by scores.py), the step
whose sampled token is the answer's first. The scheduler appends tokens through `_update_request_with_output`;
for a refused request the wrapper appends the refusal's tokens instead and finishes the request (finish_reason
"stop", stop_reason "antidote_refusal"), so it is never scheduled again and its cache blocks are freed. The
client reads `"antidote_refused": true` beside the harm score in kv_transfer_params (scores.py). A request
with structured output (a grammar the refusal's tokens may break) or asking for logprobs, and an engine
started without a tokenizer or returning sampling masks, get an empty answer, flagged the same way.
"""

from __future__ import annotations

import functools
from typing import Any

from ..generate import REFUSAL_MESSAGE
from ..steer import reaches
from .config import config_from_environment
from .patching import wrap_once

STOP_REASON = "antidote_refusal"  # the finished request's stop_reason (the OpenAI response's `stop_reason`)


def patch_refusals() -> None:
    from vllm.v1.core.sched.async_scheduler import AsyncScheduler
    from vllm.v1.core.sched.scheduler import Scheduler

    wrap_once(Scheduler, "_update_request_with_output", _refusing)
    # The asynchronous scheduler's override counts the step's tokens against the placeholders it scheduled
    # ahead; a refusal replaces one sampled token with several, so it is answered before that override runs.
    wrap_once(AsyncScheduler, "_update_request_with_output", functools.partial(_refusing, placeholders=True), own=True)


def refuses(scheduler: Any, request: Any) -> bool:
    """Whether this step's tokens are the request's first and its prompt's score reaches its threshold."""
    if request.num_output_tokens or request.sampling_params is None:
        return False
    score = scheduler.__dict__.get("_antidote_scores", {}).get(request.request_id)
    config = config_from_environment()
    if score is None or config is None:
        return False
    threshold = config.setting(request.sampling_params.extra_args).refuse_threshold  # checked by the front end
    return threshold is not None and reaches(score, threshold)


def refusal_token_ids(scheduler: Any, request: Any) -> list[int]:
    """The refusal's tokens in the served model's tokenizer, then the request's end-of-sequence token: the front
    end leaves a stopped answer's last token out of its text, as it does a normal answer's EOS (no tokens where
    they cannot be given, see above)."""
    model_config = scheduler.vllm_config.model_config
    params = request.sampling_params
    # The step's logprobs and sampling masks have one row per sampled token: the refusal's would be read off the
    # next requests' rows. A grammar may not admit the refusal's text. Without a tokenizer there is no text.
    if model_config.skip_tokenizer_init or request.use_structured_output or params.logprobs is not None:
        return []
    if getattr(scheduler, "return_sampling_mask", False):
        return []
    tokenizer = served_tokenizer(model_config)
    ends = [params.eos_token_id, *(params.stop_token_ids or ()), tokenizer.eos_token_id]
    end = next((token_id for token_id in ends if token_id is not None), None)
    message = list(tokenizer.encode(REFUSAL_MESSAGE, add_special_tokens=False))
    return message if end is None else [*message, end]


def finished_stopped() -> Any:
    from vllm.v1.request import RequestStatus

    return RequestStatus.FINISHED_STOPPED


def served_tokenizer(model_config: Any) -> Any:
    from vllm.tokenizers import cached_tokenizer_from_config

    return cached_tokenizer_from_config(model_config)


def _refusing(update, placeholders: bool = False):
    @functools.wraps(update)
    def _update_request_with_output(self, request: Any, new_token_ids: list[int], *args: Any, **kwargs: Any):
        if not refuses(self, request):
            return update(self, request, new_token_ids, *args, **kwargs)
        is_stale = kwargs.get("is_stale", args[0] if args else False)
        if placeholders and not is_stale:
            request.num_output_placeholders -= len(new_token_ids)  # the sampled tokens this refusal replaces
        refusal = refusal_token_ids(self, request)
        for token_id in refusal:
            request.append_output_token_ids(token_id)
        request.status = finished_stopped()
        request.stop_reason = STOP_REASON
        self.__dict__.setdefault("_antidote_refused", set()).add(request.request_id)
        return refusal, True

    return _update_request_with_output
