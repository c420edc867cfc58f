"""rollout.policy: new weights for the engines."""

from __future__ import annotations

from schemas.base import Message


class PolicyUpdate(Message, kw_only=True):
    """A new policy version: a safetensors folder every engine can read."""

    version: int
    weights_path: str
    step: int = 0
    checksum: str = ""
