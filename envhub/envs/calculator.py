"""Env `calculator`: arithmetic a 135M model cannot do in its head, with a calculator tool.

Task "math_format": the verifier compares the final `<answer>` numerically with the product
or sum. The prompt shows one short worked example: a small model copies a format it
has seen far more reliably than one it was only told about.
"""

from __future__ import annotations

import random

from envhub.connectors.calculator import Calculator
from envhub.envs import Split, ToolEnv, hashed_split_instances
from envhub.protocol import EnvContext, Reset
from schemas.prompts import ChatMessage, Grammar, GrammarKind
from schemas.sessions import ToolTrace

SYSTEM = """You solve arithmetic with a calculator tool. To use it, write the expression inside tool tags, \
like <tool name="calculator">12 * 34</tool>, and stop. The result comes back in the next message. \
When you know the result, give it as <answer>N</answer>.

Example:
Question: What is 12 * 34?
You: <tool name="calculator">12 * 34</tool>
Calculator: 408
You: <answer>408</answer>"""


# One call or one answer per turn, nothing else: the engine enforces it, so even the
# untrained 135M model's turns parse (its free text rarely did), and RL learns when to call.
GRAMMAR = Grammar(
    GrammarKind.REGEX, r'(<tool name="calculator">[0-9][0-9+*/() -]{0,39}</tool>|<answer>-?[0-9]{1,12}</answer>)'
)


def _problem(rng: random.Random) -> tuple[str, int]:
    kind = rng.randrange(3)
    if kind == 0:
        a, b = rng.randint(100, 999), rng.randint(11, 99)
        return f"What is {a} * {b}?", a * b
    if kind == 1:
        a, b, c = (rng.randint(100, 999) for _ in range(3))
        return f"What is {a} + {b} + {c}?", a + b + c
    a, b, c = rng.randint(100, 999), rng.randint(11, 99), rng.randint(100, 999)
    return f"What is {a} * {b} - {c}?", a * b - c


def instances(split: Split, n: int, seed: int) -> list[dict[str, str]]:
    """`n` distinct problems of `split`; train and held-out never share a question."""
    return hashed_split_instances("calculator", _problem, split, n, seed)


class CalculatorEnv(ToolEnv):
    name = "calculator"
    tools = ("calculator",)
    example = '<tool name="calculator">12 * 34</tool>'

    def __init__(self, ctx: EnvContext) -> None:
        super().__init__(ctx, [Calculator()])

    def reset(self, instance: dict[str, str]) -> Reset:
        return Reset(
            messages=[ChatMessage("system", SYSTEM), ChatMessage("user", f"Question: {instance['question']}")],
            reference=instance["answer"],
            # math_format: half for an answer in tags, half for the right one (its `success`
            # is what a held-out success counts).
            task="math_format",
            grammar=GRAMMAR,
        )

    def observe(self, text: str, trace: ToolTrace) -> str:
        # Untrained, SmolLM2-135M called the calculator again on its own result in 13 of 16
        # turns after one (4 sessions x 4 turns, real engine) instead of answering: the
        # observation says what an answer looks like; whether to give it is still the policy's.
        if not trace.ok:
            return text
        return f"{text}\nIf {text} is the result asked for, answer <answer>{text}</answer>."

    def instances(self, split: Split, n: int, seed: int) -> list[dict[str, str]]:
        return instances(split, n, seed)


def make(ctx: EnvContext) -> CalculatorEnv:
    """The entry point's factory."""
    return CalculatorEnv(ctx)
