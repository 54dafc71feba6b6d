"""Prometheus metrics of one server instance (own registry, so several apps in one process stay apart).

Per-request outcomes carry `tenant` and `arm` labels. Both sets are bounded: tenants come from the policy
file (one `default` tenant without one) and arms are `baseline` and `candidate`, so a caller cannot create
series by sending new values."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 40, 80, 160)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)
HARM_BUCKETS = (0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 1.0)
OUTCOME_LABELS = ("tenant", "arm")


class ServerMetrics:
    def __init__(self, alpha_max: float):
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("antidote_requests", "Chat completion requests by HTTP status", ["status"], registry=r)
        self.completions = Counter(
            "antidote_completions", "Finished chat completions by tenant and rollout arm", OUTCOME_LABELS, registry=r
        )
        self.prompt_tokens = Counter("antidote_prompt_tokens", "Prompt tokens processed", registry=r)
        self.completion_tokens = Counter("antidote_completion_tokens", "Completion tokens generated", registry=r)
        self.latency = Histogram(
            "antidote_request_latency_seconds", "Time from request to last token, by tenant and rollout arm",
            OUTCOME_LABELS, buckets=LATENCY_BUCKETS, registry=r,
        )  # fmt: skip
        self.first_token = Histogram(
            "antidote_time_to_first_token_seconds", "Time from request to first streamed text",
            buckets=LATENCY_BUCKETS, registry=r,
        )  # fmt: skip
        self.batch_size = Histogram(
            "antidote_batch_size", "Requests per decode batch", buckets=BATCH_BUCKETS, registry=r
        )
        self.refusals = Counter(
            "antidote_refusals", "Answers the refusal keyword judge flags, by tenant and rollout arm", OUTCOME_LABELS,
            registry=r,
        )  # fmt: skip
        self.probe_refusals = Counter(
            "antidote_probe_refusals", "Prompts refused outright by the harm probe (refuse_threshold), by tenant and "
            "rollout arm; also counted in antidote_refusals", OUTCOME_LABELS, registry=r,
        )  # fmt: skip
        self.harm_score = Histogram(
            "antidote_harm_score", "The harm probe's probability per request (modes with a probe), by tenant and arm",
            OUTCOME_LABELS, buckets=HARM_BUCKETS, registry=r,
        )  # fmt: skip
        steps = [round(alpha_max * i / 8, 6) for i in range(1, 9)] if alpha_max > 0 else [0.0]
        self.alpha = Histogram("antidote_alpha", "Alpha used per request", buckets=(0.0, *steps), registry=r)
        self.queued = Gauge("antidote_queue_depth", "Requests waiting for a batch", registry=r)
        self.policy_reloads = Counter(
            "antidote_policy_reloads", "Policy reloads (SIGHUP) by result: ok, or failed (the last good policy kept)",
            ["result"], registry=r,
        )  # fmt: skip

    def declare(self, tenants: list[str], arms: tuple[str, ...]) -> None:
        """Create every (tenant, arm) series at 0, so dashboards show an idle arm as 0 rather than no data."""
        for tenant in tenants:
            for arm in arms:
                for metric in (self.completions, self.refusals, self.probe_refusals, self.latency, self.harm_score):
                    metric.labels(tenant, arm)

    def render(self) -> bytes:
        return generate_latest(self.registry)
