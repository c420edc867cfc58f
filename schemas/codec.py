"""Wire encoding: msgpack for our own producers, JSON accepted from outside ones.

The `content-type` header picks the decoder; without it, a payload that starts with
`{` is JSON (a msgpack message is a map and never starts with that byte).
"""

from __future__ import annotations

import re
import types
from typing import TypeVar

import msgspec

from schemas.base import SCHEMA_VERSION, Message

CONTENT_TYPE_HEADER = "content-type"
MSGPACK = "application/msgpack"
JSON = "application/json"

M = TypeVar("M", bound=Message)

_msgpack_encoder = msgspec.msgpack.Encoder()
_json_encoder = msgspec.json.Encoder()


class DecodeError(ValueError):
    """A payload that is not a valid message of the expected type.

    `field` is the JSON path of the offending field (`$` for the whole message) and
    `expected` what the schema wanted there.
    """

    def __init__(self, message: str, *, field: str = "$", expected: str = "") -> None:
        super().__init__(message)
        self.field = field
        self.expected = expected


class SchemaVersionError(DecodeError):
    """A message written by a newer schema than this reader knows."""


class _Header(msgspec.Struct):
    """The two fields read before the full decode, to reject unknown versions first."""

    schema_version: int = 1
    kind: str = ""


_PATH = re.compile(r" - at `(?P<path>[^`]+)`$")
_EXPECTED = re.compile(r"^Expected `(?P<exp>[^`]+)`")


def _wrap(err: msgspec.MsgspecError, type_name: str) -> DecodeError:
    text = str(err)
    path = _PATH.search(text)
    exp = _EXPECTED.search(text)
    return DecodeError(
        f"invalid {type_name}: {text}",
        field=path.group("path") if path else "$",
        expected=exp.group("exp") if exp else "",
    )


def _content_type(headers: list[tuple[str, bytes]] | None, payload: bytes) -> str:
    for name, value in headers or ():
        if name.lower() == CONTENT_TYPE_HEADER:
            return value.decode(errors="replace").split(";")[0].strip().lower()
    return JSON if payload[:1] == b"{" else MSGPACK


def encode(msg: Message) -> bytes:
    """msgpack bytes of a message."""
    return _msgpack_encoder.encode(msg)


def encode_json(msg: Message) -> bytes:
    """JSON bytes of a message (for outside consumers and logs)."""
    return _json_encoder.encode(msg)


def decode(payload: bytes, type_: type[M], headers: list[tuple[str, bytes]] | None = None) -> M:
    """Decode `payload` into `type_`, by content type.

    Raises SchemaVersionError for a version above SCHEMA_VERSION and DecodeError
    (naming the field and what was expected) for anything else that is wrong.
    """
    ctype = _content_type(headers, payload)
    lib: types.ModuleType
    if ctype == JSON:
        lib = msgspec.json
    elif ctype in (MSGPACK, "application/x-msgpack"):
        lib = msgspec.msgpack
    else:
        raise DecodeError(
            f"unsupported content type {ctype!r}", field="headers.content-type", expected=f"{MSGPACK} or {JSON}"
        )
    try:
        header = lib.decode(payload, type=_Header)
    except msgspec.MsgspecError as err:
        raise _wrap(err, type_.__name__) from err
    except RecursionError as err:  # msgspec raises it for values nested ~1,000 deep
        raise _too_deep(type_.__name__) from err
    if header.schema_version > SCHEMA_VERSION:
        raise SchemaVersionError(
            f"{type_.__name__} has schema_version {header.schema_version}, this reader knows <= {SCHEMA_VERSION}; "
            "upgrade the consumer",
            field="$.schema_version",
            expected=f"<= {SCHEMA_VERSION}",
        )
    if header.schema_version < 1:  # versions start at 1: 0 or below is no writer's
        raise DecodeError(
            f"{type_.__name__} has schema_version {header.schema_version}; versions start at 1",
            field="$.schema_version",
            expected=f"1..{SCHEMA_VERSION}",
        )
    try:
        # The tag is optional from outside producers: kcat users should not have to
        # know our class names, so a missing `kind` is filled in.
        if not header.kind and ctype == JSON:
            obj = msgspec.json.decode(payload)
            obj["kind"] = type_.__name__
            msg = msgspec.convert(obj, type=type_)
        else:
            msg = lib.decode(payload, type=type_)
    except msgspec.MsgspecError as err:
        raise _wrap(err, type_.__name__) from err
    except (TypeError, ValueError) as err:  # raised by __post_init__ checks
        raise DecodeError(f"invalid {type_.__name__}: {err}") from err
    except RecursionError as err:
        raise _too_deep(type_.__name__) from err
    if ctype == JSON:
        _check_64_bit(msg, type_.__name__)
    return msg


def _check_64_bit(msg: Message, type_name: str) -> None:
    """JSON ints are unbounded, msgpack's stop at 64 bits: a message every stage can
    re-publish (and a learner checkpoint) must fit msgpack, so check at the door."""
    try:
        _msgpack_encoder.encode(msg)
    except OverflowError as err:
        raise DecodeError(
            f"invalid {type_name}: an integer is outside the 64-bit range: {err}",
            expected="integers in [-2**63, 2**64 - 1]",
        ) from err


def _too_deep(type_name: str) -> DecodeError:
    return DecodeError(
        f"invalid {type_name}: a value is nested too deeply to decode", expected="nesting under ~1,000 levels"
    )
