"""Process start-up: logging and the uvloop event loop."""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Coroutine
from typing import Any, TypeVar

import uvloop

T = TypeVar("T")


def setup_logging(level: str = "INFO") -> None:
    """One log format for every process."""
    logging.basicConfig(level=level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("aiokafka").setLevel(logging.WARNING)


def run(coro: Coroutine[Any, Any, T]) -> T:
    """Run `coro` to completion on uvloop.

    SIGTERM cancels it, so `finally` blocks (stopping local servers, checkpoints) run
    as on Ctrl-C; a stage that handles SIGTERM itself replaces this handler.
    """

    async def main() -> T:
        task = asyncio.current_task()
        assert task is not None
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, task.cancel)
        return await coro

    return uvloop.run(main())
