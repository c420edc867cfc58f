"""The foundation's main job: push prompt requests through the broker and read them back."""

from __future__ import annotations

import asyncio
import statistics
import time
import uuid

import msgspec
from aiokafka.structs import ConsumerRecord
from prometheus_client import CollectorRegistry
from tqdm import tqdm

from plumbing.config import Config
from plumbing.consumer import ConsumerRunner
from plumbing.dead_letters import DeadLetters
from plumbing.kafka import Publisher
from schemas import ChatMessage, PromptRequest
from schemas.topics import PROMPTS


class RoundtripReport(msgspec.Struct):
    """Counts and timings of one round trip."""

    published: int
    received: int
    publish_s: float
    latency_p50_ms: float
    latency_p95_ms: float
    total_s: float


def _batch(run_id: str, n: int) -> list[PromptRequest]:
    return [
        PromptRequest(
            run_id=run_id,
            messages=[ChatMessage("user", f"What is {i} + {i}? Answer with a number.")],
            group_size=4,
            task="math",
            reference=str(2 * i),
        )
        for i in range(n)
    ]


async def roundtrip(cfg: Config, n: int = 200) -> RoundtripReport:
    """Publish `n` prompt requests (acked) and consume them back in a fresh group."""
    run_id = f"roundtrip-{uuid.uuid4().hex[:8]}"
    registry = CollectorRegistry()
    wanted: set[str] = set()
    latencies: list[float] = []
    done = asyncio.Event()
    bar = tqdm(total=n, desc="received", unit="msg")
    async with Publisher(cfg) as pub:

        async def handle(msg: PromptRequest, _record: ConsumerRecord) -> None:
            if msg.id in wanted:
                wanted.discard(msg.id)
                latencies.append((time.time() - msg.created_at) * 1000)
                bar.update(1)
                if not wanted:
                    done.set()

        runner = ConsumerRunner(
            cfg,
            topics=[PROMPTS.name],
            group_id=run_id,
            message_type=PromptRequest,
            handler=handle,
            dead_letters=DeadLetters(pub, "roundtrip", run_id, registry),
            registry=registry,
            max_in_flight=64,
        )
        task = asyncio.create_task(runner.run())
        try:
            # Join the group first, so the timings measure the pipeline, not the join.
            await asyncio.wait_for(runner.assigned.wait(), timeout=60)
            t0 = time.perf_counter()
            batch = _batch(run_id, n)
            wanted.update(r.id for r in batch)
            await pub.publish_many(PROMPTS.name, [(r, r.routing_key()) for r in batch])
            publish_s = time.perf_counter() - t0
            await asyncio.wait_for(done.wait(), timeout=120)
        finally:
            runner.stop()
            await task
            bar.close()
    latencies.sort()
    return RoundtripReport(
        published=n,
        received=len(latencies),
        publish_s=publish_s,
        latency_p50_ms=statistics.median(latencies) if latencies else float("nan"),
        latency_p95_ms=latencies[int(0.95 * (len(latencies) - 1))] if latencies else float("nan"),
        total_s=time.perf_counter() - t0,
    )
