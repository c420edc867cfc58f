"""Admission into the engine: a bound on requests in flight, and drains for weight reloads."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager


class Admission:
    """Lets at most `limit` requests run; `exclusive()` waits for all to finish and
    holds new ones back (a weight reload must not mix KV of two policies)."""

    def __init__(self, limit: int) -> None:
        self._limit = limit
        self._running = 0
        self._exclusive = False
        self._cond = asyncio.Condition()

    @property
    def running(self) -> int:
        """Requests admitted and not yet finished."""
        return self._running

    @asynccontextmanager
    async def slot(self) -> AsyncIterator[None]:
        """Hold one request slot for the body."""
        async with self._cond:
            await self._cond.wait_for(lambda: not self._exclusive and self._running < self._limit)
            self._running += 1
        try:
            yield
        finally:
            async with self._cond:
                self._running -= 1
                self._cond.notify_all()

    @asynccontextmanager
    async def exclusive(self) -> AsyncIterator[None]:
        """Drain every running request, block new ones, run the body alone."""
        async with self._cond:
            await self._cond.wait_for(lambda: not self._exclusive)
            self._exclusive = True
            await self._cond.wait_for(lambda: self._running == 0)
        try:
            yield
        finally:
            async with self._cond:
                self._exclusive = False
                self._cond.notify_all()
