"""Fuzz: the router stage (rollout.prompts -> rollout.routed), in-process.

The router runs on a private source/output topic pair, its own consumer group and its
own Redis database (as in test_routing), so the session's real engine never sees the
storm; the code path is the one `primerl router` runs.
"""

from __future__ import annotations

import asyncio
import time
import uuid

import pytest
from prometheus_client import CollectorRegistry
from redis.asyncio import Redis
from transformers import AutoTokenizer

from plumbing.config import Config
from plumbing.kafka import Publisher
from plumbing.model_store import resolve_model
from plumbing.prefix_cache.held_blocks import HeldBlocks
from plumbing.prefix_cache.index import PrefixIndex, WorkerInfo
from router.router import Router
from schemas import ChatMessage, PromptRequest, SamplingParams, decode
from tests.fuzz.harness import (
    DEFAULT_N,
    Ledger,
    Watch,
    assert_clean,
    dlq_watch,
    heavy_n,
    make_topic,
    publish_storm,
    stop_stage,
    wait_accounted,
)
from tests.kafka_helpers import wait_until


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(resolve_model(None))


@pytest.mark.parametrize("variant", ["default", pytest.param("heavy", marks=pytest.mark.fuzz)])
async def test_router_survives_the_storm_and_accounts_for_every_record(
    cfg: Config, tokenizer, variant: str, pytestconfig
) -> None:
    n = DEFAULT_N if variant == "default" else heavy_n(pytestconfig)
    run_id = f"fz-router-{uuid.uuid4().hex[:6]}"
    redis = Redis.from_url(cfg.redis_url.rsplit("/", 1)[0] + "/5")  # a database no engine of the session uses
    await redis.flushdb()
    index = PrefixIndex(redis, cfg.routing.ttl_s)
    for w in (
        WorkerInfo(worker_id="w0", partitions=[0, 1, 2, 3], block_size=16),
        WorkerInfo(worker_id="w1", partitions=[4, 5, 6, 7], block_size=16),
    ):
        await index.heartbeat(w, HeldBlocks(), resync=True)  # cache-aware decisions render every prompt
    source, out = await make_topic(cfg, "prompts", 4), await make_topic(cfg, "routed", 8)
    t0 = time.monotonic()
    async with Publisher(cfg) as pub:
        router = Router(
            cfg,
            pub,
            redis,
            tokenizer,
            CollectorRegistry(),
            policy="cache_aware",
            source_topic=source,
            routed_topic=out,
            routed_partitions=8,
            group_id=f"router-fuzz-{uuid.uuid4().hex[:6]}",
        )
        task = asyncio.create_task(router.run())
        storm = await publish_storm(cfg, source, PromptRequest, n, seed=1701, run_id=run_id, tag=f"{run_id}")
        ledger = Ledger([storm])
        routed: list[PromptRequest] = []

        def on_routed(r) -> None:
            msg = decode(r.value, PromptRequest, list(r.headers))
            routed.append(msg)
            ledger.output_for_msg_id(msg.id)

        watches = [await dlq_watch(cfg, ledger).start(), await Watch(cfg, out, on_routed).start()]
        try:
            report = await wait_accounted(ledger, [task], what=f"router {variant} n={n}")
            good = PromptRequest(
                run_id=run_id,
                messages=[ChatMessage("user", "After the storm: 2 + 2?")],
                sampling=SamplingParams(max_tokens=4),
            )
            await pub.publish(source, good, key=good.routing_key())
            await wait_until(
                lambda: any(m.id == good.id for m in routed), 60, "the good request routed after the storm"
            )
            assert not task.done(), "the router exited"
        finally:
            await stop_stage(router.stop, task, watches)
            await redis.flushdb()
            await redis.aclose()
    print(f"\n[fuzz] router {variant}: n={n}, {time.monotonic() - t0:.1f}s")
    assert not watches[1].errors, watches[1].errors[:5]
    assert_clean(report, f"router {variant}")
