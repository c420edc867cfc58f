"""The worker registry entry in Redis (`schemas/keys.py: registry`): written by workers, read by routers and
`primerl status`."""

from __future__ import annotations

import msgspec


class WorkerInfo(msgspec.Struct, kw_only=True):
    """A live worker as the registry shows it."""

    worker_id: str
    role: str = "engine"
    host: str = ""
    pid: int = 0
    partitions: list[int] = []
    policy_version: int = 0
    block_size: int = 0
    heartbeat_at: float = 0.0
    prompt_tokens: int = 0  # cumulative, for the cache hit rate
    cached_prompt_tokens: int = 0
    in_flight: int = 0
    load_tokens: float = 0.0
