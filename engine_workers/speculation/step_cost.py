"""What a draft token costs: step time = fixed + per_token x scheduled tokens, fitted live
per batch-size bucket.

A draft token adds `per_token` to its step and, if accepted, saves the slot it would
have taken in a later step: (fixed + per_token x batch) / batch. So drafting pays
when P(accepted) > per_token x batch / (fixed + per_token x batch), the break-even
acceptance. On a GPU decode is memory-bound (per_token ~ 0: draft freely); on a small
CPU every verified token is real compute (measured here: ~8 ms per token over ~90 ms
fixed, so batch 1 breaks even at 0.08 and batch 32 at 0.74).

Step time is not linear in tokens over the whole range: at batch 1 a CPU step is
bound by reading the weights (an extra token is nearly free), at batch 8 by compute
(~3 ms per token). One line through steps of every batch size prices a draft at batch
8 by the mix of batch sizes seen (measured: 18 ms + 4.5 ms/token one minute, 28 ms +
3.7 the next, which once switched forced drafts off at batch 8). So each batch bucket
(draft_switch.bucket_of) gets its own line, whose slope comes from the steps of that
bucket, where the token count varies mostly by drafts; until a bucket has enough
varied steps, the fit over all steps stands in.
"""

from __future__ import annotations

from collections import deque

import numpy as np

from engine_workers.speculation.draft_switch import bucket_of


class _LineFit:
    """Least-squares line of step ms against tokens over a window of recent steps."""

    def __init__(self, window: int, min_points: int) -> None:
        self.points: deque[tuple[int, float]] = deque(maxlen=window)
        self.min_points = min_points
        self.line: tuple[float, float] | None = None  # (fixed ms, ms per token), once identified
        self._stale = False

    def add(self, tokens: int, ms: float) -> None:
        self.points.append((tokens, ms))
        self._stale = True

    def fit(self) -> tuple[float, float] | None:
        """The line, refitted if steps came in since; None until it is identified."""
        if self._stale and len(self.points) >= self.min_points:
            self._stale = False
            x, y = np.array(self.points, dtype=float).T
            if x.var() >= 1.0:  # one token count only: the slope is not identifiable, keep the last line
                slope, intercept = np.polyfit(x, y, 1)
                self.line = (max(float(intercept), 1e-3), max(float(slope), 0.0))
        return self.line


class StepCost:
    """Step ms against scheduled tokens over recent decode steps: one line per batch bucket,
    the line over all steps where a bucket has none yet, the configured prior before that."""

    def __init__(
        self,
        fixed_ms: float,
        per_token_ms: float,
        window: int = 256,
        min_points: int = 32,
        bucket_window: int = 128,
        bucket_min_points: int = 24,
    ) -> None:
        self._prior = (fixed_ms, per_token_ms)
        self._all = _LineFit(window, min_points)
        self._buckets: dict[int, _LineFit] = {}
        self._bucket_window = bucket_window
        self._bucket_min_points = bucket_min_points

    def observe(self, batch: int, tokens: int, ms: float) -> None:
        """One decode step (no prompt tokens in it) of `batch` requests and `tokens` tokens took `ms`."""
        self._all.add(tokens, ms)
        b = bucket_of(batch)
        fit = self._buckets.get(b)
        if fit is None:
            fit = self._buckets[b] = _LineFit(self._bucket_window, self._bucket_min_points)
        fit.add(tokens, ms)

    def line(self, batch: int) -> tuple[float, float]:
        """(fixed ms, ms per token) that prices a step of `batch` requests."""
        fit = self._buckets.get(bucket_of(batch))
        return (fit.fit() if fit is not None else None) or self._all.fit() or self._prior

    def break_even(self, batch: int) -> float:
        """Acceptance probability above which a draft token pays for its verification."""
        fixed, per_token = self.line(batch)
        marginal = per_token * max(batch, 1)
        return marginal / (fixed + marginal)
