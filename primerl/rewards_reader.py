"""Reading the rewards of one run back from rollout.rewards."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Callable

from aiokafka import AIOKafkaConsumer

from plumbing.config import Config
from plumbing.kafka import consumer_kwargs
from schemas import Reward, decode
from schemas.topics import REWARDS


class RewardsReader:
    """Collects every reward record of `run_id` (duplicates kept, in arrival order)."""

    def __init__(self, cfg: Config, run_id: str) -> None:
        self.run_id = run_id
        self.rewards: list[Reward] = []
        self._consumer = AIOKafkaConsumer(
            REWARDS.name, **consumer_kwargs(cfg, f"rewards-reader-{uuid.uuid4().hex[:8]}")
        )
        self._task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> RewardsReader:
        await self._consumer.start()
        self._task = asyncio.create_task(self._collect())
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._task
        self._task.cancel()
        await asyncio.gather(self._task, return_exceptions=True)
        await self._consumer.stop()

    async def wait_for(
        self, count: int, timeout_s: float, on_progress: Callable[[int], None] | None = None
    ) -> list[Reward]:
        """Wait until `count` rewards arrived; returns them. `on_progress(n)` hears each new count."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while len(self.rewards) < count:
            if on_progress is not None:
                on_progress(len(self.rewards))
            if loop.time() > deadline:
                raise AssertionError(f"got {len(self.rewards)} of {count} rewards after {timeout_s}s")
            await asyncio.sleep(0.1)
        return self.rewards

    async def _collect(self) -> None:
        while True:
            for records in (await self._consumer.getmany(timeout_ms=200)).values():
                for r in records:
                    reward = decode(r.value, Reward, list(r.headers))
                    if reward.run_id == self.run_id:
                        self.rewards.append(reward)
