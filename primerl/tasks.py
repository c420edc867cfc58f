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
from schemas import PromptRequest, SamplingParams, Session

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


class EnvTask:
    """First turns of sessions of a multi-turn environment (envhub/), one session per sample.

    The environment makes the prompt, the reference and the output grammar of each
    instance (`reset`); `max_tokens` is per turn. Held-out instances come from the
    environment's own held-out split, which never shares a question with training.
    """

    uses_envhub = True
    success_component = "success"

    def __init__(self, name: str, heldout: int, max_tokens: int, max_turns: int = 4) -> None:
        from envhub.protocol import EnvContext
        from envhub.registry import load_env

        # Only reset() and instances() are used here: pure functions, no tool is reached.
        self.env = load_env(name, EnvContext())
        self.name = name
        self.title = f"{name} sessions (multi-turn, tools)"
        self.heldout_n, self.max_tokens, self.max_turns = heldout, max_tokens, max_turns

    def _requests(
        self, run_id: str, instances: list[dict[str, str]], group_size: int, temperature: float
    ) -> list[PromptRequest]:
        out = []
        for inst in instances:
            reset = self.env.reset(inst)
            out.append(
                PromptRequest(
                    run_id=run_id,
                    messages=reset.messages,
                    group_size=group_size,
                    sampling=SamplingParams(temperature=temperature, max_tokens=self.max_tokens),
                    task=reset.task,
                    reference=reset.reference,
                    grammar=reset.grammar,
                    session=Session(env=self.name, max_turns=self.max_turns, state=reset.state),
                )
            )
        return out

    def train(self, run_id: str, batch: int, prompts: int, group_size: int, seed: int) -> list[PromptRequest]:
        return self._requests(run_id, self.env.instances("train", prompts, seed * 100_003 + batch), group_size, 1.0)

    def heldout(self, run_id: str) -> list[PromptRequest]:
        return self._requests(run_id, self.env.instances("heldout", self.heldout_n, 1234), 1, 0.0)


def make_task(rs: RunSettings) -> RunTask:
    """The task `rs.task` names: arithmetic, or any installed environment; ValueError lists the known ones."""
    if rs.task == DEFAULT_TASK:
        return ArithmeticTask(rs.heldout, rs.max_tokens)
    from envhub.registry import known_envs

    if rs.task not in known_envs():
        raise ValueError(f"unknown task {rs.task!r}; known: {', '.join([DEFAULT_TASK, *known_envs()])}")
    return EnvTask(rs.task, rs.heldout, rs.max_tokens)
