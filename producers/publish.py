"""Publishing prompt requests at a bounded rate, with a progress bar and a report."""

from __future__ import annotations

import asyncio
import time
from collections import Counter as TallyCounter

import msgspec
from prometheus_client import CollectorRegistry, Counter
from tqdm import tqdm

from plumbing.config import Config
from plumbing.kafka import Publisher
from schemas import PromptRequest
from schemas.topics import PROMPTS

# Acks awaited per window: bounds the futures held while keeping the producer's batches full.
_ACK_WINDOW = 256


class PublishReport(msgspec.Struct, kw_only=True):
    """What a publish did."""

    run_id: str
    topic: str
    requests: int
    samples: int  # requests x their group sizes: the completions to expect
    seconds: float
    per_task: dict[str, int]
    partitions: dict[int, int]
    first_ids: list[str]

    @property
    def rate(self) -> float:
        """Requests acknowledged per second."""
        return self.requests / self.seconds if self.seconds > 0 else float("inf")


async def publish_requests(
    cfg: Config,
    requests: list[PromptRequest],
    *,
    rate: float = 0.0,
    progress: bool = True,
    topic: str = PROMPTS.name,
    registry: CollectorRegistry | None = None,
) -> PublishReport:
    """Publish `requests` keyed by their routing key, at most `rate` per second (0: no limit);
    returns once every one is acknowledged. `registry` gets a counter of acknowledged requests."""
    acked = (
        Counter("primerl_publish_requests", "Prompt requests acknowledged by the broker", registry=registry)
        if registry
        else None
    )
    partitions: TallyCounter[int] = TallyCounter()
    bar = tqdm(total=len(requests), unit="req", desc="publish", disable=not progress)
    t0 = time.monotonic()
    async with Publisher(cfg) as pub:
        pending: list[asyncio.Future] = []

        def acked_one(fut: asyncio.Future) -> None:
            # Progress and tallies as acks arrive, so a slow rate still shows movement.
            if not fut.cancelled() and fut.exception() is None:
                partitions[fut.result().partition] += 1
                bar.update(1)
                if acked is not None:
                    acked.inc()

        async def drain() -> None:
            await asyncio.gather(*pending)  # raises the first failed send
            pending.clear()

        for i, req in enumerate(requests):
            if rate > 0:
                # A schedule, not a sleep per message: the long-run rate is exact even when
                # single sends or sleeps overrun.
                delay = t0 + i / rate - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)
            fut = await pub.send(topic, req, req.routing_key())
            fut.add_done_callback(acked_one)
            pending.append(fut)
            if len(pending) >= _ACK_WINDOW:
                await drain()
        await drain()
    bar.close()
    return PublishReport(
        run_id=requests[0].run_id if requests else "",
        topic=topic,
        requests=len(requests),
        samples=sum(r.group_size for r in requests),
        seconds=time.monotonic() - t0,
        per_task=dict(TallyCounter(r.task for r in requests)),
        partitions=dict(sorted(partitions.items())),
        first_ids=[r.id for r in requests[:3]],
    )
