"""Token in / token out: the next turn of a session, built from tokens only.

Turn t+1's prompt is turn t's prompt tokens, then the tokens turn t sampled, then the
tool response tokenized here. Nothing earlier is ever re-rendered: re-rendering the
chat each turn re-tokenizes earlier turns (a sampled " 12" can come back as " 1","2"),
and the learner would then train on tokens the model never sampled.

How a tool response sits in the chat comes from the model's own chat template, read
once by rendering a probe conversation with and without a tool turn: what the second
adds after the first is the fragment, split around a sentinel. The assistant turn the
model was writing is closed with the template's own end-of-turn text, minus the
end-of-sequence token when the model already sampled it.
"""

from __future__ import annotations

import hashlib
from typing import Any

import msgspec

from schemas import Completion, Segment, Session

_SENTINEL = "\u2063OBSERVATION\u2063"  # invisible separator: no template or tokenizer gives it meaning


class TemplateError(ValueError):
    """The tokenizer's chat template does not render a probe conversation as a prefix-extension."""


class TurnTemplate:
    """Tool-response fragments in one model's chat format (see the module doc)."""

    def __init__(self, tokenizer: Any, role: str = "user") -> None:
        self.tokenizer = tokenizer
        probe = [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}]
        before = tokenizer.apply_chat_template(probe, tokenize=False)
        after = tokenizer.apply_chat_template(
            [*probe, {"role": role, "content": _SENTINEL}], tokenize=False, add_generation_prompt=True
        )
        if not after.startswith(before) or _SENTINEL not in after:
            raise TemplateError("the chat template does not extend a conversation by appending to it")
        head, self._after = after[len(before) :].split(_SENTINEL, 1)
        # What ends an assistant turn ("<|im_end|>\n" in ChatML), before the fragment's head.
        self._close = before[before.rindex("A") + 1 :]
        self._before = head
        eos = tokenizer.eos_token_id
        self._eos_ids = {int(eos)} if eos is not None else set()
        self._eos_text = str(tokenizer.eos_token or "")

    def _encode(self, text: str, *, literal: bool) -> list[int]:
        if not text:
            return []
        if literal:
            # A tool response is outside data: a "<|im_end|>" in a fetched page must stay
            # text, not become the end-of-turn token (a prompt injection into the format).
            return list(self.tokenizer(text, add_special_tokens=False, split_special_tokens=True)["input_ids"])
        return list(self.tokenizer.encode(text, add_special_tokens=False))

    def observation_ids(self, generated: list[int], observation: str) -> list[int]:
        """The tokens after a turn that sampled `generated`: its close, the tool response, the next assistant head."""
        close = self._close
        if generated and generated[-1] in self._eos_ids and self._eos_text and close.startswith(self._eos_text):
            close = close[len(self._eos_text) :]
        return (
            self._encode(close + self._before, literal=False)
            + self._encode(observation, literal=True)
            + self._encode(self._after, literal=False)
        )


def next_request_id(completion_id: str) -> str:
    """Deterministic: a turn handled twice (a redelivery) publishes the same next request,
    which the engine's ledger then serves once."""
    return hashlib.sha256(f"{completion_id}|next-turn".encode()).hexdigest()[:32]


def extended_session(c: Completion, observation_ids: list[int]) -> Session:
    """`c`'s session with its output (a model segment) and the tool response (a tool segment) appended."""
    s = c.session
    assert s is not None
    start = s.response_len()
    mid = start + len(c.token_ids)
    return msgspec.structs.replace(
        s,
        segments=[
            *s.segments,
            Segment("model", start, mid, c.policy_version),
            Segment("tool", mid, mid + len(observation_ids)),
        ],
        logprobs=[*s.logprobs, *c.logprobs, *([0.0] * len(observation_ids))],
    )
