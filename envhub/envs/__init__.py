"""Built-in environments, and the turn logic they share: parse the turn, run at most one tool, report.

Every built-in env reacts to a turn the same way: an `<answer>` ends the session, one
well-formed call runs its tool and the result is the next observation, and anything
else (a malformed call, no call at all) is an observation telling the model what to
write instead. Per-env differences are the tools, the prompts and the component names.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Callable, Sequence
from typing import Literal, TypeVar

from envhub.connectors import Connector
from envhub.protocol import EnvContext, StepResult, truncate
from envhub.tool_calls import Answer, Call, Malformed, parse
from schemas.sessions import ToolTrace

Split = Literal["train", "heldout"]
T = TypeVar("T")


def split_of(key: str, heldout_percent: int = 20) -> Split:
    """A stable split from a hash of `key`: the same item is held out in every process and run."""
    bucket = int(hashlib.sha256(key.encode()).hexdigest()[:8], 16) % 100
    return "heldout" if bucket < heldout_percent else "train"


def hashed_split_instances(
    tag: str, problem: Callable[[random.Random], tuple[str, object]], split: Split, n: int, seed: int
) -> list[dict[str, str]]:
    """`n` distinct generated problems of `split` (`problem(rng)` -> (question, answer)); the
    splits never share a question (split by its hash)."""
    rng = random.Random(f"{tag}:{seed}")
    out: dict[str, dict[str, str]] = {}
    while len(out) < n:
        question, answer = problem(rng)
        if split_of(question) == split:
            out.setdefault(question, {"question": question, "answer": str(answer)})
    return list(out.values())


def draw(pool: Sequence[T], n: int, seed: int) -> list[T]:
    """`n` items of `pool` in a seeded order; whole reshuffled passes when `n` exceeds the pool."""
    rng = random.Random(seed)
    out: list[T] = []
    while len(out) < n and pool:
        batch = list(pool)
        rng.shuffle(batch)
        out += batch[: n - len(out)]
    return out


class ToolEnv:
    """The shared step: subclasses set name, tools, `example` (one correct call) and the connectors."""

    name: str
    tools: tuple[str, ...]
    example: str

    def __init__(self, ctx: EnvContext, connectors: Sequence[Connector]) -> None:
        self.ctx = ctx
        self.connectors = {c.name: c for c in connectors}
        if set(self.connectors) != set(self.tools):  # the parser accepts `tools`; each needs its connector
            raise ValueError(f"{self.name}: tools {self.tools} but connectors {sorted(self.connectors)}")

    def components(self, calls: list[ToolTrace], malformed: int) -> dict[str, float]:
        """This step's reward components from the calls that ran (a malformed one did not) and the
        malformed count; the same keys on every step, so sums over a session line up."""
        return {
            "tool_calls": float(len(calls)),
            "tool_errors": float(sum(not c.ok for c in calls)),
            "malformed_calls": float(malformed),
        }

    def _result(self, state: str, text: str, calls: list[ToolTrace], malformed: bool = False) -> StepResult:
        return StepResult(
            observation=truncate(text, self.ctx.max_observation_chars),
            done=False,
            components=self.components([] if malformed else calls, int(malformed)),
            calls=calls,
            state=state,
        )

    async def step(self, state: str, turn_index: int, model_text: str, *, stopped_at_close: bool = False) -> StepResult:
        parsed = parse(model_text, self.tools, stopped_at_close=stopped_at_close)
        if isinstance(parsed, Answer):
            return StepResult(observation=None, done=True, components=self.components([], 0), state=state)
        if isinstance(parsed, Malformed) and parsed.of == "answer":
            text = f"error: {parsed.reason}. A final answer looks like <answer>...</answer>."
            return self._result(state, text, [])
        if isinstance(parsed, Malformed):
            trace = ToolTrace(turn_index=turn_index, tool=parsed.tool, ok=False, error=f"malformed: {parsed.reason}")
            text = f"error: malformed tool call: {parsed.reason}. A correct call looks like {self.example}"
            return self._result(state, text, [trace], malformed=True)
        if isinstance(parsed, Call):
            out = await self.connectors[parsed.tool].call(parsed.args, turn_index)
            text = self.observe(out.text, out.trace)
            if parsed.ignored:
                text += f"\n(only the first tool call of a turn runs: {parsed.ignored} more ignored)"
            return self._result(state, text, [out.trace])
        text = f"No tool call and no answer found. Call a tool like {self.example}, or answer as <answer>...</answer>."
        return self._result(state, text, [])

    def observe(self, text: str, trace: ToolTrace) -> str:
        """The observation of a tool's result (an env may add what to do next)."""
        return text

    async def aclose(self) -> None:
        for c in self.connectors.values():
            await c.aclose()


Factory = Callable[[EnvContext], ToolEnv]
