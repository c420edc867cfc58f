"""Publishing input a stage could not process to rollout.dlq, whole and with the reason."""

from __future__ import annotations

import logging

from aiokafka.structs import ConsumerRecord
from prometheus_client import CollectorRegistry, Counter

from plumbing.kafka import Publisher
from schemas import DeadLetter
from schemas.topics import DLQ

log = logging.getLogger(__name__)


class DeadLetters:
    """Sends a failed record to the dead-letter topic and counts it per stage and error type."""

    def __init__(self, publisher: Publisher, stage: str, run_id: str, registry: CollectorRegistry) -> None:
        self._publisher = publisher
        self._stage = stage
        self._run_id = run_id
        self._count = Counter(
            "primerl_dead_letters", "Records sent to the dead-letter topic", ["stage", "error_type"], registry=registry
        )

    async def send(self, record: ConsumerRecord, error: BaseException) -> DeadLetter:
        """Publish `record` with `error` to rollout.dlq and wait for the ack."""
        letter = DeadLetter(
            run_id=self._run_id,
            stage=self._stage,
            error_type=type(error).__name__,
            error=str(error),
            source_topic=record.topic,
            partition=record.partition,
            offset=record.offset,
            key=record.key,
            headers=[(k, bytes(v)) for k, v in (record.headers or ())],
            payload=record.value or b"",
        )
        await self._publisher.publish(DLQ.name, letter, key=self._stage.encode())
        self._count.labels(self._stage, letter.error_type).inc()
        log.warning("dead-lettered %s[%d]@%d: %s: %s", record.topic, record.partition, record.offset, letter.error_type, error)
        return letter
