"""Multi-turn sessions built by hand, as the engine and the env hub would leave them (issue 23)."""

from __future__ import annotations

from typing import NamedTuple

import msgspec

from plumbing.config import Config
from plumbing.custody import envhub_signer
from schemas import Completion, Trajectory
from schemas.sessions import Segment, Session, ToolTrace


class Turn(NamedTuple):
    """An earlier turn: what the model sampled (under `version`), then the tool's response tokens."""

    tokens: list[int]
    logprobs: list[float]
    version: int
    tool: list[int]


def with_session(
    last: Completion, earlier: list[Turn], calls: list[ToolTrace] | None = None, env: str = "browser"
) -> Completion:
    """`last` (the final turn's output in token_ids/logprobs, the first prompt in prompt_token_ids)
    as the last turn of a session whose earlier turns are `earlier`: the whole session goes into
    prompt_token_ids, its layout into `session`, exactly as the env hub extends them turn by turn."""
    prompt = list(last.prompt_token_ids)
    tokens, logprobs, segments = [], [], []
    for t in earlier:
        at = len(tokens)
        segments.append(Segment("model", at, at + len(t.tokens), t.version))
        segments.append(Segment("tool", at + len(t.tokens), at + len(t.tokens) + len(t.tool)))
        tokens += t.tokens + t.tool
        logprobs += t.logprobs + [0.0] * len(t.tool)
    session = Session(
        env=env,
        sample_index=last.sample_index,
        group_size=last.group_size,
        prompt_len=len(prompt),
        segments=segments,
        logprobs=logprobs,
        calls=calls or [],
    )
    return msgspec.structs.replace(
        last, prompt_token_ids=prompt + tokens, session=session, turn_index=len(earlier), prompt_tokens=len(prompt)
    )


def trajectory_of(c: Completion, cfg: Config | None, components: dict[str, float] | None = None) -> Trajectory:
    """The env hub's Trajectory of a finished session whose last turn is `c` (signed or not),
    signed with `cfg`'s env hub key as the env hub signs it (None: an unsigned wrapper)."""
    assert c.session is not None
    t = Trajectory(
        id=c.id,
        run_id=c.run_id,
        completion=c,
        done_reason="env_done",
        turns=c.turn_index + 1,
        components=components or {},
    )
    return envhub_signer(cfg).sign(t) if cfg is not None else t


BROWSER_CALLS = [
    ToolTrace(
        turn_index=0, tool="browser", ok=True, latency_ms=12.5, url="http://example.test/a", status=200, bytes=512
    ),
    ToolTrace(
        turn_index=1,
        tool="browser",
        ok=False,
        error="HTTP 404",
        latency_ms=3.0,
        url="http://example.test/b",
        status=404,
    ),
]
