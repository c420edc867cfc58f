"""The remote reward: POST the completion to an HTTP verifier, with retries and a circuit breaker.

Request body (JSON): `{"id", "task", "prompt", "text", "reference"}`.
Reply body (JSON): `{"components": {name: float}, "scalar": float}` for a scored
completion, or `{"status": "POLICY_FAIL", "reason": "..."}` (any RewardStatus) for one
the remote judged invalid. The trace records `url`, `latency_ms` and `attempts`.

Connection errors, timeouts and HTTP 5xx/429 are retried with exponential backoff; a
4xx or a malformed reply is not (asking again will not fix it). A call that still
fails is INFRA_FAIL (TIMEOUT when the last attempt timed out) and counts towards the
circuit breaker; while the circuit is open, calls return INFRA_FAIL "circuit open"
without touching the network.
"""

from __future__ import annotations

import enum
import time
from collections.abc import Callable

import aiohttp
import msgspec
from tenacity import AsyncRetrying, retry_if_exception_type, stop_after_attempt, wait_exponential

from schemas import Completion, RewardStatus
from verifier_workers.rewards.base import Score, clip, infra_fail, policy_fail, timed_out


class RemoteConfig(msgspec.Struct, frozen=True, kw_only=True):
    """Where the remote verifier is and how hard to try."""

    url: str = ""
    timeout_s: float = 10.0  # per attempt
    retries: int = 2  # attempts after the first
    backoff_s: float = 0.2  # first wait between attempts; doubles each time
    backoff_max_s: float = 5.0
    breaker_failures: int = 5  # consecutive failed calls that open the circuit
    breaker_reset_s: float = 30.0  # how long it stays open before one trial call


class BreakerState(str, enum.Enum):
    """Circuit breaker states."""

    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


class CircuitBreaker:
    """Opens after `failures` consecutive failures, for `reset_s`; then lets one trial
    call through (half-open), which closes it on success and reopens it on failure."""

    def __init__(self, failures: int, reset_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.failures = failures
        self.reset_s = reset_s
        self._clock = clock
        self._consecutive = 0
        self._opened_at: float | None = None
        self._trial_in_flight = False

    @property
    def state(self) -> BreakerState:
        """The current state (an open circuit whose time is up reads half-open)."""
        if self._opened_at is None:
            return BreakerState.CLOSED
        if self._clock() - self._opened_at >= self.reset_s:
            return BreakerState.HALF_OPEN
        return BreakerState.OPEN

    def allow(self) -> bool:
        """Whether a call may go out now; in half-open, only one at a time."""
        state = self.state
        if state is BreakerState.CLOSED:
            return True
        if state is BreakerState.HALF_OPEN and not self._trial_in_flight:
            self._trial_in_flight = True
            return True
        return False

    def record_success(self) -> None:
        """A call succeeded: close the circuit."""
        self._consecutive = 0
        self._opened_at = None
        self._trial_in_flight = False

    def record_failure(self) -> None:
        """A call failed: count it; a failed trial or the Nth failure in a row opens the circuit."""
        self._consecutive += 1
        if self._trial_in_flight or self._consecutive >= self.failures:
            self._opened_at = self._clock()
        self._trial_in_flight = False


class _Retryable(Exception):
    """An HTTP status worth retrying (5xx, 429)."""


class _BadReply(Exception):
    """A reply that retrying will not fix (4xx, malformed body)."""


class _Reply(msgspec.Struct):
    components: dict[str, float] = {}
    scalar: float | None = None
    status: RewardStatus = RewardStatus.OK
    reason: str = ""


class RemoteReward:
    """Scores by asking a remote HTTP verifier. Call `aclose()` when done with it."""

    name = "remote"
    version = "1"

    def __init__(self, config: RemoteConfig, clock: Callable[[], float] = time.monotonic) -> None:
        self.config = config
        self.breaker = CircuitBreaker(config.breaker_failures, config.breaker_reset_s, clock)
        self._session: aiohttp.ClientSession | None = None

    async def aclose(self) -> None:
        """Close the HTTP session."""
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def score(self, completion: Completion) -> Score:
        """The remote's score; INFRA_FAIL/TIMEOUT when it cannot be had, "circuit open" without calling."""
        url = self.config.url
        if not url:
            return infra_fail("no remote verifier url configured")
        if not self.breaker.allow():
            return infra_fail("circuit open", trace={"url": url})
        payload: dict[str, object] = {
            "id": completion.id,
            "task": completion.task,
            "prompt": completion.prompt,
            "text": completion.text,
            "reference": completion.reference,
        }
        retrying = AsyncRetrying(
            stop=stop_after_attempt(1 + self.config.retries),
            wait=wait_exponential(multiplier=self.config.backoff_s, max=self.config.backoff_max_s),
            retry=retry_if_exception_type((aiohttp.ClientError, TimeoutError, _Retryable)),
            reraise=True,
        )
        started = time.monotonic()

        def trace() -> dict[str, str]:
            attempts = retrying.statistics.get("attempt_number", 0)
            return {"url": url, "latency_ms": f"{(time.monotonic() - started) * 1000:.0f}", "attempts": str(attempts)}

        succeeded = False
        try:
            reply = await self._call(retrying, url, payload)
            succeeded = True
        except TimeoutError:
            return timed_out(f"remote verifier timed out after {self.config.timeout_s:g} s", trace=trace())
        except (aiohttp.ClientError, _Retryable, _BadReply) as err:
            return infra_fail(f"remote verifier failed: {type(err).__name__}: {err}", trace=trace())
        finally:
            # Cancellation also lands here: a call that did not succeed is a failure,
            # so a half-open trial is never left in flight.
            if succeeded:
                self.breaker.record_success()
            else:
                self.breaker.record_failure()
        if reply.status is RewardStatus.OK:
            assert reply.scalar is not None  # checked in _post
            return Score(dict(reply.components), float(reply.scalar), RewardStatus.OK, trace())
        reason = reply.reason or f"remote verifier says {reply.status.value}"
        if reply.status is RewardStatus.POLICY_FAIL:
            return policy_fail(reason, dict(reply.components), trace())
        if reply.status is RewardStatus.TIMEOUT:
            return timed_out(reason, dict(reply.components), trace())
        return infra_fail(reason, dict(reply.components), trace())

    async def _call(self, retrying: AsyncRetrying, url: str, payload: dict[str, object]) -> _Reply:
        async for attempt in retrying:
            with attempt:
                return await self._post(url, payload)
        raise AssertionError("unreachable: tenacity either returns or reraises")

    async def _post(self, url: str, payload: dict[str, object]) -> _Reply:
        if self._session is None:
            self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=self.config.timeout_s))
        async with self._session.post(url, json=payload) as response:
            body = await response.read()
            if response.status >= 500 or response.status == 429:
                raise _Retryable(f"HTTP {response.status}")
            if response.status >= 400:
                raise _BadReply(f"HTTP {response.status}: {clip(body.decode('utf-8', 'replace'), 200)}")
        try:
            reply = msgspec.json.decode(body, type=_Reply)
        except msgspec.DecodeError as err:
            raise _BadReply(f"malformed reply: {err}") from err
        if reply.status is RewardStatus.OK and reply.scalar is None:
            raise _BadReply("reply has neither a scalar nor a failure status")
        return reply
