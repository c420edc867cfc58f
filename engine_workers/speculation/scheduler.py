"""vLLM's scheduler with grammar-aware drafts and a fallback that switches drafting off where it loses.

Runs in vLLM's engine-core process (`AsyncEngineArgs(scheduler_cls=...)`); settings come
from PRIMERL_SPEC_* environment variables set by engine.py before the process spawns,
and counters go to the JSON file PRIMERL_SPEC_STATS (read by the worker for /metrics).

Per request and step, after the grammar has accepted the step's tokens:
1. forced: tokens that are the grammar mask's only choice (keys and punctuation of a
   JSON schema, the answer tag): always accepted, verified k at a time in one forward
   pass instead of one pass per token;
2. n-gram: continuations of the request's last tokens found in its siblings' outputs
   (running samples of the same prompt), earlier finished rounds of the prompt, and
   the prompt itself;
then vLLM's `validate_tokens` cuts the draft at the first token the grammar rejects.

Fallback: a draft costs a verification slot and wins only when accepted. All drafts
stop while the batch exceeds PRIMERL_SPEC_MAX_BATCH; a source whose acceptance over
the last window falls below PRIMERL_SPEC_MIN_ACCEPTANCE stops and is probed again
after PRIMERL_SPEC_PROBE_EVERY steps.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections import deque
from typing import Any

from vllm.v1.core.sched.scheduler import Scheduler

from engine_workers.speculation.drafts import RoundsCache, forced_tokens, ngram_draft

log = logging.getLogger("primerl.speculation")


def _common_prefix(a: Any, b: Any) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


class _Source:
    """Drafted/accepted counts of one draft source, with a sliding window for decisions."""

    def __init__(self, window: int) -> None:
        self.drafted = 0
        self.accepted = 0
        self.recent: deque[tuple[int, int]] = deque(maxlen=window)
        self.on = True
        self.off_at = 0  # step it was switched off

    def observe(self, drafted: int, accepted: int) -> None:
        self.drafted += drafted
        self.accepted += accepted
        if drafted:
            self.recent.append((drafted, accepted))

    def recent_acceptance(self) -> float | None:
        d = sum(x for x, _ in self.recent)
        return sum(a for _, a in self.recent) / d if d >= 16 else None


class GrammarSpecScheduler(Scheduler):
    """vLLM's Scheduler; drafts for every running request come from `_draft`."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        env = os.environ
        self._min_acceptance = float(env.get("PRIMERL_SPEC_MIN_ACCEPTANCE", "0.3"))
        self._max_batch = int(env.get("PRIMERL_SPEC_MAX_BATCH", "16"))
        self._probe_every = int(env.get("PRIMERL_SPEC_PROBE_EVERY", "50"))
        self._stats_path = env.get("PRIMERL_SPEC_STATS", "")
        window = int(env.get("PRIMERL_SPEC_WINDOW", "64"))
        self._forced = _Source(window)
        self._ngram = _Source(window)
        self._rounds = RoundsCache()
        self._pending: dict[str, tuple[int, int]] = {}  # req id -> (forced, ngram) drafted for this step
        self._forced_emitted = 0
        self._generated = 0
        self._steps = 0
        self._fallbacks = 0
        self._resumes = 0
        self._batch_off = False
        self._stats_at = 0.0
        self._step_s = {"drafts": deque(maxlen=window), "plain": deque(maxlen=window)}
        self._step_started = 0.0
        self._bitmask: Any = None

    # --- drafts ---------------------------------------------------------------------------

    def update_draft_token_ids(self, draft_token_ids: Any) -> None:
        """Replace the (empty) worker drafts with ours, grammar-validated."""
        self._decide()
        for req_id in draft_token_ids.req_ids:
            request = self.requests.get(req_id)
            if request is None or request.is_finished() or request.is_prefill_chunk:
                continue
            if self._batch_off:
                request.spec_token_ids = []
                continue
            forced, ngram = self._draft(request)
            drafts = self.structured_output_manager.validate_tokens(request, forced + ngram)
            n_forced = min(len(forced), len(drafts))
            request.spec_token_ids = drafts
            self._pending[req_id] = (n_forced, len(drafts) - n_forced)

    def _draft(self, request: Any) -> tuple[list[int], list[int]]:
        k = self.num_spec_tokens
        forced: list[int] = []
        if self._forced.on and request.structured_output_request is not None:
            grammar = request.structured_output_request.grammar
            matcher = getattr(grammar, "matcher", None)
            if matcher is not None:
                if self._bitmask is None:
                    import xgrammar

                    self._bitmask = xgrammar.allocate_token_bitmask(1, grammar.vocab_size)
                forced = forced_tokens(matcher, self._bitmask, k)
        ngram: list[int] = []
        if self._ngram.on and len(forced) < k:
            context = list(request.all_token_ids) + forced
            key = hash(tuple(request.prompt_token_ids or ()))
            siblings = [list(r.output_token_ids) for r in self.running
                        if r.request_id != request.request_id and r.prompt_token_ids == request.prompt_token_ids]
            sources = siblings + self._rounds.get(key) + [list(request.prompt_token_ids or ())]
            ngram = ngram_draft(context, sources, k - len(forced))
        return forced, ngram

    # --- outcomes and fallback ------------------------------------------------------------

    def update_from_output(self, scheduler_output: Any, model_runner_output: Any) -> Any:
        """Count accepted drafts per source before vLLM applies the step."""
        now = time.perf_counter()
        drafted_any = bool(scheduler_output.scheduled_spec_decode_tokens)
        if self._step_started:
            self._step_s["drafts" if drafted_any else "plain"].append(now - self._step_started)
        sampled = model_runner_output.sampled_token_ids
        index = model_runner_output.req_id_to_index
        for req_id, spec in scheduler_output.scheduled_spec_decode_tokens.items():
            n_forced, n_ngram = self._pending.pop(req_id, (0, len(spec)))
            n_forced = min(n_forced, len(spec))
            n_ngram = min(n_ngram, len(spec) - n_forced)
            if req_id not in index or not sampled:
                continue
            # Accepted drafts are the leading sampled tokens equal to them (a rejected
            # draft is replaced by a different, recovered token; a finished request
            # has no bonus token, so the count cannot come from the length alone).
            accepted = _common_prefix(spec, sampled[index[req_id]])
            self._forced.observe(n_forced, min(accepted, n_forced))
            self._ngram.observe(n_ngram, max(0, accepted - n_forced))
            self._forced_emitted += min(accepted, n_forced)
        if sampled:
            self._generated += sum(len(t) for t in sampled)
        out = super().update_from_output(scheduler_output, model_runner_output)
        self._steps += 1
        self._step_started = time.perf_counter()
        self._write_stats(force=not self.running)  # idle: make the final counts visible now
        return out

    def _free_request(self, request: Any, *args: Any, **kwargs: Any) -> Any:
        """Keep a finished sample's output as a draft source for later rounds of its prompt."""
        if request.output_token_ids:
            self._rounds.add(hash(tuple(request.prompt_token_ids or ())), list(request.output_token_ids))
        self._pending.pop(request.request_id, None)
        return super()._free_request(request, *args, **kwargs)

    def _decide(self) -> None:
        """Switch drafting off where it loses, back on to probe.

        A batch above PRIMERL_SPEC_MAX_BATCH stops all drafts (each verified position
        is real compute on a CPU; measured: batch 32 lost with drafts accepted 86 %);
        low windowed acceptance stops a source, which is probed again later.
        """
        batch = len(self.running)
        too_big = batch > self._max_batch
        if too_big != self._batch_off:
            self._batch_off = too_big
            if too_big:
                self._fallbacks += 1
                log.warning("speculation fallback: all drafts off (batch %d > %d)", batch, self._max_batch)
            else:
                self._resumes += 1
                log.info("speculation resumed: batch %d <= %d", batch, self._max_batch)
        for name, source in (("n-gram", self._ngram), ("forced", self._forced)):
            acc = source.recent_acceptance()
            if source.on and acc is not None and acc < self._min_acceptance:
                source.on = False
                source.off_at = self._steps
                self._fallbacks += 1
                log.warning("speculation fallback: %s drafts off (acceptance %.2f < %.2f)", name, acc, self._min_acceptance)
            elif not source.on and self._steps - source.off_at >= self._probe_every:
                source.on = True
                source.recent.clear()  # judge the probe on fresh evidence
                self._resumes += 1
                log.info("speculation resumed: %s drafts on to probe", name)

    def stats(self) -> dict[str, float]:
        """Counters since start (also written to PRIMERL_SPEC_STATS)."""
        mean = {k: (sum(v) / len(v) if v else 0.0) for k, v in self._step_s.items()}
        return {
            "forced_drafted": self._forced.drafted, "forced_accepted": self._forced.accepted,
            "ngram_drafted": self._ngram.drafted, "ngram_accepted": self._ngram.accepted,
            "forced_emitted": self._forced_emitted, "generated": self._generated, "steps": self._steps,
            "fallbacks": self._fallbacks, "resumes": self._resumes,
            "ngram_on": int(self._ngram.on and not self._batch_off), "forced_on": int(self._forced.on and not self._batch_off),
            "step_ms_with_drafts": mean["drafts"] * 1000, "step_ms_plain": mean["plain"] * 1000,
        }

    def _write_stats(self, force: bool = False) -> None:
        now = time.monotonic()
        if not self._stats_path or (now - self._stats_at < 0.5 and not force):
            return
        self._stats_at = now
        tmp = f"{self._stats_path}.tmp"
        with open(tmp, "w") as f:
            json.dump(self.stats(), f)
        os.replace(tmp, self._stats_path)
