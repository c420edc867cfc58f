"""Schema round trips, typed decode errors, unknown versions, JSON from outside producers."""

from __future__ import annotations

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from schemas import (
    JSON,
    MSGPACK,
    SCHEMA_VERSION,
    ChatMessage,
    Completion,
    CompletionChunk,
    DeadLetter,
    DecodeError,
    Grammar,
    GrammarKind,
    PolicyUpdate,
    PromptRequest,
    Reward,
    RewardStatus,
    SamplingParams,
    SchemaVersionError,
    Timings,
    decode,
    encode,
    encode_json,
)
from schemas.topics import TOPICS, topic_for

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
chat = st.lists(st.builds(ChatMessage, role=st.sampled_from(["system", "user", "assistant"]), content=text), min_size=1, max_size=4)

prompts = st.one_of(
    st.builds(PromptRequest, run_id=ids, messages=chat, group_size=st.integers(1, 64), sampling=sampling, grammar=st.none() | grammars,
              session_id=st.none() | ids, turn_index=st.integers(0, 50), task=text, reference=st.none() | text, min_policy_version=small),
    st.builds(PromptRequest, run_id=ids, text=text, group_id=ids),
)
timings = st.builds(Timings, enqueued_at=floats, started_at=floats, first_token_at=floats, finished_at=floats)
completions = st.builds(
    Completion, run_id=ids, request_id=ids, group_id=ids, group_size=st.integers(1, 64), sample_index=small, prompt=text,
    prompt_token_ids=st.lists(small), text=text, token_ids=st.lists(small), logprobs=st.lists(floats),
    finish_reason=st.sampled_from(["stop", "length"]), policy_version=small, worker_id=ids, timings=timings,
    prompt_tokens=small, cached_prompt_tokens=small, grammar=st.none() | grammars, grammar_completed=st.none() | st.booleans(),
)
chunks = st.builds(CompletionChunk, run_id=ids, request_id=ids, sample_index=small, seq=small, text=text, token_ids=st.lists(small), policy_version=small)
rewards = st.builds(
    Reward, run_id=ids, completion_id=ids, request_id=ids, group_id=ids, prompt_hash=ids, tokens_hash=ids, policy_version=small,
    verifier_id=ids, verifier_version=ids, components=st.dictionaries(ids, floats), scalar=floats, status=st.sampled_from(RewardStatus),
    trace=st.dictionaries(ids, text), key_id=ids, signature=st.binary(max_size=64),
)
policies = st.builds(PolicyUpdate, run_id=ids, version=small, weights_path=text, step=small, checksum=ids)
letters = st.builds(
    DeadLetter, run_id=ids, stage=ids, error_type=ids, error=text, source_topic=ids, partition=small, offset=small,
    key=st.none() | st.binary(max_size=16), headers=st.lists(st.tuples(ids, st.binary(max_size=8)), max_size=3), payload=st.binary(max_size=64),
)
any_message = st.one_of(prompts, completions, chunks, rewards, policies, letters)


@settings(max_examples=300)
@given(any_message)
def test_msgpack_round_trip(msg) -> None:
    assert decode(encode(msg), type(msg)) == msg


@settings(max_examples=300)
@given(st.one_of(prompts, completions, chunks, policies))
def test_json_round_trip_by_header_and_by_sniffing(msg) -> None:
    raw = encode_json(msg)
    assert decode(raw, type(msg), [("content-type", JSON.encode())]) == msg
    assert decode(raw, type(msg)) == msg


def test_every_message_has_the_common_fields() -> None:
    for topic in TOPICS.values():
        fields = set(topic.message_type.__struct_fields__)
        assert {"schema_version", "id", "run_id", "created_at"} <= fields, topic.name
        assert topic.partitions >= 1
    assert topic_for("rollout.prompts").message_type is PromptRequest
    with pytest.raises(KeyError, match="known"):
        topic_for("nope")


def test_garbage_bytes_raise_typed_error() -> None:
    with pytest.raises(DecodeError):
        decode(b"\xc1\xff\x00garbage", PromptRequest)
    with pytest.raises(DecodeError):
        decode(b"{not json", PromptRequest)


def test_wrong_field_type_names_the_field() -> None:
    raw = msgspec.json.encode({"run_id": "r", "text": "hi", "sampling": {"max_tokens": "many"}})
    with pytest.raises(DecodeError) as info:
        decode(raw, PromptRequest)
    assert info.value.field == "$.sampling.max_tokens"
    assert info.value.expected == "int"


def test_missing_required_field_is_named() -> None:
    raw = msgspec.json.encode({"text": "hi"})
    with pytest.raises(DecodeError, match="run_id"):
        decode(raw, PromptRequest)


def test_semantic_check_is_a_decode_error() -> None:
    raw = msgspec.json.encode({"run_id": "r", "text": "hi", "messages": [{"role": "user", "content": "x"}]})
    with pytest.raises(DecodeError, match="exactly one"):
        decode(raw, PromptRequest)


def test_future_schema_version_is_rejected_not_misread() -> None:
    msg = PromptRequest(run_id="r", text="hi")
    future = msgspec.msgpack.encode({**msgspec.to_builtins(msg), "schema_version": SCHEMA_VERSION + 1, "renamed_field": 3})
    with pytest.raises(SchemaVersionError, match="upgrade"):
        decode(future, PromptRequest)


def test_kcat_style_json_without_kind_or_header_is_accepted() -> None:
    raw = b'{"run_id": "ext", "messages": [{"role": "user", "content": "2+2?"}], "group_size": 4}'
    msg = decode(raw, PromptRequest)
    assert msg.group_size == 4 and msg.group_id == msg.id and msg.messages == [ChatMessage("user", "2+2?")]


def test_wrong_kind_is_rejected() -> None:
    chunk = CompletionChunk(run_id="r", request_id="q", sample_index=0, seq=0, text="", token_ids=[], policy_version=0)
    with pytest.raises(DecodeError):
        decode(encode(chunk), PromptRequest)


def test_unknown_content_type_is_rejected() -> None:
    with pytest.raises(DecodeError, match="content type"):
        decode(b"x", PromptRequest, [("content-type", b"text/plain")])
    assert decode(encode(PromptRequest(run_id="r", text="t")), PromptRequest, [("Content-Type", MSGPACK.encode())]).text == "t"


def test_routing_key_keeps_sessions_and_groups_together() -> None:
    a = PromptRequest(run_id="r", text="x", group_id="g1")
    b = PromptRequest(run_id="r", text="y", group_id="g1")
    s = PromptRequest(run_id="r", text="z", group_id="g2", session_id="sess")
    assert a.routing_key() == b.routing_key() == b"g1"
    assert s.routing_key() == b"sess"
