"""The built-in task: small arithmetic in an answer format SmolLM2-135M can learn on a CPU.

Operands below MAX_OPERAND; scored by the verifier's `math_format` reward (half for
the <answer></answer> format, half for a correct answer in it).
"""

from __future__ import annotations

import random

from schemas import ChatMessage, Grammar, GrammarKind, PromptRequest, SamplingParams

SYSTEM = (
    "You are a careful calculator. Reply with the result inside <answer></answer> tags, "
    "for example <answer>12</answer>."
)


MAX_OPERAND = 20
TASK = "math_format"
# The answer straight away, in tags: the engine enforces it (structured outputs), so the
# policy learns the arithmetic rather than spending its reward on finding the format.
ANSWER_GRAMMAR = Grammar(GrammarKind.REGEX, r"<answer>[0-9]{1,3}</answer>")


def heldout_pairs(count: int, seed: int = 1234) -> set[tuple[int, int]]:
    """The (a, b) pairs reserved for evaluation: training prompts never use them."""
    rng = random.Random(seed)
    pairs: set[tuple[int, int]] = set()
    while len(pairs) < count:
        pairs.add((rng.randrange(MAX_OPERAND), rng.randrange(MAX_OPERAND)))
    return pairs


def arithmetic_requests(
    run_id: str,
    count: int,
    group_size: int,
    *,
    seed: int = 0,
    max_tokens: int = 32,
    min_tokens: int = 0,
    temperature: float = 1.0,
    exclude: set[tuple[int, int]] = frozenset(),  # type: ignore[assignment]
    pairs: list[tuple[int, int]] | None = None,
    grammar: Grammar | None = ANSWER_GRAMMAR,
) -> list[PromptRequest]:
    """Chat prompts `a + b` (a, b < MAX_OPERAND) with their reference answers, one GRPO group each:
    `pairs` when given, else `count` random pairs not in `exclude`."""
    rng = random.Random(seed)
    chosen = list(pairs or [])
    while len(chosen) < count:
        a, b = rng.randrange(MAX_OPERAND), rng.randrange(MAX_OPERAND)
        if (a, b) not in exclude:
            chosen.append((a, b))
    out = []
    for a, b in chosen:
        out.append(
            PromptRequest(
                run_id=run_id,
                messages=[ChatMessage("system", SYSTEM), ChatMessage("user", f"What is {a} + {b}?")],
                group_size=group_size,
                sampling=SamplingParams(temperature=temperature, max_tokens=max_tokens, min_tokens=min_tokens),
                task=TASK,
                grammar=grammar,
                reference=str(a + b),
            )
        )
    return out
