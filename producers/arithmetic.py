"""The built-in task: small arithmetic in an answer format SmolLM2-135M can learn on a CPU."""

from __future__ import annotations

import random

from schemas import ChatMessage, PromptRequest, SamplingParams

SYSTEM = "You are a careful calculator. Reply with the result inside <answer></answer> tags, for example <answer>12</answer>."


def arithmetic_requests(
    run_id: str, count: int, group_size: int, *, seed: int = 0, max_tokens: int = 32, temperature: float = 1.0
) -> list[PromptRequest]:
    """`count` chat prompts `a + b` (a, b < 50) with their reference answers, one GRPO group each."""
    rng = random.Random(seed)
    out = []
    for _ in range(count):
        a, b = rng.randrange(50), rng.randrange(50)
        out.append(
            PromptRequest(
                run_id=run_id,
                messages=[ChatMessage("system", SYSTEM), ChatMessage("user", f"What is {a} + {b}?")],
                group_size=group_size,
                sampling=SamplingParams(temperature=temperature, max_tokens=max_tokens),
                task="math",
                reference=str(a + b),
            )
        )
    return out
