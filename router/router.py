"""The router stage: rollout.prompts -> rollout.routed, one partition of the chosen worker.

Why a router stage rather than producer-side routing: producers that know nothing of
Redis (kcat, other teams' services) publish plain requests to rollout.prompts and are
routed just the same. Why re-keying into partitions rather than worker forwarding: a
worker only ever consumes what was meant for it (no second hop), and Kafka keeps
the at-least-once guarantee: the router commits a prompt only after the routed copy
is acked. Each worker owns some rollout.routed partitions (consumer group `engine`)
and advertises them in the registry; a rebalance between decision and delivery only
costs a cache miss, never a request.

Every `primerl engine` runs one router by default (consumer group `router`), so
routers scale with engines; `primerl router` runs one alone.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
import zlib
from dataclasses import dataclass, field
from typing import Any, get_args

import msgspec
from aiokafka.structs import ConsumerRecord
from prometheus_client import CollectorRegistry, Counter, Histogram
from redis.asyncio import Redis
from redis.exceptions import RedisError

from plumbing.config import Config, RoutingPolicy
from plumbing.consumer import ConsumerMetrics, ConsumerRunner, ConsumerStage
from plumbing.dead_letters import DeadLetters
from plumbing.kafka import Publisher
from plumbing.prefix_cache.block_hashes import chain_hashes, policy_salt
from plumbing.prefix_cache.index import PrefixIndex
from plumbing.prompts import BadRequest, render_prompt
from router.cost_model import choose
from schemas import PromptRequest, Route
from schemas.registry import WorkerInfo
from schemas.topics import PROMPTS, ROUTED

log = logging.getLogger(__name__)

ROUTER_GROUP = "router"


class RouterMetrics:
    """Routing decisions, fallbacks and predicted hits."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.routed = Counter("primerl_router_routed", "Requests routed, by policy used", ["policy"], registry=registry)
        self.fallbacks = Counter(
            "primerl_router_fallbacks",
            "Requests hash-routed because the index could not be used",
            ["reason"],
            registry=registry,
        )
        self.predicted_cached = Counter(
            "primerl_router_predicted_cached_tokens",
            "Prompt tokens the router expected the chosen worker to hold",
            registry=registry,
        )
        self.prompt_tokens = Counter(
            "primerl_router_prompt_tokens", "Prompt tokens of routed requests", registry=registry
        )
        self.decision = Histogram(
            "primerl_router_decision_seconds",
            "Time to decide (Redis round trips included)",
            buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1),
            registry=registry,
        )


@dataclass
class Router(ConsumerStage):
    """Routes every prompt request to one engine worker's partition; see the module doc."""

    cfg: Config
    publisher: Publisher
    redis: Redis
    tokenizer: Any
    registry: CollectorRegistry
    policy: RoutingPolicy | None = None  # None: cfg.routing.policy (benches compare policies in one process)
    # Shared with an engine worker in the same process (one metric family per registry).
    dead_letters: DeadLetters | None = None
    consumer_metrics: ConsumerMetrics | None = None
    source_topic: str = PROMPTS.name
    routed_topic: str = ROUTED.name
    routed_partitions: int = ROUTED.partitions
    group_id: str = ROUTER_GROUP
    _workers: list[WorkerInfo] = field(default_factory=list)
    _workers_at: float = 0.0
    _redis_down_until: float = 0.0

    def __post_init__(self) -> None:
        self.policy = self.policy or self.cfg.routing.policy
        if self.policy not in get_args(RoutingPolicy):
            raise ValueError(f"routing policy must be one of {get_args(RoutingPolicy)}, not {self.policy!r}")
        self.index = PrefixIndex(self.redis, self.cfg.routing.ttl_s, self.cfg.routing.session_idle_s)
        self.metrics = RouterMetrics(self.registry)
        self._turn = itertools.count()
        # One decision at a time: each must see the pending blocks and load the last one
        # added (a burst of a group's samples would otherwise scatter). Routers in other
        # processes can still race; the next decision corrects for it.
        self._deciding = asyncio.Lock()
        self.runner = ConsumerRunner(
            self.cfg,
            topics=[self.source_topic],
            group_id=self.group_id,
            message_type=PromptRequest,
            handler=self.handle,
            dead_letters=self.dead_letters
            or DeadLetters.from_config(self.cfg, self.publisher, "router", self.registry),
            registry=None if self.consumer_metrics else self.registry,
            metrics=self.consumer_metrics,
            max_in_flight=64,
        )

    async def handle(self, req: PromptRequest, record: ConsumerRecord) -> None:
        """Route one request and wait for the routed copy's ack."""
        t0 = time.perf_counter()
        route, partition = await self.decide(req)
        self.metrics.decision.observe(time.perf_counter() - t0)
        self.metrics.routed.labels(route.policy).inc()
        await self.publisher.publish(
            self.routed_topic, msgspec.structs.replace(req, route=route), key=req.routing_key(), partition=partition
        )

    async def decide(self, req: PromptRequest) -> tuple[Route, int]:
        """The route of `req` and the rollout.routed partition to send it to."""
        if self.policy == "hash":
            return self._hashed(req, "policy")
        if time.monotonic() < self._redis_down_until:
            return self._hashed(req, "redis_unavailable")
        try:
            async with self._deciding:
                return await asyncio.wait_for(self._decide(req), self.cfg.routing.redis_timeout_s)
        except (TimeoutError, RedisError, OSError) as err:
            log.warning(
                "routing index unavailable (%s): hash-routing for %.1fs",
                type(err).__name__,
                self.cfg.routing.retry_after_s,
            )
            self._redis_down_until = time.monotonic() + self.cfg.routing.retry_after_s
            return self._hashed(req, "redis_unavailable")
        except BadRequest:
            return self._hashed(req, "unrenderable")  # the worker dead-letters it with the reason

    async def _decide(self, req: PromptRequest) -> tuple[Route, int]:
        workers = [w for w in await self._live_workers() if w.partitions]
        if not workers:
            return self._hashed(req, "no_workers")
        key = req.routing_key()
        if self.policy == "round_robin":
            w = workers[next(self._turn) % len(workers)]
            return Route(worker_id=w.worker_id, policy="round_robin"), _pick(w.partitions, key)
        _, ids = render_prompt(req, self.tokenizer)
        block_size = workers[0].block_size
        hashes = {v: chain_hashes(ids, block_size, policy_salt(v)) for v in {w.policy_version for w in workers}}
        probes = await self.index.probe(workers, hashes)
        decode = float(req.sampling.max_tokens * req.group_size)
        r = self.cfg.routing
        session = _session_of(req)
        opens = r.balance_sessions and session is not None and req.turn_index == 0
        c = choose(
            probes, len(ids), block_size, decode, r.decode_token_cost, r.latency_weight, tie_key=key, new_session=opens
        )
        w = c.probe.worker
        others = [o.worker_id for o in workers if o.worker_id != w.worker_id] if session is not None else []
        await self.index.add_route(
            w.worker_id, hashes[w.policy_version], c.prefill_tokens, decode, r.pending_ttl_s, session, others
        )
        self.metrics.predicted_cached.inc(c.predicted_cached_tokens)
        self.metrics.prompt_tokens.inc(len(ids))
        route = Route(
            worker_id=w.worker_id,
            policy="cache_aware",
            predicted_cached_tokens=c.predicted_cached_tokens,
            prefill_tokens=c.prefill_tokens,
            decode_tokens=decode,
        )
        return route, _pick(w.partitions, key)

    async def _live_workers(self) -> list[WorkerInfo]:
        now = time.monotonic()
        if now - self._workers_at > self.cfg.routing.registry_cache_s:
            self._workers = await self.index.live_workers()
            self._workers_at = now
        return self._workers

    def _hashed(self, req: PromptRequest, reason: str) -> tuple[Route, int]:
        if reason != "policy":
            self.metrics.fallbacks.labels(reason).inc()
        return Route(worker_id="", policy="hash"), zlib.crc32(req.routing_key()) % self.routed_partitions


def _session_of(req: PromptRequest) -> str | None:
    """The session a turn belongs to, as the index counts them: its routing key (an environment
    group's sessions extend one first prompt and share it), or None for one-shot work."""
    if req.session_id is None and req.session is None:
        return None
    return req.routing_key().decode()


def _pick(partitions: list[int], key: bytes) -> int:
    """A stable partition of the worker for `key` (a session keeps its order)."""
    return sorted(partitions)[zlib.crc32(key) % len(partitions)]
