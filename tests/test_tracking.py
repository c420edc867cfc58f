"""Experiment tracking: learner steps in TensorBoard event files, the curve's CSV and plot read back from them."""

from __future__ import annotations

import csv
import math
from pathlib import Path

from plumbing.tracking import StepLog, read_scalars
from primerl.curve import TAGS, CurveRow, log_row, write_curve


def test_step_log_round_trip_skips_unmeasured(tmp_path: Path) -> None:
    with StepLog(tmp_path / "tb") as log:
        log.log(0, {"reward/mean": math.nan, "heldout_accuracy": 0.25})
        log.log(1, {"reward/mean": 0.5, "kl": 0.01})
    series = read_scalars(tmp_path / "tb")
    assert series["reward/mean"] == [(1, 0.5)]
    assert series["heldout_accuracy"] == [(0, 0.25)]
    assert abs(series["kl"][0][1] - 0.01) < 1e-6


def test_curve_csv_and_plot_come_from_the_event_files(tmp_path: Path) -> None:
    events = tmp_path / "tb"
    rows = [
        CurveRow(0, 10.0, math.nan, 0.125, 0.0, math.nan, math.nan),
        CurveRow(1, 40.0, 0.5, math.nan, 0.5, 12.5, 0.75, reward_std=0.25, loss=-0.01, kl=0.002, clip_frac=0.1),
        CurveRow(2, 70.0, 0.625, 0.375, 1.0, 13.0, 0.8, reward_std=0.2, loss=0.02, kl=0.003, clip_frac=0.05),
    ]
    with StepLog(events) as log:
        for r in rows:
            log_row(log, r)
    csv_path, png_path = write_curve(events, tmp_path / "out", "test")
    assert png_path.stat().st_size > 1000
    with open(csv_path) as f:
        table = list(csv.DictReader(f))
    assert list(table[0]) == ["step", *TAGS]
    assert [t["step"] for t in table] == ["0", "1", "2"]
    assert table[0]["reward_mean"] == "" and table[0]["heldout_accuracy"] == "0.125"
    assert table[1]["kl"] == "0.002" and table[1]["clip_frac"] == "0.1" and table[1]["reward_std"] == "0.25"
    assert table[2]["tokens_per_s"] == "13.0" and table[2]["cache_hit_rate"] == "0.8"
    # Every figure the issue names is logged.
    assert {
        "reward/mean",
        "reward/std",
        "loss",
        "kl",
        "clip_frac",
        "policy_lag",
        "tokens_per_s",
        "cache_hit_rate",
    } <= set(read_scalars(events))
