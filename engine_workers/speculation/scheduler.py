"""vLLM's scheduler with grammar-aware drafts that are proposed only where they pay.

Runs in vLLM's engine-core process (`AsyncEngineArgs(scheduler_cls=...)`). Settings
come from `additional_config["primerl_speculation"]` (set by engine.py); counters go
to the JSON file named there (read by the worker for /metrics).

After each step, for each running request (drafts.py):
1. forced: where the grammar forces the next characters (a JSON key with its quotes and
   colon, a closing tag), their tokens in the tokenizer's own split, each as likely as
   the model has taken that forced token so far;
2. n-gram: otherwise, the continuation that most matches of the request's last tokens
   agree on, in its running siblings (samples of the same prompt), earlier finished
   outputs of the same grammar (or, without one, of the same prompt) and its prompt,
   among the tokens the grammar accepts.
A draft grows while the probability that all of it is accepted stays above the
break-even acceptance of the current batch, fitted from measured step times per
batch size (step_cost.py): drafts are long at batch 1 and only near-certain at batch 32.

Fallback, logged as "speculation fallback", per workload (the grammar most running
requests follow, or free text): a source whose acceptance over its recent drafts falls
below the break-even (or the configured minimum) is switched off; it comes back on when
the batch shrinks enough for its last acceptance to pay again, or after `probe_every`
steps to be measured afresh. And per batch size, drafting as a whole stays on only
where steps with drafts emit tokens clearly faster than steps without, timed in paired
trials (draft_switch.py), which also prices what the linear fit misses.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import time
import zlib
from collections import Counter, deque
from collections.abc import Callable, Hashable
from typing import Any, cast

from vllm.v1.core.sched.scheduler import Scheduler

from engine_workers import vllm_patches
from engine_workers.speculation.draft_switch import DraftSwitch
from engine_workers.speculation.drafts import FORCED, NGRAM, OutputsCache, propose
from engine_workers.speculation.step_cost import StepCost

log = logging.getLogger("primerl.speculation")

CONFIG_KEY = "primerl_speculation"


def _common_prefix(a: Any, b: Any) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


class _Source:
    """Drafted/accepted counts of one draft source, with a sliding window for decisions."""

    def __init__(self, name: str, window: int) -> None:
        self.name = name
        self.drafted = 0
        self.accepted = 0
        self.recent: deque[tuple[int, int]] = deque(maxlen=window)
        self.on = True
        self.off_at = 0  # step it was switched off
        self.off_acceptance = 0.0  # its recent acceptance then

    def observe(self, drafted: int, accepted: int) -> None:
        self.drafted += drafted
        self.accepted += accepted
        if drafted:
            self.recent.append((drafted, accepted))

    def recent_acceptance(self) -> float | None:
        d = sum(x for x, _ in self.recent)
        return sum(a for _, a in self.recent) / d if d >= 16 else None


class GrammarSpecScheduler(Scheduler):
    """vLLM's Scheduler; drafts for every running request come from `drafts.propose`."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        vllm_patches.apply(vllm_patches.ENGINE_CORE)  # the engine core asks `propose_drafts` directly
        # vLLM types additional_config `dict | SupportsHash`; engine_workers/engine.py passes a dict.
        cfg = dict(cast(dict[str, Any], self.vllm_config.additional_config or {})).get(CONFIG_KEY, {})
        # Written by engine_workers/engine.py from EngineConfig, whose defaults are the only ones.
        self._min_acceptance = float(cfg["min_acceptance"])
        self._probe_every = int(cfg["probe_every"])
        self._stats_path = str(cfg["stats_path"])
        self._cost = StepCost(float(cfg["fixed_ms"]), float(cfg["per_token_ms"]))
        self._window = int(cfg.get("window", 64))
        self._sources: dict[str, dict[str, _Source]] = {}  # workload -> draft source -> its record
        self._by_prompt = OutputsCache()
        self._by_grammar = OutputsCache(keys=64, per_key=32)
        self._keys: dict[str, tuple[int, Hashable | None]] = {}  # req id -> (prompt key, grammar key)
        self._pending: dict[str, list[str]] = {}  # req id -> source of each draft token of this step
        self._forced_emitted = 0
        self._generated = 0
        self._mask_checked = 0  # emitted tokens of structured requests, checked against their grammar
        self._mask_accepted = 0
        self._steps = 0
        self._fallbacks = 0
        self._resumes = 0
        self._break_even = 0.0
        self._line = self._cost.line(1)  # (fixed ms, ms per token) of the current batch's fit
        self._stats_at = 0.0
        self._step_started = 0.0
        self._switch = DraftSwitch(probe_every=self._probe_every * 4)
        self._drafting = True  # decided after a step, for the next one
        self._step_drafting = True  # what the step being run got
        self._timed: tuple[int, bool, int, str] | None = None  # last decode step: batch, drafting, tokens, workload
        self._workload = "free text"  # of the step being run: what most running requests follow
        self._encode = self._forced_text_encoder()
        self._forced_seen: dict[int, tuple[int, int]] = {}  # forced token -> (accepted, verified)

    # --- drafts ---------------------------------------------------------------------------

    def update_draft_token_ids(self, draft_token_ids: Any) -> None:
        """Replace the (empty) worker drafts with ours (where vLLM still fetched them)."""
        self.propose_drafts()

    def propose_drafts(self) -> None:
        """Set the next step's drafts of every running request (called after each step)."""
        self._workload = self._running_workload()
        self._decide()
        self._drafting = self._switch.choose(len(self.running), self._workload)
        if not self._drafting:
            return
        records = self._sources_of(self._workload)
        forced_on, ngram_on = records[FORCED].on, records[NGRAM].on
        siblings: dict[int, list[Any]] = {}
        for r in self.running:
            siblings.setdefault(self._key(r)[0], []).append(r)
        for request in self.running:
            if request.is_finished() or request.is_prefill_chunk:
                continue
            req_id = request.request_id
            prompt_key, grammar_key = self._key(request)
            sources = [r.output_token_ids for r in siblings.get(prompt_key, ()) if r is not request]
            sources += self._by_grammar.get(grammar_key) if grammar_key is not None else self._by_prompt.get(prompt_key)
            sources.append(request.prompt_token_ids or [])
            so = request.structured_output_request
            matcher = getattr(so.grammar, "matcher", None) if so is not None else None
            drafts = propose(
                request.all_token_ids,
                sources,
                self.num_spec_tokens,
                self._break_even,
                matcher=matcher,
                encode=self._encode,
                forced=forced_on,
                ngram=ngram_on,
                learned=self._forced_prob,
            )
            request.spec_token_ids = [d.token for d in drafts]
            self._pending[req_id] = [d.source for d in drafts]

    def _forced_text_encoder(self) -> Callable[[str], tuple[int, ...]] | None:
        """Text -> token ids with the engine's tokenizer, cached: forced texts (JSON keys,
        closing tags) recur in every output of a grammar."""
        tokenizer = getattr(self.structured_output_manager, "tokenizer", None)
        if tokenizer is None:
            return None

        @functools.lru_cache(maxsize=4096)
        def encode(text: str) -> tuple[int, ...]:
            return tuple(tokenizer.encode(text, add_special_tokens=False))

        return encode

    def _forced_prob(self, token: int, prior: float) -> float:
        """P(the model writes forced `token`): its acceptance so far, the prior worth 4 drafts
        (`":` is nearly always taken, `":"` mostly not: the model splits it `":` + `"Bob`)."""
        accepted, verified = self._forced_seen.get(token, (0, 0))
        return (accepted + 4 * prior) / (verified + 4)

    def _running_workload(self) -> str:
        """The grammar most running requests follow (kind and a short stable hash), or free text."""
        counts = Counter(self._key(r)[1] for r in self.running)
        if not counts:
            return self._workload
        key = counts.most_common(1)[0][0]
        if key is None:
            return "free text"
        kind = getattr(key[0], "name", str(key[0])).lower() if isinstance(key, tuple) else "grammar"
        return f"{kind} {zlib.crc32(repr(key).encode()):08x}"

    def _key(self, request: Any) -> tuple[int, Hashable | None]:
        key = self._keys.get(request.request_id)
        if key is None:
            so = request.structured_output_request
            key = (hash(tuple(request.prompt_token_ids or ())), so.structured_output_key if so is not None else None)
            self._keys[request.request_id] = key
        return key

    # --- outcomes and fallback ------------------------------------------------------------

    def schedule(self, *args: Any, **kwargs: Any) -> Any:
        """Time steps: the cost fit from here to the end of `update_from_output`, the draft
        switch from one schedule to the next (drafting and output handling count too)."""
        now = time.perf_counter()
        if self._timed is not None:
            batch, drafting, tokens, workload = self._timed
            self._switch.observe(batch, drafting, (now - self._step_started) * 1000, tokens, workload)
        self._step_started, self._timed, self._step_drafting = now, None, self._drafting
        return super().schedule(*args, **kwargs)

    def update_from_output(self, scheduler_output: Any, model_runner_output: Any) -> Any:
        """Count accepted drafts per source and feed the step-cost fit, before vLLM applies the step."""
        sampled = model_runner_output.sampled_token_ids
        index = model_runner_output.req_id_to_index
        for req_id, spec in scheduler_output.scheduled_spec_decode_tokens.items():
            labels = self._pending.pop(req_id, [NGRAM] * len(spec))[: len(spec)]
            if req_id not in index or not sampled:
                continue
            # Accepted drafts are the leading sampled tokens equal to them (a rejected
            # draft is replaced by a different, recovered token; a finished request
            # has no bonus token, so the count cannot come from the length alone).
            accepted = _common_prefix(spec, sampled[index[req_id]])
            for name, source in self._sources_of(self._workload).items():  # the workload they were drafted for
                source.observe(labels.count(name), labels[:accepted].count(name))
            # Each forced draft up to the first rejection was verified (the ones after it were not).
            for i, (token, label) in enumerate(zip(spec[: accepted + 1], labels, strict=False)):
                if label == FORCED:
                    ok, n = self._forced_seen.get(token, (0, 0))
                    self._forced_seen[token] = (ok + (i < accepted), n + 1)
            self._forced_emitted += labels[:accepted].count(FORCED)
        if sampled:
            self._generated += sum(len(t) for t in sampled)
            self._check_mask(sampled, index)
        out = super().update_from_output(scheduler_output, model_runner_output)
        if self._observe_cost(scheduler_output) and self.running:  # a decode step the next one follows at once
            self._timed = (
                len(scheduler_output.num_scheduled_tokens),
                self._step_drafting,
                sum(len(t) for t in sampled),
                self._workload,
            )
        self._steps += 1
        self._write_stats(force=not self.running)  # idle: make the final counts visible now
        return out

    def _observe_cost(self, scheduler_output: Any) -> bool:
        """Decode-only steps feed the fit (a prompt chunk would mix in prefill cost); True for one."""
        n_reqs = len(scheduler_output.num_scheduled_tokens)
        tokens = scheduler_output.total_num_scheduled_tokens
        drafts = sum(len(s) for s in scheduler_output.scheduled_spec_decode_tokens.values())
        if not (self._step_started and n_reqs and tokens == n_reqs + drafts):
            return False
        self._cost.observe(n_reqs, tokens, (time.perf_counter() - self._step_started) * 1000)
        return True

    def _check_mask(self, sampled: list[list[int]], index: dict[str, int]) -> None:
        """Count the step's tokens of structured requests that their grammar accepts (the
        accepted-mask ratio, which must stay 1.00), before vLLM advances the matchers."""
        for req_id, i in index.items():
            request = self.requests.get(req_id)
            so = request.structured_output_request if request is not None else None
            matcher = getattr(so.grammar, "matcher", None) if so is not None else None
            if matcher is None or not sampled[i]:
                continue
            ok = 0
            for token in sampled[i]:
                if matcher.is_terminated():
                    break  # tokens after the grammar's end are not emitted
                self._mask_checked += 1
                if not matcher.accept_token(token):
                    break
                ok += 1
            self._mask_accepted += ok
            if ok:
                matcher.rollback(ok)

    def _free_request(self, request: Any, *args: Any, **kwargs: Any) -> Any:
        """Keep a finished sample's output as a draft source for later samples of its prompt and grammar."""
        prompt_key, grammar_key = self._key(request)
        if request.output_token_ids:
            output = list(request.output_token_ids)
            self._by_prompt.add(prompt_key, output)
            if grammar_key is not None:
                self._by_grammar.add(grammar_key, output)
        self._pending.pop(request.request_id, None)
        self._keys.pop(request.request_id, None)
        return super()._free_request(request, *args, **kwargs)

    def _sources_of(self, workload: str) -> dict[str, _Source]:
        """The draft sources' records for one workload: n-gram drafts that fail on free text
        say nothing about JSON records."""
        sources = self._sources.get(workload)
        if sources is None:
            sources = self._sources[workload] = {name: _Source(name, self._window) for name in (FORCED, NGRAM)}
        return sources

    def _decide(self) -> None:
        """Switch a source of the running workload off where its acceptance no longer pays,
        back on where it does."""
        batch = len(self.running)
        self._line = self._cost.line(batch)
        self._break_even = self._cost.break_even(batch)
        floor = max(self._min_acceptance, self._break_even)
        for source in self._sources_of(self._workload).values():
            acc = source.recent_acceptance()
            if source.on and acc is not None and acc < floor:
                source.on, source.off_at, source.off_acceptance = False, self._steps, acc
                self._fallbacks += 1
                log.warning(
                    "speculation fallback: %s drafts off at batch %d of %s (acceptance %.2f < %.2f: break-even "
                    "%.2f at %.0f ms + %.1f ms/token, minimum %.2f)",
                    source.name,
                    batch,
                    self._workload,
                    acc,
                    floor,
                    self._break_even,
                    *self._line,
                    self._min_acceptance,
                )
            elif not source.on and (source.off_acceptance >= floor or self._steps - source.off_at >= self._probe_every):
                source.on = True
                source.recent.clear()  # judge it on fresh evidence
                self._resumes += 1
                log.info(
                    "speculation resumed: %s drafts on at batch %d of %s (break-even %.2f)",
                    source.name,
                    batch,
                    self._workload,
                    self._break_even,
                )

    def stats(self) -> dict[str, Any]:
        """Counters since start (also written to the stats file)."""
        totals = {
            f"{name}_{field}": sum(getattr(sources[name], field) for sources in self._sources.values())
            for name in (FORCED, NGRAM)
            for field in ("drafted", "accepted")
        }
        return {
            **totals,
            "forced_emitted": self._forced_emitted,
            "generated": self._generated,
            "steps": self._steps,
            "grammar_tokens": self._mask_checked,
            "grammar_tokens_accepted": self._mask_accepted,
            "fallbacks": self._fallbacks + self._switch.fallbacks,
            "resumes": self._resumes + self._switch.resumes,
            "drafting_by_batch": self._switch.drafting(),
            "sources_on": {w: {name: int(r.on) for name, r in sources.items()} for w, sources in self._sources.items()},
            "break_even": self._break_even,
            "step_fixed_ms": self._line[0],
            "step_per_token_ms": self._line[1],
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
