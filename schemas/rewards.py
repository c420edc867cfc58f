"""rollout.rewards: signed scores of completions."""

from __future__ import annotations

import enum

from schemas.base import Message


class RewardStatus(str, enum.Enum):
    """Why a reward has the value it has; only OK and POLICY_FAIL are trainable."""

    OK = "OK"
    POLICY_FAIL = "POLICY_FAIL"
    INFRA_FAIL = "INFRA_FAIL"
    TIMEOUT = "TIMEOUT"


class Reward(Message, kw_only=True):
    """A reward vector plus the scalar used for training, signed by its verifier."""

    completion_id: str
    request_id: str
    group_id: str
    prompt_hash: str
    tokens_hash: str
    policy_version: int
    verifier_id: str
    verifier_version: str
    components: dict[str, float]
    scalar: float
    status: RewardStatus
    trace: dict[str, str] = {}
    key_id: str = ""
    signature: bytes = b""
