"""A consumer-group runner that commits an offset only after its handler's output is acked.

Records of one partition may be handled concurrently (bounded by `max_in_flight`);
the committed offset of a partition is the lowest offset still in flight, so a crash
never skips a record whose output was not acknowledged (at-least-once). Consumers
make the effect exactly-once with a `Ledger`.

Errors, by whose fault they are (`plumbing/failures.py`):
- A payload that does not decode, and any other exception a handler raises for one
  record, is the record's fault: it goes to the dead-letter topic and the runner goes on.
- An outage (broker or Redis unreachable) is not: the record is retried with backoff,
  up to `kafka.transient_retries` times, before it is dead-lettered.
- A dead-letter topic that cannot be written is retried until it can.
While a record is retried or a letter waits, the runner pauses its partitions but
keeps polling: a member that stops polling for `max_poll_interval_ms` leaves its group.
Only `FatalError` (for example the engine died) stops the runner, leaving that record
uncommitted for the next member of the group.

Flow control is by pausing too: with all `max_in_flight` slots busy the runner stops
fetching rather than stops polling, so a slow handler never costs the membership.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any, Generic, TypeVar, cast

from aiokafka import AIOKafkaConsumer, ConsumerRebalanceListener, TopicPartition
from aiokafka.structs import ConsumerRecord, OffsetAndMetadata
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from plumbing.config import Config
from plumbing.dead_letters import DeadLetters
from plumbing.failures import Backoff, is_transient
from plumbing.kafka import consumer_kwargs
from schemas import Message, decode

log = logging.getLogger(__name__)

M = TypeVar("M", bound=Message)


class FatalError(RuntimeError):
    """The process cannot go on (its engine died, ...): stop without committing."""


class _PartitionOffsets:
    """In-flight and finished offsets of one assigned partition."""

    def __init__(self) -> None:
        self.in_flight: set[int] = set()
        self.next_after_done = -1  # highest finished offset + 1
        self.committed = -1

    def committable(self) -> int:
        if self.in_flight:
            return min(self.in_flight)
        return self.next_after_done


class _Rebalance(ConsumerRebalanceListener):
    def __init__(self, runner: ConsumerRunner[Message]) -> None:
        self._runner = runner

    async def on_partitions_revoked(self, revoked: list[TopicPartition]) -> None:
        await self._runner._commit(list(revoked))
        gone = set(revoked)
        for tp in revoked:
            self._runner._offsets.pop(tp, None)
        self._runner._backlog = deque((tp, r) for tp, r in self._runner._backlog if tp not in gone)
        self._runner.assignment -= gone

    async def on_partitions_assigned(self, assigned: list[TopicPartition]) -> None:
        for tp in assigned:
            self._runner._offsets.setdefault(tp, _PartitionOffsets())
        self._runner.assignment = set(assigned)
        self._runner.assigned.set()
        log.info("%s assigned %s", self._runner.group_id, sorted((tp.topic, tp.partition) for tp in assigned))


Handler = Callable[[M, ConsumerRecord], Awaitable[None]]


class ConsumerMetrics:
    """Per-group consumer metrics; one instance per registry, shared by a process's runners."""

    def __init__(self, registry: CollectorRegistry) -> None:
        labels = ["group"]
        self.records = Counter("primerl_records_consumed", "Records consumed", labels, registry=registry)
        self.failed = Counter(
            "primerl_records_dead_lettered", "Records sent to the DLQ by this consumer", labels, registry=registry
        )
        self.in_flight = Gauge("primerl_records_in_flight", "Records being handled", labels, registry=registry)
        self.seconds = Histogram("primerl_record_handle_seconds", "Handler time per record", labels, registry=registry)
        self.lag = Gauge(
            "primerl_consumer_lag", "Records behind the partition end (approximate on Tansu)", labels, registry=registry
        )
        self.retries = Counter(
            "primerl_records_retried",
            "Handler attempts repeated after an outage (broker, Redis)",
            labels,
            registry=registry,
        )
        self.paused = Gauge(
            "primerl_consumer_paused",
            "1 while the group's consumption is paused, by reason",
            ["group", "reason"],
            registry=registry,
        )


class ConsumerRunner(Generic[M]):
    """Runs `handler(message, record)` for every record of `topics` in consumer group `group_id`.

    The handler returns when its output is acknowledged by the broker; only then does
    the record's offset become committable.
    """

    def __init__(
        self,
        cfg: Config,
        *,
        topics: list[str],
        group_id: str,
        message_type: type[M],
        handler: Handler[M],
        dead_letters: DeadLetters,
        registry: CollectorRegistry | None = None,
        metrics: ConsumerMetrics | None = None,
        max_in_flight: int = 1,
        client_id: str | None = None,
        message_types: dict[str, type[Message]] | None = None,
    ) -> None:
        """Metrics go to `metrics` when given (a second runner in one process), else to `registry`.

        `message_types` (topic -> type) decodes some of `topics` as another message type than
        `message_type`: one member reading two topics of one group, where a second runner
        would make each join a rebalance (records finished across it are redelivered)."""
        if max_in_flight < 1:
            raise ValueError(f"max_in_flight must be >= 1, not {max_in_flight}")
        self.group_id = group_id
        self._topics = topics
        self._type = message_type
        self._types = message_types or {}
        self._handler = handler
        self._dlq = dead_letters
        self._max_in_flight = max_in_flight
        self._retries = cfg.kafka.transient_retries
        self._offsets: dict[TopicPartition, _PartitionOffsets] = {}
        self._backlog: deque[tuple[TopicPartition, ConsumerRecord]] = deque()  # fetched, waiting for a slot
        self._tasks: set[asyncio.Task[None]] = set()
        self._fatal: BaseException | None = None
        self._stopping = asyncio.Event()
        self._commit_lock = asyncio.Lock()
        self._retrying = 0  # records waiting out an outage
        self._paused_for = ""  # why consumption is paused now ("" = flowing)
        self.assigned = asyncio.Event()  # set once the group has given this member partitions
        self.assignment: set[TopicPartition] = set()
        kwargs = consumer_kwargs(cfg, group_id)
        if client_id:
            kwargs["client_id"] = client_id
        self._consumer = AIOKafkaConsumer(**kwargs)
        if metrics is None:
            if registry is None:
                raise ValueError("a ConsumerRunner needs a registry or shared metrics")
            metrics = ConsumerMetrics(registry)
        self.metrics = metrics
        # Series at 0 from the start: a group that never dead-letters still answers the DLQ
        # share (dead-lettered / consumed) and the dashboard's DLQ rate, instead of "no data".
        for counter in (metrics.records, metrics.failed, metrics.retries):
            counter.labels(group_id)

    def stop(self) -> None:
        """Ask the loop to finish: no new records; in-flight ones complete and commit."""
        self._stopping.set()

    @property
    def paused_for(self) -> str:
        """Why consumption is paused ("" when it flows): dead_letters_blocked, outage_retry or slots_full."""
        return self._paused_for

    async def run(self) -> None:
        """Consume until `stop()` or a FatalError (re-raised after clean-up)."""
        self._consumer.subscribe(self._topics, listener=_Rebalance(self))  # type: ignore[arg-type]
        await self._consumer.start()
        try:
            while not self._stopping.is_set() and self._fatal is None:
                self._start_backlog()
                self._flow_control()
                free = self._max_in_flight - len(self._tasks)
                batches = await self._consumer.getmany(timeout_ms=200, max_records=max(1, free))
                for tp, records in batches.items():
                    self._backlog.extend((tp, r) for r in records)
                self._start_backlog()
                self._update_lag()
            if self._tasks:
                await asyncio.gather(*self._tasks, return_exceptions=True)
            await self._commit(list(self._offsets))
        finally:
            for task in self._tasks:
                task.cancel()
            self._set_paused("")
            await self._consumer.stop()
        if self._fatal is not None:
            raise self._fatal

    def _start_backlog(self) -> None:
        while (
            self._backlog
            and len(self._tasks) < self._max_in_flight
            and self._fatal is None
            and not self._stopping.is_set()
        ):
            tp, record = self._backlog.popleft()
            if tp in self._offsets:  # still ours
                self._start(tp, record)

    def _flow_control(self) -> None:
        """Pause every assigned partition while records wait out an outage or a slot; resume after."""
        if self._dlq.blocked:
            reason = "dead_letters_blocked"
        elif self._retrying:
            reason = "outage_retry"
        elif self._backlog or len(self._tasks) >= self._max_in_flight:
            reason = "slots_full"
        else:
            reason = ""
        self._set_paused(reason)
        if reason:
            self._consumer.pause(*self._consumer.assignment())
        elif self._consumer.paused():
            self._consumer.resume(*self._consumer.paused())

    def _set_paused(self, reason: str) -> None:
        if reason == self._paused_for:
            return
        if self._paused_for:
            self.metrics.paused.labels(self.group_id, self._paused_for).set(0)
            if self._paused_for != "slots_full":
                log.warning("%s: consumption resumed (was paused: %s)", self.group_id, self._paused_for)
        if reason:
            self.metrics.paused.labels(self.group_id, reason).set(1)
            if reason != "slots_full":  # ordinary backpressure is not news
                log.warning(
                    "%s: consumption paused (%s); polling on to keep the group membership", self.group_id, reason
                )
        self._paused_for = reason

    def _start(self, tp: TopicPartition, record: ConsumerRecord) -> None:
        offsets = self._offsets.setdefault(tp, _PartitionOffsets())
        offsets.in_flight.add(record.offset)
        task = asyncio.create_task(self._handle(tp, offsets, record))
        self._tasks.add(task)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            # `_handle` catches everything a record can cause; reaching here is a bug in
            # the runner itself. Stop loudly rather than hold the offset forever.
            err = task.exception()
            log.error("%s: record task failed outside its handler: %r", self.group_id, err)
            self._fatal = FatalError(f"consumer task failed: {err!r}")

    async def _handle(self, tp: TopicPartition, offsets: _PartitionOffsets, record: ConsumerRecord) -> None:
        self.metrics.in_flight.labels(self.group_id).inc()
        self.metrics.records.labels(self.group_id).inc()
        done = False
        try:
            with self.metrics.seconds.labels(self.group_id).time():
                done = await self._process(record)
        finally:
            self.metrics.in_flight.labels(self.group_id).dec()
            if done:
                offsets.in_flight.discard(record.offset)
                offsets.next_after_done = max(offsets.next_after_done, record.offset + 1)
                if self._offsets.get(tp) is offsets:
                    await self._commit([tp])

    async def _process(self, record: ConsumerRecord) -> bool:
        """Handle one record; True once it took effect or was dead-lettered (committable)."""
        try:
            # A type of `message_types` is one the handler takes too (the caller's contract).
            msg = cast(
                M, decode(record.value or b"", self._types.get(record.topic, self._type), list(record.headers or ()))
            )
        except Exception as err:  # noqa: BLE001 - DecodeError, or whatever a hostile payload makes the decoder raise
            return await self._dead_letter(record, err)
        backoff = Backoff()
        while True:
            try:
                await self._handler(msg, record)
                return True
            except FatalError as err:
                log.error("fatal error on %s[%d]@%d: %s", record.topic, record.partition, record.offset, err)
                self._fatal = err
                return False
            except asyncio.CancelledError:
                raise
            except Exception as err:  # noqa: BLE001 - any per-record failure is retried or dead-lettered, never fatal
                if not is_transient(err):
                    return await self._dead_letter(record, err)
                if self._stopping.is_set():
                    return False  # uncommitted: the next owner retries it
                if backoff.attempt >= self._retries:
                    return await self._dead_letter(
                        record,
                        RuntimeError(
                            f"gave up after {backoff.attempt + 1} attempts on an outage: {type(err).__name__}: {err}"
                        ),
                    )
                delay = backoff.next_delay()
                self.metrics.retries.labels(self.group_id).inc()
                log.warning(
                    "%s: %s[%d]@%d failed on an outage (%s: %s); retry %d/%d in %.1fs",
                    self.group_id,
                    record.topic,
                    record.partition,
                    record.offset,
                    type(err).__name__,
                    err,
                    backoff.attempt,
                    self._retries,
                    delay,
                )
                self._retrying += 1
                try:
                    await asyncio.wait_for(self._stopping.wait(), delay)
                except TimeoutError:
                    pass
                finally:
                    self._retrying -= 1

    async def _dead_letter(self, record: ConsumerRecord, err: BaseException) -> bool:
        self.metrics.failed.labels(self.group_id).inc()
        return await self._dlq.deliver(record, err, self._stopping) is not None

    async def _commit(self, tps: list[TopicPartition]) -> None:
        async with self._commit_lock:
            to_commit: dict[TopicPartition, OffsetAndMetadata] = {}
            for tp in tps:
                offsets = self._offsets.get(tp)
                if offsets is None:
                    continue
                point = offsets.committable()
                if point > offsets.committed:
                    to_commit[tp] = OffsetAndMetadata(point, "")
            if not to_commit:
                return
            try:
                await self._consumer.commit(to_commit)
            except Exception as err:  # noqa: BLE001 - a lost partition: its new owner re-processes, ledgers dedup
                log.warning("commit failed (%s); records will be redelivered to the new owner", err)
                return
            for tp, om in to_commit.items():
                if tp in self._offsets:
                    self._offsets[tp].committed = om.offset

    def _update_lag(self) -> None:
        lag = 0
        for tp in self._consumer.assignment():
            hw = self._consumer.highwater(tp)
            pos = self._offsets.get(tp)
            if hw is not None and pos is not None:
                lag += max(0, hw - max(pos.committed, 0))
        self.metrics.lag.labels(self.group_id).set(lag)


class ConsumerStage:
    """A stage that is one `ConsumerRunner` (router, deferral, verifier): `run`, `stop` and `ready` are the runner's.

    `stop` finishes in-flight records and commits them; records still waiting (a parked
    request, a letter the DLQ has not taken) stay uncommitted for the next member.
    """

    runner: ConsumerRunner[Any]

    async def run(self) -> None:
        """Consume until `stop()` (raises the runner's FatalError)."""
        await self.runner.run()

    def stop(self) -> None:
        """Finish in-flight records, commit, and return from `run`."""
        self.runner.stop()

    @property
    def ready(self) -> asyncio.Event:
        """Set once the group gave this member partitions."""
        return self.runner.assigned
