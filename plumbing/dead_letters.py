"""Publishing input a stage could not process to rollout.dlq, whole and with the reason.

Two promises: a letter always fits, and a letter is never given up on.
- A record near the broker's size limit plus the letter's envelope is over the
  producer's `max_request_size`; aiokafka refuses it before sending, and a stage that
  could not dead-letter its record crash-looped on it (one 1 MB garbage prompt stopped
  every router). So a payload over `dead_letters.max_inline_bytes` is written whole to
  a content-addressed file (`spill.py`) and the letter carries its size, sha256, first
  bytes and path; oversized keys and headers likewise.
- When the DLQ cannot be written (broker down, topic refusing), `deliver` retries
  with backoff until it is written or the stage stops; `blocked` tells the stage's
  consumer to pause meanwhile (it keeps polling, so it keeps its group membership).
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import socket
from pathlib import Path

import msgspec
from aiokafka.structs import ConsumerRecord
from prometheus_client import CollectorRegistry, Counter, Gauge

from plumbing.config import Config, DeadLetterConfig
from plumbing.failures import Backoff
from plumbing.kafka import Publisher
from plumbing.spill import spill
from schemas import Completion, DeadLetter, PromptRequest, Reward, decode, encode
from schemas.completions import completion_id
from schemas.topics import DLQ, TOPICS

log = logging.getLogger(__name__)

# The letter's own fields and msgpack framing, on top of payload, key and headers.
_ENVELOPE_BYTES = 4096
_ERROR_CHARS = 2000  # an error message may quote the input: it is not the place for the input


class DeadLetterMetrics:
    """One set per registry: stages sharing a process share it."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.count = Counter(
            "primerl_dead_letters", "Records sent to the dead-letter topic", ["stage", "error_type"], registry=registry
        )
        self.spilled = Counter(
            "primerl_dead_letters_spilled",
            "Dead letters whose payload or headers went to a file (over the inline bound)",
            ["stage"],
            registry=registry,
        )
        self.failures = Counter(
            "primerl_dead_letter_publish_failures",
            "Failed attempts to write the dead-letter topic (retried)",
            ["stage"],
            registry=registry,
        )
        self.blocked = Gauge(
            "primerl_dead_letters_blocked",
            "1 while the stage cannot write the dead-letter topic and has paused",
            ["stage"],
            registry=registry,
        )


class DeadLetters:
    """Sends a failed record to the dead-letter topic and counts it per stage and error type."""

    def __init__(
        self,
        publisher: Publisher,
        stage: str,
        run_id: str,
        registry: CollectorRegistry | None = None,
        *,
        cfg: DeadLetterConfig | None = None,
        spill_dir: Path | None = None,
        metrics: DeadLetterMetrics | None = None,
    ) -> None:
        """Metrics go to `metrics` when given (a second stage in one process), else to `registry`."""
        self._publisher = publisher
        self._stage = stage
        self._run_id = run_id
        self._cfg = cfg or DeadLetterConfig()
        self._spill_dir = spill_dir or self._cfg.spill_dir or Path(".primerl/dead-letters")
        if metrics is None:
            if registry is None:
                raise ValueError("DeadLetters needs a registry or shared metrics")
            metrics = DeadLetterMetrics(registry)
        self.metrics = metrics
        self._blocked = 0  # deliveries waiting for the DLQ
        self.unblocked = asyncio.Event()
        self.unblocked.set()

    def for_stage(self, stage: str) -> DeadLetters:
        """Another stage of this process: same publisher, config and metrics, its own name."""
        return DeadLetters(
            self._publisher, stage, self._run_id, cfg=self._cfg, spill_dir=self._spill_dir, metrics=self.metrics
        )

    @classmethod
    def from_config(cls, cfg: Config, publisher: Publisher, stage: str, registry: CollectorRegistry) -> DeadLetters:
        """The stage's dead letters with the process's bounds and spill folder."""
        return cls(publisher, stage, cfg.run_id, registry, cfg=cfg.dead_letters, spill_dir=cfg.spill_dir)

    @property
    def blocked(self) -> bool:
        """True while some letter waits for the dead-letter topic to take it."""
        return self._blocked > 0

    def letter(self, record: ConsumerRecord, error: BaseException) -> DeadLetter:
        """The letter for `record`, fitted under the inline bounds (spilling what does not fit)."""
        payload = record.value or b""
        headers = [(k, bytes(v)) for k, v in (record.headers or ())]
        key = record.key
        letter = DeadLetter(
            run_id=self._run_id,
            stage=self._stage,
            error_type=type(error).__name__,
            error=_clip(str(error)),
            source_topic=record.topic,
            partition=record.partition,
            offset=record.offset,
            key=key,
            headers=headers,
            payload=payload,
            payload_size=len(payload),
            payload_sha256=hashlib.sha256(payload).hexdigest(),
            host=socket.gethostname(),
        )
        limit = self._cfg.max_inline_bytes
        spilled = False
        if len(payload) > limit:
            letter.payload_ref = str(spill(self._spill_dir, payload, letter.payload_sha256))
            letter.payload = payload[: self._cfg.head_bytes]
            spilled = True
        side = len(key or b"") + sum(len(k) + len(v) for k, v in headers)
        if side > self._cfg.max_inline_side_bytes:
            blob = msgspec.msgpack.encode({"key": key, "headers": headers})
            letter.headers_ref = str(spill(self._spill_dir, blob, hashlib.sha256(blob).hexdigest()))
            letter.key = (key or b"")[:256] or None
            letter.headers = [(k[:256], v[:256]) for k, v in headers[:16]]
            spilled = True
        if spilled:
            self.metrics.spilled.labels(self._stage).inc()
        size = len(encode(letter)) + _ENVELOPE_BYTES
        if size > self._cfg.max_letter_bytes:  # cannot happen with sane bounds; refuse to build an unsendable letter
            raise ValueError(
                f"dead letter of {size} bytes over max_letter_bytes={self._cfg.max_letter_bytes}: check the bounds"
            )
        return letter

    async def send(self, record: ConsumerRecord, error: BaseException) -> DeadLetter:
        """Publish `record` with `error` to rollout.dlq once and wait for the ack (raises if it cannot)."""
        letter = self.letter(record, error)
        await self._publisher.publish(DLQ.name, letter, key=self._stage.encode())
        self.metrics.count.labels(self._stage, letter.error_type).inc()
        log.warning(
            "dead-lettered %s[%d]@%d: %s: %s%s",
            record.topic,
            record.partition,
            record.offset,
            letter.error_type,
            _clip(str(error), 300),
            f" (payload kept in {letter.payload_ref})" if letter.payload_ref else "",
        )
        return letter

    async def deliver(
        self, record: ConsumerRecord, error: BaseException, stopping: asyncio.Event | None = None
    ) -> DeadLetter | None:
        """`send`, retried with backoff until it succeeds; None only if `stopping` was set first.

        The record must stay uncommitted until this returns a letter: a stage that stops
        while the DLQ is down leaves the record to its next owner, never skips it.
        """
        backoff = Backoff(cap_s=self._cfg.retry_cap_s)
        was_blocked = False
        try:
            while True:
                try:
                    letter = await self.send(record, error)
                    if was_blocked:
                        log.warning(
                            "%s: dead-letter topic writable again after %d attempts; resuming",
                            self._stage,
                            backoff.attempt + 1,
                        )
                    return letter
                except asyncio.CancelledError:
                    raise
                except Exception as err:  # noqa: BLE001 - whatever keeps the DLQ from taking it, retry
                    self.metrics.failures.labels(self._stage).inc()
                    if not was_blocked:
                        was_blocked = True
                        self._blocked += 1
                        self.unblocked.clear()
                        self.metrics.blocked.labels(self._stage).set(1)
                    delay = backoff.next_delay()
                    log.error(
                        "%s: cannot write the dead-letter topic (%s: %s); consumption paused, retry %d in %.1fs",
                        self._stage,
                        type(err).__name__,
                        _clip(str(err), 200),
                        backoff.attempt,
                        delay,
                    )
                    if stopping is not None:
                        try:
                            await asyncio.wait_for(stopping.wait(), delay)
                            return None
                        except TimeoutError:
                            continue
                    await asyncio.sleep(delay)
        finally:
            if was_blocked:
                self._blocked -= 1
                if not self._blocked:
                    self.unblocked.set()
                    self.metrics.blocked.labels(self._stage).set(0)


def _clip(text: str, limit: int = _ERROR_CHARS) -> str:
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} chars)"


def dead_letter_sample_ids(letter: DeadLetter, run_id: str) -> list[str]:
    """The sample (completion) ids of `run_id` a dead letter carries (none for other runs/topics)."""
    topic = TOPICS.get(letter.source_topic)
    if topic is None:
        return []
    try:
        msg = decode(letter.payload, topic.message_type, list(letter.headers))
    except Exception:  # noqa: BLE001 - garbage: no sample of ours
        return []
    if msg.run_id != run_id:
        return []
    if isinstance(msg, PromptRequest):
        return [completion_id(msg.id, i) for i in range(msg.group_size)]
    if isinstance(msg, Completion):
        return [msg.id]
    if isinstance(msg, Reward):
        return [msg.completion_id]
    return []
