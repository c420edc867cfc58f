"""Env `python`: counting questions a small model answers by writing and running a short program.

Task "math". The python tool runs the code in the sandbox (plumbing.sandbox) under
EnvContext.sandbox_wall_s; what the program prints comes back as the observation.
"""

from __future__ import annotations

import math
import random

from envhub.connectors.python import PythonTool
from envhub.envs import Split, ToolEnv, hashed_split_instances
from envhub.protocol import EnvContext, Reset
from plumbing.sandbox import Sandbox, SandboxLimits
from schemas.prompts import ChatMessage

SYSTEM = """You answer counting questions by running Python. Write a program inside tool tags, like \
<tool name="python">print(sum(range(10)))</tool>, and stop. What it prints comes back in the next \
message. Then give the number as <answer>N</answer>.

Example:
Question: How many integers from 1 to 50 are divisible by 7?
You: <tool name="python">print(sum(1 for i in range(1, 51) if i % 7 == 0))</tool>
Python: 7
You: <answer>7</answer>"""


def _problem(rng: random.Random) -> tuple[str, int]:
    n, a, b = rng.randint(500, 9999), rng.randint(3, 13), rng.randint(3, 13)
    if a == b:
        return f"How many integers from 1 to {n} are divisible by {a}?", n // a
    count = n // a + n // b - n // math.lcm(a, b)  # inclusion-exclusion
    return f"How many integers from 1 to {n} are divisible by {a} or by {b}?", count


def instances(split: Split, n: int, seed: int) -> list[dict[str, str]]:
    """`n` distinct problems of `split`; train and held-out never share a question."""
    return hashed_split_instances("python", _problem, split, n, seed)


class PythonEnv(ToolEnv):
    name = "python"
    tools = ("python",)
    example = '<tool name="python">print(6 * 7)</tool>'

    def __init__(self, ctx: EnvContext, sandbox: Sandbox | None = None) -> None:
        box = sandbox or Sandbox(SandboxLimits(wall_s=ctx.sandbox_wall_s))
        super().__init__(ctx, [PythonTool(box)])

    def reset(self, instance: dict[str, str]) -> Reset:
        return Reset(
            messages=[ChatMessage("system", SYSTEM), ChatMessage("user", f"Question: {instance['question']}")],
            reference=instance["answer"],
            task="math_format",
        )

    def instances(self, split: Split, n: int, seed: int) -> list[dict[str, str]]:
        return instances(split, n, seed)


def make(ctx: EnvContext) -> PythonEnv:
    """The entry point's factory."""
    return PythonEnv(ctx)
