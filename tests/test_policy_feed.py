"""The policy feed on the real broker: a starting reader applies only the newest version of each run."""

from __future__ import annotations

import asyncio
from pathlib import Path

from prometheus_client import CollectorRegistry

import plumbing.policy_feed as feed_module
from plumbing.config import Config
from plumbing.dead_letters import DeadLetters
from plumbing.kafka import Publisher
from plumbing.policy_feed import PolicyFeed
from schemas import PolicyUpdate
from schemas.topics import POLICY, Topic
from tests.kafka_helpers import make_topic, wait_until


async def test_a_starting_reader_applies_only_the_newest_update_of_each_run(
    cfg: Config, tmp_path: Path, monkeypatch
) -> None:
    topic = await make_topic(cfg)
    monkeypatch.setattr(feed_module, "POLICY", Topic(topic, 1, POLICY.message_type, POLICY.key_rule))
    applied: list[tuple[str, int]] = []

    async def on_update(u: PolicyUpdate, _record) -> bool:
        applied.append((u.run_id, u.version))
        return True

    async with Publisher(cfg) as pub:
        for v in (1, 2, 3):
            await pub.publish(topic, PolicyUpdate(run_id="a", version=v, weights_path=f"/gone/v{v}"))
        await pub.publish(topic, PolicyUpdate(run_id="b", version=1, weights_path="/b/v1"))
        feed = PolicyFeed(cfg, DeadLetters(pub, "test-feed", "t", CollectorRegistry(), spill_dir=tmp_path), on_update)
        task = asyncio.create_task(feed.run())
        await asyncio.wait_for(feed.caught_up.wait(), 30)
        assert sorted(applied) == [("a", 3), ("b", 1)]  # not v1 and v2 of run a: superseded
        assert feed.latest("a") == 3 and feed.latest() == 3
        await pub.publish(topic, PolicyUpdate(run_id="a", version=4, weights_path="/a/v4"))
        await wait_until(lambda: feed.latest("a") == 4, what="a live update, applied at once")
        assert applied[-1] == ("a", 4)
        feed.stop()
        await task
