"""Turning a PromptRequest into engine input, or a clear reason why it cannot be served."""

from __future__ import annotations

from typing import Any

import msgspec
from vllm import SamplingParams as VllmSamplingParams
from vllm.exceptions import VLLMValidationError
from vllm.sampling_params import RequestOutputKind

from engine_workers.grammar import GrammarError, structured_outputs
from plumbing.prompts import BadRequest, render_prompt
from schemas import PromptRequest


class EngineInput(msgspec.Struct, frozen=True):
    """What the engine needs for one request: rendered prompt, its tokens, sampling."""

    prompt: str
    prompt_token_ids: list[int]
    params: Any  # vllm.SamplingParams (not a msgspec type)


def build_input(
    req: PromptRequest, tokenizer: Any, max_model_len: int, max_group_size: int = 256, vocab_size: int = 0
) -> EngineInput:
    """Validate `req` against the model and build the engine input; raises BadRequest.

    `vocab_size` (the model's, 0: the tokenizer's length) bounds token-in prompts.
    """
    if req.prompt_token_ids is not None:
        # Before decoding: an id past the embedding table would crash the engine, not the request.
        vocab = vocab_size or len(tokenizer)
        bad = next((t for t in req.prompt_token_ids if not 0 <= t < vocab), None)
        if bad is not None:
            raise BadRequest(f"prompt_token_ids holds {bad}, outside this model's vocabulary [0, {vocab})")
    if req.session is not None and req.turn_index > 0 and req.group_size != 1:
        raise BadRequest(f"a session's turn {req.turn_index} continues one sample: group_size must be 1")
    if req.group_size > max_group_size:
        # vLLM would take n=10**9 and hold the engine (and its memory) for it.
        raise BadRequest(
            f"group_size {req.group_size} over this engine's limit of {max_group_size} (engine.max_group_size)"
        )
    prompt, ids = render_prompt(req, tokenizer)
    s = req.sampling
    if not ids:
        raise BadRequest("empty prompt")
    if len(ids) + s.max_tokens > max_model_len:
        raise BadRequest(
            f"prompt of {len(ids)} tokens + max_tokens {s.max_tokens} exceeds the model's {max_model_len}-token context"
        )
    kwargs: dict[str, Any] = {}
    if req.grammar is not None:
        try:
            kwargs["structured_outputs"] = structured_outputs(req.grammar)
        except (GrammarError, ValueError) as err:
            raise BadRequest(f"unusable grammar: {err}") from err
    if s.temperature == 0 and req.group_size > 1:
        raise BadRequest("greedy sampling (temperature 0) cannot draw more than one sample per group")
    try:
        params = VllmSamplingParams(
            n=req.group_size,
            temperature=s.temperature,
            top_p=s.top_p,
            top_k=s.top_k if s.top_k > 0 else 0,
            max_tokens=s.max_tokens,
            min_tokens=s.min_tokens,
            stop=list(s.stop) or None,
            # logprobs=0 returns the sampled token's log-prob, which learners need.
            logprobs=s.logprobs,
            output_kind=RequestOutputKind.DELTA,
            **kwargs,
        )
    except (VLLMValidationError, ValueError, TypeError) as err:
        raise BadRequest(f"invalid sampling parameters: {err}") from err
    return EngineInput(prompt=prompt, prompt_token_ids=ids, params=params)
