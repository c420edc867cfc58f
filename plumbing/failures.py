"""Which failures are the input's fault and which are the infrastructure's.

A stage dead-letters a record only for what is wrong with the record. A broker or
Redis that is unreachable for a while says nothing about the record: dead-lettering
it would drop good work (a paused broker once turned every in-flight completion of
an engine into a dead letter), so those are retried, with consumption paused, until
the outage ends.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TypeVar

from aiokafka.errors import KafkaConnectionError, KafkaError, KafkaTimeoutError, NodeNotReadyError, RequestTimedOutError
from redis.exceptions import BusyLoadingError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

log = logging.getLogger(__name__)

T = TypeVar("T")

_TRANSIENT = (
    KafkaConnectionError,
    KafkaTimeoutError,
    NodeNotReadyError,
    RequestTimedOutError,
    RedisConnectionError,
    RedisTimeoutError,
    BusyLoadingError,
    ConnectionError,
    TimeoutError,
    asyncio.TimeoutError,
)


def is_transient(err: BaseException) -> bool:
    """True for an outage of a server the stage depends on (retry), False for bad input (dead-letter).

    aiokafka marks its retriable errors (leader moved, request timed out); a record too
    large or refused by authorisation is not retriable and is the record's fault.
    """
    if isinstance(err, _TRANSIENT):
        return True
    return isinstance(err, KafkaError) and bool(getattr(err, "retriable", False))


@dataclass
class Backoff:
    """Exponential backoff with jitter: 0.25 s doubling up to `cap_s`, each delay drawn from [half, all] of it.

    Jitter so a fleet of stages that lost the broker together does not come back
    in lockstep.
    """

    base_s: float = 0.25
    cap_s: float = 30.0
    attempt: int = 0
    _rng: random.Random = field(default_factory=random.Random)

    def next_delay(self) -> float:
        """The delay before the next attempt (and count this one)."""
        ceiling = min(self.cap_s, self.base_s * (2 ** min(self.attempt, 16)))
        self.attempt += 1
        return self._rng.uniform(ceiling / 2, ceiling)


async def retry_transient(
    op: Callable[[], Awaitable[T]], what: str, stopping: asyncio.Event | None = None, cap_s: float = 30.0
) -> T:
    """`op()`, retried with backoff while it fails on an outage; other errors, and any once `stopping` is set, raise."""
    backoff = Backoff(cap_s=cap_s)
    while True:
        try:
            return await op()
        except asyncio.CancelledError:
            raise
        except Exception as err:
            if not is_transient(err) or (stopping is not None and stopping.is_set()):
                raise
            delay = backoff.next_delay()
            log.warning(
                "%s failed on an outage (%s: %s); retry %d in %.1fs",
                what,
                type(err).__name__,
                err,
                backoff.attempt,
                delay,
            )
            await asyncio.sleep(delay)
