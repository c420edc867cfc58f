"""The global prefix index and worker registry in Redis (keys: schemas/keys.py).

Every entry of an engine worker expires unless the worker heartbeats, so a dead
worker's entries are gone within one TTL. The pending-blocks ZSET (score: expiry)
lets a burst of a group's samples see the first one's prefix before vLLM has
computed it; the load HASH is added to by routers and released by the worker. The
sessions ZSET (score: when its last turn was routed) is written by routers only: a
session counts as live on a worker until `session_idle_s` passes without a turn.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import msgspec
from redis.asyncio import Redis

from plumbing.prefix_cache.held_blocks import HeldBlocks
from schemas import keys
from schemas.registry import WorkerInfo


class Probe(msgspec.Struct):
    """What the index says about one worker for one request."""

    worker: WorkerInfo
    matched_blocks: int
    prefill_load: float
    decode_load: float
    live_sessions: int = 0  # sessions whose last turn was routed here within the idle window


# Release only what exists: a worker whose load key expired (it died) is not revived.
_RELEASE = """
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
local v = redis.call('HINCRBYFLOAT', KEYS[1], ARGV[1], -tonumber(ARGV[2]))
if tonumber(v) < 0 then redis.call('HSET', KEYS[1], ARGV[1], 0) end
return 1
"""


class PrefixIndex:
    """Reads and writes of the index; every call is one Redis round trip."""

    def __init__(self, redis: Redis, ttl_s: float, session_idle_s: float = 30.0) -> None:
        self.redis = redis
        self.ttl_ms = int(ttl_s * 1000)
        self.session_idle_s = session_idle_s
        self._release = redis.register_script(_RELEASE)

    async def heartbeat(self, info: WorkerInfo, blocks: HeldBlocks, resync: bool) -> None:
        """Register `info` and index the block changes; `resync` rewrites the whole set
        (after a failed heartbeat, whose changes were lost)."""
        w = info.worker_id
        cleared, added, removed = blocks.take_changes()
        pipe = self.redis.pipeline(transaction=True)
        pipe.set(keys.registry(info.role, w), msgspec.json.encode(info), px=self.ttl_ms)
        if resync or cleared:
            pipe.delete(keys.held_blocks(w))
            added, removed = blocks.held(), set()
        if cleared:
            pipe.delete(keys.pending_blocks(w))
        if added:
            pipe.sadd(keys.held_blocks(w), *added)
        if removed:
            pipe.srem(keys.held_blocks(w), *removed)
        pipe.zremrangebyscore(keys.pending_blocks(w), "-inf", time.time())
        for key in (keys.held_blocks(w), keys.pending_blocks(w), keys.load(w)):
            pipe.pexpire(key, self.ttl_ms)
        await pipe.execute()

    async def deregister(self, worker_id: str, role: str = "engine") -> None:
        """Remove a stopping worker at once rather than after its TTL."""
        await self.redis.delete(
            keys.registry(role, worker_id),
            keys.held_blocks(worker_id),
            keys.pending_blocks(worker_id),
            keys.load(worker_id),
            keys.sessions(worker_id),
        )

    async def live_workers(self, role: str = "engine") -> list[WorkerInfo]:
        """Every worker of `role` whose heartbeat has not expired."""
        names = [k async for k in self.redis.scan_iter(match=keys.registry_pattern(role), count=500)]
        if not names:
            return []
        values = await self.redis.mget(names)
        return sorted((msgspec.json.decode(v, type=WorkerInfo) for v in values if v), key=lambda i: i.worker_id)

    async def probe(self, workers: list[WorkerInfo], hashes_by_version: dict[int, list[str]]) -> list[Probe]:
        """Per worker: leading blocks of the request it holds (or was routed), its load, and
        its live sessions."""
        pipe = self.redis.pipeline(transaction=False)
        since = time.time() - self.session_idle_s
        for wi in workers:
            hashes = hashes_by_version[wi.policy_version]
            if hashes:
                pipe.smismember(keys.held_blocks(wi.worker_id), hashes)
                pipe.zmscore(keys.pending_blocks(wi.worker_id), hashes)
            pipe.hmget(keys.load(wi.worker_id), ["prefill", "decode"])
            pipe.zcount(keys.sessions(wi.worker_id), since, "+inf")
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
            probes.append(Probe(wi, matched, float(prefill or 0), float(decode or 0), int(next(results))))
        return probes

    async def add_route(
        self,
        worker_id: str,
        hashes: list[str],
        prefill: float,
        decode: float,
        pending_ttl_s: float,
        session: str | None = None,
        others: Sequence[str] = (),
    ) -> None:
        """Record a routing decision: the worker will hold `hashes`, and has more to do; a turn
        of `session` makes it live here and no longer on any of `others` (it moved)."""
        pipe = self.redis.pipeline(transaction=True)
        if session is not None:
            now = time.time()
            sessions = keys.sessions(worker_id)
            pipe.zremrangebyscore(sessions, "-inf", now - self.session_idle_s)
            pipe.zadd(sessions, {session: now})
            pipe.pexpire(sessions, int(self.session_idle_s * 1000))
            for other in others:
                pipe.zrem(keys.sessions(other), session)
        if hashes:
            pipe.zadd(keys.pending_blocks(worker_id), {h: time.time() + pending_ttl_s for h in hashes})
            pipe.pexpire(keys.pending_blocks(worker_id), self.ttl_ms, nx=True)
        pipe.hincrbyfloat(keys.load(worker_id), "prefill", prefill)
        pipe.hincrbyfloat(keys.load(worker_id), "decode", decode)
        pipe.pexpire(keys.load(worker_id), self.ttl_ms, nx=True)
        await pipe.execute()

    async def release(self, worker_id: str, kind: str, amount: float) -> None:
        """Take served work off a worker's load (`kind`: prefill or decode)."""
        if amount:
            await self._release(keys=[keys.load(worker_id)], args=[kind, amount])
