"""A processed-id ledger in Redis, for idempotent consumers (exactly-once effect).

A consumer checks `done(id)` before doing the work and calls `mark(id)` after its
output is acknowledged; a redelivered message is then skipped. Output ids are
derived from input ids, so the rare duplicate from a crash between the ack and the
mark is also caught by the next stage's ledger.
"""

from __future__ import annotations

from redis.asyncio import Redis


class Ledger:
    """Processed message ids of one stage, with a TTL beyond any redelivery window."""

    def __init__(self, redis: Redis, stage: str, ttl_s: int = 7 * 24 * 3600) -> None:
        self._redis = redis
        self._prefix = f"primerl:ledger:{stage}:"
        self._ttl = ttl_s

    async def done(self, msg_id: str) -> bool:
        """Whether `msg_id` already took effect."""
        return bool(await self._redis.exists(self._prefix + msg_id))

    async def mark(self, msg_id: str) -> bool:
        """Record `msg_id` as done; False when it already was (someone else won)."""
        return bool(await self._redis.set(self._prefix + msg_id, b"1", nx=True, ex=self._ttl))
