"""The typed interface every reward function implements, and the guard around it."""

from __future__ import annotations

import asyncio
from typing import Protocol

import msgspec

from schemas import Completion, RewardStatus

# A trace value is for people and metrics, not for storage: keep rewards small.
MAX_TRACE_CHARS = 500


class Score(msgspec.Struct, frozen=True):
    """The outcome of scoring one completion.

    `scalar` is what a learner trains on; `status` says whether it may: only OK and
    POLICY_FAIL are trainable, INFRA_FAIL and TIMEOUT carry scalar 0.0 that must not
    be read as a zero reward.
    """

    components: dict[str, float]
    scalar: float
    status: RewardStatus
    trace: dict[str, str] = {}


class RewardFn(Protocol):
    """A reward function: a name and version (signed into every reward) and `score`."""

    name: str
    version: str

    async def score(self, completion: Completion) -> Score:
        """Score one completion; may raise, the registry's guard turns that into INFRA_FAIL."""
        ...


def clip(text: str, limit: int = MAX_TRACE_CHARS) -> str:
    """`text` cut to `limit` characters, marked when cut."""
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _failed(
    status: RewardStatus, reason: str, components: dict[str, float] | None, trace: dict[str, str] | None
) -> Score:
    return Score(
        components=dict(components or {}), scalar=0.0, status=status, trace={**(trace or {}), "reason": clip(reason)}
    )


def policy_fail(reason: str, components: dict[str, float] | None = None, trace: dict[str, str] | None = None) -> Score:
    """The model's output is invalid (no answer, grammar violated, code crashed): scalar 0.0, trainable."""
    return _failed(RewardStatus.POLICY_FAIL, reason, components, trace)


def infra_fail(reason: str, components: dict[str, float] | None = None, trace: dict[str, str] | None = None) -> Score:
    """The verifier could not score (misconfiguration, crash, unreachable service): not trainable."""
    return _failed(RewardStatus.INFRA_FAIL, reason, components, trace)


def timed_out(reason: str, components: dict[str, float] | None = None, trace: dict[str, str] | None = None) -> Score:
    """Scoring ran out of time: not trainable."""
    return _failed(RewardStatus.TIMEOUT, reason, components, trace)


class Guarded:
    """Wraps a reward function so that no exception escapes `score`.

    A verifier bug must never reach the learner as a zero reward, and must never kill
    the consumer: it becomes INFRA_FAIL with the exception in the trace.
    """

    def __init__(self, inner: RewardFn) -> None:
        self.inner = inner
        self.name = inner.name
        self.version = inner.version

    async def score(self, completion: Completion) -> Score:
        """The inner function's score, or INFRA_FAIL naming the exception it raised."""
        try:
            return await self.inner.score(completion)
        except asyncio.CancelledError:
            raise
        except Exception as err:  # noqa: BLE001 - any verifier bug is an infra failure
            return infra_fail(f"verifier error: {type(err).__name__}: {err}")
