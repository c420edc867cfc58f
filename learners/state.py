"""The learner's durable state, written with the optimizer in one atomic checkpoint.

Offsets and the partial-group buffer live in the same file as the optimizer state,
so a restarted learner resumes exactly where the checkpoint was taken: records after
it are re-read and rebuild the buffer, records before it are never counted twice.
"""

from __future__ import annotations

import io
import os
from pathlib import Path

import msgspec
import torch

from learners.samples import Sample
from schemas import Completion, Reward

# Reward ids kept for the replay check; older ones belong to long-finished groups.
REPLAY_WINDOW = 200_000


class LearnerState(msgspec.Struct):
    """Everything but the weights and the optimizer (those are referenced / stored beside)."""

    run_id: str
    step: int = 0
    version: int = 0
    weights_path: str = ""
    offsets: dict[str, int] = {}  # "topic:partition" -> next offset to read
    completions: dict[str, Completion] = {}  # waiting for their reward
    rewards: dict[str, Reward] = {}  # verified, waiting for their completion
    groups: dict[str, list[Sample]] = {}
    group_first_seen: dict[str, float] = {}
    ready: list[list[Sample]] = []
    seen_rewards: list[str] = []
    counters: dict[str, int] = {}

    def count(self, name: str, n: int = 1) -> None:
        """Bump a durable counter (rejected rewards, stale samples, ...)."""
        self.counters[name] = self.counters.get(name, 0) + n


def save_checkpoint(path: Path, state: LearnerState, optimizer: torch.optim.Optimizer) -> None:
    """Write state and optimizer in one file, atomically (temp file, fsync, rename)."""
    buf = io.BytesIO()
    torch.save({"state": msgspec.msgpack.encode(state), "optimizer": optimizer.state_dict()}, buf)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    with open(tmp, "wb") as f:
        f.write(buf.getvalue())
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def load_checkpoint(path: Path) -> tuple[LearnerState, dict] | None:
    """The checkpoint's state and optimizer state dict, or None when there is none."""
    if not path.exists():
        return None
    data = torch.load(path, weights_only=False)
    return msgspec.msgpack.decode(data["state"], type=LearnerState), data["optimizer"]
