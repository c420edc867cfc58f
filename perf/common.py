"""Shared bits of the benchmarks: percentiles, CSV and plot writing."""

from __future__ import annotations

import csv
from collections.abc import Sequence
from pathlib import Path

import msgspec

ARTIFACTS = Path(__file__).resolve().parents[1] / "artifacts"


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0..100), nearest-rank; NaN for no values."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    rank = max(0, min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1))))
    return ordered[rank]


def write_csv(path: Path, rows: Sequence[msgspec.Struct]) -> None:
    """Rows of one Struct type as CSV, columns in field order."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fields = list(type(rows[0]).__struct_fields__)
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(fields)
        for row in rows:
            writer.writerow([f"{v:.4f}" if isinstance(v, float) else v for v in (getattr(row, k) for k in fields)])
