"""The engine worker: a Kafka consumer around one vLLM engine.

Consumes rollout.routed (group `engine`; the router put each request on a partition
this worker owns), streams rollout.completion-chunks as tokens arrive, publishes one
rollout.completions record per sample, and reloads weights on rollout.policy. A
request's offset is committed only after all its final completions are acked; a
processed-request ledger in Redis keeps a redelivered request from being generated
again. It heartbeats into the Redis registry with its partitions, its load and the
prefix blocks its engine holds (from vLLM's KV-cache events).

A request for a policy version the engine has not loaded never waits in a consumer
slot for long (one such request per slot once left an engine serving nothing):
- the version is published and loading here: wait at most `engine.reload_wait_s`;
- it is not published yet, and at most `engine.max_versions_ahead` ahead of the
  newest one: park it on rollout.deferred (`engine_workers/deferral.py` releases it
  to rollout.prompts once the version is published) and commit;
- further ahead: it can never be scheduled in reasonable time; dead-letter it.
Why a deferred topic rather than a Redis park or an in-memory wait: the request then
survives a restart of the engine and of Redis without its data (the chaos suite does
both), it is bounded per process by the deferral's slots, and a request waits where
it blocks only other waiting requests.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
import uuid
from dataclasses import dataclass, field

import msgspec
from aiokafka.structs import ConsumerRecord
from prometheus_client import CollectorRegistry
from redis.asyncio import Redis
from redis.exceptions import RedisError

from engine_workers.admission import Admission
from engine_workers.deferral import DEFERRED_SINCE
from engine_workers.engine import Engine, EngineDead
from engine_workers.metrics import EngineMetrics
from engine_workers.prefix_cache.kv_events import follow_kv_events
from engine_workers.requests import build_input
from plumbing.config import Config
from plumbing.consumer import ConsumerRunner, FatalError
from plumbing.custody import engine_signer
from plumbing.dead_letters import DeadLetters
from plumbing.kafka import Publisher
from plumbing.ledger import Ledger
from plumbing.policy_feed import PolicyFeed
from plumbing.prefix_cache.held_blocks import HeldBlocks
from plumbing.prefix_cache.index import PrefixIndex
from plumbing.trust import Signer
from schemas import Completion, CompletionChunk, PolicyUpdate, PromptRequest, Timings
from schemas.completions import completion_id
from schemas.registry import WorkerInfo
from schemas.topics import CHUNKS, COMPLETIONS, DEFERRED, ROUTED

log = logging.getLogger(__name__)

ENGINE_GROUP = "engine"


class Unschedulable(ValueError):
    """A request that can never run here in reasonable time (dead-lettered with this reason)."""


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
    signer: Signer | None = None  # None: engine.key_file, else the state dir's engine key

    def __post_init__(self) -> None:
        if self.signer is None:
            self.signer = engine_signer(self.cfg)
        self.metrics = EngineMetrics(self.registry)
        # Fail open: with Redis down the worker keeps serving (routers hash-route meanwhile).
        self.ledger = Ledger(self.redis, "engine", fail_open=True)
        self.index = PrefixIndex(self.redis, self.cfg.routing.ttl_s)
        self.blocks = HeldBlocks(policy_version=self.engine.policy_version)
        self._served_prompt_tokens = 0
        self._served_cached_tokens = 0
        self.dead_letters = DeadLetters.from_config(self.cfg, self.publisher, "engine", self.registry)
        self.admission = Admission(self.cfg.engine.max_in_flight)
        self._version_changed = asyncio.Condition()
        self.follower_letters = self.dead_letters.for_stage("policy-follower")
        self.policy = PolicyFeed(self.cfg, self.follower_letters, self._on_policy_update, self.redis)
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
        """Serve until stopped; raises FatalError when the engine dies or a background task fails.

        The policy follower, heartbeat and KV-event reader are supervised: one that ends
        stops the worker with its cause (a dead follower once left an engine serving old
        weights forever).
        """
        background = {
            asyncio.create_task(self.policy.run(), name="policy follower"),
            asyncio.create_task(self._heartbeat(), name="registry heartbeat"),
        }
        if self.engine.kv_events_endpoint:
            background.add(
                asyncio.create_task(
                    follow_kv_events(self.engine.kv_events_endpoint, self.engine.kv_events_topic, self.blocks),
                    name="KV-event reader",
                )
            )
        caught_up = asyncio.create_task(self.policy.caught_up.wait(), name="policy catch-up")
        serving: asyncio.Task[None] | None = None
        try:
            # Serve only under the newest policy: a restarted engine once served v0 while
            # it replayed every version (the chaos run's stale samples).
            await asyncio.wait(
                {caught_up, *background}, timeout=self.cfg.engine.reload_wait_s, return_when=asyncio.FIRST_COMPLETED
            )
            if not caught_up.done():
                log.warning(
                    "policy feed not caught up within %.0fs; serving v%d meanwhile",
                    self.cfg.engine.reload_wait_s,
                    self.engine.policy_version,
                )
            serving = asyncio.create_task(self.runner.run(), name="consumer")
            done, _ = await asyncio.wait({serving, *background}, return_when=asyncio.FIRST_COMPLETED)
            if serving not in done:
                failed = next(iter(done))
                cause = failed.exception() if not failed.cancelled() else None
                log.error("engine worker %s: %s ended (%r); stopping", self.worker_id, failed.get_name(), cause)
                self.runner.stop()
                await asyncio.gather(serving, return_exceptions=True)
                raise FatalError(f"{failed.get_name()} ended: {cause!r}") from cause
            await serving  # re-raises its FatalError
        finally:
            caught_up.cancel()
            if serving is None:
                self.runner.stop()
            self.policy.stop()
            for t in background:
                t.cancel()
            await asyncio.gather(*background, return_exceptions=True)
            try:
                await self.index.deregister(self.worker_id)
            except (RedisError, OSError) as err:
                log.warning("could not deregister (%s); the entry expires with its TTL", err)

    def stop(self) -> None:
        """Finish in-flight requests, commit, and return from `run`."""
        self.runner.stop()

    @property
    def ready(self) -> asyncio.Event:
        """Set once the group gave this member partitions."""
        return self.runner.assigned

    async def handle(self, req: PromptRequest, record: ConsumerRecord) -> None:
        """Generate the group of `req`, stream chunks, publish finals; returns once all are acked."""
        enqueued_at = record.timestamp / 1000 if record.timestamp else req.created_at
        inp = build_input(req, self.engine.tokenizer, self.engine.max_model_len, self.cfg.engine.max_group_size)
        if not await self._version_ready(req):
            return
        async with self.ledger.claim(req.id) as fresh:
            if not fresh:
                self.metrics.requests.labels("duplicate").inc()
                return
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

    async def _version_ready(self, req: PromptRequest) -> bool:
        """True when `req` may run now; False once it is parked on rollout.deferred (see the module doc)."""
        need = req.min_policy_version
        if self.engine.policy_version >= need:
            return True
        e = self.cfg.engine
        published = self.policy.latest(e.policy_run)
        if need <= published:
            try:
                async with self._version_changed:
                    await asyncio.wait_for(
                        self._version_changed.wait_for(lambda: self.engine.policy_version >= need), e.reload_wait_s
                    )
                return True
            except TimeoutError:
                log.warning(
                    "request %s: policy v%d published but not loaded here within %.0fs; deferring",
                    req.id,
                    need,
                    e.reload_wait_s,
                )
        elif need > published + e.max_versions_ahead:
            self.metrics.requests.labels("unschedulable").inc()
            raise Unschedulable(
                f"min_policy_version {need} is {need - published} versions ahead of the newest published policy "
                f"(v{published}); engine.max_versions_ahead={e.max_versions_ahead}: it would wait indefinitely"
            )
        since = req.metadata.get(DEFERRED_SINCE) or f"{time.time():.3f}"
        parked = msgspec.structs.replace(req, route=None, metadata={**req.metadata, DEFERRED_SINCE: since})
        await self.publisher.publish(DEFERRED.name, parked, key=req.routing_key())
        await self._release_load(req, "prefill")
        await self._release_load(req, "decode")
        self.metrics.requests.labels("deferred").inc()
        return False

    async def _generate(
        self, req: PromptRequest, prompt: str, prompt_ids: list[int], params: object, enqueued_at: float
    ) -> None:
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
                        run_id=req.run_id,
                        request_id=req.id,
                        sample_index=d.index,
                        seq=s.seq,
                        text=d.text,
                        token_ids=d.token_ids,
                        policy_version=version,
                    )
                    s.seq += 1
                    acks.append(await self.publisher.send(CHUNKS.name, chunk, key=req.id.encode()))
        finished_at = time.time()
        signer = self.signer
        assert signer is not None  # set in __post_init__
        # Signed here, the one place finals are built: verifiers and learners refuse unsigned ones.
        finals = [
            signer.sign(
                Completion(
                    id=completion_id(req.id, i),
                    run_id=req.run_id,
                    request_id=req.id,
                    group_id=req.group_id,
                    group_size=req.group_size,
                    sample_index=i,
                    session_id=req.session_id,
                    turn_index=req.turn_index,
                    prompt=prompt,
                    prompt_token_ids=prompt_ids,
                    text="".join(s.text),
                    token_ids=s.token_ids,
                    logprobs=s.logprobs,
                    finish_reason=s.finish_reason or "abort",
                    policy_version=version,
                    worker_id=self.worker_id,
                    timings=Timings(
                        enqueued_at=enqueued_at,
                        started_at=started_at,
                        first_token_at=s.first_token_at or finished_at,
                        finished_at=finished_at,
                    ),
                    prompt_tokens=len(prompt_ids),
                    cached_prompt_tokens=cached,
                    task=req.task,
                    reference=req.reference,
                    grammar=req.grammar,
                    route=req.route,
                    # The grammar mask allows end-of-sequence only where the grammar is complete,
                    # so a stop (not a length cut, not a stop string) means the output completed it.
                    grammar_completed=None
                    if req.grammar is None
                    else (s.finish_reason == "stop" and not req.sampling.stop),
                )
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
            worker_id=self.worker_id,
            host=socket.gethostname(),
            pid=os.getpid(),
            partitions=sorted(tp.partition for tp in self.runner.assignment if tp.topic == ROUTED.name),
            policy_version=self.engine.policy_version,
            block_size=self.engine.block_size,
            heartbeat_at=time.time(),
            prompt_tokens=self._served_prompt_tokens,
            cached_prompt_tokens=self._served_cached_tokens,
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

    async def _on_policy_update(self, update: PolicyUpdate, record: ConsumerRecord) -> bool:
        """Load a newer version this engine follows; an update it cannot load is dead-lettered."""
        follow = self.cfg.engine.policy_run
        if follow and update.run_id != follow:
            return False
        if update.version <= self.engine.policy_version:
            return True
        try:
            async with self.admission.exclusive():
                took = await self.engine.reload(update.weights_path, update.version)
        except EngineDead as err:
            raise FatalError(f"engine died loading policy v{update.version}: {err}") from err
        except asyncio.CancelledError:
            raise
        except Exception as err:  # noqa: BLE001 - a bad update (no weights there, wrong shapes) must not stop serving
            await self.policy.dead_letter(record, err)
            return False
        self.metrics.reload_seconds.observe(took)
        self.metrics.policy_version.set(update.version)
        async with self._version_changed:
            self._version_changed.notify_all()
        return True
