"""rollout.dlq: input a stage could not process, kept whole with the reason."""

from __future__ import annotations

from schemas.base import Message


class DeadLetter(Message, kw_only=True):
    """The original record (bytes, key, headers, position) and why it failed."""

    stage: str
    error_type: str
    error: str
    source_topic: str
    partition: int
    offset: int
    key: bytes | None = None
    headers: list[tuple[str, bytes]] = []
    payload: bytes
