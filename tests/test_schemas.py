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
    CompletionChunk,
    DecodeError,
    PromptRequest,
    SchemaVersionError,
    decode,
    encode,
    encode_json,
)
from schemas.topics import TOPICS, topic_for
from tests.strategies import any_message, chunks, completions, letters, policies, prompts, rewards  # noqa: F401


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


@pytest.mark.parametrize(
    "raw",
    [
        b'{"run_id": "r", "text": "t", "x": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",  # skipped unknown field
        b'{"run_id": "r", "text": "t", "metadata": ' + b'{"a":' * 5_000 + b"1" + b"}" * 5_000 + b"}",
        b"\x83\xa6run_id\xa1r\xa4text\xa1t\xa1x" + b"\x91" * 100_000 + b"\xc0",  # msgpack
    ],
)
def test_deeply_nested_payloads_are_a_decode_error_not_a_recursion_error(raw: bytes) -> None:
    # Found by the fuzz suite: RecursionError escaped decode() and crashed the learner
    # and the archiver (they catch DecodeError/ValueError only).
    with pytest.raises(DecodeError, match="nested too deeply"):
        decode(raw, PromptRequest)


def test_json_ints_beyond_64_bits_are_a_decode_error() -> None:
    # Found by the fuzz suite: JSON decoded 2**64 into an int field; re-encoding it as
    # msgpack raised OverflowError later (the learner's checkpoint: it crashed, and again
    # on every restart; the router dead-lettered its own re-publish with an OverflowError).
    for big in (2**64, -(2**63) - 1, 10**30):
        raw = msgspec.json.encode({"run_id": "r", "text": "t", "min_policy_version": big})
        with pytest.raises(DecodeError, match="64-bit"):
            decode(raw, PromptRequest)
    assert decode(msgspec.json.encode({"run_id": "r", "text": "t", "min_policy_version": 2**64 - 1}), PromptRequest)


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
    future = msgspec.msgpack.encode(
        {**msgspec.to_builtins(msg), "schema_version": SCHEMA_VERSION + 1, "renamed_field": 3}
    )
    with pytest.raises(SchemaVersionError, match="upgrade"):
        decode(future, PromptRequest)


@pytest.mark.parametrize("version", [0, -1, -(2**63)])
def test_schema_version_below_one_is_rejected(version: int) -> None:
    raw = msgspec.msgpack.encode(
        {**msgspec.to_builtins(PromptRequest(run_id="r", text="hi")), "schema_version": version}
    )
    with pytest.raises(DecodeError, match="versions start at 1"):
        decode(raw, PromptRequest)


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
    assert (
        decode(encode(PromptRequest(run_id="r", text="t")), PromptRequest, [("Content-Type", MSGPACK.encode())]).text
        == "t"
    )


def test_routing_key_keeps_sessions_and_groups_together() -> None:
    a = PromptRequest(run_id="r", text="x", group_id="g1")
    b = PromptRequest(run_id="r", text="y", group_id="g1")
    s = PromptRequest(run_id="r", text="z", group_id="g2", session_id="sess")
    assert a.routing_key() == b.routing_key() == b"g1"
    assert s.routing_key() == b"sess"
