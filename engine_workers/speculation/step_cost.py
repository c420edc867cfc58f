"""What drafts cost: step time = fixed + per_token x tokens (+ draft_step if any request
has drafts), fitted live over recent decode steps.

A draft token adds `per_token` to its step; the first draft of a step also brings in
vLLM's rejection sampler for the whole batch (`draft_step`). An accepted draft saves
the slot it would have taken in a later step: (fixed + per_token x batch) / batch. So a
token pays when P(accepted) > per_token x batch / (fixed + per_token x batch), the
break-even acceptance, and a step's drafts pay when their expected accepted tokens save
more than they add. On a GPU decode is memory-bound (per_token ~ 0: draft freely); on a
small CPU every verified token is real compute (measured here: ~8 ms per token and
~10 ms per drafting step over ~90 ms fixed; batch 1 breaks even at 0.08, 32 at 0.74).
"""

from __future__ import annotations

from collections import deque

import numpy as np


class StepCost:
    """Least-squares fit of step ms against scheduled tokens and whether the step had drafts."""

    def __init__(self, fixed_ms: float, per_token_ms: float, draft_step_ms: float, window: int = 256,
                 min_points: int = 32) -> None:
        self.fixed_ms = fixed_ms
        self.per_token_ms = per_token_ms
        self.draft_step_ms = draft_step_ms
        self._points: deque[tuple[int, int, float]] = deque(maxlen=window)
        self._min_points = min_points

    def observe(self, tokens: int, drafted: bool, ms: float) -> None:
        """One decode step (no prompt tokens in it) of `tokens` tokens took `ms`."""
        self._points.append((tokens, int(drafted), ms))
        if len(self._points) < self._min_points:
            return
        x, d, y = np.array(self._points, dtype=float).T
        if x.var() < 1.0:  # one batch size only: the slope is not identifiable, keep the last fit
            return
        both = 4 <= d.sum() <= len(d) - 4  # enough steps with and without drafts to tell them apart
        design = np.column_stack([np.ones_like(x), x, d] if both else [np.ones_like(x), x])
        coef = np.linalg.lstsq(design, y, rcond=None)[0]
        self.fixed_ms = max(float(coef[0]), 1e-3)
        self.per_token_ms = max(float(coef[1]), 0.0)
        if both:
            self.draft_step_ms = max(float(coef[2]), 0.0)

    def slot_ms(self, batch: int) -> float:
        """What one token's slot in a step of `batch` requests costs."""
        batch = max(batch, 1)
        return (self.fixed_ms + self.per_token_ms * batch) / batch

    def break_even(self, batch: int) -> float:
        """Acceptance probability above which a draft token pays for its verification."""
        return min(1.0, self.per_token_ms / self.slot_ms(batch))

    def step_pays(self, batch: int, drafted: int, expected_accepted: float) -> bool:
        """Whether a step's drafts save more time than they add."""
        return expected_accepted * self.slot_ms(batch) > self.draft_step_ms + self.per_token_ms * drafted
