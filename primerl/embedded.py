"""Running stages inside one driver process (`primerl up`, benchmarks)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

from plumbing.config import Config
from plumbing.kafka import Publisher
from schemas import PromptRequest
from schemas.topics import PROMPTS

W = TypeVar("W")

Serve = Callable[[Config, "asyncio.Future[W]"], Coroutine[Any, Any, None]]


async def start_stage(serve: Serve[W], cfg: Config) -> tuple[asyncio.Task[None], W]:
    """Start `serve(cfg, started)` as a task; returns it with the worker once it serves.

    Raises the stage's own error if it fails before it is up.
    """
    started: asyncio.Future[W] = asyncio.get_running_loop().create_future()
    task = asyncio.create_task(serve(cfg, started), name=serve.__name__.removeprefix("serve_"))
    waiting: set[asyncio.Future[Any]] = {task, started}
    await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
    if not started.done():
        task.result()  # it ended before serving: raise why
        raise RuntimeError(f"{serve.__name__} returned before serving")
    return task, started.result()


async def publish_prompts(cfg: Config, reqs: list[PromptRequest]) -> float:
    """Publish `reqs` keyed by their routing key and wait for every ack; returns the send time."""
    async with Publisher(cfg) as pub:
        t0 = time.time()
        await pub.publish_many(PROMPTS.name, [(r, r.routing_key()) for r in reqs])
    return t0
