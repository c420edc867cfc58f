"""Whether to draft at all, per workload and batch size: whichever measured faster.

The break-even gate (step_cost.py) prices a draft token from a linear fit, which misses
costs that come with drafting as such (vLLM's rejection sampler runs, grammar masks are
filled per draft position, serially). So per batch bucket the engine also times both
policies, drafts on and off, as milliseconds per emitted token in a paired trial, keeps
drafting only where it clearly wins, and runs a new trial now and then. Per workload
too (the grammar most running requests follow, or free text): whether drafts pay
depends on what is drafted, and a verdict learned on free text must not hold back JSON
records at the same batch size.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

log = logging.getLogger("primerl.speculation")

BUCKET_TOPS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)


def bucket_of(batch: int) -> int:
    """Index of the batch-size bucket (1, 2, 3-4, 5-8, ...)."""
    for i, top in enumerate(BUCKET_TOPS):
        if batch <= top:
            return i
    return len(BUCKET_TOPS)


def bucket_name(i: int) -> str:
    """Human-readable range of bucket `i`."""
    lo = BUCKET_TOPS[i - 1] + 1 if i else 1
    hi = BUCKET_TOPS[i] if i < len(BUCKET_TOPS) else None
    return f"{lo}" if lo == hi else f"{lo}-{hi if hi else ''}"


@dataclass
class _Bucket:
    # drafting on/off -> (ms, tokens) of its steps in the current trial
    history: dict[bool, list[tuple[float, int]]] = field(default_factory=lambda: {True: [], False: []})
    best: bool = True
    trial: bool = True  # a paired trial is running: steps alternate drafting on and off
    next_arm: bool = True
    since_trial: int = 0

    def start_trial(self) -> None:
        self.trial, self.since_trial = True, 0
        for h in self.history.values():
            h.clear()

    def ms_per_token(self, arm: bool) -> float:
        h = self.history[arm]
        return sum(ms for ms, _ in h) / max(1, sum(t for _, t in h))


class DraftSwitch:
    """Per workload and batch bucket, drafts on or off, by measured ms per emitted token.

    Both policies are timed in a paired trial, alternating step by step, so that they
    see the same requests at the same point of their outputs (a JSON record's forced
    keys come in bursts: blocks of steps timed at different moments compared mostly the
    moments). Drafting is kept only if it wins the trial by MARGIN, so a near-tie goes
    to plain steps; every `probe_every` steps of a bucket a new trial re-measures both.
    """

    MARGIN = 1.03

    def __init__(self, steps: int = 16, probe_every: int = 200) -> None:
        self._buckets: dict[tuple[str, int], _Bucket] = {}
        self._steps = steps
        self._probe_every = probe_every
        self.fallbacks = 0
        self.resumes = 0

    def _bucket(self, workload: str, batch: int) -> _Bucket:
        key = (workload, bucket_of(batch))
        b = self._buckets.get(key)
        if b is None:
            b = self._buckets[key] = _Bucket()
        return b

    def choose(self, batch: int, workload: str = "any") -> bool:
        """Whether the next step of `batch` running requests of `workload` drafts."""
        b = self._bucket(workload, batch)
        if not b.trial and b.since_trial >= self._probe_every:
            b.start_trial()
        if not b.trial:
            return b.best
        arm = b.next_arm
        if len(b.history[not arm]) < self._steps:  # alternate until both arms have their steps
            b.next_arm = not arm
        return arm

    def observe(self, batch: int, drafted: bool, ms: float, tokens: int, workload: str = "any") -> None:
        """A decode step of `batch` requests of `workload`, run with drafting on or off, took
        `ms` for `tokens`."""
        if tokens <= 0:
            return
        i = bucket_of(batch)
        b = self._bucket(workload, batch)
        if not b.trial:
            b.since_trial += 1
            return
        b.history[drafted].append((ms, tokens))
        if min(len(h) for h in b.history.values()) < self._steps:
            return
        b.trial = False
        on, off = b.ms_per_token(True), b.ms_per_token(False)
        best = on * self.MARGIN < off
        if best != b.best:
            b.best = best
            if best:
                self.resumes += 1
                log.info(
                    "speculation resumed: drafts on at batch %s of %s (%.1f ms/token with drafts, %.1f without)",
                    bucket_name(i),
                    workload,
                    on,
                    off,
                )
            else:
                self.fallbacks += 1
                log.warning(
                    "speculation fallback: drafts off at batch %s of %s (%.1f ms/token with drafts, %.1f without)",
                    bucket_name(i),
                    workload,
                    on,
                    off,
                )

    def drafting(self) -> dict[str, dict[str, int]]:
        """Per workload and bucket measured so far: 1 if drafts are on."""
        out: dict[str, dict[str, int]] = {}
        for (workload, i), b in sorted(self._buckets.items()):
            out.setdefault(workload, {})[bucket_name(i)] = int(b.best)
        return out
