"""A processed-id ledger in Redis, for idempotent consumers (exactly-once effect).

    async with ledger.claim(msg.id) as fresh:
        if not fresh:
            return                        # already took effect: skip
        ...produce the output, wait for the ack...
        await ledger.mark(msg.id)

`claim` takes a short-lived lock (SET NX with a TTL, renewed while the body runs), so
two deliveries of one message handled at once, in one worker or two, produce one
effect: the second waits for the first and then skips. The claim of a worker that
died expires within `claim_ttl_s` and the redelivery proceeds. Output ids are derived
from input ids, so the last window (killed between the ack and `mark`) is caught by
the next stage's ledger.

With `fail_open`, a Redis outage does not stop the stage: the body runs unclaimed
(a redelivery during the outage may then take effect twice, under the same output
ids) and `unavailable` counts how often. Without it, a Redis call that fails is retried
with backoff for up to `retry_s` (a restarted Redis closes every pooled connection: the
first command on each fails once) before the error reaches the caller; a failed claim
renewal is retried at the next renewal, never raised into the body.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager, suppress
from typing import TypeVar

from redis.asyncio import Redis
from redis.exceptions import RedisError

from schemas import keys

log = logging.getLogger(__name__)

T = TypeVar("T")

_DONE = b"done"

# Renew only our own claim; a claim that expired and was taken by another is theirs.
_RENEW = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('EXPIRE', KEYS[1], ARGV[2])
end
return 0
"""
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"""


class Ledger:
    """Processed message ids of one stage."""

    def __init__(
        self,
        redis: Redis,
        stage: str,
        ttl_s: int = 7 * 24 * 3600,
        claim_ttl_s: int = 15,
        fail_open: bool = False,
        retry_s: float = 30.0,
    ) -> None:
        self._redis = redis
        self._fail_open = fail_open
        self._retry_s = 0.0 if fail_open else retry_s
        self.unavailable = 0
        self._prefix = keys.ledger_prefix(stage)
        self._ttl = ttl_s
        self._claim_ttl = claim_ttl_s
        self._token = uuid.uuid4().hex.encode()  # whose claim it is
        self._renew = redis.register_script(_RENEW)
        self._release = redis.register_script(_RELEASE)

    async def _retrying(self, call: Callable[[], Awaitable[T]]) -> T:
        """`call()`, retried on Redis errors with backoff for up to `retry_s`."""
        deadline = time.monotonic() + self._retry_s
        delay = 0.05
        while True:
            try:
                return await call()
            except (RedisError, OSError) as err:
                if time.monotonic() + delay > deadline:
                    raise
                log.warning("ledger: Redis call failed (%s: %s); retrying in %.2fs", type(err).__name__, err, delay)
                await asyncio.sleep(delay)
                delay = min(1.0, delay * 2)

    async def mark(self, msg_id: str) -> None:
        """Record `msg_id` as having taken effect."""
        try:
            await self._retrying(lambda: self._redis.set(self._prefix + msg_id, _DONE, ex=self._ttl))
        except (RedisError, OSError):
            if not self._fail_open:
                raise
            self.unavailable += 1

    @asynccontextmanager
    async def claim(self, msg_id: str, poll_s: float = 0.2) -> AsyncIterator[bool]:
        """Hold the claim on `msg_id` for the body; yields False when it already took effect."""
        key = self._prefix + msg_id
        try:
            fresh = await self._take(key, poll_s)
        except (RedisError, OSError) as err:
            if not self._fail_open:
                raise
            self.unavailable += 1
            log.warning("ledger unavailable (%s): handling %s unclaimed", type(err).__name__, msg_id)
            fresh = None
        if fresh is None or not fresh:
            yield fresh is None
            return
        done = asyncio.Event()
        renewer = asyncio.create_task(self._keep(key, done))
        try:
            yield True
        finally:
            done.set()
            renewer.cancel()
            with suppress(asyncio.CancelledError):
                await renewer
            try:
                await self._retrying(lambda: self._release(keys=[key], args=[self._token]))  # no-op once marked done
            except (RedisError, OSError):
                if not self._fail_open:
                    raise

    async def _take(self, key: str, poll_s: float) -> bool:
        """True once we hold the claim, False when the message already took effect."""
        while True:
            if await self._retrying(lambda: self._redis.set(key, self._token, nx=True, ex=self._claim_ttl)):
                return True
            value = await self._retrying(lambda: self._redis.get(key))
            if value == _DONE:
                return False
            if value is not None:
                await asyncio.sleep(poll_s)  # another delivery is being handled: wait for it

    async def _keep(self, key: str, done: asyncio.Event) -> None:
        # Ends on `done` as well as on cancel: a cancel that lands while a renewal is inside
        # the Redis client can be absorbed there, and the loop then renewed forever; `primerl
        # up` hung at shutdown on three such renewers, each 'cancelling' and never done.
        while not done.is_set():
            with suppress(TimeoutError):
                await asyncio.wait_for(done.wait(), self._claim_ttl / 3)
            if done.is_set():
                return
            try:
                await self._renew(keys=[key], args=[self._token, self._claim_ttl])
            except (RedisError, OSError) as err:
                # Raising here would surface in the body's `finally` and fail a record whose
                # effect may already be out; the claim may lapse, the next renewal tries again.
                log.warning("ledger: claim renewal failed (%s); trying again at the next one", type(err).__name__)
