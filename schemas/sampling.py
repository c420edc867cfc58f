"""Per-request sampling settings (their own module: prompts and sessions both carry them)."""

from __future__ import annotations

import msgspec


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
