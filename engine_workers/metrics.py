"""Prometheus metrics of an engine worker."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)


class EngineMetrics:
    """Requests, tokens, latency and cache figures of one engine worker."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.requests = Counter("primerl_engine_requests", "Prompt requests by outcome", ["outcome"], registry=registry)
        self.samples = Counter("primerl_engine_samples", "Final completions published", registry=registry)
        self.generated_tokens = Counter("primerl_engine_generated_tokens", "Tokens generated", registry=registry)
        self.prompt_tokens = Counter(
            "primerl_engine_prompt_tokens", "Prompt tokens of served requests", registry=registry
        )
        self.cached_prompt_tokens = Counter(
            "primerl_engine_cached_prompt_tokens",
            "Prompt tokens served from the prefix cache (vLLM's count)",
            registry=registry,
        )
        self.ttfb = Histogram(
            "primerl_engine_ttfb_seconds",
            "Enqueue on the prompts topic to the first token",
            buckets=_LATENCY_BUCKETS,
            registry=registry,
        )
        self.e2e = Histogram(
            "primerl_engine_e2e_seconds",
            "Enqueue to the final completion acked",
            buckets=_LATENCY_BUCKETS,
            registry=registry,
        )
        self.in_flight = Gauge("primerl_engine_in_flight", "Requests in the engine", registry=registry)
        self.policy_version = Gauge("primerl_engine_policy_version", "Policy version being served", registry=registry)
        self.predicted_hits = Counter(
            "primerl_engine_routed_hits",
            "Requests the router sent here expecting cached prefix blocks",
            registry=registry,
        )
        self.predicted_hits_missed = Counter(
            "primerl_engine_routed_hits_missed",
            "Of those, requests where vLLM found fewer cached tokens than the router predicted",
            registry=registry,
        )
        self.index_sync_failures = Counter(
            "primerl_engine_index_sync_failures",
            "Registry heartbeats that failed (Redis down or slow)",
            registry=registry,
        )
        self.ledger_unavailable = Gauge(
            "primerl_engine_ledger_unavailable", "Requests handled without the Redis ledger (outage)", registry=registry
        )
        self.reload_seconds = Histogram(
            "primerl_engine_reload_seconds",
            "Weight reload time (drain excluded)",
            buckets=_LATENCY_BUCKETS,
            registry=registry,
        )
        self.resumed_samples = Counter(
            "primerl_engine_resumed_samples",
            "Samples of redelivered requests continued from their chunk log (issue 22)",
            registry=registry,
        )
        self.resumed_tokens = Counter(
            "primerl_engine_resumed_tokens",
            "Tokens carried over from a chunk log instead of generated again",
            registry=registry,
        )
        self.resume_restarts = Counter(
            "primerl_engine_resume_restarts",
            "Samples with chunks in the log that restarted anyway (policy rule, or no clean chain)",
            registry=registry,
        )
        self.resume_scan_seconds = Histogram(
            "primerl_engine_resume_scan_seconds",
            "Reading one redelivered request's chunk log back",
            buckets=_LATENCY_BUCKETS,
            registry=registry,
        )
