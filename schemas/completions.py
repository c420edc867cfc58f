"""rollout.completion-chunks (streamed deltas) and rollout.completions (finals)."""

from __future__ import annotations

import msgspec

from schemas.base import Message
from schemas.prompts import Grammar, Route
from schemas.sessions import Session


class CompletionChunk(Message, kw_only=True):
    """A streamed delta of one sample; `seq` orders the chunks of one attempt's sample from 0.

    The last three fields (issue 22) let a worker that takes over a redelivered request
    resume each sample from the chunk log (engine_workers/resume.py). Chunks written
    before them decode with the defaults and are simply not resumable from.
    """

    request_id: str
    sample_index: int
    seq: int
    text: str
    token_ids: list[int]
    policy_version: int
    logprobs: list[float] = []  # sampled log-prob of each of `token_ids`
    finish_reason: str = ""  # set on the sample's last chunk
    # The generation attempt that wrote it: a redelivered request is an attempt of its own,
    # so two attempts' chunks (same seq numbers) are never spliced together. A resumed
    # attempt re-publishes the prefix it continues as its own first chunks.
    attempt: str = ""


class VersionSpan(msgspec.Struct, frozen=True):
    """Tokens from `start` on (to the next span) were sampled under policy `version`."""

    start: int
    version: int


class Timings(msgspec.Struct, frozen=True, kw_only=True):
    """Unix-second timestamps of one sample's life in the engine worker."""

    enqueued_at: float
    started_at: float
    first_token_at: float
    finished_at: float


def completion_id(request_id: str, sample_index: int) -> str:
    """Deterministic id of a final completion, so a regenerated sample is a duplicate
    that every downstream ledger recognises."""
    return f"{request_id}/{sample_index}"


class Completion(Message, kw_only=True):
    """One finished sample with everything a verifier and a learner need."""

    request_id: str
    group_id: str
    group_size: int
    sample_index: int
    session_id: str | None = None
    turn_index: int = 0
    prompt: str
    prompt_token_ids: list[int]
    text: str
    token_ids: list[int]
    logprobs: list[float]
    finish_reason: str
    policy_version: int
    worker_id: str
    timings: Timings
    prompt_tokens: int
    cached_prompt_tokens: int
    task: str = "none"
    reference: str | None = None
    grammar: Grammar | None = None
    grammar_completed: bool | None = None
    route: Route | None = None
    # Custody (plumbing/trust.py): the engine worker's Ed25519 signature over the fields a
    # verifier scores and a learner trains on. Empty on completions written before it
    # existed; verifiers and learners refuse those unless custody.require_engine_signatures
    # is off. Older readers ignore the two fields (unknown fields are skipped on decode).
    engine_key_id: str = ""
    engine_signature: bytes = b""
    # Issue 22: set when the sample continued a prefix read back from the chunk log of an
    # attempt that died: the number of tokens it carried over (their log-probs are the
    # ones sampled then). None: generated in one attempt.
    resumed_at_token: int | None = None
    # Only with engine.resume_policy = "continue" and a prefix sampled under an older
    # version: the version of each token span (`policy_version` is then the oldest one,
    # so staleness bounds stay conservative). Empty: every token under `policy_version`.
    policy_spans: list[VersionSpan] = []
    # Issue 23: the environment session this turn belongs to, as the request carried it
    # (the first turn's with sample_index, group_size, prompt_len and sampling filled in).
    # Signed with the rest: it says which of prompt_token_ids were sampled and which
    # were tool responses. Such completions are the env hub's; verifiers and learners
    # take a session only once finished, from rollout.trajectories.
    session: Session | None = None
