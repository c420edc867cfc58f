"""`primerl tail TOPIC`: a topic's records as JSON lines, decoded with the topic registry's schemas.

One line per record: where it sits (topic, partition, offset, timestamp, key) and the
decoded message under `value`. A dead letter's original payload is decoded too when its
source topic is known (`original`). A record that does not decode is one line with
`error` (and the size and first bytes), never a crash: tail is how people look at
garbage. Bytes fields appear as base64 (msgspec's JSON form of bytes).

Where it starts: `--from-beginning` reads the whole topic; otherwise it still reads from
the beginning but prints only records written from a few seconds before the start on.
The local broker reports wrong end offsets for multi-record batches, so `latest` cannot
be trusted there (see /work/shared notes and plumbing/kafka.py). Without `--follow` it
stops once no record arrived for `idle_s`.
"""

from __future__ import annotations

import asyncio
import base64
import time
import uuid
from collections.abc import Callable
from typing import Any

import msgspec
from aiokafka import AIOKafkaConsumer

from plumbing.config import Config
from plumbing.kafka import consumer_kwargs
from schemas import DeadLetter, DecodeError, decode
from schemas.topics import DLQ, TOPICS, Topic

HEAD_BYTES = 64  # of a record that does not decode, this much is shown
START_SLACK_S = 5.0  # without --from-beginning: records this much older than the start still show

_json = msgspec.json.Encoder()


class TailOptions(msgspec.Struct, frozen=True, kw_only=True):
    """What to show and when to stop."""

    run_id: str | None = None
    from_beginning: bool = False
    follow: bool = False
    idle_s: float = 3.0
    max_records: int | None = None  # stop after this many printed lines (tests, `| head`)


class Record(msgspec.Struct, frozen=True):
    """The parts of a consumer record tail reads (aiokafka's ConsumerRecord has them)."""

    topic: str
    partition: int
    offset: int
    timestamp: int
    key: bytes | None
    value: bytes | None
    headers: list[tuple[str, bytes]] = []


def record_line(topic: Topic, rec: Record, run_id: str | None = None) -> bytes | None:
    """The JSON line of one record; None when `run_id` is given and the message belongs to another run."""
    where: dict[str, Any] = {
        "topic": rec.topic,
        "partition": rec.partition,
        "offset": rec.offset,
        "timestamp_ms": rec.timestamp,
        "key": _text(rec.key),
    }
    payload = rec.value or b""
    try:
        msg = decode(payload, topic.message_type, list(rec.headers))
    except (DecodeError, RecursionError, UnicodeDecodeError, ValueError) as err:
        if run_id is not None:
            return None  # a garbage record names no run: it is nobody's when a run is asked for
        return _json.encode({**where, "error": str(err)[:500], "size": len(payload), "head": _head(payload)})
    if run_id is not None and getattr(msg, "run_id", None) != run_id:
        return None
    line: dict[str, Any] = {**where, "type": type(msg).__name__, "value": msgspec.to_builtins(msg)}
    if isinstance(msg, DeadLetter):
        line["original"] = _original(msg)
    return _json.encode(line)


def _original(letter: DeadLetter) -> dict[str, Any]:
    """A dead letter's original payload decoded with its source topic's schema, or why not."""
    source = TOPICS.get(letter.source_topic)
    if source is None:
        return {"error": f"source topic {letter.source_topic!r} is not in the registry"}
    if not letter.complete:
        return {"error": f"payload kept whole in {letter.payload_ref or letter.headers_ref} on {letter.host or '?'}"}
    try:
        return msgspec.to_builtins(decode(letter.payload, source.message_type, list(letter.headers)))
    except (DecodeError, RecursionError, ValueError) as err:
        return {"error": str(err)[:500]}


def _text(raw: bytes | None) -> str | None:
    if raw is None:
        return None
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return "base64:" + base64.b64encode(raw).decode()


def _head(raw: bytes) -> str:
    return base64.b64encode(raw[:HEAD_BYTES]).decode()


async def tail(cfg: Config, topic_name: str, opts: TailOptions, emit: Callable[[bytes], None]) -> int:
    """Print the topic's records through `emit` (one JSON line each, no newline); returns how many."""
    topic = TOPICS[topic_name] if topic_name in TOPICS else _unknown(topic_name)
    started_ms = (time.time() - START_SLACK_S) * 1000
    consumer = AIOKafkaConsumer(
        topic.name,
        **{
            **consumer_kwargs(cfg, f"tail-{uuid.uuid4().hex[:8]}"),
            # A record up to the producers' request limit, whatever the partition holds.
            "max_partition_fetch_bytes": 8 * 1024 * 1024,
        },
    )
    printed = 0
    await consumer.start()
    try:
        loop = asyncio.get_running_loop()
        last = loop.time()
        while opts.follow or loop.time() - last < opts.idle_s:
            batches = await consumer.getmany(timeout_ms=200)
            for records in batches.values():
                last = loop.time()
                for r in records:
                    if not opts.from_beginning and r.timestamp < started_ms:
                        continue
                    rec = Record(r.topic, r.partition, r.offset, r.timestamp, r.key, r.value, list(r.headers))
                    line = record_line(topic, rec, opts.run_id)
                    if line is None:
                        continue
                    emit(line)
                    printed += 1
                    if opts.max_records is not None and printed >= opts.max_records:
                        return printed
            if not consumer.assignment():
                last = loop.time()  # still joining: idleness counts from the assignment
    finally:
        await consumer.stop()
    return printed


def _unknown(name: str) -> Topic:
    raise KeyError(f"unknown topic {name!r}; known: {', '.join(sorted(TOPICS))} (dead letters: {DLQ.name})")
