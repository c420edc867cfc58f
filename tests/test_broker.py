"""The plumbing against the real broker and Redis: DLQ, consumer groups, redelivery, ledger."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import textwrap
import uuid

import pytest

from plumbing.config import Config
from plumbing.consumer import FatalError
from plumbing.kafka import Publisher
from plumbing.ledger import Ledger
from plumbing.redis_client import connect_redis
from schemas import PromptRequest
from tests.kafka_helpers import dead_letters_from, make_topic, run_in_background, runner_for, wait_until

GARBAGE = [b"\xc1\xc1\xc1 not msgpack", b'{"run_id": 5, "text": "wrong type"}', b"{truncated json", b""]


async def test_garbage_goes_to_the_dead_letter_topic_and_the_consumer_goes_on(cfg: Config) -> None:
    topic = await make_topic(cfg)
    good: list[str] = []

    async def handle(msg: PromptRequest, _r) -> None:
        good.append(msg.id)

    async with Publisher(cfg) as pub:
        for i, payload in enumerate(GARBAGE):
            await pub.publish_raw(topic, payload, key=b"k%d" % i)
        ok = PromptRequest(run_id="t", text="still served")
        await pub.publish(topic, ok)
        runner = runner_for(cfg, pub, topic, f"g-{uuid.uuid4().hex[:6]}", PromptRequest, handle)
        task = await run_in_background(runner)
        await wait_until(lambda: good == [ok.id], what="the good message after the garbage")
        runner.stop()
        await task
    letters = await dead_letters_from(cfg, topic, len(GARBAGE))
    assert sorted(letter.payload for letter in letters) == sorted(GARBAGE)
    by_payload = {letter.payload: letter for letter in letters}
    assert by_payload[GARBAGE[1]].error_type == "DecodeError" and "$.run_id" in by_payload[GARBAGE[1]].error
    assert all(letter.stage == f"test-{topic}" and letter.error for letter in letters)
    assert {letter.key for letter in letters} == {b"k0", b"k1", b"k2", b"k3"}


async def test_a_handler_crash_is_dead_lettered_not_fatal(cfg: Config) -> None:
    topic = await make_topic(cfg)
    seen: list[str] = []

    async def handle(msg: PromptRequest, _r) -> None:
        seen.append(msg.text or "")
        if msg.text == "boom":
            raise ZeroDivisionError("handler bug on this input")

    async with Publisher(cfg) as pub:
        for text in ("boom", "after"):
            await pub.publish(topic, PromptRequest(run_id="t", text=text), key=b"same")
        runner = runner_for(cfg, pub, topic, f"g-{uuid.uuid4().hex[:6]}", PromptRequest, handle, max_in_flight=1)
        task = await run_in_background(runner)
        await wait_until(lambda: seen == ["boom", "after"], what="both records")
        runner.stop()
        await task
    [letter] = await dead_letters_from(cfg, topic, 1)
    assert letter.error_type == "ZeroDivisionError" and "handler bug" in letter.error


async def test_consumer_group_of_two_splits_partitions_and_loses_nothing(cfg: Config) -> None:
    topic = await make_topic(cfg, partitions=4)
    group = f"g-{uuid.uuid4().hex[:6]}"
    got: dict[str, list[str]] = {"a": [], "b": []}

    def handler(name: str):
        async def handle(msg: PromptRequest, _r) -> None:
            got[name].append(msg.id)

        return handle

    async with Publisher(cfg) as pub:
        a = runner_for(cfg, pub, topic, group, PromptRequest, handler("a"))
        b = runner_for(cfg, pub, topic, group, PromptRequest, handler("b"))
        tasks = [await run_in_background(a), await run_in_background(b)]
        await wait_until(
            lambda: len(a.assignment) + len(b.assignment) == 4 and bool(a.assignment) and bool(b.assignment),
            what="both members assigned",
        )
        sent = [PromptRequest(run_id="t", text=str(i), group_id=f"grp{i}") for i in range(60)]
        await pub.publish_many(topic, [(m, m.routing_key()) for m in sent])
        await wait_until(lambda: len(got["a"]) + len(got["b"]) >= len(sent), what="all messages")
        a.stop()
        b.stop()
        await asyncio.gather(*tasks)
    assert sorted(got["a"] + got["b"]) == sorted(m.id for m in sent)
    assert got["a"] and got["b"], "both members of the group received records"


KILLED_CONSUMER = textwrap.dedent(
    """
    import asyncio, os, sys
    from plumbing.config import load_config
    from plumbing.kafka import Publisher
    from schemas import PromptRequest
    from tests.kafka_helpers import runner_for

    async def main():
        cfg = load_config(kafka_bootstrap_servers=sys.argv[1], redis_url=sys.argv[2])
        async with Publisher(cfg) as pub:
            async def handle(msg, _r):
                print("received", msg.id, flush=True)
                os._exit(9)  # dies before the output is acknowledged
            await runner_for(cfg, pub, sys.argv[3], sys.argv[4], PromptRequest, handle).run()

    asyncio.run(main())
    """
)


async def test_a_consumer_killed_before_acknowledging_has_its_message_redelivered(cfg: Config) -> None:
    topic = await make_topic(cfg)
    group = f"g-{uuid.uuid4().hex[:6]}"
    msg = PromptRequest(run_id="t", text="redeliver me")
    async with Publisher(cfg) as pub:
        await pub.publish(topic, msg)
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", KILLED_CONSUMER, cfg.bootstrap, cfg.redis_url, topic, group, stdout=subprocess.PIPE
    )
    out, _ = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 9 and f"received {msg.id}".encode() in out
    redelivered: list[str] = []

    async def handle(m: PromptRequest, _r) -> None:
        redelivered.append(m.id)

    async with Publisher(cfg) as pub:
        runner = runner_for(cfg, pub, topic, group, PromptRequest, handle)
        task = await run_in_background(runner)
        await wait_until(lambda: redelivered == [msg.id], what="redelivery to the next member")
        runner.stop()
        await task


async def test_the_ledger_makes_a_redelivered_message_take_effect_once(cfg: Config) -> None:
    topic = await make_topic(cfg)
    group = f"g-{uuid.uuid4().hex[:6]}"
    redis = connect_redis(cfg)
    ledger = Ledger(redis, f"test-{topic}")
    effect_key = f"effect:{topic}"
    deliveries: list[int] = []

    def handler(crash_after_effect: bool):
        async def handle(msg: PromptRequest, _r) -> None:
            deliveries.append(1)
            async with ledger.claim(msg.id) as fresh:
                if not fresh:
                    return
                await redis.incr(effect_key)
                await ledger.mark(msg.id)
            if crash_after_effect:
                raise FatalError("dies after the effect, before the commit")

        return handle

    msg = PromptRequest(run_id="t", text="once")
    async with Publisher(cfg) as pub:
        await pub.publish(topic, msg)
        first = runner_for(cfg, pub, topic, group, PromptRequest, handler(True))
        with pytest.raises(FatalError):
            await first.run()
        second = runner_for(cfg, pub, topic, group, PromptRequest, handler(False))
        task = await run_in_background(second)
        await wait_until(lambda: len(deliveries) == 2, what="the redelivery")
        second.stop()
        await task
    assert int(await redis.get(effect_key)) == 1
    await redis.aclose()


async def test_concurrent_deliveries_of_one_message_take_effect_once(cfg: Config) -> None:
    redis = connect_redis(cfg)
    ledgers = [Ledger(redis, f"test-{uuid.uuid4().hex[:6]}", claim_ttl_s=3)] * 1
    ledgers.append(Ledger(redis, ledgers[0]._prefix.split(":")[2], claim_ttl_s=3))  # a second worker, same stage
    effects: list[int] = []

    async def deliver(ledger: Ledger) -> None:
        async with ledger.claim("m1") as fresh:
            if fresh:
                await asyncio.sleep(4)  # longer than the claim TTL: the claim must be renewed
                effects.append(1)
                await ledger.mark("m1")

    await asyncio.gather(*(deliver(ledger) for ledger in ledgers * 2))
    assert effects == [1]
    await redis.aclose()


async def test_a_dead_workers_claim_expires(cfg: Config) -> None:
    redis = connect_redis(cfg)
    stage = f"test-{uuid.uuid4().hex[:6]}"
    await redis.set(f"primerl:ledger:{stage}:m1", b"someone-dead", ex=1)
    async with Ledger(redis, stage).claim("m1") as fresh:
        assert fresh
    await redis.aclose()
