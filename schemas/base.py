"""The fields every message carries."""

from __future__ import annotations

import time
import uuid

import msgspec

# Bump when a field changes meaning or a required field is added. Readers reject
# versions above the one they know, so a newer writer is never misread.
SCHEMA_VERSION = 1


def new_id() -> str:
    """A globally unique message id (uuid4, hex)."""
    return uuid.uuid4().hex


def now() -> float:
    """Wall-clock time in Unix seconds, the timestamp unit of every message."""
    return time.time()


class Message(msgspec.Struct, kw_only=True, tag_field="kind", tag=True, forbid_unknown_fields=False):
    """Base of every message: schema version, unique id, run id and creation time.

    `kind` (the class name) is written on the wire so a dead letter or a replay can
    tell what it holds without knowing the topic.
    """

    schema_version: int = SCHEMA_VERSION
    id: str = msgspec.field(default_factory=new_id)
    run_id: str
    created_at: float = msgspec.field(default_factory=now)
