"""rollout.prompts: what producers ask the engines to generate."""

from __future__ import annotations

import enum
import json

import msgspec

from schemas.base import Message


class ChatMessage(msgspec.Struct, frozen=True):
    """One turn of a chat prompt."""

    role: str
    content: str


# The math task's answer format (GrammarKind.ANSWER_FORMAT): free reasoning, then the
# answer in tags. Engines enforce it and verifiers check it, so it lives in the contract.
ANSWER_FORMAT_REGEX = r"[^<]{0,600}<answer>-?[0-9]{1,12}(\.[0-9]{1,6})?</answer>"


class GrammarKind(str, enum.Enum):
    """Output grammars the engines know; `answer_format` is the math task's built-in one."""

    JSON_SCHEMA = "json_schema"
    REGEX = "regex"
    CHOICE = "choice"
    LARK = "lark"
    GBNF = "gbnf"
    ANSWER_FORMAT = "answer_format"


class Grammar(msgspec.Struct, frozen=True):
    """An output grammar: `spec` is the schema (JSON text), regex, grammar text, or
    choices (JSON list) depending on `kind`."""

    kind: GrammarKind
    spec: str = ""

    def choices(self) -> list[str]:
        """The choice list of a CHOICE grammar; ValueError when the spec is not one."""
        try:
            choices = json.loads(self.spec)
        except json.JSONDecodeError as err:
            raise ValueError(f"choice spec must be a JSON list of strings: {err}") from err
        if not (isinstance(choices, list) and choices and all(isinstance(c, str) for c in choices)):
            raise ValueError("choice spec must be a non-empty JSON list of strings")
        return choices


class SamplingParams(msgspec.Struct, frozen=True, kw_only=True):
    """Per-request sampling; validated by the engine worker against the model."""

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    max_tokens: int = 128
    # End-of-sequence is not sampled before this many tokens (long rollouts on demand:
    # the resume benchmark's 512-token samples).
    min_tokens: int = 0
    stop: list[str] = []
    # Log-prob of each sampled token is always recorded; this asks for extra top-k.
    logprobs: int = 0


class Route(msgspec.Struct, frozen=True, kw_only=True):
    """The router's decision, carried to the worker (which releases the load it added)
    and echoed on the completions (so hit predictions can be checked against vLLM)."""

    worker_id: str
    policy: str  # cache_aware, round_robin or hash (degraded)
    predicted_cached_tokens: int = 0
    prefill_tokens: float = 0.0  # load added to the worker's prefill queue
    decode_tokens: float = 0.0  # load added to its decode queue


class PromptRequest(Message, kw_only=True):
    """A prompt to sample `group_size` completions for (one GRPO group).

    Exactly one of `messages` (chat, rendered with the model's chat template) or
    `text` (raw prompt) is set.
    """

    messages: list[ChatMessage] | None = None
    text: str | None = None
    group_id: str = ""
    group_size: int = 1
    session_id: str | None = None
    turn_index: int = 0
    sampling: SamplingParams = SamplingParams()
    grammar: Grammar | None = None
    task: str = "none"
    reference: str | None = None
    metadata: dict[str, str] = {}
    min_policy_version: int = 0
    route: Route | None = None  # set by the router on rollout.routed, never by producers

    def __post_init__(self) -> None:
        if (self.messages is None) == (self.text is None):
            raise ValueError("exactly one of `messages` or `text` must be set")
        if self.group_size < 1:
            raise ValueError("`group_size` must be >= 1")
        if not self.group_id:
            self.group_id = self.id

    def routing_key(self) -> bytes:
        """Kafka key: a session's turns and a group's samples share a key, so they
        land on the same partition (and engine worker) and reuse its KV cache."""
        return (self.session_id or self.group_id).encode()
