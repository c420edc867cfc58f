"""Issue 17's two poison pills and the failure rules behind them, on the real broker.

1. A record near the broker's size limit: its dead letter must still fit (the payload
   goes whole to a content-addressed file), and the consumer must go on.
2. A dead-letter topic that cannot be written: the consumer pauses and retries, never
   dies, never skips, and resumes by itself.
3. An outage in a handler (broker, Redis) is retried, not dead-lettered.
"""

from __future__ import annotations

import hashlib
import uuid
from pathlib import Path

from aiokafka.errors import KafkaConnectionError
from prometheus_client import CollectorRegistry

from plumbing.config import Config
from plumbing.consumer import ConsumerRunner
from plumbing.dead_letters import DeadLetters
from plumbing.failures import is_transient
from plumbing.kafka import Publisher
from plumbing.spill import read_spilled
from schemas import PromptRequest
from schemas.topics import DLQ
from tests.kafka_helpers import dead_letters_from, make_topic, run_in_background, wait_until

NEAR_LIMIT = 1_048_576 - 4096  # under the producer's max_request_size with the record's own framing


class _DlqDown:
    """A publisher whose DLQ writes fail the first `failures` times (the broker refusing them)."""

    def __init__(self, inner: Publisher, failures: int) -> None:
        self._inner = inner
        self.failures = failures
        self.attempts = 0

    async def publish(self, topic: str, msg, key=None, partition=None):
        if topic == DLQ.name:
            self.attempts += 1
            if self.attempts <= self.failures:
                raise KafkaConnectionError("dead-letter topic unreachable (test)")
        return await self._inner.publish(topic, msg, key, partition)


def _runner(cfg: Config, dead_letters: DeadLetters, topic: str, handler, registry: CollectorRegistry) -> ConsumerRunner:
    return ConsumerRunner(
        cfg,
        topics=[topic],
        group_id=f"g-{uuid.uuid4().hex[:6]}",
        message_type=PromptRequest,
        handler=handler,
        dead_letters=dead_letters,
        registry=registry,
        max_in_flight=4,
    )


def _sample(registry: CollectorRegistry, name: str, **labels: str) -> float:
    return registry.get_sample_value(name, labels) or 0.0


async def test_a_record_near_the_size_limit_is_dead_lettered_whole_and_the_consumer_goes_on(
    cfg: Config, tmp_path: Path
) -> None:
    topic = await make_topic(cfg)
    garbage = b"\xc1" + uuid.uuid4().bytes * (NEAR_LIMIT // 16)
    served: list[str] = []

    async def handle(msg: PromptRequest, _r) -> None:
        served.append(msg.id)

    registry = CollectorRegistry()
    async with Publisher(cfg) as pub:
        await pub.publish_raw(topic, garbage, key=b"big")
        ok = PromptRequest(run_id="t", text="after the big one")
        await pub.publish(topic, ok)
        letters_out = DeadLetters(pub, "test-big", "t", registry, spill_dir=tmp_path / "spill")
        runner = _runner(cfg, letters_out, topic, handle, registry)
        task = await run_in_background(runner)
        await wait_until(lambda: served == [ok.id], what="the good record after the oversized one")
        assert not task.done(), "the consumer died on the oversized record"
        runner.stop()
        await task
    [letter] = await dead_letters_from(cfg, topic, 1)
    assert letter.payload_size == len(garbage) and letter.payload_sha256 == hashlib.sha256(garbage).hexdigest()
    assert letter.payload == garbage[:1024] and not letter.complete
    assert read_spilled(letter.payload_ref) == garbage  # kept whole, found where the letter says
    assert Path(letter.payload_ref).name == letter.payload_sha256  # content-addressed
    assert _sample(registry, "primerl_dead_letters_spilled_total", stage="test-big") == 1


async def test_oversized_headers_and_key_go_to_a_file_too(cfg: Config, tmp_path: Path) -> None:
    topic = await make_topic(cfg)
    headers = [(f"h{i}", b"x" * 50_000) for i in range(8)]  # 400 kB of headers
    registry = CollectorRegistry()
    async with Publisher(cfg) as pub:
        await pub.publish_raw(topic, b"\xc1not a message", key=b"k" * 200_000, headers=headers)
        letters_out = DeadLetters(pub, "test-headers", "t", registry, spill_dir=tmp_path / "spill")
        runner = _runner(cfg, letters_out, topic, lambda *_: None, registry)
        task = await run_in_background(runner)
        [letter] = await dead_letters_from(cfg, topic, 1)
        runner.stop()
        await task
    assert letter.payload == b"\xc1not a message" and not letter.payload_ref and letter.headers_ref
    import msgspec

    side = msgspec.msgpack.decode(read_spilled(letter.headers_ref))
    assert side["key"] == b"k" * 200_000 and [(k, v) for k, v in side["headers"]] == headers


async def test_a_dead_letter_topic_that_refuses_pauses_the_consumer_until_it_takes_the_letter(
    cfg: Config, tmp_path: Path
) -> None:
    topic = await make_topic(cfg)
    served: list[str] = []

    async def handle(msg: PromptRequest, _r) -> None:
        served.append(msg.id)

    registry = CollectorRegistry()
    async with Publisher(cfg) as pub:
        flaky = _DlqDown(pub, failures=4)
        letters_out = DeadLetters(flaky, "test-blocked", "t", registry, spill_dir=tmp_path)  # type: ignore[arg-type]
        runner = _runner(cfg, letters_out, topic, handle, registry)
        task = await run_in_background(runner)
        await wait_until(lambda: bool(runner.assignment), what="the assignment")
        await pub.publish_raw(topic, b"\xc1garbage while the DLQ is down", key=b"g")
        goods = [PromptRequest(run_id="t", text=f"good {i}") for i in range(3)]
        for g in goods:
            await pub.publish(topic, g)
        await wait_until(lambda: runner.paused_for == "dead_letters_blocked", what="the pause")
        assert _sample(registry, "primerl_dead_letters_blocked", stage="test-blocked") == 1
        assert _sample(registry, "primerl_consumer_paused", group=runner.group_id, reason="dead_letters_blocked") == 1
        # Records already in flight go on; the poison's offset holds the partition's commit.
        assert all(o.committed <= 0 for o in runner._offsets.values()), "committed past a record not yet dead-lettered"
        await wait_until(
            lambda: flaky.attempts == 5 and runner.paused_for == "", timeout_s=60, what="the letter, then the resume"
        )
        assert not task.done(), "the consumer died while the DLQ was down"
        await wait_until(lambda: len(served) == 3, what="every good record")
        assert _sample(registry, "primerl_dead_letters_blocked", stage="test-blocked") == 0
        assert _sample(registry, "primerl_dead_letter_publish_failures_total", stage="test-blocked") == 4
        runner.stop()
        await task
    letters = await dead_letters_from(cfg, topic, 1)
    assert len(letters) == 1 and letters[0].payload.startswith(b"\xc1garbage")  # exactly once
    assert sorted(served) == sorted(g.id for g in goods)  # nothing skipped


async def test_a_stage_stopped_while_the_dlq_is_down_leaves_the_record_uncommitted(cfg: Config, tmp_path: Path) -> None:
    topic = await make_topic(cfg)
    group = f"g-{uuid.uuid4().hex[:6]}"
    served: list[str] = []

    async def handle(msg: PromptRequest, _r) -> None:
        served.append(msg.id)

    async with Publisher(cfg) as pub:
        await pub.publish_raw(topic, b"\xc1poison", key=b"p")
        after = PromptRequest(run_id="t", text="after")
        await pub.publish(topic, after, key=b"p")
        registry = CollectorRegistry()
        down = DeadLetters(_DlqDown(pub, failures=10**6), "test-stop", "t", registry, spill_dir=tmp_path)  # type: ignore[arg-type]
        first = ConsumerRunner(
            cfg,
            topics=[topic],
            group_id=group,
            message_type=PromptRequest,
            handler=handle,
            dead_letters=down,
            registry=registry,
            max_in_flight=1,
        )
        task = await run_in_background(first)
        await wait_until(lambda: first.paused_for == "dead_letters_blocked", what="the pause")
        first.stop()
        await task
        assert served == []  # nothing after the poison went ahead of it
        registry2 = CollectorRegistry()
        second = ConsumerRunner(
            cfg,
            topics=[topic],
            group_id=group,
            message_type=PromptRequest,
            handler=handle,
            dead_letters=DeadLetters(pub, "test-stop", "t", registry2, spill_dir=tmp_path),
            registry=registry2,
            max_in_flight=1,
        )
        task = await run_in_background(second)
        await wait_until(
            lambda: served == [after.id], what="the next owner to dead-letter the poison and serve the rest"
        )
        second.stop()
        await task
    assert len(await dead_letters_from(cfg, topic, 1)) == 1


async def test_an_outage_in_a_handler_is_retried_not_dead_lettered(cfg: Config, tmp_path: Path) -> None:
    topic = await make_topic(cfg)
    calls: list[str] = []

    async def handle(msg: PromptRequest, _r) -> None:
        calls.append(msg.id)
        if len(calls) <= 2:
            raise KafkaConnectionError("broker unreachable (test)")

    registry = CollectorRegistry()
    async with Publisher(cfg) as pub:
        req = PromptRequest(run_id="t", text="good, but the broker is away")
        await pub.publish(topic, req)
        runner = _runner(
            cfg, DeadLetters(pub, "test-outage", "t", registry, spill_dir=tmp_path), topic, handle, registry
        )
        task = await run_in_background(runner)
        await wait_until(lambda: len(calls) == 3, what="two retries then success")
        runner.stop()
        await task
    assert calls == [req.id] * 3
    assert _sample(registry, "primerl_records_retried_total", group=runner.group_id) == 2
    assert _sample(registry, "primerl_records_dead_lettered_total", group=runner.group_id) == 0


def test_failures_are_classified_by_whose_fault_they_are() -> None:
    from aiokafka.errors import MessageSizeTooLargeError, RequestTimedOutError
    from redis.exceptions import ConnectionError as RedisConnectionError
    from redis.exceptions import ResponseError

    from schemas import DecodeError

    assert (
        is_transient(KafkaConnectionError())
        and is_transient(RequestTimedOutError())
        and is_transient(RedisConnectionError())
    )
    assert not is_transient(MessageSizeTooLargeError()) and not is_transient(DecodeError("x"))
    assert not is_transient(ResponseError("WRONGTYPE")) and not is_transient(ValueError("bad input"))


async def test_a_bad_policy_record_is_dead_lettered_once_however_many_engines_read_it(
    cfg: Config, tmp_path: Path, monkeypatch
) -> None:
    import asyncio

    import plumbing.policy_feed as feed_module
    from plumbing.policy_feed import PolicyFeed
    from plumbing.redis_client import connect_redis
    from schemas import PolicyUpdate
    from schemas.topics import POLICY, Topic

    topic = await make_topic(cfg)
    monkeypatch.setattr(feed_module, "POLICY", Topic(topic, 1, POLICY.message_type, POLICY.key_rule))
    redis = connect_redis(cfg)
    async with Publisher(cfg) as pub:
        await pub.publish_raw(topic, b"\xc1 not an update")
        await pub.publish(topic, PolicyUpdate(run_id="t", version=3, weights_path="/w"))
        for _ in range(3):  # three engine starts, one after the other
            feed = PolicyFeed(
                cfg, DeadLetters(pub, "test-feed", "t", CollectorRegistry(), spill_dir=tmp_path), redis=redis
            )
            task = asyncio.create_task(feed.run())
            await wait_until(lambda f=feed: f.latest("t") == 3 and f.caught_up.is_set(), what="the feed to catch up")
            feed.stop()
            await task
    await redis.aclose()
    letters = await dead_letters_from(cfg, topic, 1)
    import pytest

    with pytest.raises(TimeoutError):
        await dead_letters_from(cfg, topic, 2, timeout_s=5)
    assert letters[0].payload == b"\xc1 not an update"
