"""rollout.prompts: what producers ask the engines to generate."""

from __future__ import annotations

import enum
import json

import msgspec

from schemas.base import Message
from schemas.sampling import SamplingParams
from schemas.sessions import Session


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

    Exactly one of `messages` (chat, rendered with the model's chat template), `text`
    (raw prompt) or `prompt_token_ids` (token in: the engine checks them against its
    vocabulary and context, and never re-tokenizes) is set.
    """

    messages: list[ChatMessage] | None = None
    text: str | None = None
    prompt_token_ids: list[int] | None = None
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
    # A multi-turn environment session (schemas/sessions.py): set by a producer on the
    # first turn (env name), carried and extended by the env hub on every later one.
    session: Session | None = None

    def __post_init__(self) -> None:
        if sum(x is not None for x in (self.messages, self.text, self.prompt_token_ids)) != 1:
            raise ValueError("exactly one of `messages`, `text` or `prompt_token_ids` must be set")
        if self.prompt_token_ids is not None and not self.prompt_token_ids:
            raise ValueError("`prompt_token_ids` must not be empty")
        if self.group_size < 1:
            raise ValueError("`group_size` must be >= 1")
        if not self.group_id:
            self.group_id = self.id

    def routing_key(self) -> bytes:
        """Kafka key: a session's turns and a group's samples share a key, so they
        land on the same partition (and engine worker) and reuse its KV cache. An
        environment session keys by its first turn's group: every turn of all of that
        group's sessions extends the same first prompt."""
        return (self.group_id if self.session is not None else self.session_id or self.group_id).encode()
