"""rollout.dlq: input a stage could not process, kept whole with the reason."""

from __future__ import annotations

from schemas.base import Message


class DeadLetter(Message, kw_only=True):
    """The original record (bytes, key, headers, position) and why it failed.

    A letter always fits under the producer's request limit: a payload larger than the
    stage's inline bound is kept whole in a content-addressed file (`payload_ref`,
    named by its sha256) and only its first bytes travel in `payload`. The same holds
    for oversized keys and headers (`headers_ref`). `payload_size` and
    `payload_sha256` are those of the original payload in either case.
    """

    stage: str
    error_type: str
    error: str
    source_topic: str
    partition: int
    offset: int
    key: bytes | None = None
    headers: list[tuple[str, bytes]] = []
    payload: bytes
    payload_size: int = -1  # -1: written before sizes were recorded
    payload_sha256: str = ""
    payload_ref: str = ""  # "" when `payload` is the whole original
    headers_ref: str = ""  # "" when `key` and `headers` are the originals
    host: str = ""  # where `payload_ref` and `headers_ref` live

    @property
    def complete(self) -> bool:
        """Whether the letter itself holds the whole original record."""
        return not self.payload_ref and not self.headers_ref
