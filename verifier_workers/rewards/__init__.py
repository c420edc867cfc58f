"""Reward functions, chosen per completion by `completion.task`.

    registry = build_registry(RewardConfig(...))
    score = await score_completion(registry, completion)   # never raises but UnknownTask

Status rules (see schemas.RewardStatus): OK for a scored completion, right (1.0) or
wrong (0.0); POLICY_FAIL (0.0) when the model's output is invalid: no answer, grammar
violated, code that fails, crashes or is stopped by a barrier; INFRA_FAIL and TIMEOUT
(0.0, not trainable) when the verifier could not score: a missing reference or
grammar, an exception inside a scorer, an unreachable remote, a time limit.
"""

from __future__ import annotations

import msgspec

from plumbing.sandbox import Sandbox, SandboxLimits
from schemas import Completion
from verifier_workers.rewards.base import Guarded, RewardFn, Score, infra_fail, policy_fail, timed_out
from verifier_workers.rewards.code import CodeReward
from verifier_workers.rewards.format import FormatReward
from verifier_workers.rewards.match import AnswerMatchReward, ExactReward, RegexReward
from verifier_workers.rewards.math import FormattedMathReward, MathReward
from verifier_workers.rewards.remote import RemoteConfig, RemoteReward


class RewardConfig(msgspec.Struct, frozen=True, kw_only=True):
    """Settings of every reward function; the defaults suit a local run."""

    math_rel_tol: float = 1e-6
    math_symbolic_timeout_s: float = 2.0
    exact_casefold: bool = False
    sandbox: SandboxLimits = SandboxLimits()
    remote: RemoteConfig = RemoteConfig()


class UnknownTask(ValueError):
    """A completion names a task no reward function is registered for (bad input: dead-letter it)."""


def build_registry(config: RewardConfig | None = None) -> dict[str, RewardFn]:
    """Task name -> reward function, each guarded so that an exception is INFRA_FAIL.

    The functions hold per-process state (the sandbox's probe and parallelism, the
    remote's HTTP session and circuit breaker): build one registry per process, and
    close the remote's session at shutdown with `close_registry`.
    """
    config = config or RewardConfig()
    math = MathReward(rel_tol=config.math_rel_tol, symbolic_timeout_s=config.math_symbolic_timeout_s)
    functions: list[RewardFn] = [
        math,
        FormattedMathReward(math),
        ExactReward(casefold=config.exact_casefold),
        RegexReward(),
        AnswerMatchReward(),
        FormatReward(),
        CodeReward(Sandbox(config.sandbox)),
        RemoteReward(config.remote),
    ]
    return {fn.name: Guarded(fn) for fn in functions}


async def close_registry(registry: dict[str, RewardFn]) -> None:
    """Release what the functions hold (the remote verifier's HTTP session)."""
    for fn in registry.values():
        inner = getattr(fn, "inner", fn)
        if isinstance(inner, RemoteReward):
            await inner.aclose()


async def score_completion(registry: dict[str, RewardFn], completion: Completion) -> Score:
    """Score `completion` with the function its task names; raises UnknownTask for an unknown one."""
    fn = registry.get(completion.task)
    if fn is None:
        raise UnknownTask(f"unknown task {completion.task!r}; known tasks: {', '.join(sorted(registry))}")
    return await fn.score(completion)


__all__ = [
    "AnswerMatchReward",
    "CodeReward",
    "ExactReward",
    "FormatReward",
    "Guarded",
    "MathReward",
    "RegexReward",
    "RemoteConfig",
    "RemoteReward",
    "RewardConfig",
    "RewardFn",
    "SandboxLimits",
    "Score",
    "UnknownTask",
    "build_registry",
    "close_registry",
    "infra_fail",
    "policy_fail",
    "score_completion",
    "timed_out",
]
