"""Prefix hashing, the block tracker, the cost model, the Redis index and the router stage.

The router runs on a private source/output topic pair and its own Redis database, so a
real engine worker of the session (which registers and routes on the shared ones)
never sees these requests.
"""

from __future__ import annotations

import asyncio
import time
import uuid
import zlib
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from aiokafka import AIOKafkaConsumer
from prometheus_client import CollectorRegistry
from redis.asyncio import Redis
from transformers import AutoTokenizer
from vllm.distributed.kv_events import AllBlocksCleared, BlockRemoved, BlockStored

from plumbing.config import Config
from plumbing.kafka import Publisher, consumer_kwargs
from plumbing.local_servers import start_redis, stop_process
from plumbing.model_store import resolve_model
from plumbing.prefix_cache.block_hashes import cacheable_tokens, chain_hashes, policy_salt
from plumbing.prefix_cache.held_blocks import HeldBlocks
from plumbing.prefix_cache.index import PrefixIndex, Probe
from router.cost_model import choose
from router.router import Router
from schemas import ChatMessage, PromptRequest, SamplingParams, decode
from schemas.keys import held_blocks as held_key
from schemas.keys import load as load_key
from schemas.keys import sessions as sessions_key
from schemas.registry import WorkerInfo
from tests.kafka_helpers import dead_letters_from, make_topic, wait_until

BS = 4  # a small block size keeps the hand-made cases readable


# --- block hashes ---------------------------------------------------------------------------


def test_block_hashes_chain_over_full_blocks_and_depend_on_the_salt() -> None:
    tokens = list(range(10))
    h = chain_hashes(tokens, BS, "policy-v0")
    assert len(h) == 2  # the partial third block is not hashed (vLLM caches full blocks only)
    assert chain_hashes(tokens[:8], BS, "policy-v0") == h
    assert chain_hashes(tokens[:4], BS, "policy-v0") == h[:1]
    assert chain_hashes([9] + tokens[1:], BS, "policy-v0")[1] != h[1], "a block's hash must depend on its parent"
    assert set(chain_hashes(tokens, BS, "policy-v1")).isdisjoint(h)


def test_cacheable_tokens_leave_the_last_prompt_token_to_compute() -> None:
    assert cacheable_tokens(2, 10, BS) == 8
    assert cacheable_tokens(2, 8, BS) == 4  # fully cached prompt: vLLM recomputes its last block
    assert cacheable_tokens(0, 8, BS) == 0


# --- the tracker of vLLM's KV events --------------------------------------------------------


def _stored(hashes: list[int], parent: int | None, tokens: list[int], salt: str | None = "policy-v0") -> BlockStored:
    extra = [(salt,)] + [None] * (len(hashes) - 1) if salt and parent is None else None
    return BlockStored(
        block_hashes=hashes,
        parent_block_hash=parent,
        token_ids=tokens,
        block_size=BS,
        lora_id=None,
        medium="CPU",
        lora_name=None,
        extra_keys=extra,
    )


def test_held_blocks_follow_stores_evictions_and_clears() -> None:
    tokens = list(range(12))
    ours = chain_hashes(tokens, BS, policy_salt(0))
    blocks = HeldBlocks()
    blocks.apply(_stored([101, 102], None, tokens[:8]))
    blocks.apply(_stored([103], 102, tokens[8:12]))
    assert blocks.held() == set(ours)
    cleared, added, removed = blocks.take_changes()
    assert not cleared and added == set(ours) and not removed
    blocks.apply(BlockRemoved(block_hashes=[103], medium="CPU"))
    assert blocks.held() == set(ours[:2]) and blocks.take_changes()[2] == {ours[2]}
    blocks.apply(_stored([200], 999, tokens[:4]))  # parent never seen (dropped events)
    assert blocks.orphans == 1 and blocks.held() == set(ours[:2])
    blocks.apply(AllBlocksCleared())
    assert blocks.held() == set() and blocks.take_changes()[0]


def test_held_blocks_use_the_salt_vllm_reports() -> None:
    tokens = list(range(8))
    blocks = HeldBlocks(policy_version=0)
    blocks.apply(_stored([1, 2], None, tokens, salt="policy-v3"))
    assert blocks.held() == set(chain_hashes(tokens, BS, policy_salt(3)))


# --- the cost model -------------------------------------------------------------------------


def _probe(name: str, matched: int, prefill: float = 0.0, decode: float = 0.0, sessions: int = 0) -> Probe:
    return Probe(WorkerInfo(worker_id=name, partitions=[0]), matched, prefill, decode, sessions)


def test_the_cost_model_prefers_the_warm_worker() -> None:
    c = choose(
        [_probe("cold", 0), _probe("warm", 3)], prompt_len=14, block_size=BS, decode_tokens=8, decode_token_cost=1
    )
    assert c.probe.worker.worker_id == "warm" and c.predicted_cached_tokens == 12 and c.prefill_tokens == 2


def test_a_hot_prefix_moves_off_an_overloaded_home() -> None:
    # Waiting behind 100 queued prefill tokens (weighed 0.5) costs more than recomputing 12 elsewhere.
    c = choose(
        [_probe("home", 3, prefill=100), _probe("idle", 0)],
        prompt_len=14,
        block_size=BS,
        decode_tokens=8,
        decode_token_cost=1,
    )
    assert c.probe.worker.worker_id == "idle" and c.predicted_cached_tokens == 0
    # ...but a little queue does not outweigh the cache.
    c = choose(
        [_probe("home", 3, prefill=5), _probe("idle", 0)],
        prompt_len=14,
        block_size=BS,
        decode_tokens=8,
        decode_token_cost=1,
    )
    assert c.probe.worker.worker_id == "home"


def test_equal_costs_go_to_the_least_loaded() -> None:
    # a: 10 uncached + 0.5 * 8 queued = 14; b: 14 uncached, nothing queued.
    c = choose(
        [_probe("a", 1, prefill=8), _probe("b", 0)], prompt_len=14, block_size=BS, decode_tokens=8, decode_token_cost=1
    )
    assert c.probe.worker.worker_id == "b"


def test_ties_on_an_idle_fleet_spread_by_the_request_key_and_stay_put() -> None:
    # Prompts under one block match nothing, so idle workers tie on cost and load: list
    # order would send every request to "a"; the key's hash spreads them, stably per key.
    probes = [_probe("a", 0), _probe("b", 0), _probe("c", 0)]
    keys = [b"g%d" % i for i in range(300)]
    picks = {k: choose(probes, 14, BS, 8, 1, tie_key=k).probe.worker.worker_id for k in keys}
    counts = {w: list(picks.values()).count(w) for w in "abc"}
    assert all(60 < n < 140 for n in counts.values()), counts
    assert all(choose(probes[::-1], 14, BS, 8, 1, tie_key=k).probe.worker.worker_id == w for k, w in picks.items())
    # Without a key (or with any real difference in load) the old order still decides.
    assert choose(probes, 14, BS, 8, 1).probe.worker.worker_id == "a"
    assert choose([_probe("a", 0, prefill=1), _probe("b", 0)], 14, BS, 8, 1, tie_key=b"k").probe.worker.worker_id == "b"


def test_pure_ttft_would_scatter_a_burst_and_the_blend_keeps_it() -> None:
    # The first sample of a group is queued on `home` (12 prefill tokens); the second
    # starts sooner on `idle` by recomputing, but that doubles the work.
    probes = [_probe("home", 3, prefill=12), _probe("idle", 0)]
    assert choose(probes, 14, BS, 8, 1, latency_weight=1.0).probe.worker.worker_id == "idle"
    assert choose(probes, 14, BS, 8, 1, latency_weight=0.5).probe.worker.worker_id == "home"


def test_a_new_session_goes_to_the_fewest_live_sessions_and_then_by_cost() -> None:
    # `home` holds the prompt and is idle, but already serves two sessions' later turns.
    probes = [_probe("home", 3, sessions=2), _probe("busy", 0, prefill=40, sessions=1), _probe("far", 0, sessions=1)]
    assert choose(probes, 14, BS, 8, 1).probe.worker.worker_id == "home"  # one-shot work: by cost
    assert choose(probes, 14, BS, 8, 1, new_session=True).probe.worker.worker_id == "far"  # fewest, then cost


# --- the Redis index ------------------------------------------------------------------------


@pytest.fixture
async def redis(cfg: Config) -> AsyncIterator[Redis]:
    r = Redis.from_url(cfg.redis_url.rsplit("/", 1)[0] + "/3")  # a database no engine of the session uses
    await r.flushdb()
    yield r
    await r.flushdb()
    await r.aclose()


def _worker_blocks(tokens: list[int], version: int = 0) -> HeldBlocks:
    blocks = HeldBlocks(policy_version=version)
    n = len(tokens) // BS
    blocks.apply(_stored(list(range(1, n + 1)), None, tokens[: n * BS], salt=policy_salt(version)))
    return blocks


async def test_the_index_answers_with_the_leading_blocks_each_worker_holds(redis: Redis) -> None:
    index = PrefixIndex(redis, ttl_s=5)
    tokens = list(range(16))
    a, b = WorkerInfo(worker_id="a", partitions=[0]), WorkerInfo(worker_id="b", partitions=[1])
    await index.heartbeat(a, _worker_blocks(tokens[:12]), resync=True)
    await index.heartbeat(b, HeldBlocks(), resync=True)
    assert [w.worker_id for w in await index.live_workers()] == ["a", "b"]
    hashes = chain_hashes(tokens, BS, policy_salt(0))
    probes = await index.probe([a, b], {0: hashes})
    assert [(p.worker.worker_id, p.matched_blocks) for p in probes] == [("a", 3), ("b", 0)]
    # A routed request counts as held (pending) until its blocks are reported stored.
    await index.add_route("b", hashes, prefill=16, decode=8, pending_ttl_s=30)
    probes = await index.probe([a, b], {0: hashes})
    assert probes[1].matched_blocks == 4 and probes[1].prefill_load == 16 and probes[1].decode_load == 8
    await index.release("b", "prefill", 16)
    await index.release("b", "decode", 100)  # more than was added: clamped at zero
    probes = await index.probe([a, b], {0: hashes})
    assert probes[1].prefill_load == 0 and probes[1].decode_load == 0
    # Another policy version: nothing matches.
    assert [p.matched_blocks for p in await index.probe([a], {0: chain_hashes(tokens, BS, policy_salt(1))})] == [0]


async def test_the_index_counts_live_sessions_moves_them_and_forgets_idle_ones(redis: Redis) -> None:
    index = PrefixIndex(redis, ttl_s=5, session_idle_s=0.5)
    a, b = WorkerInfo(worker_id="a", partitions=[0]), WorkerInfo(worker_id="b", partitions=[1])

    async def live() -> list[int]:
        return [p.live_sessions for p in await index.probe([a, b], {0: []})]

    await index.add_route("a", [], 1, 1, 30, session="s0", others=["b"])
    await index.add_route("a", [], 1, 1, 30, session="s1", others=["b"])
    await index.add_route("b", [], 1, 1, 30)  # one-shot work counts as no session
    assert await live() == [2, 0]
    await index.add_route("b", [], 1, 1, 30, session="s1", others=["a"])  # s1's turn moved to b
    await index.add_route("a", [], 1, 1, 30, session="s0", others=["b"])  # s0's next turn: still one
    assert await live() == [1, 1]
    await asyncio.sleep(0.6)  # no turn for longer than session_idle_s
    assert await live() == [0, 0]
    await index.add_route("a", [], 1, 1, 30, session="s2", others=["b"])
    assert await redis.zcard(sessions_key("a")) == 1, "idle sessions are pruned on the next write"
    await index.deregister("a")
    assert await redis.exists(sessions_key("a")) == 0


async def test_a_dead_workers_entries_are_gone_within_one_ttl(redis: Redis) -> None:
    index = PrefixIndex(redis, ttl_s=1)
    await index.heartbeat(WorkerInfo(worker_id="dead", partitions=[0]), _worker_blocks(list(range(8))), resync=True)
    await index.add_route("dead", ["x"], prefill=1, decode=1, pending_ttl_s=30)
    assert await redis.exists(held_key("dead"), load_key("dead")) == 2
    await asyncio.sleep(1.2)  # no heartbeat since
    assert await index.live_workers() == []
    assert await redis.exists(held_key("dead"), load_key("dead")) == 0
    await index.release("dead", "decode", 1)  # a late release does not revive it
    assert await redis.exists(load_key("dead")) == 0


# --- the router stage, through the broker ---------------------------------------------------


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(resolve_model(None))


def _request(run_id: str, system: str, question: str, **kw: object) -> PromptRequest:
    return PromptRequest(
        run_id=run_id,
        messages=[ChatMessage("system", system), ChatMessage("user", question)],
        sampling=SamplingParams(max_tokens=8),
        **kw,
    )


class _Setup:
    """Two registered fake workers, a router on private topics, a reader of its output."""

    def __init__(self, cfg: Config, redis: Redis, tokenizer, policy: str) -> None:
        self.cfg, self.redis, self.tokenizer, self.policy = cfg, redis, tokenizer, policy
        self.workers = [
            WorkerInfo(worker_id="w0", partitions=list(range(0, 4)), block_size=128),
            WorkerInfo(worker_id="w1", partitions=list(range(4, 8)), block_size=128),
        ]
        self.routed: list[tuple[int, PromptRequest]] = []

    async def register(self) -> None:
        index = PrefixIndex(self.redis, self.cfg.routing.ttl_s)
        for w in self.workers:
            await index.heartbeat(w, HeldBlocks(), resync=True)

    async def __aenter__(self) -> _Setup:
        self.source, self.out = await make_topic(self.cfg, 4), await make_topic(self.cfg, 8)
        await self.register()
        self.pub = Publisher(self.cfg)
        await self.pub.start()
        self.registry = CollectorRegistry()
        self.router = Router(
            self.cfg,
            self.pub,
            self.redis,
            self.tokenizer,
            self.registry,
            policy=self.policy,
            source_topic=self.source,
            routed_topic=self.out,
            routed_partitions=8,
            group_id=f"router-{uuid.uuid4().hex[:6]}",
        )
        self.task = asyncio.create_task(self.router.run())
        self.reader = AIOKafkaConsumer(self.out, **consumer_kwargs(self.cfg, f"reader-{uuid.uuid4().hex[:6]}"))
        await self.reader.start()
        self.reading = asyncio.create_task(self._read())
        await asyncio.wait_for(self.router.runner.assigned.wait(), 60)
        return self

    async def _read(self) -> None:
        async for r in self.reader:
            self.routed.append((r.partition, decode(r.value, PromptRequest, list(r.headers))))

    async def send(self, reqs: list[PromptRequest], wait: bool = True) -> None:
        before = len(self.routed)
        for r in reqs:
            await self.pub.publish(self.source, r, key=r.routing_key())
        if wait:
            await wait_until(lambda: len(self.routed) >= before + len(reqs), 60, "routed copies")

    def owner(self, partition: int) -> str:
        return next(w.worker_id for w in self.workers if partition in w.partitions)

    def metric(self, name: str, **labels: str) -> float:
        return self.registry.get_sample_value(name, labels) or 0.0

    async def __aexit__(self, *exc: object) -> None:
        self.router.stop()
        await self.task
        self.reading.cancel()
        await asyncio.gather(self.reading, return_exceptions=True)
        await self.reader.stop()
        await self.pub.stop()


async def test_cache_aware_routing_keeps_a_shared_prefix_on_one_worker_and_balances_the_rest(
    cfg, redis, tokenizer
) -> None:
    run_id = f"t-{uuid.uuid4().hex[:6]}"
    shared = "You are a careful assistant. " + "Follow every rule of the house style guide. " * 60
    async with _Setup(cfg, redis, tokenizer, "cache_aware") as s:
        await s.send([_request(run_id, shared, f"Question {i}?") for i in range(3)])
        homes = {s.owner(p) for p, _ in s.routed}
        assert len(homes) == 1, f"requests sharing a {len(shared)}-char prefix were split over {homes}"
        for p, req in s.routed:
            assert req.route is not None and req.route.worker_id == s.owner(p) and req.route.policy == "cache_aware"
        # The first decision found nothing cached, the next two found its blocks (pending).
        # (Which request was decided first depends on the partitions they arrived on.)
        assert sorted(r.route.predicted_cached_tokens > 0 for _, r in s.routed) == [False, True, True]
        # An unrelated prompt goes to the idle worker.
        await s.send([_request(run_id, "Another system prompt entirely. " * 40, "Hello?")])
        assert s.owner(s.routed[-1][0]) not in homes
        assert s.metric("primerl_router_routed_total", policy="cache_aware") == 4


@pytest.mark.parametrize("balance", [True, False])
async def test_sessions_under_one_system_prompt_split_over_workers_and_their_turns_stay_home(
    cfg, redis, tokenizer, balance: bool
) -> None:
    """By cost alone every session's first turn joins the shared prompt's home (as a group's
    samples do); balancing live sessions spreads them, and a later turn still follows its cache."""
    cfg.routing.balance_sessions = balance
    run_id = f"t-{uuid.uuid4().hex[:6]}"
    shared = "You are a careful assistant. " + "Follow every rule of the house style guide. " * 60
    async with _Setup(cfg, redis, tokenizer, "cache_aware") as s:
        for i in range(4):  # one at a time: the order of decisions is the order of arrival
            await s.send([_request(run_id, shared, f"Question {i}?", session_id=f"s{i}")])
        homes = [s.owner(p) for p, _ in s.routed]
        if balance:
            assert sorted(homes) == ["w0", "w0", "w1", "w1"], homes
        else:
            assert len(set(homes)) == 1, homes  # what the lever is for
        assert await redis.zcard(sessions_key("w0")) + await redis.zcard(sessions_key("w1")) == 4
        # Turn 1 of s0 (its prompt extends turn 0's): it stays where turn 0 went.
        await s.send([_request(run_id, shared, "Question 0? An answer. And then?", session_id="s0", turn_index=1)])
        assert s.owner(s.routed[-1][0]) == homes[0]


async def test_round_robin_alternates_workers(cfg, redis, tokenizer) -> None:
    run_id = f"t-{uuid.uuid4().hex[:6]}"
    async with _Setup(cfg, redis, tokenizer, "round_robin") as s:
        for _ in range(4):  # one at a time: the order of decisions is the order of arrival
            await s.send([_request(run_id, "Same prompt.", "Same question?")])
        owners = [s.owner(p) for p, _ in s.routed]
        assert owners in (["w0", "w1", "w0", "w1"], ["w1", "w0", "w1", "w0"])


async def test_garbage_goes_to_the_dead_letter_topic_and_routing_goes_on(cfg, redis, tokenizer) -> None:
    run_id = f"t-{uuid.uuid4().hex[:6]}"
    async with _Setup(cfg, redis, tokenizer, "cache_aware") as s:
        await s.pub.publish_raw(s.source, b"\x92not a prompt request", key=b"k")
        await s.pub.publish_raw(s.source, b'{"kind": "PromptRequest", "text": 5}', key=b"k")
        letters = await dead_letters_from(cfg, s.source, 2)
        errors = sorted(d.error for d in letters)
        assert (
            "Expected `object`, got `array`" in errors[0]
            and "Expected `str | null`, got `int` - at `$.text`" in errors[1]
        ), errors
        await s.send([_request(run_id, "Still routing.", "Yes?")])
        assert s.routed[-1][1].run_id == run_id


async def test_kcat_style_json_is_routed_like_any_request(cfg, redis, tokenizer) -> None:
    run_id = f"t-{uuid.uuid4().hex[:6]}"
    async with _Setup(cfg, redis, tokenizer, "cache_aware") as s:
        body = f'{{"kind": "PromptRequest", "run_id": "{run_id}", "text": "2 + 2 = ?", "group_size": 2}}'
        await s.pub.publish_raw(s.source, body.encode(), key=b"kcat", headers=[("content-type", b"application/json")])
        await wait_until(lambda: any(r.run_id == run_id for _, r in s.routed), 60, "the routed JSON request")
        routed = next(r for _, r in s.routed if r.run_id == run_id)
        assert routed.route is not None and routed.route.policy == "cache_aware" and routed.group_size == 2


async def test_with_redis_slow_or_down_routing_hashes_loses_nothing_and_recovers(
    cfg, tokenizer, tmp_path: Path
) -> None:
    _, rec = start_redis(tmp_path)
    url = f"redis://127.0.0.1:{rec.port}/0"
    redis = Redis.from_url(url, socket_timeout=2, socket_connect_timeout=1)
    cfg.routing.retry_after_s = 0.5
    run_id = f"t-{uuid.uuid4().hex[:6]}"
    reqs = [_request(run_id, "System.", f"Question {i}?", group_id=f"g{i}") for i in range(12)]
    try:
        async with _Setup(cfg, redis, tokenizer, "cache_aware") as s:
            await s.send(reqs[:2])
            # Slow: every command blocks for 3 s (longer than the router's timeout).
            await redis.execute_command("CLIENT", "PAUSE", "3000", "ALL")
            t0 = time.monotonic()
            await s.send(reqs[2:5])
            assert time.monotonic() - t0 < 3, "routing waited for the paused Redis"
            # Down: the server is gone.
            stop_process(rec)
            await s.send(reqs[5:8])
            assert s.metric("primerl_router_fallbacks_total", reason="redis_unavailable") == 6
            for p, req in s.routed[2:8]:
                assert req.route is not None and req.route.policy == "hash"
                assert p == zlib.crc32(req.routing_key()) % 8, "degraded routing must hash by the group key"
            # Back: a new server on the same port; workers re-register at their next heartbeat.
            _, rec = start_redis(tmp_path, port=rec.port)
            await s.register()
            await asyncio.sleep(cfg.routing.retry_after_s)
            await s.send(reqs[8:])
            assert [r.route.policy for _, r in s.routed[8:]] == ["cache_aware"] * 4  # type: ignore[union-attr]
            assert sorted(r.id for _, r in s.routed) == sorted(r.id for r in reqs), "a request was lost or doubled"
    finally:
        await redis.aclose()
        stop_process(rec)
