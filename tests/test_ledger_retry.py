"""Regression (chaos run, issue 17): a Redis restart closes every pooled connection, and the
verifier's first ledger call on each raised `ConnectionError: Connection closed by server`;
the consumer dead-lettered those good completions (8 of them in the 1,000-sample run).
Non-fail-open ledgers now retry for a while; claim renewals never raise into the body."""

from __future__ import annotations

import asyncio

import pytest
from redis.exceptions import ConnectionError as RedisConnectionError

from plumbing.ledger import Ledger


class FlakyRedis:
    """Just what the ledger uses; the next `failures` calls raise like a restarted Redis."""

    def __init__(self, failures: int = 0) -> None:
        self.failures = failures
        self.data: dict[str, bytes] = {}
        self.calls = 0

    def _maybe_fail(self) -> None:
        self.calls += 1
        if self.failures > 0:
            self.failures -= 1
            raise RedisConnectionError("Connection closed by server.")

    async def set(self, key: str, value: bytes, nx: bool = False, ex: int | None = None) -> bool | None:
        self._maybe_fail()
        if nx and key in self.data:
            return None
        self.data[key] = value
        return True

    async def get(self, key: str) -> bytes | None:
        self._maybe_fail()
        return self.data.get(key)

    def register_script(self, src: str):  # noqa: ANN201
        async def script(keys: list[str], args: list[object]) -> int:
            self._maybe_fail()
            if self.data.get(keys[0]) == args[0]:
                if "DEL" in src:
                    del self.data[keys[0]]
                return 1
            return 0

        return script


async def test_claim_and_mark_survive_a_redis_restart() -> None:
    redis = FlakyRedis(failures=2)
    ledger = Ledger(redis, "verifier:test")  # type: ignore[arg-type]
    async with ledger.claim("c1") as fresh:
        assert fresh
        redis.failures = 1  # restarted again while the body ran
        await ledger.mark("c1")
    async with ledger.claim("c1") as fresh:
        assert not fresh  # took effect once


async def test_a_redis_that_stays_down_still_raises_after_the_retry_window() -> None:
    ledger = Ledger(FlakyRedis(failures=10**6), "verifier:test", retry_s=0.3)  # type: ignore[arg-type]
    with pytest.raises(RedisConnectionError):
        async with ledger.claim("c1"):
            pass


async def test_a_failed_renewal_does_not_fail_the_body() -> None:
    redis = FlakyRedis()
    ledger = Ledger(redis, "verifier:test", claim_ttl_s=1)  # type: ignore[arg-type]
    async with ledger.claim("c1") as fresh:
        assert fresh
        redis.failures = 1
        await asyncio.sleep(0.5)  # a renewal (every claim_ttl_s / 3) hits the failure
        await ledger.mark("c1")


async def test_fail_open_ledgers_do_not_wait() -> None:
    ledger = Ledger(FlakyRedis(failures=10**6), "engine:test", fail_open=True)  # type: ignore[arg-type]
    async with ledger.claim("r1") as fresh:
        assert fresh  # unclaimed, at once
    assert ledger.unavailable == 1


async def test_a_claim_ends_even_when_the_client_absorbs_the_renewers_cancel() -> None:
    """A renewal that swallows the CancelledError (as a Redis client may when a cancel lands
    mid-command) must not keep the renewer, and so the claim's exit, alive for ever."""
    redis = FlakyRedis()
    ledger = Ledger(redis, "verifier:test", claim_ttl_s=1)  # type: ignore[arg-type]
    renewing = asyncio.Event()

    absorbed: list[bool] = []

    async def absorbing(keys: list[str], args: list[object]) -> int:
        renewing.set()
        try:
            await asyncio.sleep(0.5)
        except asyncio.CancelledError:
            if absorbed:  # only the first (so that a failing run still tears down)
                raise
            absorbed.append(True)  # the cancel is lost here
        return 1

    ledger._renew = absorbing  # type: ignore[assignment]

    async def claim_and_leave_mid_renewal() -> None:
        async with ledger.claim("c1") as fresh:
            assert fresh
            await renewing.wait()  # leave while the renewer is inside `absorbing`

    task = asyncio.create_task(claim_and_leave_mid_renewal())
    finished, _ = await asyncio.wait({task}, timeout=5)  # not wait_for: its cancel would hang on the renewer too
    assert task in finished, "the claim never ended: its renewer outlived the cancel"
    task.result()
    assert absorbed  # the case was the one meant: a cancel was lost inside the renewal
