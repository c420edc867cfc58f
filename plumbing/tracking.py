"""Experiment tracking: learner-step figures as TensorBoard event files, and reading them back.

TensorBoard rather than MLflow: its wheel (and tensorboard-data-server's) is what the
machines here can install, it adds a handful of small packages (MLflow brings a web
server, SQLAlchemy, alembic, and a sqlite store by default), and an event folder is
plain files a user opens with `tensorboard --logdir`. The writer is torch's
SummaryWriter (torch is already the learner's); the reader is TensorBoard's own
event loader, so the plots made from it show exactly what TensorBoard shows.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path

# The figures of every learner step, by tag (the CSV's and the plot's names too).
STEP_FIGURES = (
    "reward/mean",
    "reward/std",
    "loss",
    "kl",
    "clip_frac",
    "policy_lag",
    "tokens_per_s",
    "cache_hit_rate",
    "heldout_accuracy",
)


class StepLog:
    """One run's event folder; `log(step, figures)` appends one scalar per finite figure."""

    def __init__(self, log_dir: Path) -> None:
        from torch.utils.tensorboard import SummaryWriter  # needs the tensorboard package

        self.log_dir = log_dir
        log_dir.mkdir(parents=True, exist_ok=True)
        # flush_secs: a user watching with `tensorboard --logdir` sees a step within seconds.
        self._writer = SummaryWriter(log_dir=str(log_dir), flush_secs=5)

    def log(self, step: int, figures: Mapping[str, float], wall_time: float | None = None) -> None:
        """Write the finite figures of `step` (NaN means not measured at that step: skipped)."""
        for tag, value in figures.items():
            if value is not None and math.isfinite(value):
                self._writer.add_scalar(tag, float(value), global_step=step, walltime=wall_time)
        self._writer.flush()

    def close(self) -> None:
        """Flush and close the event file."""
        self._writer.close()

    def __enter__(self) -> StepLog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def read_scalars(log_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar series of an event folder: tag -> [(step, value)] in step order."""
    from tensorboard.backend.event_processing.event_accumulator import SCALARS, EventAccumulator

    acc = EventAccumulator(str(log_dir), size_guidance={SCALARS: 0})  # 0: keep every point
    acc.Reload()
    return {tag: sorted((e.step, e.value) for e in acc.Scalars(tag)) for tag in acc.Tags()[SCALARS]}
