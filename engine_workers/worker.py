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
from collections.abc import Coroutine
from dataclasses import dataclass, field
from typing import Any

import msgspec
from aiokafka.errors import KafkaError
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
from engine_workers.resume import (
    Continuation,
    Prefix,
    format_hint,
    held_back_text,
    parse_hint,
    prefixes,
    read_chunks,
    republished,
    usable,
)
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
from schemas import Completion, CompletionChunk, PolicyUpdate, PromptRequest, Session, Timings, keys
from schemas.completions import VersionSpan, completion_id
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
    resumed_at: int | None = None  # tokens carried over from a dead attempt's chunks
    spans: list[VersionSpan] = field(default_factory=list)  # of the carried-over prefix
    continuation: Continuation | None = None  # a resumed sample's text across the boundary


@dataclass
class _Attempt:
    """One generation attempt of a request: what its streams share."""

    req: PromptRequest
    attempt: str
    version: int
    prompt_tokens: int
    cached: int = 0
    prefill_released: bool = False
    acks: list[asyncio.Future[Any]] = field(default_factory=list)
    hint: asyncio.Task[None] | None = None


def _spans(s: _Sample, version: int) -> list[VersionSpan]:
    """Version spans of a sample, only when it mixes versions (a prefix from an older one)."""
    if s.resumed_at is None or {sp.version for sp in s.spans} <= {version}:
        return []
    spans = list(s.spans)
    if len(s.token_ids) > s.resumed_at and spans[-1].version != version:
        spans.append(VersionSpan(s.resumed_at, version))
    return spans


def _session_of(req: PromptRequest, i: int, prompt_len: int) -> Session | None:
    """The session sample `i` of `req` continues: a first turn fans out into one session per sample."""
    if req.session is None or req.turn_index > 0:
        return req.session
    return msgspec.structs.replace(
        req.session,
        sample_index=i,
        group_size=req.group_size,
        prompt_len=prompt_len,
        sampling=req.session.sampling or req.sampling,
    )


async def _all(streams: list[Coroutine[Any, Any, None]]) -> None:
    """Run the streams of one attempt together; the first failure cancels the rest (an
    engine death surfaces as itself, not wrapped in an exception group)."""
    tasks = [asyncio.ensure_future(c) for c in streams]
    try:
        await asyncio.gather(*tasks)
    except BaseException:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        raise


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
        e = self.engine
        inp = build_input(req, e.tokenizer, e.max_model_len, self.cfg.engine.max_group_size, e.vocab_size)
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
        self, req: PromptRequest, prompt: str, prompt_ids: list[int], params: Any, enqueued_at: float
    ) -> None:
        version = self.engine.policy_version
        started_at = time.time()
        samples = [_Sample() for _ in range(req.group_size)]
        # Unique even if redelivered while running; also the attempt id on its chunks.
        attempt = f"{req.id}:{uuid.uuid4().hex[:8]}"
        run = _Attempt(req=req, attempt=attempt, version=version, prompt_tokens=len(prompt_ids))
        max_tokens = int(params.max_tokens)
        jobs: list[tuple[list[int], Any, str, list[int]]] = []
        for i, pre in (await self._resumable(req, version)).items():
            s = samples[i]
            s.resumed_at = len(pre.token_ids)
            s.text, s.token_ids, s.logprobs = list(pre.texts), list(pre.token_ids), list(pre.logprobs)
            s.spans = list(pre.spans)
            s.finish_reason = pre.finish_reason or ("length" if len(pre.token_ids) >= max_tokens else "")
            for c in republished(pre, req.run_id, req.id, attempt):
                await self._send_chunk(run, c)
                s.seq = c.seq + 1
            if not s.finish_reason:
                s.continuation = Continuation(held_back_text(self.engine.tokenizer, pre), list(req.sampling.stop))
                rest = params.clone()
                rest.n = 1
                rest.max_tokens = max_tokens - len(pre.token_ids)
                rest.min_tokens = max(0, int(params.min_tokens) - len(pre.token_ids))
                jobs.append((prompt_ids + pre.token_ids, rest, f"{attempt}/{i}", [i]))
        fresh = [i for i, s in enumerate(samples) if s.resumed_at is None]
        if fresh:
            group = params
            if len(fresh) < req.group_size:
                group = params.clone()
                group.n = len(fresh)
            jobs.insert(0, (prompt_ids, group, attempt, fresh))
        await _all([self._stream(run, samples, *job, enqueued_at) for job in jobs])
        if not jobs:
            await self._release_load(req, "prefill")
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
                    group_size=session.group_size if session is not None else req.group_size,
                    sample_index=session.sample_index if session is not None else i,
                    session_id=req.session_id or (f"{req.group_id}/{i}" if session is not None else None),
                    turn_index=req.turn_index,
                    session=session,
                    prompt=prompt,
                    prompt_token_ids=prompt_ids,
                    text="".join(s.text),
                    token_ids=s.token_ids,
                    logprobs=s.logprobs,
                    finish_reason=s.finish_reason or "abort",
                    policy_version=min([version, *(sp.version for sp in s.spans)]),
                    worker_id=self.worker_id,
                    timings=Timings(
                        enqueued_at=enqueued_at,
                        started_at=started_at,
                        first_token_at=s.first_token_at or finished_at,
                        finished_at=finished_at,
                    ),
                    prompt_tokens=len(prompt_ids),
                    cached_prompt_tokens=run.cached,
                    task=req.task,
                    reference=req.reference,
                    grammar=req.grammar,
                    route=req.route,
                    # The grammar mask allows end-of-sequence only where the grammar is complete,
                    # so a stop (not a length cut, not a stop string) means the output completed it.
                    grammar_completed=None
                    if req.grammar is None
                    else (s.finish_reason == "stop" and not req.sampling.stop),
                    resumed_at_token=s.resumed_at,
                    policy_spans=_spans(s, version),
                )
            )
            for i, s in enumerate(samples)
            for session in (_session_of(req, i, len(prompt_ids)),)
        ]
        await self._release_load(req, "decode")
        await asyncio.gather(*run.acks)
        if run.hint is not None:
            await run.hint
        await self.publisher.publish_many(COMPLETIONS.name, [(c, req.group_id.encode()) for c in finals])
        self.metrics.samples.inc(len(finals))
        self.metrics.generated_tokens.inc(sum(len(s.token_ids) - (s.resumed_at or 0) for s in samples))
        self.metrics.prompt_tokens.inc(len(prompt_ids))
        self.metrics.cached_prompt_tokens.inc(run.cached)
        self._served_prompt_tokens += len(prompt_ids)
        self._served_cached_tokens += run.cached
        if req.route is not None and req.route.predicted_cached_tokens > 0:
            self.metrics.predicted_hits.inc()
            if run.cached < req.route.predicted_cached_tokens:
                self.metrics.predicted_hits_missed.inc()
        self.metrics.e2e.observe(time.time() - enqueued_at)

    async def _stream(
        self,
        run: _Attempt,
        samples: list[_Sample],
        token_ids: list[int],
        params: Any,
        engine_request_id: str,
        indices: list[int],
        enqueued_at: float,
    ) -> None:
        """One engine request's outputs into `samples` (engine output index k is sample `indices[k]`)."""
        async for step in self.engine.stream(token_ids, params, engine_request_id):
            # A continuation's prompt holds its prefix too: count only the request's prompt.
            run.cached = max(run.cached, min(step.num_cached_tokens, run.prompt_tokens))
            if not run.prefill_released:
                run.prefill_released = True
                await self._release_load(run.req, "prefill")
            for d in step.deltas:
                i = indices[d.index]
                s = samples[i]
                if d.token_ids and not s.first_token_at:
                    s.first_token_at = time.time()
                    self.metrics.ttfb.observe(s.first_token_at - enqueued_at)
                text, finish, cut = d.text, d.finish_reason or "", False
                if s.continuation is not None:
                    text, cut = s.continuation.feed(d.text, bool(finish))
                    finish = "stop" if cut else finish
                s.text.append(text)
                s.token_ids.extend(d.token_ids)
                s.logprobs.extend(d.logprobs)
                if finish:
                    s.finish_reason = finish
                if d.token_ids or text or finish:
                    chunk = CompletionChunk(
                        run_id=run.req.run_id,
                        request_id=run.req.id,
                        sample_index=i,
                        seq=s.seq,
                        text=text,
                        token_ids=d.token_ids,
                        policy_version=run.version,
                        logprobs=d.logprobs,
                        finish_reason=finish,
                        attempt=run.attempt,
                    )
                    s.seq += 1
                    await self._send_chunk(run, chunk)
                if cut:
                    # A stop string across the resume point: vLLM cannot see it, so the
                    # sample ends here (a continuation is a one-sample engine request).
                    await self.engine.abort(engine_request_id)
                    return

    async def _send_chunk(self, run: _Attempt, chunk: CompletionChunk) -> None:
        ack = await self.publisher.send(CHUNKS.name, chunk, key=run.req.id.encode())
        run.acks.append(ack)
        if run.hint is None and self.cfg.engine.resume:
            run.hint = asyncio.create_task(self._store_hint(run.req.id, ack))

    async def _store_hint(self, request_id: str, ack: asyncio.Future[Any]) -> None:
        """Point at the request's first acked chunk (kept if an earlier attempt set it: scans start there)."""
        meta = await ack
        try:
            await self.redis.set(
                keys.resume_hint(request_id),
                format_hint(meta.partition, meta.offset),
                nx=True,
                ex=max(1, int(self.cfg.engine.resume_hint_ttl_s)),
            )
        except (RedisError, OSError) as err:
            log.debug("resume pointer of %s not stored (%s): a redelivery restarts it", request_id, err)

    async def _resumable(self, req: PromptRequest, version: int) -> dict[int, Prefix]:
        """The samples of `req` a dead attempt left clean acknowledged prefixes of (engine_workers/resume.py).

        A first delivery finds no pointer and costs one GET. Grammar-constrained samples
        restart: the grammar state would start over on the continuation.
        """
        e = self.cfg.engine
        if not e.resume or req.grammar is not None:
            return {}
        try:
            hint = parse_hint(await self.redis.get(keys.resume_hint(req.id)))
        except (RedisError, OSError):
            return {}
        if hint is None:
            return {}
        try:
            chunks, stats = await read_chunks(
                self.cfg,
                CHUNKS.name,
                req.id,
                *hint,
                timeout_s=e.resume_scan_timeout_s,
                max_records=e.resume_max_records,
            )
        except (KafkaError, OSError) as err:
            log.warning("chunk log of %s unreadable (%s): its samples restart", req.id, err)
            return {}
        self.metrics.resume_scan_seconds.observe(stats.seconds)
        vocab = getattr(self.engine, "vocab_size", 0) or len(self.engine.tokenizer)
        found = prefixes(
            chunks,
            run_id=req.run_id,
            request_id=req.id,
            group_size=req.group_size,
            vocab_size=vocab,
            max_tokens=req.sampling.max_tokens,
        )
        ok = {i: p for i, p in found.items() if usable(p, version, e.resume_policy)}
        with_chunks = {c.sample_index for c in chunks if 0 <= c.sample_index < req.group_size}
        self.metrics.resumed_samples.inc(len(ok))
        self.metrics.resumed_tokens.inc(sum(len(p.token_ids) for p in ok.values()))
        self.metrics.resume_restarts.inc(len(with_chunks - ok.keys()))
        log.info(
            "request %s redelivered: %d/%d samples resume (%d tokens carried over); scanned %d records in %.3fs",
            req.id,
            len(ok),
            req.group_size,
            sum(len(p.token_ids) for p in ok.values()),
            stats.scanned,
            stats.seconds,
        )
        return ok

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
