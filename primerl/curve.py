"""The learning curve of `primerl up`: one row per learner step, logged to TensorBoard, and the
CSV and plot made back from those event files (so the three never disagree)."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import msgspec

from plumbing.tracking import StepLog, read_scalars


class CurveRow(msgspec.Struct):
    """One learner step of the learning curve (NaN: not measured at that step)."""

    step: int
    wall_s: float
    reward_mean: float
    heldout_accuracy: float
    policy_lag_mean: float
    tokens_per_s: float
    cache_hit_rate: float
    reward_std: float = math.nan
    loss: float = math.nan
    kl: float = math.nan
    clip_frac: float = math.nan


# CSV column -> TensorBoard tag.
TAGS: dict[str, str] = {
    "wall_s": "wall_s",
    "reward_mean": "reward/mean",
    "reward_std": "reward/std",
    "heldout_accuracy": "heldout_accuracy",
    "loss": "loss",
    "kl": "kl",
    "clip_frac": "clip_frac",
    "policy_lag_mean": "policy_lag",
    "tokens_per_s": "tokens_per_s",
    "cache_hit_rate": "cache_hit_rate",
}


def log_row(log: StepLog, row: CurveRow) -> None:
    """Every figure of `row` as a scalar at its step."""
    log.log(row.step, {tag: getattr(row, field) for field, tag in TAGS.items()})


def write_curve(events_dir: Path, out_dir: Path, title: str, suffix: str = "") -> tuple[Path, Path]:
    """learning_curve<suffix>.csv and .png in `out_dir`, both read from the event files in `events_dir`."""
    series = read_scalars(events_dir)
    by_step: dict[int, dict[str, float]] = {}
    for field, tag in TAGS.items():
        for step, value in series.get(tag, []):
            by_step.setdefault(step, {})[field] = value
    out_dir.mkdir(parents=True, exist_ok=True)
    csv_path, png_path = out_dir / f"learning_curve{suffix}.csv", out_dir / f"learning_curve{suffix}.png"
    with open(csv_path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["step", *TAGS])
        for step in sorted(by_step):
            w.writerow([step, *(_csv_cell(by_step[step].get(field)) for field in TAGS)])
    _plot(series, png_path, title)
    return csv_path, png_path


def _csv_cell(value: float | None) -> str | float:
    return "" if value is None else round(value, 4)


def _plot(series: dict[str, list[tuple[int, float]]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for tag, style, label in (
        ("reward/mean", "o-", "train reward mean"),
        ("heldout_accuracy", "s--", "held-out accuracy (greedy)"),
    ):
        points = series.get(tag, [])
        ax.plot([s for s, _ in points], [v for _, v in points], style, label=label)
    ax.set_xlabel("learner step")
    ax.set_ylim(0, 1)
    ax.legend()
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
