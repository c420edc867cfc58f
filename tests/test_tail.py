"""`primerl tail`: any topic as JSON lines, decoded with the schemas; garbage is an error line, never a crash."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import uuid

import msgspec
import pytest
from aiokafka import AIOKafkaProducer

from operations.tail import HEAD_BYTES, START_SLACK_S, Record, TailOptions, record_line, tail
from plumbing.config import Config
from plumbing.kafka import common_kwargs
from schemas import DeadLetter, encode, encode_json
from schemas.topics import COMPLETIONS, DLQ
from tests.reward_helpers import make_completion


def _rec(value: bytes | None, topic: str = COMPLETIONS.name, offset: int = 0) -> Record:
    return Record(topic, 3, offset, 1_700_000_000_000, b"group-1", value, [])


def test_a_completion_decodes_to_its_fields() -> None:
    line = json.loads(record_line(COMPLETIONS, _rec(encode(make_completion("the answer is 4")))) or b"")
    assert line["type"] == "Completion" and line["partition"] == 3 and line["key"] == "group-1"
    assert line["value"]["text"] == "the answer is 4" and line["value"]["run_id"] == "test-run"


def test_json_payloads_from_outside_producers_decode_too() -> None:
    line = json.loads(record_line(COMPLETIONS, _rec(encode_json(make_completion("x")))) or b"")
    assert line["value"]["text"] == "x"


@pytest.mark.parametrize(
    "payload",
    [b"", b"\x00\xff garbage", b"{not json", b"[1,2,3]", os.urandom(2 * 1024 * 1024), b"{" * 5000, None],
    ids=["empty", "bytes", "bad-json", "wrong-shape", "oversized-2MiB", "deep", "tombstone"],
)
def test_garbage_is_one_error_line(payload: bytes | None) -> None:
    line = json.loads(record_line(COMPLETIONS, _rec(payload)) or b"")
    assert "error" in line and line["size"] == len(payload or b"")
    assert base64.b64decode(line["head"]) == (payload or b"")[:HEAD_BYTES]
    assert len(line["error"]) <= 500


def test_run_filter_hides_other_runs_and_garbage() -> None:
    payload = encode(make_completion("x"))
    assert record_line(COMPLETIONS, _rec(payload), run_id="other") is None
    assert record_line(COMPLETIONS, _rec(payload), run_id="test-run") is not None
    assert record_line(COMPLETIONS, _rec(b"junk"), run_id="test-run") is None


def test_dead_letter_shows_its_original_decoded() -> None:
    original = encode(make_completion("bad one"))
    letter = DeadLetter(
        run_id="test-run",
        stage="verifier",
        error_type="X",
        error="why",
        source_topic=COMPLETIONS.name,
        partition=0,
        offset=7,
        payload=original,
    )
    line = json.loads(record_line(DLQ, _rec(encode(letter), DLQ.name)) or b"")
    assert line["type"] == "DeadLetter" and line["value"]["error"] == "why"
    assert base64.b64decode(line["value"]["payload"]) == original
    assert line["original"]["text"] == "bad one"
    garbage = msgspec.structs.replace(letter, payload=b"\x01junk")
    line = json.loads(record_line(DLQ, _rec(encode(garbage), DLQ.name)) or b"")
    assert "error" in line["original"]


async def test_tail_against_the_broker_prints_good_and_garbage(cfg: Config) -> None:
    """Real broker: a completion, garbage and an oversized garbage record; every one is a line, in order."""
    run_id = f"tail-{uuid.uuid4().hex[:8]}"
    comp = msgspec.structs.replace(make_completion("hello tail"), run_id=run_id)
    producer = AIOKafkaProducer(**common_kwargs(cfg), max_request_size=2 * 1024 * 1024)
    await producer.start()
    try:
        key = run_id.encode()  # one key: one partition, so the order is the send order
        await producer.send_and_wait(COMPLETIONS.name, encode(comp), key=key)
        await producer.send_and_wait(COMPLETIONS.name, b"\xc1 not msgpack", key=key)
        await producer.send_and_wait(COMPLETIONS.name, b"\x00" * (900 * 1024), key=key)
        await producer.send_and_wait(COMPLETIONS.name, encode(comp), key=key)
    finally:
        await producer.stop()
    lines: list[dict[str, object]] = []
    n = await tail(
        cfg, COMPLETIONS.name, TailOptions(from_beginning=True, idle_s=3.0), lambda b: lines.append(json.loads(b))
    )
    mine = [ln for ln in lines if ln.get("key") == run_id]
    assert n == len(lines)
    assert ["error" in ln for ln in mine] == [False, True, True, False]
    assert mine[2]["size"] == 900 * 1024
    # --run-id: only the run's decoded messages.
    only: list[bytes] = []
    await tail(cfg, COMPLETIONS.name, TailOptions(from_beginning=True, run_id=run_id, idle_s=2.0), only.append)
    assert [json.loads(b)["value"]["text"] for b in only] == ["hello tail", "hello tail"]
    # Without --from-beginning, what was written before the start (less the slack) is not shown.
    await asyncio.sleep(START_SLACK_S + 1)
    fresh: list[bytes] = []
    await tail(cfg, COMPLETIONS.name, TailOptions(run_id=run_id, idle_s=2.0), fresh.append)
    assert fresh == []
