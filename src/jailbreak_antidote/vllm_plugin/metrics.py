"""Prometheus metrics of the antidote in vLLM's front end (the process that takes requests), served on vLLM's own
`/metrics` beside its `vllm:` series, with the names `antidote serve` uses:

- `antidote_requests_total{mode}`: requests taken, by the mode they run at (`unsteered` for alpha 0, else
  fixed, gated, scaled or monitor);
- `antidote_probe_refusals_total`: prompts refused outright by the harm probe (stop_reason "antidote_refusal");
- `antidote_harm_score`: the probe's probability per finished request that has one (histogram).

They live in prometheus_client's default registry, which vLLM's `/metrics` serves; with several API servers
(PROMETHEUS_MULTIPROC_DIR set by vLLM) each process writes its own values and vLLM's collector sums them.
Requests are counted when the front end accepts them (a 400 is not counted), finished ones where it takes the
engine's outputs (`OutputProcessor.process_outputs`).
"""

from __future__ import annotations

import functools
from collections.abc import Iterable
from typing import Any

from .config import PROBE_MODES, Setting
from .patching import wrap_once
from .refusals import STOP_REASON
from .scores import RESPONSE_KEY

MODES = ("unsteered", "fixed", *PROBE_MODES)  # the requests counter's labels: a bounded set
HARM_BUCKETS = (0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 1.0)  # as antidote serve's


class AntidoteMetrics:
    """The series, created once per process (at 0 for every mode, so a dashboard shows an idle mode as 0)."""

    def __init__(self) -> None:
        from prometheus_client import Counter, Histogram

        self.requests = Counter("antidote_requests", "Requests taken by the antidote, by mode (unsteered: alpha 0)",
                                ["mode"])  # fmt: skip
        for mode in MODES:
            self.requests.labels(mode)
        self.probe_refusals = Counter(
            "antidote_probe_refusals", "Prompts refused outright by the harm probe (refuse threshold)"
        )
        self.harm_score = Histogram("antidote_harm_score", "The harm probe's probability per finished request",
                                    buckets=HARM_BUCKETS)  # fmt: skip

    def taken(self, setting: Setting) -> None:
        self.requests.labels(setting.mode if setting.steered else "unsteered").inc()

    def finished(self, outputs: Iterable[Any]) -> None:
        """Count the refusals and harm scores of the finished requests among a step's engine outputs."""
        for output in outputs:
            if output.finish_reason is None:
                continue
            if output.stop_reason == STOP_REASON:
                self.probe_refusals.inc()
            params = output.kv_transfer_params
            if isinstance(params, dict) and RESPONSE_KEY in params:
                self.harm_score.observe(params[RESPONSE_KEY])


@functools.cache
def antidote_metrics() -> AntidoteMetrics:
    return AntidoteMetrics()


def patch_output_processor() -> None:
    from vllm.v1.engine.output_processor import OutputProcessor

    wrap_once(OutputProcessor, "process_outputs", _observing)


def _observing(process):
    @functools.wraps(process)
    def process_outputs(self: Any, engine_core_outputs: list[Any], *args: Any, **kwargs: Any):
        from .config import config_from_environment

        if config_from_environment() is not None:
            antidote_metrics().finished(engine_core_outputs)
        return process(self, engine_core_outputs, *args, **kwargs)

    return process_outputs
