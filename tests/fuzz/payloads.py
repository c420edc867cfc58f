"""Seeded, deterministic malformed payloads for every input topic (issue 17).

`malformed(message_type, n, seed)` yields `Payload(category, payload, headers)`:

- random_bytes     bytes of random length, some dressed up as JSON or msgpack maps
- truncation       a valid message (msgpack or JSON) cut short
- type_confusion   a field (or the whole message) of the wrong type, a wrong `kind`,
                   payloads nested thousands deep
- unknown_version  schema_version from 2 up to 2**64 - 1 (and beyond), with new fields
- limits           ints and floats at the limits of their types (0, -1, 2**31, 2**63,
                   2**64, NaN, inf, -0.0, denormals), empty and very long containers
- hostile_unicode  NUL, bidi overrides, zero-width, combining storms, BOMs, non-characters,
                   invalid UTF-8, lone surrogates (JSON escapes), path tricks in ids
- mutation         hypothesis-drawn valid messages, mutated 1-3 times: a field dropped,
                   a type swapped, extreme ints/floats, NaN, huge strings, a wrong
                   `kind` tag, schema_version 2..2**63 (some stay valid on purpose)
- near_size_limit  `near_limit` records (3 by default) just under the producer's
                   max_request_size (1,048,576 bytes): two leave ~2 KB for the record
                   envelope, one only ~250 bytes (its dead letter cannot be inline)

The first `n - near_limit` payloads cycle through the seven other categories (so they
are spread evenly); the near-limit ones are placed at 1/4, 1/2 and 3/4 of the stream, so
a stage must go on after them. The same (message_type, n, seed, run_id) always gives the
same payloads.

The message `id` is never dropped nor replaced by another string: a payload that decodes
carries the id the generator gave it (`<run_id>-<seed>-<index>`), so a stage's output
can be traced back to its input. Valid messages are drawn with hypothesis under a fixed
seed (`hypothesis.seed` + `derandomize`-like settings: no database, generate phase only).
"""

from __future__ import annotations

import json
import math
import random
from collections.abc import Iterator
from typing import Any, NamedTuple

import msgspec
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import seed as hypothesis_seed
from hypothesis import strategies as st

from schemas import (
    CONTENT_TYPE_HEADER,
    JSON,
    MSGPACK,
    Completion,
    DeadLetter,
    Message,
    PolicyUpdate,
    PromptRequest,
    Reward,
    SamplingParams,
    Trajectory,
)
from tests import strategies as valid

MAX_REQUEST_SIZE = 1_048_576  # aiokafka's default max_request_size
ENVELOPE_ROOM = 2048  # record header, key, headers and batch overhead
NEAR_LIMIT_BYTES = MAX_REQUEST_SIZE - ENVELOPE_ROOM
# One near-limit record in three is tighter still: ~90 bytes of batch overhead, the key and
# a tag header leave it within ~250 bytes of the limit, so a dead letter wrapping it inline
# (payload + reason + position) is over the limit: the letter must spill the payload.
TIGHT_LIMIT_BYTES = MAX_REQUEST_SIZE - 400
# Every other payload stays under this (the broker never frees memory); some land between
# 256 KiB (where dead letters spill their payload to a file) and this bound.
MAX_ORDINARY_BYTES = 512 * 1024

CATEGORIES = (
    "random_bytes",
    "truncation",
    "type_confusion",
    "unknown_version",
    "limits",
    "hostile_unicode",
    "mutation",
    "near_size_limit",
)
_SPREAD = CATEGORIES[:-1]


class Payload(NamedTuple):
    """One fuzz record: its category, the bytes, and the headers to send it with."""

    category: str
    payload: bytes
    headers: list[tuple[str, bytes]]


# --- valid messages, drawn by hypothesis under a fixed seed ----------------------------------

_TASKS = ("math", "math_format", "exact", "regex", "format")  # cheap, local reward functions

_STRATEGIES: dict[type[Message], st.SearchStrategy[Any]] = {
    # Engine-cheap requests: a few tokens, small groups, no policy wait (min_policy_version
    # extremes come from the mutations and limits, not from the valid base).
    PromptRequest: st.builds(
        PromptRequest,
        run_id=valid.ids,
        text=st.text(min_size=1, max_size=60),
        group_size=st.integers(1, 4),
        sampling=st.builds(
            SamplingParams, temperature=st.floats(0.1, 2), top_p=st.floats(0.05, 1), max_tokens=st.integers(1, 4)
        ),
        task=st.sampled_from(_TASKS),
        reference=st.none() | valid.text,
    )
    | st.builds(
        PromptRequest,
        run_id=valid.ids,
        messages=valid.chat,
        group_size=st.integers(1, 4),
        sampling=st.builds(SamplingParams, max_tokens=st.integers(1, 4)),
        grammar=st.none() | valid.grammars,
        session_id=st.none() | valid.ids,
        turn_index=st.integers(0, 50),
        task=st.sampled_from(_TASKS),
    ),
    Completion: valid.completions.map(lambda c: msgspec.structs.replace(c, task=_TASKS[len(c.text) % len(_TASKS)])),
    Reward: valid.rewards,
    PolicyUpdate: valid.policies,
    DeadLetter: valid.letters,
    Trajectory: valid.trajectories,
}


def valid_messages(message_type: type[Message], count: int, seed: int, run_id: str) -> list[Message]:
    """`count` valid messages of `message_type`, the same for the same arguments.

    Each gets the id `<run_id>-<seed>-v<i>`, the run id `run_id` and a fixed creation
    time (the defaults are random uuids and the clock).
    """
    drawn: list[Message] = []

    @hypothesis_seed(seed)
    @settings(
        max_examples=count,
        database=None,
        phases=[Phase.generate],
        deadline=None,
        suppress_health_check=list(HealthCheck),
        derandomize=False,
    )
    @given(_STRATEGIES[message_type])
    def collect(msg: Message) -> None:
        drawn.append(msg)

    collect()
    if not drawn:  # pragma: no cover - hypothesis always draws at least one
        raise RuntimeError(f"hypothesis drew no {message_type.__name__}")
    out = []
    for i in range(count):
        msg = drawn[i % len(drawn)]
        fixed: dict[str, Any] = {"id": f"{run_id}-{seed}-v{i}", "run_id": run_id, "created_at": 1.8e9 + i}
        if isinstance(msg, PromptRequest):  # its group id defaulted to a random uuid
            fixed["group_id"] = f"{run_id}-{seed}-g{i}"
        out.append(msgspec.structs.replace(msg, **fixed))
    return out


# --- building blocks --------------------------------------------------------------------------

_INTS = [0, -1, 1, 2**31 - 1, -(2**31), 2**31, 2**32, 2**53 + 1, 2**63 - 1, -(2**63), 2**63, 2**64 - 1]
_TOO_BIG_INTS = [2**64, -(2**63) - 1, 10**30]
_FLOATS = [math.nan, math.inf, -math.inf, 1.7976931348623157e308, -1.7976931348623157e308, 5e-324, -0.0, 0.0]
_HOSTILE = [
    "\x00",
    "a\x00b",
    "\u202eevil\u202c",
    "\u200b\u200c\u200d\u2060\ufeff",
    "e" + "\u0301" * 5000,
    "\U0001f468\u200d\U0001f469\u200d\U0001f467\u200d\U0001f466" * 200,
    "\ufeffBOM",
    "\ufffe\uffff",
    "\U0010ffff",
    "\ufdfa" * 2000,
    "../../../../etc/passwd",
    "..",
    ".",
    "/",
    "C:\\Windows\\system32",
    "\r\n\r\nX-Injected: 1",
    "%s%n%x" * 50,
    "'; DROP TABLE runs; --",
    "\u0000" * 1000,
    "\x1b[2J\x1b[31m",
    "\t\v\f",
    "𝕳𝖊𝖑𝖑𝖔",
    "İıſﬃ",
    "\ud7ff\ue000",
    "a" * 70_000,
]
_BAD_UTF8 = [b"\xff", b"\xc0\x80", b"\xed\xa0\x80", b"\xf4\x90\x80\x80", b"\x80abc", b"abc\xe2\x82"]
_KIND_TAGS = [
    "",
    "Nope",
    "promptrequest",
    "Completion",
    "Reward",
    "PolicyUpdate",
    "DeadLetter",
    "CompletionChunk",
    "PromptRequest\x00",
    "x" * 300,
]


def _msgpack(obj: Any) -> bytes:
    return msgspec.msgpack.encode(obj)


def _json(obj: Any) -> bytes:
    # Python's json writes NaN/Infinity (not JSON) and \ud800 escapes for surrogates: both are hostile on purpose.
    return json.dumps(obj, ensure_ascii=True, default=lambda b: b.decode("latin-1")).encode()


def _packed(rng: random.Random, obj: Any) -> tuple[bytes, list[tuple[str, bytes]]]:
    """obj as msgpack (NaN, inf and 64-bit ints have an exact form there); as JSON when
    an int is beyond 64 bits (msgpack has no form for it)."""
    try:
        return _msgpack(obj), rng.choice([[(CONTENT_TYPE_HEADER, MSGPACK.encode())], []])
    except OverflowError:
        return _json(obj), [(CONTENT_TYPE_HEADER, JSON.encode())]


def _encode(rng: random.Random, obj: Any) -> tuple[bytes, list[tuple[str, bytes]]]:
    """obj as msgpack (usually) or JSON, with or without a content-type header."""
    if rng.random() < 0.6:
        return _packed(rng, obj)
    try:
        raw = _json(obj)
    except (TypeError, ValueError):  # bytes values have no JSON form
        return _msgpack(obj), [(CONTENT_TYPE_HEADER, MSGPACK.encode())]
    return raw, rng.choice(
        [[(CONTENT_TYPE_HEADER, JSON.encode())], [], [(CONTENT_TYPE_HEADER, b"application/json; charset=utf-8")]]
    )


def _fields(obj: dict[str, Any]) -> list[str]:
    return [k for k in obj if k != "id"]


def _walk(obj: Any, path: tuple = ()) -> Iterator[tuple[tuple, Any]]:
    """(path, value) of every value inside obj (dict keys and list indexes), `id` excluded."""
    if isinstance(obj, dict):
        for k, v in obj.items():
            if path == () and k == "id":
                continue
            yield (*path, k), v
            yield from _walk(v, (*path, k))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield (*path, i), v
            yield from _walk(v, (*path, i))


def _set(obj: Any, path: tuple, value: Any) -> None:
    for p in path[:-1]:
        obj = obj[p]
    obj[path[-1]] = value


def _pick_path(rng: random.Random, obj: dict[str, Any], want: type | tuple[type, ...] | None = None) -> tuple | None:
    paths = [p for p, v in _walk(obj) if want is None or (isinstance(v, want) and not isinstance(v, bool))]
    return rng.choice(paths) if paths else None


def _other_type_value(rng: random.Random, current: Any) -> Any:
    options: list[Any] = [rng.randint(-5, 5), rng.random(), True, None, "str", [1, "two"], {"k": 1}, b"\x00bin"]
    options = [o for o in options if type(o) is not type(current)]
    return rng.choice(options)


def _nested(rng: random.Random, base: dict[str, Any], depth: int, as_json: bool) -> bytes:
    """`base` with an extra field holding a value nested `depth` deep."""
    obj = _copy(base)
    obj["x"] = "\x01NEST\x01"
    if as_json:
        inner = "[" * depth + "]" * depth if rng.random() < 0.5 else '{"a":' * depth + "1" + "}" * depth
        return _json(obj).replace(b'"\\u0001NEST\\u0001"', inner.encode())
    marker = _msgpack("\x01NEST\x01")
    return _msgpack(obj).replace(marker, b"\x91" * depth + b"\xc0")


# --- categories -------------------------------------------------------------------------------


def _random_bytes(rng: random.Random, base: dict[str, Any]) -> Payload:
    size = rng.choice([0, 1, 2, rng.randint(3, 16), rng.randint(17, 256), rng.randint(257, 4096)])
    raw = rng.randbytes(size)
    style = rng.randrange(5)
    if style == 1:
        raw = b"{" + raw
    elif style == 2:
        raw = bytes([0x80 | rng.randrange(16)]) + raw  # a msgpack fixmap header
    elif style == 3:
        raw = b"\xde" + raw  # map16
    headers = rng.choice(
        [
            [],
            [(CONTENT_TYPE_HEADER, JSON.encode())],
            [(CONTENT_TYPE_HEADER, MSGPACK.encode())],
            [(CONTENT_TYPE_HEADER, rng.randbytes(rng.randint(0, 12)))],
            [(CONTENT_TYPE_HEADER, b"text/plain")],
        ]
    )
    return Payload("random_bytes", raw, headers)


def _truncation(rng: random.Random, base: dict[str, Any]) -> Payload:
    raw, headers = _encode(rng, base)
    cut = rng.choice([0, 1, rng.randrange(len(raw)), len(raw) - 1, len(raw) // 2])
    return Payload("truncation", raw[: min(cut, len(raw) - 1)], headers)


def _type_confusion(rng: random.Random, base: dict[str, Any]) -> Payload:
    obj = _copy(base)
    style = rng.randrange(6)
    if style == 0:  # the whole message is not a map
        raw, headers = _encode(rng, rng.choice([[obj], "a string", 42, None, True, [], 3.5, list(obj.items())]))
        return Payload("type_confusion", raw, headers)
    if style == 1:  # the wrong kind tag
        obj["kind"] = rng.choice(_KIND_TAGS)
    elif style == 2:  # nested thousands deep
        return Payload("type_confusion", _nested(rng, obj, rng.choice([1_000, 5_000, 50_000]), rng.random() < 0.5), [])
    elif style == 3:  # the id itself of another type
        obj["id"] = rng.choice([7, -1.5, True, None, [obj["id"]], {"id": obj["id"]}])  # never text: see the module doc
    else:
        path = _pick_path(rng, obj)
        if path is None:
            obj["kind"] = 7
        else:
            current: Any = obj
            for p in path:
                current = current[p]
            _set(obj, path, _other_type_value(rng, current))
    raw, headers = _encode(rng, obj)
    return Payload("type_confusion", raw, headers)


def _unknown_version(rng: random.Random, base: dict[str, Any]) -> Payload:
    obj = _copy(base)
    obj["schema_version"] = rng.choice(
        [2, 3, 255, 2**31, 2**32, 2**53, 2**63 - 1, 2**63, 2**64 - 1, 2**64, rng.randint(2, 2**63)]
    )
    if rng.random() < 0.5:
        obj["renamed_" + rng.choice(_fields(base) or ["x"])] = rng.choice([1, "v2", [1, 2], {"new": True}])
    if rng.random() < 0.3 and _fields(obj):
        obj.pop(rng.choice([f for f in _fields(obj) if f != "schema_version"] or ["kind"]), None)
    raw, headers = _encode(rng, obj)
    return Payload("unknown_version", raw, headers)


def _limits(rng: random.Random, base: dict[str, Any]) -> Payload:
    obj = _copy(base)
    for _ in range(rng.randint(1, 3)):
        style = rng.randrange(4)
        if style == 0 and (path := _pick_path(rng, obj, int)):
            _set(obj, path, rng.choice(_INTS + _TOO_BIG_INTS))
        elif style == 1 and (path := _pick_path(rng, obj, float)):
            _set(obj, path, rng.choice(_FLOATS))
        elif style == 2 and (path := _pick_path(rng, obj, list)):
            _set(obj, path, rng.choice([[], [rng.choice(_INTS)] * rng.choice([1, 10_000, 60_000]), [0.0] * 20_000]))
        elif style == 3 and (path := _pick_path(rng, obj, (str, dict))):
            current: Any = obj
            for p in path:
                current = current[p]
            _set(obj, path, "" if isinstance(current, str) else {f"k{i}": "v" for i in range(rng.choice([0, 5_000]))})
        else:
            obj[
                rng.choice(
                    [
                        "group_size",
                        "sample_index",
                        "version",
                        "min_policy_version",
                        "policy_version",
                        "turn_index",
                        "created_at",
                    ]
                )
            ] = rng.choice(_INTS + _FLOATS)
    return Payload("limits", *_packed(rng, obj))


def _hostile_unicode(rng: random.Random, base: dict[str, Any]) -> Payload:
    obj = _copy(base)
    style = rng.randrange(4)
    if style == 0:  # invalid UTF-8 inside a msgpack str: splice bytes into the encoding of a marker
        marker = "\x01MARK\x01"
        path = _pick_path(rng, obj, str) or ("run_id",)
        _set(obj, path, marker)
        raw = _msgpack(obj)
        bad = rng.choice(_BAD_UTF8)
        tag = bytes([0xA0 | len(marker)])
        i = raw.index(tag + marker.encode())
        raw = raw[:i] + bytes([0xA0 | len(bad)]) + bad + raw[i + 1 + len(marker) :]
        return Payload("hostile_unicode", raw, [(CONTENT_TYPE_HEADER, MSGPACK.encode())])
    if style == 1:  # lone surrogates as JSON escapes
        path = _pick_path(rng, obj, str) or ("run_id",)
        _set(obj, path, rng.choice(["\ud800", "\udfff", "a\udc00b", "\ud83d"]))
        return Payload("hostile_unicode", _json(obj), rng.choice([[], [(CONTENT_TYPE_HEADER, JSON.encode())]]))
    for _ in range(rng.randint(1, 3)):
        path = _pick_path(rng, obj, str) or ("run_id",)
        _set(obj, path, rng.choice(_HOSTILE))
    raw, headers = _encode(rng, obj)
    if style == 3:  # hostile headers too
        headers = headers + [(rng.choice(["\u202efuzz", "x" * 200, "", "content-type\x00"]), rng.choice(_BAD_UTF8))]
    return Payload("hostile_unicode", raw, headers)


def _mutation(rng: random.Random, base: dict[str, Any]) -> Payload:
    """1-3 mutations of a valid message; some results are still valid (that is the point)."""
    obj = _copy(base)
    for _ in range(rng.randint(1, 3)):
        op = rng.randrange(8)
        if op == 0 and _fields(obj):  # drop a field (never the id: outputs are traced by it)
            victim = rng.choice(_fields(obj))
            obj.pop(victim)
        elif op == 1 and (path := _pick_path(rng, obj)):  # swap a type
            current: Any = obj
            for p in path:
                current = current[p]
            _set(obj, path, _other_type_value(rng, current))
        elif op == 2 and (path := _pick_path(rng, obj, int)):
            _set(obj, path, rng.choice(_INTS + _TOO_BIG_INTS))
        elif op == 3 and (path := _pick_path(rng, obj, float)):
            _set(obj, path, rng.choice([math.nan, math.inf, -math.inf, 1e308, -1e308]))
        elif op == 4 and (path := _pick_path(rng, obj, str)):  # a huge string
            _set(obj, path, rng.choice("ab\u00e9\u4e2d") * rng.choice([10_000, 100_000, 250_000]))
        elif op == 5:
            obj["kind"] = rng.choice(_KIND_TAGS)
        elif op == 6:
            obj["schema_version"] = rng.randint(2, 2**63)
        else:  # an unknown extra field (must be ignored) or a NaN where a number goes
            obj[f"extra_{rng.randrange(100)}"] = rng.choice([math.nan, "x", [1], {"a": None}])
    return Payload("mutation", *_packed(rng, obj))


def _near_size_limit(rng: random.Random, base: dict[str, Any], which: int) -> Payload:
    """Three shapes just under the limit: raw garbage, a valid message with one huge
    string, and a message of the wrong shape (JSON)."""
    shape = which % 3
    if shape == 0:  # as close as the producer takes: its dead letter (payload + reason) cannot fit inline
        return Payload("near_size_limit", rng.randbytes(TIGHT_LIMIT_BYTES), [])
    obj = _copy(base)
    path = _pick_path(rng, obj, str) or ("run_id",)
    if shape == 1:
        _set(obj, path, "")
        room = NEAR_LIMIT_BYTES - len(_msgpack(obj)) - 5  # str32 header
        _set(obj, path, "x" * room)
        raw = _msgpack(obj)
        return Payload("near_size_limit", raw, [(CONTENT_TYPE_HEADER, MSGPACK.encode())])
    obj["kind"] = 12345
    obj["padding"] = ""
    room = NEAR_LIMIT_BYTES - len(_json(obj))
    obj["padding"] = "p" * room
    raw = _json(obj)
    return Payload("near_size_limit", raw, [(CONTENT_TYPE_HEADER, JSON.encode())])


_MAKERS = {
    "random_bytes": _random_bytes,
    "truncation": _truncation,
    "type_confusion": _type_confusion,
    "unknown_version": _unknown_version,
    "limits": _limits,
    "hostile_unicode": _hostile_unicode,
    "mutation": _mutation,
}


def _copy(obj: dict[str, Any]) -> dict[str, Any]:
    return msgspec.msgpack.decode(msgspec.msgpack.encode(obj))


def malformed(
    message_type: type[Message], n: int, seed: int, *, run_id: str = "fuzz", near_limit: int = 3, valid_pool: int = 200
) -> Iterator[Payload]:
    """`n` payloads for a topic of `message_type`: `near_limit` near the size limit, the
    rest spread evenly over the other categories (see the module doc). Deterministic."""
    rng = random.Random(f"{message_type.__name__}/{seed}/{n}/{run_id}")
    bases = [msgspec.to_builtins(m) for m in valid_messages(message_type, min(valid_pool, max(n, 1)), seed, run_id)]
    near_limit = min(near_limit, n)
    near_at = {((k + 1) * n) // (near_limit + 1) for k in range(near_limit)}
    while len(near_at) < near_limit:  # tiny n: positions collide
        near_at.add(max(set(range(n)) - near_at))
    spread = 0
    near_done = 0
    for i in range(n):
        base = _copy(bases[i % len(bases)])
        base["id"] = f"{run_id}-{seed}-{i}"
        if i in near_at:
            yield _near_size_limit(rng, base, near_done)
            near_done += 1
            continue
        category = _SPREAD[spread % len(_SPREAD)]
        spread += 1
        for _ in range(20):
            item = _MAKERS[category](rng, base)
            if len(item.payload) <= MAX_ORDINARY_BYTES:
                break
        else:  # pragma: no cover - 20 oversized draws in a row
            item = Payload(category, item.payload[:MAX_ORDINARY_BYTES], item.headers)
        yield item
