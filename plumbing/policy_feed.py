"""Every policy update of every run, read from rollout.policy by each process that needs it.

No consumer group: every engine must see every version (group members would split
them). An update that does not decode (or that `on_update` rejects) is dead-lettered
and skipped. Every engine start re-reads the topic from the start, so the letter goes
through a ledger keyed by the record's position: one letter per bad record, not one
per engine and restart (found by the fuzz suite).

Catching up: a starting reader first reads to the end of the topic and then applies
only the newest update of each run. Applying every old version in turn cost a
restarted engine one reload per version, and the old folders are deleted by then
(a dead letter each); meanwhile it served v0 (the chaos run dropped 25 % of its
samples as stale). `caught_up` is set once the newest is applied; an engine worker
starts consuming only then. `latest(run)` is
what the process has seen published; `wait_for` waits for a version with a bound.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

from aiokafka import AIOKafkaConsumer
from aiokafka.structs import ConsumerRecord
from redis.asyncio import Redis

from plumbing.config import Config
from plumbing.dead_letters import DeadLetters
from plumbing.kafka import common_kwargs
from plumbing.ledger import Ledger
from schemas import PolicyUpdate, decode
from schemas.topics import POLICY

log = logging.getLogger(__name__)

# Returns whether the update counts as published (False: it was rejected, e.g. no weights there).
OnUpdate = Callable[[PolicyUpdate, ConsumerRecord], Awaitable[bool]]


class PolicyFeed:
    """Follows rollout.policy from the start; see the module doc."""

    def __init__(
        self, cfg: Config, dead_letters: DeadLetters, on_update: OnUpdate | None = None, redis: Redis | None = None
    ) -> None:
        self._cfg = cfg
        self._dlq = dead_letters
        self._letters = Ledger(redis, "policy-dead-letters", fail_open=True) if redis is not None else None
        self._on_update = on_update
        self._latest: dict[str, int] = {}
        self._changed = asyncio.Condition()
        self.caught_up = asyncio.Event()  # set once the newest update of each run is applied
        self._stopping = asyncio.Event()

    def latest(self, run_id: str = "") -> int:
        """The newest version seen for `run_id` ("" = of any run); 0 before any."""
        if run_id:
            return self._latest.get(run_id, 0)
        return max(self._latest.values(), default=0)

    async def wait_for(self, run_id: str, version: int, timeout_s: float) -> bool:
        """True once `latest(run_id) >= version`, False after `timeout_s`."""
        if self.latest(run_id) >= version:
            return True
        try:
            async with self._changed:
                await asyncio.wait_for(
                    self._changed.wait_for(lambda: self.latest(run_id) >= version), max(0.0, timeout_s)
                )
            return True
        except TimeoutError:
            return False

    def stop(self) -> None:
        """Return from `run` after the current update."""
        self._stopping.set()

    async def run(self) -> None:
        """Read updates until stopped; see the module doc for catching up."""
        consumer = AIOKafkaConsumer(
            POLICY.name,
            **common_kwargs(self._cfg),
            group_id=None,
            auto_offset_reset="earliest",
            fetch_max_wait_ms=self._cfg.kafka.fetch_max_wait_ms,
        )
        await consumer.start()
        held: dict[str, tuple[PolicyUpdate, ConsumerRecord]] | None = {}  # newest per run, while catching up
        try:
            while not self._stopping.is_set():
                batches = await consumer.getmany(timeout_ms=500)
                if not batches and held is not None:
                    # An empty poll: at the end (the local broker's end offsets are not to be trusted).
                    for update, record in sorted(held.values(), key=lambda ur: ur[0].version):
                        await self._take(update, record)
                    held = None
                    self.caught_up.set()
                for records in batches.values():
                    for record in records:
                        await self._one(record, held)
        finally:
            await consumer.stop()

    async def _one(self, record: ConsumerRecord, held: dict[str, tuple[PolicyUpdate, ConsumerRecord]] | None) -> None:
        try:
            update = decode(record.value or b"", PolicyUpdate, list(record.headers or ()))
        except Exception as err:  # noqa: BLE001 - any undecodable update is the record's fault
            await self.dead_letter(record, err)
            return
        if update.version < 0:
            await self.dead_letter(record, ValueError(f"policy version {update.version} < 0"))
            return
        if held is None:
            await self._take(update, record)
        elif update.run_id not in held or update.version >= held[update.run_id][0].version:
            held[update.run_id] = (update, record)  # an older one is superseded, not wrong: skipped quietly

    async def _take(self, update: PolicyUpdate, record: ConsumerRecord) -> None:
        if self._on_update is not None and not await self._on_update(update, record):
            return
        async with self._changed:
            self._latest[update.run_id] = max(self._latest.get(update.run_id, 0), update.version)
            self._changed.notify_all()

    async def dead_letter(self, record: ConsumerRecord, err: BaseException) -> None:
        """Dead-letter `record` unless a reader of this topic already did (see the module doc)."""
        if self._letters is None:
            await self._dlq.deliver(record, err, self._stopping)
            return
        position = f"{record.topic}:{record.partition}:{record.offset}"
        async with self._letters.claim(position) as fresh:
            if fresh and await self._dlq.deliver(record, err, self._stopping) is not None:
                await self._letters.mark(position)
