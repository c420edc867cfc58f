"""The engine worker: a Kafka consumer around one vLLM engine.

Consumes rollout.routed (group `engine`; the router put each request on a partition
this worker owns), streams rollout.completion-chunks as tokens arrive, publishes one
rollout.completions record per sample, and reloads weights on rollout.policy. A
request's offset is committed only after all its final completions are acked; a
processed-request ledger in Redis keeps a redelivered request from being generated
again. It heartbeats into the Redis registry with its partitions, its load and the
prefix blocks its engine holds (from vLLM's KV-cache events).
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
import uuid
from dataclasses import dataclass, field

from aiokafka import AIOKafkaConsumer
from aiokafka.structs import ConsumerRecord
from prometheus_client import CollectorRegistry
from redis.asyncio import Redis
from redis.exceptions import RedisError

from engine_workers.admission import Admission
from engine_workers.engine import Engine, EngineDead
from engine_workers.metrics import EngineMetrics
from engine_workers.prefix_cache.held_blocks import HeldBlocks
from engine_workers.prefix_cache.index import PrefixIndex, WorkerInfo
from engine_workers.prefix_cache.kv_events import follow_kv_events
from engine_workers.requests import build_input
from plumbing.config import Config
from plumbing.consumer import ConsumerRunner, FatalError
from plumbing.dead_letters import DeadLetters
from plumbing.kafka import Publisher, common_kwargs
from plumbing.ledger import Ledger
from schemas import Completion, CompletionChunk, PolicyUpdate, PromptRequest, Timings, decode
from schemas.completions import completion_id
from schemas.topics import CHUNKS, COMPLETIONS, POLICY, ROUTED

log = logging.getLogger(__name__)

ENGINE_GROUP = "engine"


@dataclass
class _Sample:
    text: list[str] = field(default_factory=list)
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    finish_reason: str = ""
    first_token_at: float = 0.0
    seq: int = 0


@dataclass
class EngineWorker:
    """Serves prompt requests from Kafka with `engine`; see the module doc."""

    cfg: Config
    engine: Engine
    publisher: Publisher
    redis: Redis
    registry: CollectorRegistry
    worker_id: str = field(default_factory=lambda: f"engine-{uuid.uuid4().hex[:8]}")

    def __post_init__(self) -> None:
        self.metrics = EngineMetrics(self.registry)
        # Fail open: with Redis down the worker keeps serving (routers hash-route meanwhile).
        self.ledger = Ledger(self.redis, "engine", fail_open=True)
        self.index = PrefixIndex(self.redis, self.cfg.routing.ttl_s)
        self.blocks = HeldBlocks(policy_version=self.engine.policy_version)
        self._served_prompt_tokens = 0
        self._served_cached_tokens = 0
        self.dead_letters = DeadLetters(self.publisher, "engine", self.cfg.run_id, self.registry)
        self.admission = Admission(self.cfg.engine.max_in_flight)
        self._version_changed = asyncio.Condition()
        self.runner = ConsumerRunner(
            self.cfg,
            topics=[ROUTED.name],
            group_id=ENGINE_GROUP,
            message_type=PromptRequest,
            handler=self.handle,
            dead_letters=self.dead_letters,
            registry=self.registry,
            max_in_flight=self.cfg.engine.max_in_flight,
            client_id=self.worker_id,
        )

    async def run(self) -> None:
        """Serve until stopped; raises FatalError when the engine dies."""
        tasks = [asyncio.create_task(self._follow_policy()), asyncio.create_task(self._heartbeat())]
        if self.engine.kv_events_endpoint:
            tasks.append(asyncio.create_task(
                follow_kv_events(self.engine.kv_events_endpoint, self.engine.kv_events_topic, self.blocks)))
        try:
            await self.runner.run()
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            try:
                await self.index.deregister(self.worker_id)
            except (RedisError, OSError) as err:
                log.warning("could not deregister (%s); the entry expires with its TTL", err)

    def stop(self) -> None:
        """Finish in-flight requests, commit, and return from `run`."""
        self.runner.stop()

    async def handle(self, req: PromptRequest, record: ConsumerRecord) -> None:
        """Generate the group of `req`, stream chunks, publish finals; returns once all are acked."""
        enqueued_at = record.timestamp / 1000 if record.timestamp else req.created_at
        inp = build_input(req, self.engine.tokenizer, self.engine.max_model_len)
        async with self.ledger.claim(req.id) as fresh:
            if not fresh:
                self.metrics.requests.labels("duplicate").inc()
                return
            async with self._version_changed:
                await self._version_changed.wait_for(lambda: self.engine.policy_version >= req.min_policy_version)
            async with self.admission.slot():
                self.metrics.in_flight.inc()
                try:
                    await self._generate(req, inp.prompt, inp.prompt_token_ids, inp.params, enqueued_at)
                except EngineDead as err:
                    raise FatalError(f"engine died: {err}") from err
                finally:
                    self.metrics.in_flight.dec()
            await self.ledger.mark(req.id)
        self.metrics.requests.labels("ok").inc()
        self.metrics.ledger_unavailable.set(self.ledger.unavailable)

    async def _generate(self, req: PromptRequest, prompt: str, prompt_ids: list[int], params: object, enqueued_at: float) -> None:
        version = self.engine.policy_version
        started_at = time.time()
        samples = [_Sample() for _ in range(req.group_size)]
        acks = []
        cached = 0
        engine_request_id = f"{req.id}:{uuid.uuid4().hex[:8]}"  # unique even if redelivered while running
        prefill_released = False
        async for step in self.engine.stream(prompt_ids, params, engine_request_id):
            cached = max(cached, step.num_cached_tokens)
            if not prefill_released:
                prefill_released = True
                await self._release_load(req, "prefill")
            for d in step.deltas:
                s = samples[d.index]
                if d.token_ids and not s.first_token_at:
                    s.first_token_at = time.time()
                    self.metrics.ttfb.observe(s.first_token_at - enqueued_at)
                s.text.append(d.text)
                s.token_ids.extend(d.token_ids)
                s.logprobs.extend(d.logprobs)
                if d.finish_reason:
                    s.finish_reason = d.finish_reason
                if d.token_ids or d.text:
                    chunk = CompletionChunk(
                        run_id=req.run_id, request_id=req.id, sample_index=d.index, seq=s.seq,
                        text=d.text, token_ids=d.token_ids, policy_version=version,
                    )
                    s.seq += 1
                    acks.append(await self.publisher.send(CHUNKS.name, chunk, key=req.id.encode()))
        finished_at = time.time()
        finals = [
            Completion(
                id=completion_id(req.id, i), run_id=req.run_id, request_id=req.id, group_id=req.group_id,
                group_size=req.group_size, sample_index=i, session_id=req.session_id, turn_index=req.turn_index,
                prompt=prompt, prompt_token_ids=prompt_ids, text="".join(s.text), token_ids=s.token_ids,
                logprobs=s.logprobs, finish_reason=s.finish_reason or "abort", policy_version=version,
                worker_id=self.worker_id,
                timings=Timings(enqueued_at=enqueued_at, started_at=started_at,
                                first_token_at=s.first_token_at or finished_at, finished_at=finished_at),
                prompt_tokens=len(prompt_ids), cached_prompt_tokens=cached, task=req.task, reference=req.reference,
                grammar=req.grammar, route=req.route,
                # The grammar mask allows end-of-sequence only where the grammar is complete,
                # so a stop (not a length cut, not a stop string) means the output completed it.
                grammar_completed=None if req.grammar is None else (s.finish_reason == "stop" and not req.sampling.stop),
            )
            for i, s in enumerate(samples)
        ]
        await self._release_load(req, "decode")
        await asyncio.gather(*acks)
        await self.publisher.publish_many(COMPLETIONS.name, [(c, req.group_id.encode()) for c in finals])
        self.metrics.samples.inc(len(finals))
        self.metrics.generated_tokens.inc(sum(len(s.token_ids) for s in samples))
        self.metrics.prompt_tokens.inc(len(prompt_ids))
        self.metrics.cached_prompt_tokens.inc(cached)
        self._served_prompt_tokens += len(prompt_ids)
        self._served_cached_tokens += cached
        if req.route is not None and req.route.predicted_cached_tokens > 0:
            self.metrics.predicted_hits.inc()
            if cached < req.route.predicted_cached_tokens:
                self.metrics.predicted_hits_missed.inc()
        self.metrics.e2e.observe(time.time() - enqueued_at)

    async def _release_load(self, req: PromptRequest, kind: str) -> None:
        """Take this request's share off the load the router added to its worker."""
        r = req.route
        if r is None or not r.worker_id:
            return
        try:
            await self.index.release(r.worker_id, kind, r.prefill_tokens if kind == "prefill" else r.decode_tokens)
        except (RedisError, OSError) as err:
            log.debug("load release failed (%s); the load key expires with its worker", err)

    def info(self) -> WorkerInfo:
        """This worker as the registry shows it."""
        return WorkerInfo(
            worker_id=self.worker_id, host=socket.gethostname(), pid=os.getpid(),
            partitions=sorted(tp.partition for tp in self.runner.assignment if tp.topic == ROUTED.name),
            policy_version=self.engine.policy_version, block_size=self.engine.block_size, heartbeat_at=time.time(),
            prompt_tokens=self._served_prompt_tokens, cached_prompt_tokens=self._served_cached_tokens,
            in_flight=self.admission.running,
        )

    async def _heartbeat(self) -> None:
        """Register this worker and index its blocks every `heartbeat_s`; resync after an outage."""
        resync = True
        while True:
            try:
                self.blocks.policy_version = self.engine.policy_version
                await self.index.heartbeat(self.info(), self.blocks, resync)
                if resync:
                    log.info("registered in the routing index: %d blocks held", len(self.blocks.by_vllm))
                resync = False
            except (RedisError, OSError) as err:
                if not resync:
                    log.warning("registry heartbeat failed (%s): will resync the index", type(err).__name__)
                self.metrics.index_sync_failures.inc()
                resync = True
            await asyncio.sleep(self.cfg.routing.heartbeat_s)

    async def _follow_policy(self) -> None:
        """Read every policy update (no group: each engine sees all) and load newer versions."""
        consumer = AIOKafkaConsumer(POLICY.name, **common_kwargs(self.cfg), group_id=None, auto_offset_reset="earliest")
        await consumer.start()
        try:
            async for record in consumer:
                try:
                    update = decode(record.value or b"", PolicyUpdate, list(record.headers or ()))
                    follow = self.cfg.engine.policy_run
                    if (follow and update.run_id != follow) or update.version <= self.engine.policy_version:
                        continue
                    async with self.admission.exclusive():
                        took = await self.engine.reload(update.weights_path, update.version)
                    self.metrics.reload_seconds.observe(took)
                    self.metrics.policy_version.set(update.version)
                    async with self._version_changed:
                        self._version_changed.notify_all()
                except asyncio.CancelledError:
                    raise
                except Exception as err:  # noqa: BLE001 - a bad update must not stop serving
                    await self.dead_letters.send(record, err)
        finally:
            await consumer.stop()
