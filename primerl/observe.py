"""Watching a run from outside: chunk and completion arrival times, per request."""

from __future__ import annotations

import asyncio
import time
import uuid
from dataclasses import dataclass, field

from aiokafka import AIOKafkaConsumer

from plumbing.config import Config
from plumbing.kafka import consumer_kwargs
from schemas import Completion, CompletionChunk, DecodeError, decode
from schemas.topics import CHUNKS, COMPLETIONS


@dataclass
class RequestView:
    """What an outside observer saw of one prompt request."""

    first_chunk_at: float = 0.0
    chunks: dict[int, list[CompletionChunk]] = field(default_factory=dict)
    finals: dict[int, Completion] = field(default_factory=dict)
    final_at: float = 0.0


class RunObserver:
    """Consumes chunks and completions of one run (a private group, from the beginning)."""

    def __init__(self, cfg: Config, run_id: str) -> None:
        self.run_id = run_id
        self.requests: dict[str, RequestView] = {}
        self.duplicates = 0
        self._consumer = AIOKafkaConsumer(
            CHUNKS.name, COMPLETIONS.name, **consumer_kwargs(cfg, f"observer-{run_id}-{uuid.uuid4().hex[:6]}")
        )
        self._task: asyncio.Task[None] | None = None
        self.ready = asyncio.Event()

    async def start(self) -> None:
        """Join and start collecting in the background."""
        await self._consumer.start()
        self._task = asyncio.create_task(self._collect())

    async def stop(self) -> None:
        """Stop collecting."""
        if self._task:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        await self._consumer.stop()

    def finals(self) -> list[Completion]:
        """Every distinct final completion seen."""
        return [c for v in self.requests.values() for c in v.finals.values()]

    async def wait_finals(self, count: int, timeout_s: float) -> None:
        """Wait until `count` distinct finals were seen."""
        deadline = time.monotonic() + timeout_s
        while len(self.finals()) < count:
            if time.monotonic() > deadline:
                raise TimeoutError(f"saw {len(self.finals())} of {count} completions after {timeout_s}s")
            await asyncio.sleep(0.05)

    async def _collect(self) -> None:
        while True:
            batches = await self._consumer.getmany(timeout_ms=100)
            if self._consumer.assignment():
                self.ready.set()
            now = time.time()
            for tp, records in batches.items():
                for r in records:
                    try:
                        if tp.topic == CHUNKS.name:
                            chunk = decode(r.value, CompletionChunk, list(r.headers))
                            if chunk.run_id != self.run_id:
                                continue
                            view = self.requests.setdefault(chunk.request_id, RequestView())
                            view.first_chunk_at = view.first_chunk_at or now
                            view.chunks.setdefault(chunk.sample_index, []).append(chunk)
                        else:
                            final = decode(r.value, Completion, list(r.headers))
                            if final.run_id != self.run_id:
                                continue
                            view = self.requests.setdefault(final.request_id, RequestView())
                            if final.sample_index in view.finals:
                                self.duplicates += 1
                            view.finals[final.sample_index] = final
                            view.final_at = now
                    except DecodeError:
                        continue  # not ours to judge: the producing stage dead-letters its own garbage
