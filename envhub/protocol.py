"""The environment protocol: what a multi-turn environment gives the env hub, turn by turn.

An environment is stateless between calls: everything a session needs to continue
lives in the `state` string it returns, which travels in `Session.state` (so any env
hub replica can run a session's next turn, and a redelivered turn replays the same way).
"""

from __future__ import annotations

from typing import Literal, Protocol

import msgspec

from schemas.prompts import ChatMessage, Grammar
from schemas.sessions import ToolTrace


class EnvContext(msgspec.Struct, frozen=True, kw_only=True):
    """What environment factories receive: where the tools reach and how long they may take."""

    corpus_url: str = "http://127.0.0.1:8089"  # the local corpus server (envhub.corpus_server)
    sandbox_wall_s: float = 10.0  # wall-clock limit of one python tool run
    http_timeout_s: float = 5.0  # total time limit of one browser fetch
    max_observation_chars: int = 2000  # longer tool responses are cut (and say so)


class Reset(msgspec.Struct, frozen=True, kw_only=True):
    """A session's start: the first turn's prompt and what the verifier checks at the end."""

    messages: list[ChatMessage]  # the first turn's chat prompt
    state: str = ""  # env-private JSON carried in Session.state
    reference: str | None = None  # what the verifier checks the final answer against
    task: str = "math_format"  # the verifier's reward-function name for the final answer
    # The output grammar of every turn (None: free text). A 135M model writes a well-formed
    # call or answer only when the engine enforces the shape; the built-in tasks do.
    grammar: Grammar | None = None


class StepResult(msgspec.Struct, frozen=True, kw_only=True):
    """What one model turn led to: a tool response for the next turn, or the end."""

    observation: str | None  # tool response text for the model's next turn; None when done
    done: bool
    components: dict[str, float] = {}  # this step's reward components (tool use)
    calls: list[ToolTrace] = []  # one per tool call run (or refused) this step
    state: str = ""


class Environment(Protocol):
    """A multi-turn environment. `step` never raises for anything the model wrote: a bad
    call is an observation telling the model what was wrong, plus a failed ToolTrace.
    Only infrastructure failures (the sandbox cannot start) raise."""

    name: str
    tools: tuple[str, ...]

    def instances(self, split: Literal["train", "heldout"], n: int, seed: int) -> list[dict[str, str]]:
        """`n` task instances of `split` (train and held-out never share one), deterministic in `seed`."""
        ...

    def reset(self, instance: dict[str, str]) -> Reset:
        """The first turn of a session on `instance` (one of the env module's `instances`)."""
        ...

    async def step(self, state: str, turn_index: int, model_text: str, *, stopped_at_close: bool = False) -> StepResult:
        """React to turn `turn_index`'s output. `stopped_at_close`: generation stopped at the
        stop string `</tool>`, which vLLM drops from the text (so the call is complete)."""
        ...

    async def aclose(self) -> None:
        """Release what the environment holds (HTTP sessions); called once at shutdown."""
        ...


def truncate(text: str, limit: int) -> str:
    """`text` cut to `limit` characters, saying so: a model must not take a cut page for all of it."""
    if len(text) <= limit:
        return text
    return text[:limit] + f"\n[truncated: first {limit} of {len(text)} characters shown]"
