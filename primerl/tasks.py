"""What `primerl up --task NAME` trains on: the built-in single-turn arithmetic, or a multi-turn environment.

A RunTask makes the training batches and the held-out prompts of a run and names the
reward component a held-out success counts. An environment task's prompts are the
first turns of sessions (`PromptRequest.session`); the env hub (envhub/) runs their
later turns, so a run of one also starts that stage.
"""

from __future__ import annotations

from typing import Protocol

from primerl.settings import RunSettings
from producers.arithmetic import arithmetic_requests, heldout_pairs
from schemas import PromptRequest

DEFAULT_TASK = "arithmetic"


class RunTask(Protocol):
    """The prompts of one kind of run."""

    name: str
    title: str  # of the learning curve's plot
    uses_envhub: bool
    success_component: str  # a held-out prompt succeeded when its reward has this component at 1

    def train(self, run_id: str, batch: int, prompts: int, group_size: int, seed: int) -> list[PromptRequest]:
        """Training batch number `batch` (never a held-out prompt)."""
        ...

    def heldout(self, run_id: str) -> list[PromptRequest]:
        """The held-out prompts, greedy, one sample each (the same every evaluation)."""
        ...


class ArithmeticTask:
    """`a + b` with operands below 20, the answer in tags the engine enforces (producers/arithmetic.py)."""

    name = DEFAULT_TASK
    title = "a+b"
    uses_envhub = False
    success_component = "success"

    def __init__(self, heldout: int, max_tokens: int) -> None:
        self.held = sorted(heldout_pairs(heldout))
        self.max_tokens = max_tokens

    def train(self, run_id: str, batch: int, prompts: int, group_size: int, seed: int) -> list[PromptRequest]:
        return arithmetic_requests(
            run_id,
            prompts,
            group_size,
            seed=seed * 100_003 + batch,
            max_tokens=self.max_tokens,
            exclude=set(self.held),
        )

    def heldout(self, run_id: str) -> list[PromptRequest]:
        return arithmetic_requests(run_id, 0, 1, pairs=self.held, temperature=0.0, max_tokens=self.max_tokens)


def make_task(rs: RunSettings) -> RunTask:
    """The task `rs.task` names; ValueError lists the known ones."""
    if rs.task == DEFAULT_TASK:
        return ArithmeticTask(rs.heldout, rs.max_tokens)
    raise ValueError(f"unknown task {rs.task!r}; known: {DEFAULT_TASK}")
