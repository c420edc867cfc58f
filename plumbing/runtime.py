"""Process start-up: logging and the uvloop event loop."""

from __future__ import annotations

import logging
from collections.abc import Coroutine
from typing import Any, TypeVar

import uvloop

T = TypeVar("T")


def setup_logging(level: str = "INFO") -> None:
    """One log format for every process."""
    logging.basicConfig(level=level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("aiokafka").setLevel(logging.WARNING)


def run(coro: Coroutine[Any, Any, T]) -> T:
    """Run `coro` to completion on uvloop."""
    return uvloop.run(coro)
