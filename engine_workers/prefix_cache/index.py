"""The global prefix index and worker registry in Redis.

Per engine worker (all expire unless the worker heartbeats, so a dead worker's
entries are gone within one TTL):
  primerl:registry:engine:<w>  JSON WorkerInfo
  primerl:kv:<w>               SET of block hashes its engine holds (from KV events)
  primerl:kvp:<w>              ZSET of block hashes routed to it but not yet reported
                               stored (score: expiry), so a burst of a group's samples
                               sees the first one's prefix before vLLM has computed it
  primerl:load:<w>             HASH prefill / decode: tokens routed to it and not yet
                               served (added by routers, released by the worker)
"""

from __future__ import annotations

import time

import msgspec
from redis.asyncio import Redis

from engine_workers.prefix_cache.held_blocks import HeldBlocks

REGISTRY_PREFIX = "primerl:registry:"


class WorkerInfo(msgspec.Struct, kw_only=True):
    """A live worker as the registry shows it."""

    worker_id: str
    role: str = "engine"
    host: str = ""
    pid: int = 0
    partitions: list[int] = []
    policy_version: int = 0
    block_size: int = 0
    heartbeat_at: float = 0.0
    prompt_tokens: int = 0  # cumulative, for the cache hit rate
    cached_prompt_tokens: int = 0
    in_flight: int = 0
    load_tokens: float = 0.0


class Probe(msgspec.Struct):
    """What the index says about one worker for one request."""

    worker: WorkerInfo
    matched_blocks: int
    prefill_load: float
    decode_load: float


def registry_key(role: str, worker_id: str) -> str:
    """The registry entry of a worker."""
    return f"{REGISTRY_PREFIX}{role}:{worker_id}"


def held_key(worker_id: str) -> str:
    """Blocks a worker's engine holds."""
    return f"primerl:kv:{worker_id}"


def pending_key(worker_id: str) -> str:
    """Blocks routed to a worker, not yet reported stored."""
    return f"primerl:kvp:{worker_id}"


def load_key(worker_id: str) -> str:
    """Tokens routed to a worker and not yet served."""
    return f"primerl:load:{worker_id}"


# Release only what exists: a worker whose load key expired (it died) is not revived.
_RELEASE = """
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
local v = redis.call('HINCRBYFLOAT', KEYS[1], ARGV[1], -tonumber(ARGV[2]))
if tonumber(v) < 0 then redis.call('HSET', KEYS[1], ARGV[1], 0) end
return 1
"""


class PrefixIndex:
    """Reads and writes of the index; every call is one Redis round trip."""

    def __init__(self, redis: Redis, ttl_s: float) -> None:
        self.redis = redis
        self.ttl_ms = int(ttl_s * 1000)
        self._release = redis.register_script(_RELEASE)

    async def heartbeat(self, info: WorkerInfo, blocks: HeldBlocks, resync: bool) -> None:
        """Register `info` and index the block changes; `resync` rewrites the whole set
        (after a failed heartbeat, whose changes were lost)."""
        w = info.worker_id
        cleared, added, removed = blocks.take_changes()
        pipe = self.redis.pipeline(transaction=True)
        pipe.set(registry_key(info.role, w), msgspec.json.encode(info), px=self.ttl_ms)
        if resync or cleared:
            pipe.delete(held_key(w))
            added, removed = blocks.held(), set()
        if cleared:
            pipe.delete(pending_key(w))
        if added:
            pipe.sadd(held_key(w), *added)
        if removed:
            pipe.srem(held_key(w), *removed)
        pipe.zremrangebyscore(pending_key(w), "-inf", time.time())
        for key in (held_key(w), pending_key(w), load_key(w)):
            pipe.pexpire(key, self.ttl_ms)
        await pipe.execute()

    async def deregister(self, worker_id: str, role: str = "engine") -> None:
        """Remove a stopping worker at once rather than after its TTL."""
        await self.redis.delete(registry_key(role, worker_id), held_key(worker_id), pending_key(worker_id), load_key(worker_id))

    async def live_workers(self, role: str = "engine") -> list[WorkerInfo]:
        """Every worker of `role` whose heartbeat has not expired."""
        keys = [k async for k in self.redis.scan_iter(match=f"{REGISTRY_PREFIX}{role}:*", count=500)]
        if not keys:
            return []
        values = await self.redis.mget(keys)
        return sorted((msgspec.json.decode(v, type=WorkerInfo) for v in values if v), key=lambda i: i.worker_id)

    async def probe(self, workers: list[WorkerInfo], hashes_by_version: dict[int, list[str]]) -> list[Probe]:
        """Per worker: leading blocks of the request it holds (or was routed), and its load."""
        pipe = self.redis.pipeline(transaction=False)
        for wi in workers:
            hashes = hashes_by_version[wi.policy_version]
            if hashes:
                pipe.smismember(held_key(wi.worker_id), hashes)
                pipe.zmscore(pending_key(wi.worker_id), hashes)
            pipe.hmget(load_key(wi.worker_id), ["prefill", "decode"])
        results = iter(await pipe.execute())
        now = time.time()
        probes = []
        for wi in workers:
            hashes = hashes_by_version[wi.policy_version]
            matched = 0
            if hashes:
                held, pending = next(results), next(results)
                for h, p in zip(held, pending, strict=True):
                    if not (h or (p is not None and p > now)):
                        break
                    matched += 1
            prefill, decode = next(results)
            probes.append(Probe(wi, matched, float(prefill or 0), float(decode or 0)))
        return probes

    async def add_route(self, worker_id: str, hashes: list[str], prefill: float, decode: float, pending_ttl_s: float) -> None:
        """Record a routing decision: the worker will hold `hashes`, and has more to do."""
        pipe = self.redis.pipeline(transaction=True)
        if hashes:
            pipe.zadd(pending_key(worker_id), {h: time.time() + pending_ttl_s for h in hashes})
            pipe.pexpire(pending_key(worker_id), self.ttl_ms, nx=True)
        pipe.hincrbyfloat(load_key(worker_id), "prefill", prefill)
        pipe.hincrbyfloat(load_key(worker_id), "decode", decode)
        pipe.pexpire(load_key(worker_id), self.ttl_ms, nx=True)
        await pipe.execute()

    async def release(self, worker_id: str, kind: str, amount: float) -> None:
        """Take served work off a worker's load (`kind`: prefill or decode)."""
        if amount:
            await self._release(keys=[load_key(worker_id)], args=[kind, amount])
