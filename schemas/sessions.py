"""Multi-turn sessions (issue 23): what a session's turns carry, and rollout.trajectories.

A session is one sample of a first-turn group that an environment (envhub/) keeps
talking to. Its turns travel as ordinary PromptRequests, token in / token out: turn
t+1's `prompt_token_ids` are turn t's prompt tokens, then the tokens turn t sampled,
then the tokenized tool response. Earlier turns are never re-rendered, so what a
learner trains on is exactly what the engines sampled (plus the tool responses,
masked out of the loss). The layout of those tokens rides along in `Session`, which
the engine echoes onto the completion it signs.
"""

from __future__ import annotations

from typing import Literal

import msgspec

from schemas.sampling import SamplingParams

SegmentKind = Literal["model", "tool"]


class Segment(msgspec.Struct, frozen=True):
    """Tokens [start, end) of a session's response (the tokens after its first prompt).

    `model`: sampled by policy `version` (trained on); `tool`: a tool response the env
    hub tokenized (never trained on; version -1).
    """

    kind: SegmentKind
    start: int
    end: int
    version: int = -1


class ToolTrace(msgspec.Struct, frozen=True, kw_only=True):
    """One tool call of a session as the env hub ran it; a browser fetch fills the HTTP fields."""

    turn_index: int
    tool: str  # the connector's name; "" when the call could not be parsed
    ok: bool
    error: str = ""  # why it failed: malformed call, unknown tool, the tool's own error
    latency_ms: float = 0.0
    url: str = ""
    status: int = 0
    bytes: int = 0


class Session(msgspec.Struct, frozen=True, kw_only=True):
    """A session's state, carried by each turn's request and echoed on its completion.

    Producers set `env` (and optionally `max_turns`, `state`) on the first turn; the
    engine fills `sample_index`, `group_size`, `prompt_len` and `sampling` when it
    fans the first turn out into a group; the env hub appends to `segments`,
    `logprobs` and `calls` turn by turn.
    """

    env: str  # the environment's entry-point name (envhub.registry)
    max_turns: int = 4
    sample_index: int = 0  # which sample of the first turn's group this session is
    group_size: int = 1  # the first turn's group size (what a learner assembles)
    prompt_len: int = 0  # tokens of the first turn's prompt
    sampling: SamplingParams | None = None  # the first turn's, reused by every turn
    # The response so far, up to this turn's prompt end: segments cover
    # prompt_token_ids[prompt_len:] exactly, and `logprobs` has one entry per token of it
    # (the sampled log-prob on model tokens, 0.0 on tool tokens).
    segments: list[Segment] = []
    logprobs: list[float] = []
    calls: list[ToolTrace] = []
    # The environment's own reward components (`StepResult.components`), summed over the
    # steps so far; the trajectory adds the last step's.
    components: dict[str, float] = {}
    state: str = ""  # the environment's own state (JSON), opaque to every other stage

    def response_len(self) -> int:
        """Tokens of the response before this turn's output."""
        return self.segments[-1].end if self.segments else 0
