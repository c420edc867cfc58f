"""Watching a run from outside: chunk, completion and (optionally) reward arrival times, per request."""

from __future__ import annotations

import asyncio
import time
import uuid
from dataclasses import dataclass, field

from aiokafka import AIOKafkaConsumer

from plumbing.config import Config
from plumbing.dead_letters import dead_letter_sample_ids
from plumbing.kafka import consumer_kwargs
from schemas import Completion, CompletionChunk, DeadLetter, DecodeError, Reward, decode
from schemas.topics import CHUNKS, COMPLETIONS, DLQ, REWARDS


@dataclass
class RequestView:
    """What an outside observer saw of one prompt request."""

    first_chunk_at: float = 0.0
    chunks: dict[int, list[CompletionChunk]] = field(default_factory=dict)
    finals: dict[int, Completion] = field(default_factory=dict)
    final_at: float = 0.0
    rewards: dict[int, Reward] = field(default_factory=dict)  # by sample index (with_rewards only)
    reward_at: float = 0.0
    dead: dict[int, str] = field(default_factory=dict)  # sample index -> stage: error_type: error


class RunObserver:
    """Consumes chunks and completions of one run (a private group, from the beginning);
    also its rewards with `with_rewards` (what a client of the verified pipeline sees), and
    then the dead letters of its requests and completions too, so a client waiting on a reward
    learns at once that none will come (the bench waited out a 600 s timeout on one in the levers run)."""

    def __init__(self, cfg: Config, run_id: str, with_rewards: bool = False) -> None:
        self.run_id = run_id
        self.requests: dict[str, RequestView] = {}
        self.duplicates = 0
        topics = [CHUNKS.name, COMPLETIONS.name] + ([REWARDS.name, DLQ.name] if with_rewards else [])
        self._consumer = AIOKafkaConsumer(*topics, **consumer_kwargs(cfg, f"observer-{run_id}-{uuid.uuid4().hex[:6]}"))
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
                        elif tp.topic == REWARDS.name:
                            reward = decode(r.value, Reward, list(r.headers))
                            if reward.run_id != self.run_id:
                                continue
                            view = self.requests.setdefault(reward.request_id, RequestView())
                            index = int(reward.completion_id.rpartition("/")[2])
                            view.rewards.setdefault(index, reward)
                            view.reward_at = view.reward_at or now
                        elif tp.topic == DLQ.name:
                            self._dead_letter(decode(r.value, DeadLetter, list(r.headers)))
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

    def _dead_letter(self, letter: DeadLetter) -> None:
        """Note a letter whose original is one of this run's requests, completions or rewards."""
        why = f"{letter.stage}: {letter.error_type}: {letter.error}"
        for sample_id in dead_letter_sample_ids(letter, self.run_id):
            request_id, _, index = sample_id.rpartition("/")
            if not index.isdigit():  # a forged id; engines name samples <request id>/<index>
                continue
            self.requests.setdefault(request_id, RequestView()).dead.setdefault(int(index), why)
