"""Rendering a prompt request into text and token ids, the same way in routers and engines.

Routers hash the prompt's blocks to find the warm engine; the engine prefills the same
tokens. Both must render identically, so the rendering lives here, not in either stage.
"""

from __future__ import annotations

from typing import Any

from schemas import PromptRequest


class BadRequest(ValueError):
    """A request this worker will never be able to serve; it goes to the dead-letter topic."""


def render_prompt(req: PromptRequest, tokenizer: Any) -> tuple[str, list[int]]:
    """The prompt text and token ids; chat messages go through the model's chat template.

    Token ids given (token in) are used as they are: the text is only their decoding,
    for the record; nothing is re-tokenized.
    """
    if req.prompt_token_ids is not None:
        ids = list(req.prompt_token_ids)
        try:
            return tokenizer.decode(ids, skip_special_tokens=False), ids
        except (TypeError, ValueError, OverflowError, IndexError) as err:
            raise BadRequest(f"prompt_token_ids cannot be decoded by this model's tokenizer: {err}") from err
    if req.messages is not None:
        msgs = [{"role": m.role, "content": m.content} for m in req.messages]
        try:
            text = tokenizer.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
        except Exception as err:  # noqa: BLE001 - a template rejecting the roles is bad input
            raise BadRequest(f"chat template rejected the messages: {err}") from err
        return text, tokenizer.encode(text, add_special_tokens=False)
    assert req.text is not None
    return req.text, tokenizer.encode(req.text)
