"""Hypothesis strategies of valid messages, shared by the schema tests and the fuzz suite."""

from __future__ import annotations

import msgspec
from hypothesis import strategies as st

from schemas import (
    ChatMessage,
    Completion,
    CompletionChunk,
    DeadLetter,
    Grammar,
    GrammarKind,
    PolicyUpdate,
    PromptRequest,
    Reward,
    RewardStatus,
    SamplingParams,
    Timings,
    Trajectory,
)
from schemas.sessions import Segment, Session, ToolTrace

text = st.text(max_size=40)
ids = st.text(alphabet="abcdef0123456789", min_size=1, max_size=32)
floats = st.floats(allow_nan=False, allow_infinity=False, width=64)
small = st.integers(min_value=0, max_value=2**31)

sampling = st.builds(
    SamplingParams,
    temperature=st.floats(0, 2),
    top_p=st.floats(0, 1),
    max_tokens=st.integers(1, 4096),
    stop=st.lists(text, max_size=3),
)
grammars = st.builds(Grammar, kind=st.sampled_from(GrammarKind), spec=text)
chat = st.lists(
    st.builds(ChatMessage, role=st.sampled_from(["system", "user", "assistant"]), content=text), min_size=1, max_size=4
)

prompts = st.one_of(
    st.builds(
        PromptRequest,
        run_id=ids,
        messages=chat,
        group_size=st.integers(1, 64),
        sampling=sampling,
        grammar=st.none() | grammars,
        session_id=st.none() | ids,
        turn_index=st.integers(0, 50),
        task=text,
        reference=st.none() | text,
        min_policy_version=small,
    ),
    st.builds(PromptRequest, run_id=ids, text=text, group_id=ids),
)
timings = st.builds(Timings, enqueued_at=floats, started_at=floats, first_token_at=floats, finished_at=floats)
completions = st.builds(
    Completion,
    run_id=ids,
    request_id=ids,
    group_id=ids,
    group_size=st.integers(1, 64),
    sample_index=small,
    prompt=text,
    prompt_token_ids=st.lists(small),
    text=text,
    token_ids=st.lists(small),
    logprobs=st.lists(floats),
    finish_reason=st.sampled_from(["stop", "length"]),
    policy_version=small,
    worker_id=ids,
    timings=timings,
    prompt_tokens=small,
    cached_prompt_tokens=small,
    grammar=st.none() | grammars,
    grammar_completed=st.none() | st.booleans(),
)
segments = st.builds(Segment, kind=st.sampled_from(["model", "tool"]), start=small, end=small, version=small)
tool_traces = st.builds(
    ToolTrace,
    turn_index=small,
    tool=text,
    ok=st.booleans(),
    error=text,
    latency_ms=floats,
    url=text,
    status=small,
    bytes=small,
)
sessions = st.builds(
    Session,
    env=ids,
    max_turns=small,
    sample_index=small,
    group_size=st.integers(1, 64),
    prompt_len=small,
    sampling=st.none() | sampling,
    segments=st.lists(segments, max_size=6),
    logprobs=st.lists(floats, max_size=16),
    calls=st.lists(tool_traces, max_size=4),
    state=text,
)
# Kept apart from `completions`: a session turn on rollout.completions is skipped by the
# verifier and the learner, not refused, so the completion storms stay session-free.
session_completions = st.builds(lambda c, s: msgspec.structs.replace(c, session=s), completions, sessions)
trajectories = st.builds(
    Trajectory,
    run_id=ids,
    completion=session_completions,
    done_reason=st.sampled_from(["env_done", "turn_limit", "context_full"]),
    turns=small,
    components=st.dictionaries(ids, floats, max_size=4),
)
chunks = st.builds(
    CompletionChunk,
    run_id=ids,
    request_id=ids,
    sample_index=small,
    seq=small,
    text=text,
    token_ids=st.lists(small),
    policy_version=small,
)
rewards = st.builds(
    Reward,
    run_id=ids,
    completion_id=ids,
    request_id=ids,
    group_id=ids,
    prompt_hash=ids,
    tokens_hash=ids,
    policy_version=small,
    verifier_id=ids,
    verifier_version=ids,
    components=st.dictionaries(ids, floats),
    scalar=floats,
    status=st.sampled_from(RewardStatus),
    trace=st.dictionaries(ids, text),
    key_id=ids,
    signature=st.binary(max_size=64),
)
policies = st.builds(PolicyUpdate, run_id=ids, version=small, weights_path=text, step=small, checksum=ids)
letters = st.builds(
    DeadLetter,
    run_id=ids,
    stage=ids,
    error_type=ids,
    error=text,
    source_topic=ids,
    partition=small,
    offset=small,
    key=st.none() | st.binary(max_size=16),
    headers=st.lists(st.tuples(ids, st.binary(max_size=8)), max_size=3),
    payload=st.binary(max_size=64),
)
any_message = st.one_of(prompts, completions, chunks, rewards, policies, letters)
