"""What became of every sample the learner took in: trained in step N, or dropped with a reason.

One JSON line per event, appended to `<checkpoint dir>/outcomes.jsonl` (flushed to the
OS, so a SIGKILL loses nothing written):

- `{"kind": "step", "step", "version", "updated", "ids", "group_sizes", "reward_ids",
  "threads"}`: the completion ids a step trained on, *in training order* (groups one
  after the other, `group_sizes` long each, samples in group order), the id of the
  Reward each was scored with, and torch's thread count; written *before* that step's
  checkpoint. This is the step list `primerl replay --stage learner` replays to
  reproduce the live run's weights byte for byte (operations/replay.py).
- `{"kind": "drop", "reason", "step", "ids"}`: samples that left the buffer untrained,
  or a reward it rejected, with the reason the GroupBuffer gave (learners/group_buffer.py:
  stale, duplicate_in_group, group_timeout, orphan_completion, orphan_reward,
  binding_mismatch).

A learner killed between a step's line and its checkpoint redoes that step after the
restart (it resumes from the previous checkpoint) and writes a second line for the same
step number: the last line of a step number is the one that took effect, and only step
numbers below the checkpoint's `step` are committed (`committed_steps`).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any


class OutcomeLog:
    """Appends outcome lines; one open file per learner process."""

    def __init__(self, path: Path) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(path, "a", encoding="utf-8")  # noqa: SIM115 - closed with the process

    def _write(self, line: dict[str, Any]) -> None:
        line["t"] = round(time.time(), 3)
        self._file.write(json.dumps(line, separators=(",", ":")) + "\n")
        self._file.flush()

    def trained(
        self,
        step: int,
        version: int,
        ids: list[str],
        updated: bool,
        *,
        group_sizes: list[int] | None = None,
        reward_ids: list[str] | None = None,
        threads: int = 0,
    ) -> None:
        """Step `step` trained on `ids`, in training order (`updated`: the weights changed, a new
        version; `group_sizes`: how the ids split into groups; `reward_ids`: each one's Reward;
        `threads`: torch's intra-op thread count for the step)."""
        line: dict[str, Any] = {"kind": "step", "step": step, "version": version, "updated": updated, "ids": ids}
        if group_sizes is not None:
            line["group_sizes"] = group_sizes
        if reward_ids is not None:
            line["reward_ids"] = reward_ids
        if threads:
            line["threads"] = threads
        self._write(line)

    def trained_groups(self, step: int, version: int, groups: list[list[Any]], updated: bool, threads: int = 0) -> None:
        """`trained` for a step's groups of Samples: ids, group sizes and reward ids in training order."""
        self.trained(
            step,
            version,
            [s.completion_id for g in groups for s in g],
            updated,
            group_sizes=[len(g) for g in groups],
            reward_ids=[s.reward_id for g in groups for s in g],
            threads=threads,
        )

    def dropped(self, reason: str, step: int, ids: list[str]) -> None:
        """`ids` left the buffer untrained, for `reason`."""
        if ids:
            self._write({"kind": "drop", "reason": reason, "step": step, "ids": ids})

    def close(self) -> None:
        """Close the file."""
        self._file.close()


def read_outcomes(path: Path) -> list[dict[str, Any]]:
    """Every line of an outcome log (a torn last line, from a kill mid-write, is skipped)."""
    if not path.exists():
        return []
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return out


def committed_steps(lines: list[dict[str, Any]], checkpoint_step: int | None = None) -> dict[int, dict[str, Any]]:
    """Step number -> the line that took effect (the last one of that number), for steps
    below `checkpoint_step` (None: every step seen)."""
    steps: dict[int, dict[str, Any]] = {}
    for line in lines:
        if line.get("kind") == "step":
            steps[int(line["step"])] = line
    if checkpoint_step is not None:
        steps = {s: line for s, line in steps.items() if s < checkpoint_step}
    return steps
