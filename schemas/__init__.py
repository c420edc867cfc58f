"""Every message on every topic: typed msgspec Structs, the topic registry and the codec.

Import from here; the submodules are split by topic family.
"""

from schemas.base import SCHEMA_VERSION, Message, new_id, now
from schemas.codec import (
    CONTENT_TYPE_HEADER,
    JSON,
    MSGPACK,
    DecodeError,
    SchemaVersionError,
    decode,
    encode,
    encode_json,
)
from schemas.completions import Completion, CompletionChunk, Timings
from schemas.dlq import DeadLetter
from schemas.policy import PolicyUpdate
from schemas.prompts import ChatMessage, Grammar, GrammarKind, PromptRequest, Route
from schemas.rewards import Reward, RewardStatus
from schemas.sampling import SamplingParams
from schemas.sessions import Segment, Session, ToolTrace
from schemas.topics import TOPICS, Topic, topic_for
from schemas.trajectories import Trajectory

__all__ = [
    "SCHEMA_VERSION",
    "Message",
    "new_id",
    "now",
    "CONTENT_TYPE_HEADER",
    "JSON",
    "MSGPACK",
    "DecodeError",
    "SchemaVersionError",
    "decode",
    "encode",
    "encode_json",
    "Completion",
    "CompletionChunk",
    "Timings",
    "DeadLetter",
    "PolicyUpdate",
    "ChatMessage",
    "Grammar",
    "GrammarKind",
    "PromptRequest",
    "Route",
    "SamplingParams",
    "Segment",
    "Session",
    "ToolTrace",
    "Trajectory",
    "Reward",
    "RewardStatus",
    "TOPICS",
    "Topic",
    "topic_for",
]
