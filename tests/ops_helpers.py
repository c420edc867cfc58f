"""Helpers shared by the operations tests: reading a run's prompts back from the topic."""

from __future__ import annotations

import asyncio
import uuid

from aiokafka import AIOKafkaConsumer

from plumbing.config import Config
from plumbing.kafka import consumer_kwargs
from schemas import PromptRequest, decode
from schemas.topics import PROMPTS


async def prompts_of_run(cfg: Config, run_id: str, count: int, timeout_s: float = 30, settle_s: float = 1.0) -> list[PromptRequest]:
    """Every prompt request of `run_id` on rollout.prompts (a private group, from the start):
    waits for `count`, then `settle_s` more so that extra ones would show up."""
    consumer = AIOKafkaConsumer(PROMPTS.name, **consumer_kwargs(cfg, f"prompts-reader-{uuid.uuid4().hex[:8]}"))
    await consumer.start()
    found: list[PromptRequest] = []
    loop = asyncio.get_running_loop()
    try:
        deadline = loop.time() + timeout_s
        settle_until: float | None = None
        while True:
            now = loop.time()
            if settle_until is None and len(found) >= count:
                settle_until = now + settle_s
            if (settle_until is not None and now >= settle_until) or now > deadline:
                break
            for records in (await consumer.getmany(timeout_ms=200)).values():
                for r in records:
                    try:
                        req = decode(r.value or b"", PromptRequest, list(r.headers or ()))
                    except ValueError:
                        continue
                    if req.run_id == run_id:
                        found.append(req)
    finally:
        await consumer.stop()
    return found
