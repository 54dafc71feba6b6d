"""The harm score back to the client (engine-core process).

The model runner reads each prompt's p(harmful) in its prefill (runner.py) and sends the step's scores with
the step's output, `{request id: p}`. The scheduler keeps them until the request finishes and returns its
score with the final output, in the one per-request field vLLM 0.32 carries from the engine to the client:
`kv_transfer_params` (`RequestOutput.kv_transfer_params` offline, `"kv_transfer_params"` in a non-streaming
OpenAI response), as {"antidote_harm_score": p}, beside whatever a KV connector puts there. Requests whose
prompt the probe did not read whole (a fixed request split by chunked prefill or served from the prefix
cache) have no score, as do antidotes without a probe. A request refused outright also carries
{"antidote_refused": true}.
"""

from __future__ import annotations

import functools
from typing import Any

from .patching import wrap_once

OUTPUT_FIELD = "antidote_harm_scores"  # on the runner's output: {request id: p} read in that step
RESPONSE_KEY = "antidote_harm_score"  # in the finished request's kv_transfer_params
REFUSED_KEY = "antidote_refused"  # there too, true when the prompt was refused outright (refusals.py)


def patch_scheduler() -> None:
    from vllm.v1.core.sched.scheduler import Scheduler

    wrap_once(Scheduler, "update_from_output", _collecting)
    wrap_once(Scheduler, "_free_request", _returning)


def _collecting(update):
    @functools.wraps(update)
    def update_from_output(self, scheduler_output: Any, model_runner_output: Any, *args: Any, **kwargs: Any):
        scores = getattr(model_runner_output, OUTPUT_FIELD, None)
        if scores:
            held = self.__dict__.setdefault("_antidote_scores", {})
            held.update({request_id: p for request_id, p in scores.items() if request_id in self.requests})
        return update(self, scheduler_output, model_runner_output, *args, **kwargs)

    return update_from_output


def _returning(free):
    @functools.wraps(free)
    def _free_request(self, request: Any, *args: Any, **kwargs: Any):
        kv_transfer_params, ec_transfer_params = free(self, request, *args, **kwargs)
        score = self.__dict__.get("_antidote_scores", {}).pop(request.request_id, None)
        if score is not None:
            kv_transfer_params = {**(kv_transfer_params or {}), RESPONSE_KEY: score}
        if request.request_id in self.__dict__.get("_antidote_refused", ()):
            self._antidote_refused.discard(request.request_id)
            kv_transfer_params = {**(kv_transfer_params or {}), REFUSED_KEY: True}
        return kv_transfer_params, ec_transfer_params

    return _free_request
