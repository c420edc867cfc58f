"""The shape of a `primerl up` run, apart from the run itself (importing it loads no torch or vLLM)."""

from __future__ import annotations

import msgspec


class RunSettings(msgspec.Struct, frozen=True, kw_only=True):
    """The shape of the run."""

    steps: int = 15
    prompts_per_step: int = 8
    group_size: int = 4
    heldout: int = 32
    eval_every: int = 3
    max_tokens: int = 24
    seed: int = 0
    task: str = "arithmetic"  # or a multi-turn environment's name (primerl/tasks.py)
