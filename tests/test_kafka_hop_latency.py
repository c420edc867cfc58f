"""perf/kafka_hop_latency.py on the session's broker: each record is timed from publish to consume."""

from __future__ import annotations

from perf.kafka_hop_latency import hop_latency
from plumbing.config import Config


async def test_each_record_to_an_idle_consumer_is_timed(cfg: Config) -> None:
    latencies = await hop_latency(cfg.bootstrap, 100, 3)
    assert len(latencies) == 3 and all(0 < s < 10 for s in latencies), latencies
