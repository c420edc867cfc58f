"""Fuzz: the engine worker (rollout.routed, group `engine`, and its policy follower on
rollout.policy), in-process around a stand-in engine.

The worker code is the real one (decode, build_input with the real tokenizer and vLLM's
SamplingParams validation, the Redis ledger, admission, chunk and completion publishing,
the policy follower); only vLLM's generation is replaced by a stand-in that emits one
token per sample at once, so 1,000 requests cost seconds, and a hostile request can
never take the session's real engine down. Topics are private (the module's topic
constants), Redis is a database no engine of the session uses.

A routed request is served when its completions arrive, or deferred when it waits for a
policy version (rollout.deferred, once that topic exists); a policy record is taken in
when it decodes (a newer version that fails to load is dead-lettered).
"""

from __future__ import annotations

import asyncio
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry
from redis.asyncio import Redis
from transformers import AutoTokenizer

import engine_workers.worker as worker_module
from engine_workers.engine import SampleDelta, StepOutput
from engine_workers.worker import EngineWorker
from plumbing.config import Config
from plumbing.kafka import Publisher
from plumbing.model_store import resolve_model
from schemas import (
    TOPICS,
    Completion,
    CompletionChunk,
    DeadLetter,
    PolicyUpdate,
    PromptRequest,
    SamplingParams,
    Topic,
    decode,
)
from schemas.topics import DLQ
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


@dataclass
class _StandInEngine:
    """What EngineWorker uses of Engine; generation is one token per sample."""

    tokenizer: Any
    max_model_len: int = 2048
    block_size: int = 16
    kv_events_endpoint: str = ""
    kv_events_topic: str = "kv"
    vocab_size: int = 0  # 0: the tokenizer's (build_input bounds token-in prompts by it)
    policy_version: int = 0

    async def stream(self, prompt_token_ids: list[int], params: Any, request_id: str):
        await asyncio.sleep(0)
        yield StepOutput(
            deltas=[
                SampleDelta(index=i, text="x", token_ids=[42], logprobs=[-0.5], finish_reason="length")
                for i in range(params.n)
            ],
            num_cached_tokens=0,
        )

    async def reload(self, weights_path: str, version: int) -> float:
        folder = Path(weights_path)  # the real engine's check, before it touches vLLM
        if not folder.is_dir() or not any(folder.glob("*.safetensors")):
            raise ValueError(f"no safetensors weights at {weights_path!r}")
        self.policy_version = version
        return 0.0


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(resolve_model(None))


@pytest.mark.parametrize("variant", ["default", pytest.param("heavy", marks=pytest.mark.fuzz)])
async def test_engine_worker_survives_the_storm_and_accounts_for_every_record(
    cfg: Config, tokenizer, tmp_path: Path, monkeypatch, variant: str, pytestconfig
) -> None:
    n = DEFAULT_N if variant == "default" else heavy_n(pytestconfig)
    run_id = f"fz-engine-{uuid.uuid4().hex[:6]}"
    routed, policy = await make_topic(cfg, "routed", 4), await make_topic(cfg, "policy", 1)
    completions, chunks = await make_topic(cfg, "completions", 4), await make_topic(cfg, "chunks", 4)
    monkeypatch.setattr(worker_module, "ROUTED", Topic(routed, 4, PromptRequest, "fuzz"))
    import plumbing.policy_feed as feed_module  # the follower moved here on main

    for module in (worker_module, feed_module):
        if hasattr(module, "POLICY"):
            monkeypatch.setattr(module, "POLICY", Topic(policy, 1, PolicyUpdate, "fuzz"))
    monkeypatch.setattr(worker_module, "COMPLETIONS", Topic(completions, 4, Completion, "fuzz"))
    monkeypatch.setattr(worker_module, "CHUNKS", Topic(chunks, 4, CompletionChunk, "fuzz"))
    deferred_topic = TOPICS.get("rollout.deferred")  # the deferral stage's topic, once it exists
    if deferred_topic is not None and hasattr(worker_module, "DEFERRED"):
        deferred = await make_topic(cfg, "deferred", 4)
        monkeypatch.setattr(worker_module, "DEFERRED", Topic(deferred, 4, PromptRequest, "fuzz"))
    else:
        deferred = None
    cfg.engine.policy_run = ""  # follow every run's updates: the storm's included
    redis = Redis.from_url(cfg.redis_url.rsplit("/", 1)[0] + "/6")
    await redis.flushdb()
    engine = _StandInEngine(tokenizer)
    t0 = time.monotonic()
    async with Publisher(cfg) as pub:
        worker = EngineWorker(cfg, engine, pub, redis, CollectorRegistry(), worker_id=f"fuzz-{uuid.uuid4().hex[:6]}")  # type: ignore[arg-type]
        task = asyncio.create_task(worker.run())
        storms = [
            await publish_storm(cfg, routed, PromptRequest, n, seed=4242, run_id=run_id, tag=f"{run_id}-q"),
            await publish_storm(cfg, policy, PolicyUpdate, n, seed=4343, run_id=run_id, tag=f"{run_id}-p"),
        ]
        ledger = Ledger(storms)
        samples: dict[str, set[int]] = {}
        doubled_samples: list[str] = []

        def on_completion(r) -> None:
            c = decode(r.value, Completion, list(r.headers))
            if c.sample_index in samples.setdefault(c.request_id, set()):
                doubled_samples.append(c.id)
            samples[c.request_id].add(c.sample_index)
            if c.sample_index == 0:
                ledger.output_for_msg_id(c.request_id)

        def on_deferred(r) -> None:
            ledger.output_for_msg_id(decode(r.value, PromptRequest, list(r.headers)).id)

        watches = [await dlq_watch(cfg, ledger).start(), await Watch(cfg, completions, on_completion).start()]
        if deferred:
            watches.append(await Watch(cfg, deferred, on_deferred).start())
        weights = tmp_path / "v1"
        weights.mkdir()
        (weights / "model.safetensors").write_bytes(b"stand-in")
        good_policy = PolicyUpdate(run_id=run_id, version=1, weights_path=str(weights), checksum="x")

        def policy_settled() -> bool:
            """The follower is past the storm once the good update (published after it) is loaded;
            then a policy record that decoded and got no letter was taken in."""
            if engine.policy_version < 1:
                return True  # nothing to settle yet
            for s in storms[1].sent:
                if s.decoded_id is not None and not ledger.letters.get(s.fuzz_id) and not ledger.outputs.get(s.fuzz_id):
                    ledger.output_for_fuzz_id(s.fuzz_id)
            return True

        try:
            await pub.publish(policy, good_policy)
            await wait_until(
                lambda: engine.policy_version >= 1 or task.done(), 120, "the good policy update loaded after the storm"
            )
            # The follower wrote every letter before it loaded the good update, but the DLQ
            # watch reads behind: a sentinel on the follower's DLQ partition (same key),
            # once seen, says every follower letter before it has been seen too.
            sentinel = DeadLetter(
                run_id=run_id,
                stage="fuzz-sentinel",
                error_type="",
                error="",
                source_topic=f"sentinel.{run_id}",
                partition=0,
                offset=0,
                payload=b"",
            )
            await pub.publish(DLQ.name, sentinel, key=b"policy-follower")
            await wait_until(lambda: sentinel.source_topic in ledger.seen_sources, 60, "the letter watch to catch up")
            report = await wait_accounted(ledger, [task], extra=policy_settled, what=f"engine {variant} n={n}")
            good = PromptRequest(
                run_id=run_id, text="After the storm: 2 + 2 =", sampling=SamplingParams(max_tokens=2), group_size=2
            )
            await pub.publish(routed, good, key=good.routing_key())
            await wait_until(lambda: samples.get(good.id) == {0, 1}, 60, "the good request served after the storm")
            assert not task.done(), f"the engine worker exited: {task.exception()!r}"
        finally:
            await stop_stage(worker.stop, task, watches)
            await redis.aclose()
    print(f"\n[fuzz] engine {variant}: n={n} per topic, {time.monotonic() - t0:.1f}s; policy v{engine.policy_version}")
    assert not doubled_samples, doubled_samples[:5]
    assert_clean(report, f"engine {variant}")
