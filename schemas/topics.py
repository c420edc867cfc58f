"""The topic registry: names, final partition counts, what each carries and how it is keyed.

Partitions are fixed at creation (the local broker cannot add partitions later), so
each count is sized for the largest consumer group expected on that topic.
"""

from __future__ import annotations

import msgspec

from schemas.base import Message
from schemas.completions import Completion, CompletionChunk
from schemas.dlq import DeadLetter
from schemas.policy import PolicyUpdate
from schemas.prompts import PromptRequest
from schemas.rewards import Reward
from schemas.trajectories import Trajectory


class Topic(msgspec.Struct, frozen=True):
    """A topic: its name, partition count, message type and key rule (for readers)."""

    name: str
    partitions: int
    message_type: type[Message]
    key_rule: str


PROMPTS = Topic("rollout.prompts", 16, PromptRequest, "session_id, else group_id (any key works: the router re-routes)")
ROUTED = Topic(
    "rollout.routed",
    16,
    PromptRequest,
    "none: the router picks a partition owned by the chosen engine worker (see router/)",
)
CHUNKS = Topic("rollout.completion-chunks", 8, CompletionChunk, "request_id: a sample's chunks stay in order")
COMPLETIONS = Topic(
    "rollout.completions", 16, Completion, "group_id: a group's samples reach one verifier/learner partition"
)
REWARDS = Topic("rollout.rewards", 16, Reward, "group_id: a group's rewards are assembled in one place")
TRAJECTORIES = Topic(
    "rollout.trajectories",
    16,
    Trajectory,
    "group_id: a group's sessions are scored and assembled in one place (envhub/ writes them)",
)
POLICY = Topic("rollout.policy", 1, PolicyUpdate, "none: one ordered stream of versions")
DLQ = Topic("rollout.dlq", 4, DeadLetter, "stage")
DEFERRED = Topic(
    "rollout.deferred",
    8,
    PromptRequest,
    "session_id, else group_id: requests waiting for a policy version (engine_workers/deferral.py releases them)",
)

TOPICS: dict[str, Topic] = {
    t.name: t for t in (PROMPTS, ROUTED, CHUNKS, COMPLETIONS, TRAJECTORIES, REWARDS, POLICY, DLQ, DEFERRED)
}


def topic_for(name: str) -> Topic:
    """The registry entry of a topic name; KeyError names the known topics."""
    try:
        return TOPICS[name]
    except KeyError:
        raise KeyError(f"unknown topic {name!r}; known: {sorted(TOPICS)}") from None
