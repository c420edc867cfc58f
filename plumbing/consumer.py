"""A consumer-group runner that commits an offset only after its handler's output is acked.

Records of one partition may be handled concurrently (bounded by `max_in_flight`);
the committed offset of a partition is the lowest offset still in flight, so a crash
never skips a record whose output was not acknowledged (at-least-once). Consumers
make the effect exactly-once with a `Ledger`.

Errors: a payload that does not decode, and any exception a handler raises for one
record, go to the dead-letter topic and the runner goes on. Only `FatalError` (for
example the engine died) stops it, leaving that record uncommitted for the next
member of the group.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Generic, TypeVar

from aiokafka import AIOKafkaConsumer, ConsumerRebalanceListener, TopicPartition
from aiokafka.structs import ConsumerRecord, OffsetAndMetadata
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from plumbing.config import Config
from plumbing.dead_letters import DeadLetters
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
    def __init__(self, runner: "ConsumerRunner[Message]") -> None:
        self._runner = runner

    async def on_partitions_revoked(self, revoked: list[TopicPartition]) -> None:
        await self._runner._commit(list(revoked))
        for tp in revoked:
            self._runner._offsets.pop(tp, None)
        self._runner.assignment -= set(revoked)

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
        self.failed = Counter("primerl_records_dead_lettered", "Records sent to the DLQ by this consumer", labels, registry=registry)
        self.in_flight = Gauge("primerl_records_in_flight", "Records being handled", labels, registry=registry)
        self.seconds = Histogram("primerl_record_handle_seconds", "Handler time per record", labels, registry=registry)
        self.lag = Gauge("primerl_consumer_lag", "Records behind the partition end (approximate on Tansu)", labels, registry=registry)


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
    ) -> None:
        """Metrics go to `metrics` when given (a second runner in one process), else to `registry`."""
        self.group_id = group_id
        self._topics = topics
        self._type = message_type
        self._handler = handler
        self._dlq = dead_letters
        self._slots = asyncio.Semaphore(max_in_flight)
        self._offsets: dict[TopicPartition, _PartitionOffsets] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._fatal: BaseException | None = None
        self._stopping = asyncio.Event()
        self._commit_lock = asyncio.Lock()
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

    def stop(self) -> None:
        """Ask the loop to finish: no new records; in-flight ones complete and commit."""
        self._stopping.set()

    async def run(self) -> None:
        """Consume until `stop()` or a FatalError (re-raised after clean-up)."""
        self._consumer.subscribe(self._topics, listener=_Rebalance(self))  # type: ignore[arg-type]
        await self._consumer.start()
        try:
            while not self._stopping.is_set() and self._fatal is None:
                batches = await self._consumer.getmany(timeout_ms=200, max_records=64)
                for tp, records in batches.items():
                    for record in records:
                        await self._slots.acquire()
                        if self._fatal is not None or self._stopping.is_set():
                            self._slots.release()
                            break
                        self._start(tp, record)
                self._update_lag()
            if self._tasks:
                await asyncio.gather(*self._tasks, return_exceptions=True)
            await self._commit(list(self._offsets))
        finally:
            for task in self._tasks:
                task.cancel()
            await self._consumer.stop()
        if self._fatal is not None:
            raise self._fatal

    def _start(self, tp: TopicPartition, record: ConsumerRecord) -> None:
        offsets = self._offsets.setdefault(tp, _PartitionOffsets())
        offsets.in_flight.add(record.offset)
        task = asyncio.create_task(self._handle(tp, offsets, record))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _handle(self, tp: TopicPartition, offsets: _PartitionOffsets, record: ConsumerRecord) -> None:
        self.metrics.in_flight.labels(self.group_id).inc()
        self.metrics.records.labels(self.group_id).inc()
        done = False
        try:
            with self.metrics.seconds.labels(self.group_id).time():
                try:
                    msg = decode(record.value or b"", self._type, list(record.headers or ()))
                    await self._handler(msg, record)
                except FatalError as err:
                    log.error("fatal error on %s[%d]@%d: %s", record.topic, record.partition, record.offset, err)
                    self._fatal = err
                    return
                except asyncio.CancelledError:
                    raise
                except Exception as err:  # noqa: BLE001 - any per-record failure is dead-lettered, never fatal
                    self.metrics.failed.labels(self.group_id).inc()
                    try:
                        await self._dlq.send(record, err)
                    except Exception as dlq_err:  # the DLQ itself is down: keep the record uncommitted
                        self._fatal = FatalError(f"dead-letter publish failed: {dlq_err}")
                        return
            done = True
        finally:
            self.metrics.in_flight.labels(self.group_id).dec()
            self._slots.release()
            if done:
                offsets.in_flight.discard(record.offset)
                offsets.next_after_done = max(offsets.next_after_done, record.offset + 1)
                if self._offsets.get(tp) is offsets:
                    await self._commit([tp])

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
