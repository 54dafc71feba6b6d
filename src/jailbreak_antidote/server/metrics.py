"""Prometheus metrics of one server instance (own registry, so several apps in one process stay apart)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 40, 80, 160)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)


class ServerMetrics:
    def __init__(self, alpha_max: float):
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("antidote_requests", "Chat completion requests by HTTP status", ["status"], registry=r)
        self.prompt_tokens = Counter("antidote_prompt_tokens", "Prompt tokens processed", registry=r)
        self.completion_tokens = Counter("antidote_completion_tokens", "Completion tokens generated", registry=r)
        self.latency = Histogram(
            "antidote_request_latency_seconds", "Time from request to last token", buckets=LATENCY_BUCKETS, registry=r
        )
        self.first_token = Histogram(
            "antidote_time_to_first_token_seconds", "Time from request to first streamed text",
            buckets=LATENCY_BUCKETS, registry=r,
        )  # fmt: skip
        self.batch_size = Histogram(
            "antidote_batch_size", "Requests per decode batch", buckets=BATCH_BUCKETS, registry=r
        )
        self.refusals = Counter("antidote_refusals", "Answers the refusal keyword judge flags", registry=r)
        steps = [round(alpha_max * i / 8, 6) for i in range(1, 9)] if alpha_max > 0 else [0.0]
        self.alpha = Histogram("antidote_alpha", "Alpha used per request", buckets=(0.0, *steps), registry=r)
        self.queued = Gauge("antidote_queue_depth", "Requests waiting for a batch", registry=r)

    def render(self) -> bytes:
        return generate_latest(self.registry)
