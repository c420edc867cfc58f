"""rollout.trajectories: finished multi-turn sessions, from the env hub to verifiers and learners."""

from __future__ import annotations

from typing import Literal

from schemas.base import Message
from schemas.completions import Completion

DoneReason = Literal["env_done", "turn_limit", "context_full"]


class Trajectory(Message, kw_only=True):
    """A finished session, on rollout.trajectories: its last turn, exactly as the engine signed it.

    That completion's `prompt_token_ids` hold the whole session (first prompt, every
    earlier turn's output and tool response) and its `session` their layout, so the
    engine's signature covers every token a learner trains on. `id` is the last
    turn's completion id: a session finished twice (a redelivery) is one trajectory.

    The env hub signs the wrapper (`key_id`, `signature`: plumbing/trust.py's
    `trajectory_bytes`, which binds the completion's engine signature too), so the
    tool-use components a verifier copies into the reward are the env hub's, not a
    broker writer's.
    """

    completion: Completion
    done_reason: DoneReason
    turns: int
    # What the environment reports besides the final answer (tool use); the verifier
    # puts them into the reward's components.
    components: dict[str, float] = {}
    key_id: str = ""
    signature: bytes = b""
