"""Small helpers shared by the broker tests."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Callable

from aiokafka import AIOKafkaConsumer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from prometheus_client import CollectorRegistry

from plumbing.config import Config
from plumbing.consumer import ConsumerRunner
from plumbing.dead_letters import DeadLetters
from plumbing.kafka import Publisher, common_kwargs, consumer_kwargs
from schemas import DeadLetter, Message, decode
from schemas.topics import DLQ


async def make_topic(cfg: Config, partitions: int = 1) -> str:
    """A fresh topic for one test, so tests never see each other's records."""
    name = f"test.{uuid.uuid4().hex[:10]}"
    admin = AIOKafkaAdminClient(**common_kwargs(cfg))
    await admin.start()
    try:
        await admin.create_topics([NewTopic(name, num_partitions=partitions, replication_factor=1)])
    finally:
        await admin.close()
    return name


def runner_for(
    cfg: Config, pub: Publisher, topic: str, group: str, type_: type[Message], handler, max_in_flight: int = 4
) -> ConsumerRunner:
    """A ConsumerRunner with its own metrics registry and the test's DLQ stage name."""
    registry = CollectorRegistry()
    return ConsumerRunner(
        cfg,
        topics=[topic],
        group_id=group,
        message_type=type_,
        handler=handler,
        dead_letters=DeadLetters(pub, f"test-{topic}", "test", registry),
        registry=registry,
        max_in_flight=max_in_flight,
    )


async def wait_until(cond: Callable[[], bool], timeout_s: float = 60, what: str = "condition") -> None:
    """Poll `cond` until true, failing the test after `timeout_s`."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while not cond():
        if loop.time() > deadline:
            raise AssertionError(f"timed out after {timeout_s}s waiting for {what}")
        await asyncio.sleep(0.1)


async def dead_letters_from(cfg: Config, source_topic: str, count: int, timeout_s: float = 30) -> list[DeadLetter]:
    """Read rollout.dlq from the start until `count` letters about `source_topic` are found."""
    return await dead_letters_matching(cfg, lambda d: d.source_topic == source_topic, count, timeout_s)


async def dead_letters_matching(
    cfg: Config, pred: Callable[[DeadLetter], bool], count: int, timeout_s: float = 30
) -> list[DeadLetter]:
    """Read rollout.dlq from the start until `count` letters satisfying `pred` are found."""
    consumer = AIOKafkaConsumer(DLQ.name, **consumer_kwargs(cfg, f"dlq-reader-{uuid.uuid4().hex[:8]}"))
    await consumer.start()
    found: list[DeadLetter] = []
    try:

        async def collect() -> None:
            while len(found) < count:
                for records in (await consumer.getmany(timeout_ms=500)).values():
                    for r in records:
                        letter = decode(r.value, DeadLetter, list(r.headers))
                        if pred(letter):
                            found.append(letter)

        await asyncio.wait_for(collect(), timeout_s)
    finally:
        await consumer.stop()
    return found


async def run_in_background(runner: ConsumerRunner) -> asyncio.Task[None]:
    """Start `runner.run()` as a task."""
    return asyncio.create_task(runner.run())
