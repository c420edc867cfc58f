"""What a draft token costs: step time = fixed + per_token x scheduled tokens, fitted live.

A draft token adds `per_token` to its step and, if accepted, saves the slot it would
have taken in a later step: (fixed + per_token x batch) / batch. So drafting pays
when P(accepted) > per_token x batch / (fixed + per_token x batch), the break-even
acceptance. On a GPU decode is memory-bound (per_token ~ 0: draft freely); on a small
CPU every verified token is real compute (measured here: ~8 ms per token over ~90 ms
fixed, so batch 1 breaks even at 0.08 and batch 32 at 0.74).
"""

from __future__ import annotations

from collections import deque

import numpy as np


class StepCost:
    """Least-squares fit of step ms against scheduled tokens over recent decode steps."""

    def __init__(self, fixed_ms: float, per_token_ms: float, window: int = 256, min_points: int = 32) -> None:
        self.fixed_ms = fixed_ms
        self.per_token_ms = per_token_ms
        self._points: deque[tuple[int, float]] = deque(maxlen=window)
        self._min_points = min_points

    def observe(self, tokens: int, ms: float) -> None:
        """One decode step (no prompt tokens in it) of `tokens` tokens took `ms`."""
        self._points.append((tokens, ms))
        if len(self._points) < self._min_points:
            return
        x, y = np.array(self._points, dtype=float).T
        if x.var() < 1.0:  # one batch size only: the slope is not identifiable, keep the last fit
            return
        slope, intercept = np.polyfit(x, y, 1)
        self.per_token_ms = max(float(slope), 0.0)
        self.fixed_ms = max(float(intercept), 1e-3)

    def break_even(self, batch: int) -> float:
        """Acceptance probability above which a draft token pays for its verification."""
        marginal = self.per_token_ms * max(batch, 1)
        return marginal / (self.fixed_ms + marginal)
