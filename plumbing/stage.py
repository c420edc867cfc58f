"""One lifecycle for every stage process: metrics, Redis, publisher, signals, supervision.

A stage is anything with `run()` (until stopped or failed), an idempotent `stop()`
and a `ready` event (set once it consumes). `serve_stage` replaces the four copies of
start-up the stages had: it serves /metrics, opens Redis and an acking publisher,
lets the stage's `build` make the stage (registering its own clean-up on the exit
stack), installs SIGTERM/SIGINT when the stage is a process of its own, hands the
stage to an in-process driver through `started`, runs it, and closes everything in
reverse order however it ended.

`supervise` runs a main stage with the ones embedded beside it (the router and the
deferral inside an engine process): whichever ends first ends them all, and an end
that was not asked for is raised with its cause, never swallowed.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Awaitable, Callable
from contextlib import AsyncExitStack
from dataclasses import dataclass
from typing import Protocol, TypeVar, runtime_checkable

from prometheus_client import CollectorRegistry
from redis.asyncio import Redis

from plumbing.config import Config
from plumbing.consumer import FatalError
from plumbing.kafka import Publisher
from plumbing.metrics import serve_metrics
from plumbing.redis_client import connect_redis

log = logging.getLogger(__name__)


@runtime_checkable
class Stage(Protocol):
    """What `serve_stage` and `supervise` need of a stage."""

    async def run(self) -> None:
        """Work until `stop()` (return) or a failure (raise)."""

    def stop(self) -> None:
        """Ask `run` to finish; idempotent."""

    @property
    def ready(self) -> asyncio.Event:
        """Set once the stage consumes (its group gave it partitions)."""


class StageEnded(FatalError):
    """A stage ended that nobody asked to stop: the process cannot go on."""


@dataclass
class StageContext:
    """What `build` gets to make its stage: the process's clients, and the exit stack for its own clean-up."""

    cfg: Config
    registry: CollectorRegistry
    redis: Redis | None  # None for a stage that keeps no state in Redis (the archiver)
    publisher: Publisher
    stack: AsyncExitStack
    metrics_port: int

    def need_redis(self) -> Redis:
        """The Redis client, for a stage served with `uses_redis` (the default)."""
        if self.redis is None:
            raise RuntimeError("this stage was served without Redis (uses_redis=False)")
        return self.redis


S = TypeVar("S")


async def serve_stage(
    cfg: Config,
    name: str,
    build: Callable[[StageContext], Awaitable[tuple[S, Stage]]],
    started: asyncio.Future[S] | None = None,
    *,
    uses_redis: bool = True,
) -> None:
    """Run the stage `build` makes until SIGTERM/SIGINT or its failure; see the module doc.

    `build` returns (handle, runnable): the handle is what `started` receives (the
    worker a driver talks to), the runnable what runs (the worker itself, or the
    worker supervised with its embedded stages).
    """
    registry = CollectorRegistry()
    port = serve_metrics(cfg.metrics, registry)
    async with AsyncExitStack() as stack:
        redis = connect_redis(cfg) if uses_redis else None
        if redis is not None:
            stack.push_async_callback(redis.aclose)
        publisher = await stack.enter_async_context(Publisher(cfg))
        handle, runnable = await build(StageContext(cfg, registry, redis, publisher, stack, port))
        if started is None:  # a process of its own; an embedding driver owns the signals
            loop = asyncio.get_running_loop()
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(sig, runnable.stop)
        log.info("%s serving; metrics on :%d", name, port)
        if started is not None:
            started.set_result(handle)
        await runnable.run()


class Supervised:
    """A main stage with embedded ones, run and stopped as one (see the module doc)."""

    def __init__(self, main: Stage, embedded: list[Stage]) -> None:
        self.main = main
        self.embedded = embedded

    @property
    def ready(self) -> asyncio.Event:
        """The main stage's readiness."""
        return self.main.ready

    def stop(self) -> None:
        """Stop the main stage; the embedded ones follow."""
        self.main.stop()

    async def run(self) -> None:
        """Run all; the first to end ends the rest. An embedded stage ending on its own is a failure."""
        await supervise({"main": self.main, **{type(s).__name__.lower(): s for s in self.embedded}}, main="main")


async def supervise(stages: dict[str, Stage], main: str) -> None:
    """Run `stages` until the first one ends; stop the others; raise StageEnded unless `main` ended cleanly."""
    tasks = {asyncio.create_task(s.run(), name=n): n for n, s in stages.items()}
    try:
        done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        first = next(iter(done))
        name = tasks[first]
        if name == main:
            first.result()  # re-raise the main stage's own failure
            return
        cause = first.exception() if not first.cancelled() else None
        log.error("%s ended (%r): stopping %s", name, cause, ", ".join(n for n in stages if n != name))
        raise StageEnded(f"{name} ended: {cause!r}") from cause
    finally:
        for s in stages.values():
            s.stop()
        await asyncio.gather(*tasks, return_exceptions=True)
