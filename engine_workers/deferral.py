"""The deferral stage: rollout.deferred -> (the policy version is published) -> rollout.prompts.

Consumer group `deferral`, embedded in every engine process (`engine.deferral_embedded`).
An engine parks here a request whose `min_policy_version` is not published yet (see
engine_workers/worker.py); this stage holds up to `engine.max_parked` of them, each
waiting for its version, and re-publishes it to rollout.prompts, so it is routed
afresh under the new policy (the prefix cache is salted by version). A request parked
longer than `engine.park_timeout_s` (counted from its first parking, which it carries
in its metadata) is dead-lettered with that reason.

Parking holds offsets of rollout.deferred only: a released request commits once every
earlier one of its partition is released or expired, and a restart may release one
again, which the engine's ledger turns into a no-op.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass

import msgspec
from aiokafka.structs import ConsumerRecord
from prometheus_client import CollectorRegistry, Counter, Gauge

from plumbing.config import Config
from plumbing.consumer import ConsumerMetrics, ConsumerRunner, ConsumerStage
from plumbing.dead_letters import DeadLetters
from plumbing.kafka import Publisher
from plumbing.policy_feed import PolicyFeed
from schemas import PromptRequest
from schemas.topics import DEFERRED, PROMPTS

log = logging.getLogger(__name__)

DEFERRAL_GROUP = "deferral"
DEFERRED_SINCE = "primerl.deferred_since"  # metadata the engine sets when it first parks a request


class ParkTimeout(ValueError):
    """A parked request whose policy version was not published in time."""


class _Metrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.parked = Gauge(
            "primerl_deferral_parked", "Requests parked, waiting for their policy version", registry=registry
        )
        self.released = Counter(
            "primerl_deferral_released", "Parked requests released to rollout.prompts", registry=registry
        )
        self.expired = Counter(
            "primerl_deferral_expired", "Parked requests dead-lettered after park_timeout_s", registry=registry
        )


@dataclass
class Deferral(ConsumerStage):
    """See the module doc. `policy` is the process's policy feed (shared with its engine worker)."""

    cfg: Config
    publisher: Publisher
    policy: PolicyFeed
    dead_letters: DeadLetters
    registry: CollectorRegistry
    consumer_metrics: ConsumerMetrics | None = None

    def __post_init__(self) -> None:
        self.metrics = _Metrics(self.registry)
        self.runner = ConsumerRunner(
            self.cfg,
            topics=[DEFERRED.name],
            group_id=DEFERRAL_GROUP,
            message_type=PromptRequest,
            handler=self.handle,
            dead_letters=self.dead_letters,
            registry=None if self.consumer_metrics else self.registry,
            metrics=self.consumer_metrics,
            max_in_flight=self.cfg.engine.max_parked,
        )

    async def handle(self, req: PromptRequest, record: ConsumerRecord) -> None:
        """Wait for `req`'s version (bounded), then re-publish it to rollout.prompts."""
        e = self.cfg.engine
        since = _since(req, record)
        self.metrics.parked.inc()
        try:
            ready = await self.policy.wait_for(
                e.policy_run, req.min_policy_version, since + e.park_timeout_s - time.time()
            )
        finally:
            self.metrics.parked.dec()
        if not ready:
            self.metrics.expired.inc()
            raise ParkTimeout(
                f"policy v{req.min_policy_version} not published within engine.park_timeout_s={e.park_timeout_s:.0f}s "
                f"(newest: v{self.policy.latest(e.policy_run)})"
            )
        await self.publisher.publish(PROMPTS.name, msgspec.structs.replace(req, route=None), key=req.routing_key())
        self.metrics.released.inc()


def _since(req: PromptRequest, record: ConsumerRecord) -> float:
    """When the request was first parked: its metadata, else the record's time (never in the future)."""
    now = time.time()
    fallback = record.timestamp / 1000 if record.timestamp else now
    try:
        since = float(req.metadata.get(DEFERRED_SINCE, ""))
    except ValueError:
        return min(fallback, now)
    return min(since, now) if math.isfinite(since) else min(fallback, now)
