"""Prometheus view of the engine core's speculation counters (read at scrape time)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector


class SpeculationCollector(Collector):
    """Exports the counters `stats()` returns (see scheduler.GrammarSpecScheduler.stats)."""

    def __init__(self, stats: Callable[[], dict[str, Any]]) -> None:
        self._stats = stats

    def collect(self) -> Iterator[Metric]:
        """One family per counter; nothing before the engine's first step."""
        s = self._stats()
        if not s:
            return
        drafted = CounterMetricFamily(
            "primerl_spec_drafted_tokens", "Draft tokens proposed, by source", labels=["source"]
        )
        accepted = CounterMetricFamily(
            "primerl_spec_accepted_tokens", "Draft tokens accepted, by source", labels=["source"]
        )
        for source in ("forced", "ngram"):
            drafted.add_metric([source], s[f"{source}_drafted"])
            accepted.add_metric([source], s[f"{source}_accepted"])
        yield drafted
        yield accepted
        yield CounterMetricFamily(
            "primerl_spec_forced_tokens_emitted",
            "Tokens emitted without a forward pass of their own (grammar-forced drafts accepted)",
            value=s["forced_emitted"],
        )
        yield CounterMetricFamily(
            "primerl_spec_generated_tokens", "Tokens emitted by the engine core", value=s["generated"]
        )
        yield CounterMetricFamily(
            "primerl_spec_fallbacks", "Times a draft source was switched off", value=s["fallbacks"]
        )
        yield CounterMetricFamily(
            "primerl_spec_grammar_tokens", "Emitted tokens of requests with a grammar", value=s["grammar_tokens"]
        )
        yield GaugeMetricFamily(
            "primerl_spec_accepted_mask_ratio",
            "Share of emitted grammar tokens the grammar mask accepts (must be 1.00)",
            value=s["grammar_tokens_accepted"] / s["grammar_tokens"] if s["grammar_tokens"] else 1.0,
        )
        total_d = s["forced_drafted"] + s["ngram_drafted"]
        yield GaugeMetricFamily(
            "primerl_spec_acceptance_rate",
            "Accepted over drafted tokens since start",
            value=(s["forced_accepted"] + s["ngram_accepted"]) / total_d if total_d else 0.0,
        )
        on = GaugeMetricFamily(
            "primerl_spec_source_on",
            "1 while a draft source is on for a workload (0: fallen back)",
            labels=["source", "workload"],
        )
        for workload, sources in s.get("sources_on", {}).items():
            for source, value in sources.items():
                on.add_metric([source, workload], value)
        yield on
        by_batch = GaugeMetricFamily(
            "primerl_spec_drafting",
            "1 while drafting is on for a workload (grammar, or free "
            "text) and batch-size bucket (0: steps without drafts measured faster)",
            labels=["workload", "batch"],
        )
        for workload, buckets in s.get("drafting_by_batch", {}).items():
            for bucket, value in buckets.items():
                by_batch.add_metric([workload, bucket], value)
        yield by_batch
        yield GaugeMetricFamily(
            "primerl_spec_break_even_acceptance",
            "Acceptance a draft token needs to pay for its verification at the current batch",
            value=s["break_even"],
        )
        # In seconds, the base unit: promtool's lint fails a name with an abbreviated unit (_ms).
        cost = GaugeMetricFamily(
            "primerl_spec_step_cost_seconds",
            "Fitted step time at the current batch: fixed + per_token x tokens",
            labels=["part"],
        )
        cost.add_metric(["fixed"], s["step_fixed_ms"] / 1000)
        cost.add_metric(["per_token"], s["step_per_token_ms"] / 1000)
        yield cost
