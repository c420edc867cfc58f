"""The whole prime stack against its own baseline, and both against the raw engines, in one run.

Stacks (each W=2 engine workers, `primerl engine --no-router`, pinned one core each with
taskset + VLLM_CPU_OMP_THREADS_BIND, engine prefix caching on in all):

- baseline: speculation off, a `primerl router --policy round_robin`;
- prime: grammar-aware speculation on (`engine.speculation`), `primerl router --policy cache_aware`;
- raw: the upper bound, the same requests sent straight to two offline engines in this
  process (engine_workers/engine.py's AsyncLLM wrapper, configured as prime's engines,
  one per core), each session and group kept on one engine, with no Kafka, router or
  verifier.

A pipeline cell publishes to rollout.prompts; the router, the engines and a `primerl
verifier` process do the rest. What is measured is what a client sees: TTFB is publish
-> the first chunk on rollout.completion-chunks; the end-to-end latency is publish ->
the sample's reward on rollout.rewards (verified and signed); tokens/s is the generated
tokens of rewarded samples over the cell's wall time; the hit rate is vLLM's cached
prompt tokens over prompt tokens (as perf/routing_bench.py computes it); the acceptance
rate is the prime engines' draft tokens accepted over drafted during the cell (read from
their /metrics before and after). The workload is perf/workload.py's: multi-turn
sessions, GRPO groups of G=8 as separate requests under a shared system prompt, a share
of JSON tool calls under a schema (where speculation's forced tokens pay).

Why two resident engine sets rather than restarting the engines between cells:
speculation is an engine start-up setting (its scheduler class and speculative config
are engine arguments, engine_workers/engine.py), and starting two pinned engines takes
~40-90 s on this machine, which at two switches per context and repeat would be most of
the run. So the baseline and prime sets run side by side, each with its own broker,
Redis, router and verifier (topic and consumer-group names are fixed, so two sets on one
broker would serve each other's requests); two engine processes share each core, and
only one set has work at a time (a pause between cells lets vLLM's busy-polling readers
of the idle set go quiet, and the idle set runs at nice 19, `--idle-nice`). A session's
next turn goes out on its previous turn's completion, as the env hub sends turns
(`--turn-after`); perf_requests.csv has each request's times and worker. The raw cells
run first, before the pipeline sets start: six engines at once do not fit in 24 GiB
(one engine is ~2.4 GiB + its KV cache). They run again on fresh engines after the
pipeline sets stop (`--raw-after`, their repeats numbered on), so the raw bound is the
mean over both ends of the run and the drift between them is printed: this VM's speed
moves between runs by more than most levers (raw at 2,048 made 18.5-26 tok/s).

Cells: raw (context x repeat), then per context and repeat baseline, prime, baseline,
prime, ..., then raw again; a cell's text is drawn from a seed of its context and repeat, so the three
stacks get the same prompts, and no engine sees the same text twice (no cell profits
from another's cache). Each engine set first serves an unrecorded warm-up phase.

    python -m perf.bench_matrix --contexts 512,1024,2048,4096,8192 --repeats 2
    python -m perf.bench_matrix --smoke      # or: primerl bench --smoke

Writes artifacts/perf_results.csv (smoke: sample_perf_results.csv), perf_matrix.png
(smoke: sample_perf_matrix.png) and metrics.txt (smoke: sample_metrics.txt, every
process's /metrics with a `process` label); prints the per-cell table and the ratios.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import os
import socket
import sys
import time
import uuid
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import msgspec
import psutil
from prometheus_client import CollectorRegistry
from prometheus_client import Counter as PromCounter
from prometheus_client import Histogram as PromHistogram
from prometheus_client.parser import text_string_to_metric_families
from redis.asyncio import Redis
from tqdm import tqdm

from perf.common import ARTIFACTS, percentile, write_csv
from perf.scrape import scrape, write_scrape
from perf.stack import Stack, StackSettings, Stage, process_tree
from perf.workload import ROOT, Shape, Workload, engine_command, pinned, wait_workers
from plumbing.config import MetricsConfig
from plumbing.redis_client import connect_redis
from plumbing.runtime import run, setup_logging
from schemas import PromptRequest
from schemas.topics import PROMPTS

if TYPE_CHECKING:
    from primerl.observe import RequestView

PIPELINE = ("baseline", "prime")
COLUMNS = (
    "context,speculation,global_cache,tokens_per_s,ttfb_ms,p95_ms,cache_hit_rate,stack,repeat,requests,"
    "ttfb_p95_ms,load_max_over_mean,acceptance_rate"
).split(",")
# The research notes' floors, at 2,048 tokens and above.
TARGETS = {"tokens_per_s": 1.5, "ttfb": 0.69, "p95": 0.77, "prime_hit_rate": 0.78, "raw_fraction": 0.9}


@dataclass(frozen=True)
class StackSpec:
    """What a stack switches on."""

    speculation: bool
    policy: str  # the router's policy ("" for raw: sessions and groups stay on one engine)
    global_cache: str  # cache-aware routing over every engine's prefix cache


def stacks(prime_speculation: bool = True) -> dict[str, StackSpec]:
    """The stacks; `prime_speculation=False` is the routing-only ablation (`--prime-speculation off`)."""
    return {
        "baseline": StackSpec(False, "round_robin", "off"),
        "prime": StackSpec(prime_speculation, "cache_aware", "on"),
        "raw": StackSpec(prime_speculation, "", "sticky"),  # configured as prime's engines
    }


STACKS = stacks()


def specs_of(args: argparse.Namespace) -> dict[str, StackSpec]:
    """The stacks as `args` configure them."""
    return stacks(getattr(args, "prime_speculation", "on") == "on")


class Row(msgspec.Struct):
    """One cell: a stack at a context size, one repeat. Field order = the CSV's columns."""

    context: int
    speculation: str
    global_cache: str
    tokens_per_s: float
    ttfb_ms: float  # median
    p95_ms: float  # end to end (publish -> reward; raw: submit -> last token)
    cache_hit_rate: float
    stack: str
    repeat: int
    requests: int
    ttfb_p95_ms: float
    load_max_over_mean: float
    acceptance_rate: float  # NaN where speculation is off


class Ratios(msgspec.Struct):
    """Prime over baseline at one context (means over repeats), and the pipelines' share of raw."""

    context: int
    tokens_per_s: float
    ttfb: float
    p95: float
    hit_rate: float
    prime_hit_rate: float
    baseline_hit_rate: float
    raw_fraction: float  # prime tokens/s over raw tokens/s
    baseline_raw_fraction: float


@dataclass(frozen=True)
class Cell:
    """One stack at one context, one repeat; `seed` draws its text."""

    stack: str
    context: int
    repeat: int
    seed: int


@dataclass
class Sample:
    """One request as the client saw it (Unix seconds)."""

    sent: float
    first: float
    done: float
    tokens: int
    prompt_tokens: int
    cached_tokens: int
    worker: str
    final: float = 0.0  # the completion seen (pipeline); raw: = done
    kind: str = ""  # "turn N" of a session, or "group"


class RequestRow(msgspec.Struct):
    """One request of one cell (perf_requests.csv): where its time went, seconds from the cell's start."""

    stack: str
    context: int
    repeat: int
    kind: str
    worker: str
    sent_s: float
    first_s: float
    final_s: float
    done_s: float
    tokens: int
    prompt_tokens: int
    cached_tokens: int


def request_rows(cell: Cell, samples: Sequence[Sample]) -> list[RequestRow]:
    t0 = min((s.sent for s in samples), default=0.0)
    return [
        RequestRow(
            cell.stack,
            cell.context,
            cell.repeat,
            s.kind,
            s.worker,
            s.sent - t0,
            s.first - t0,
            (s.final or s.done) - t0,
            s.done - t0,
            s.tokens,
            s.prompt_tokens,
            s.cached_tokens,
        )
        for s in sorted(samples, key=lambda s: s.sent)
    ]


def kind_of(req: PromptRequest) -> str:
    return f"turn {req.turn_index}" if req.session_id else "group" if req.group_id else "single"


def cell_seed(base: int, context: int, repeat: int) -> int:
    """The text seed of (context, repeat): shared by the stacks, distinct across cells of one stack."""
    return base * 1_000_003 + context * 101 + repeat


def cell_order(
    contexts: Sequence[int], repeats: int, raw: bool = True, seed: int = 0, raw_after: bool = False
) -> list[Cell]:
    """Every cell in run order: raw first (see the module doc), then baseline and prime interleaved;
    with `raw_after`, the raw cells once more at the end (repeats numbered on from `repeats`, the
    same text, on engines started afresh), so the raw bound spans the pipeline cells' time."""
    first = [Cell("raw", c, r, cell_seed(seed, c, r)) for c in contexts for r in range(repeats)] if raw else []
    cells = first + [
        Cell(stack, c, r, cell_seed(seed, c, r)) for c in contexts for r in range(repeats) for stack in PIPELINE
    ]
    if raw and raw_after:
        cells += [Cell("raw", c.context, c.repeat + repeats, c.seed) for c in first]
    return cells


def raw_drift(rows: Sequence[Row], repeats: int) -> dict[int, tuple[float, float]]:
    """Per context, the raw cells' mean tokens/s before the pipeline cells and after them."""
    out = {}
    for context in sorted({r.context for r in rows if r.stack == "raw"}):
        raw = [r for r in rows if r.stack == "raw" and r.context == context and r.requests]
        before, after = [r for r in raw if r.repeat < repeats], [r for r in raw if r.repeat >= repeats]
        if before and after:
            out[context] = (_mean(before, "tokens_per_s"), _mean(after, "tokens_per_s"))
    return out


def summarise(
    cell: Cell, samples: Sequence[Sample], acceptance: float, workers: int = 2, spec: StackSpec | None = None
) -> Row:
    """A cell's row from its finished samples (`spec`: the cell's stack, default as in STACKS)."""
    spec = spec or STACKS[cell.stack]
    nan = float("nan")
    if not samples:
        return Row(cell.context, _onoff(spec.speculation), spec.global_cache, 0.0, nan, nan, nan, cell.stack,
                   cell.repeat, 0, nan, nan, acceptance)  # fmt: skip
    wall = max(s.done for s in samples) - min(s.sent for s in samples)
    ttfb = [(s.first - s.sent) * 1000 for s in samples]
    e2e = [(s.done - s.sent) * 1000 for s in samples]
    per_worker = Counter(s.worker for s in samples)
    loads = list(per_worker.values()) + [0] * max(0, workers - len(per_worker))
    return Row(
        context=cell.context,
        speculation=_onoff(spec.speculation),
        global_cache=spec.global_cache,
        tokens_per_s=sum(s.tokens for s in samples) / wall if wall > 0 else nan,
        ttfb_ms=percentile(ttfb, 50),
        p95_ms=percentile(e2e, 95),
        cache_hit_rate=sum(s.cached_tokens for s in samples) / max(1, sum(s.prompt_tokens for s in samples)),
        stack=cell.stack,
        repeat=cell.repeat,
        requests=len(samples),
        ttfb_p95_ms=percentile(ttfb, 95),
        load_max_over_mean=max(loads) / (sum(loads) / len(loads)),
        acceptance_rate=acceptance,
    )


def _onoff(flag: bool) -> str:
    return "on" if flag else "off"


def _mean(rows: Sequence[Row], name: str) -> float:
    values = [getattr(r, name) for r in rows if not math.isnan(getattr(r, name))]
    return sum(values) / len(values) if values else float("nan")


def _ratio(a: float, b: float) -> float:
    return a / b if b and not math.isnan(a) and not math.isnan(b) else float("nan")


def ratios(rows: Sequence[Row]) -> list[Ratios]:
    """Per context: prime over baseline of the means over repeats; each pipeline's tokens/s over raw's."""
    out = []
    for context in sorted({r.context for r in rows}):
        by = {s: [r for r in rows if r.context == context and r.stack == s and r.requests] for s in STACKS}
        if not by["prime"] or not by["baseline"]:
            continue
        p, b, raw = (
            {k: _mean(by[s], k) for k in ("tokens_per_s", "ttfb_ms", "p95_ms", "cache_hit_rate")}
            for s in ("prime", "baseline", "raw")
        )
        out.append(
            Ratios(
                context=context,
                tokens_per_s=_ratio(p["tokens_per_s"], b["tokens_per_s"]),
                ttfb=_ratio(p["ttfb_ms"], b["ttfb_ms"]),
                p95=_ratio(p["p95_ms"], b["p95_ms"]),
                hit_rate=_ratio(p["cache_hit_rate"], b["cache_hit_rate"]),
                prime_hit_rate=p["cache_hit_rate"],
                baseline_hit_rate=b["cache_hit_rate"],
                raw_fraction=_ratio(p["tokens_per_s"], raw["tokens_per_s"]),
                baseline_raw_fraction=_ratio(b["tokens_per_s"], raw["tokens_per_s"]),
            )
        )
    return out


def meets(r: Ratios) -> dict[str, bool]:
    """Which of the research notes' targets `r` reaches (they apply at 2,048 tokens and above)."""
    return {
        "tokens_per_s": r.tokens_per_s >= TARGETS["tokens_per_s"],
        "ttfb": r.ttfb <= TARGETS["ttfb"],
        "p95": r.p95 <= TARGETS["p95"],
        "prime_hit_rate": r.prime_hit_rate >= TARGETS["prime_hit_rate"],
        "raw_fraction": r.raw_fraction >= TARGETS["raw_fraction"],
    }


def table(rows: Sequence[msgspec.Struct]) -> str:
    """Rows of one Struct type as an aligned text table."""
    if not rows:
        return "(no rows)"
    fields = list(type(rows[0]).__struct_fields__)
    cells = [[_fmt(getattr(r, f)) for f in fields] for r in rows]
    widths = [max(len(f), *(len(c[i]) for c in cells)) for i, f in enumerate(fields)]
    lines = ["  ".join(f.rjust(w) for f, w in zip(fields, widths, strict=True))]
    lines += ["  ".join(c.rjust(w) for c, w in zip(row, widths, strict=True)) for row in cells]
    return "\n".join(lines)


def _fmt(v: object) -> str:
    if isinstance(v, float):
        return "nan" if math.isnan(v) else f"{v:.3f}" if abs(v) < 100 else f"{v:.0f}"
    return str(v)


def spec_counters(text: str) -> tuple[float, float]:
    """(drafted, accepted) draft tokens in one /metrics page (summed over sources)."""
    drafted = accepted = 0.0
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            if s.name == "primerl_spec_drafted_tokens_total":
                drafted += s.value
            elif s.name == "primerl_spec_accepted_tokens_total":
                accepted += s.value
    return drafted, accepted


def acceptance(before: tuple[float, float], after: tuple[float, float]) -> float:
    """Accepted over drafted between two counter readings (NaN when nothing was drafted)."""
    drafted = after[0] - before[0]
    return (after[1] - before[1]) / drafted if drafted > 0 else float("nan")


class CpuRow(msgspec.Struct):
    """CPU seconds one process tree used during one cell (perf_cpu.csv): where the cores went."""

    stack: str
    context: int
    repeat: int
    process: str
    wall_s: float
    cpu_s: float
    core_share: float  # cpu_s over wall_s x the cores the bench runs on


def cpu_seconds(pids: dict[str, tuple[int, bool]]) -> dict[str, float]:
    """User + system CPU seconds so far of each named process, with its descendants where the
    flag says so (an engine's engine core; not the bench's own children, counted by name)."""
    out: dict[str, float] = {}
    for name, (pid, tree) in pids.items():
        total = 0.0
        procs = process_tree(pid) if tree else [psutil.Process(pid)]
        for p in procs:
            try:
                t = p.cpu_times()
                total += t.user + t.system
            except psutil.Error:
                pass  # gone meanwhile: its time is lost to both snapshots alike
        out[name] = total
    return out


def cpu_rows(cell: Cell, before: dict[str, float], after: dict[str, float], wall_s: float, cores: int) -> list[CpuRow]:
    return [
        CpuRow(
            cell.stack,
            cell.context,
            cell.repeat,
            name,
            wall_s,
            after[name] - before.get(name, 0.0),
            (after[name] - before.get(name, 0.0)) / (wall_s * cores),
        )  # fmt: skip
        for name in sorted(after)
    ]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class BenchMetrics:
    """This process's own /metrics: what the client saw, per stack."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        buckets = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 40, 80, 160, 320)
        self.ttfb = PromHistogram(
            "primerl_bench_ttfb_seconds", "Publish -> first chunk", ["stack"], buckets=buckets, registry=self.registry
        )
        self.latency = PromHistogram(
            "primerl_bench_latency_seconds",
            "Publish -> reward (raw: submit -> last token)",
            ["stack"],
            buckets=buckets,
            registry=self.registry,
        )
        self.tokens = PromCounter(
            "primerl_bench_generated_tokens", "Generated tokens of finished samples", ["stack"], registry=self.registry
        )
        self.failed = PromCounter(
            "primerl_bench_failed_requests", "Requests with no reward in time", ["stack"], registry=self.registry
        )

    def observe(self, stack: str, s: Sample) -> None:
        self.ttfb.labels(stack).observe(s.first - s.sent)
        self.latency.labels(stack).observe(s.done - s.sent)
        self.tokens.labels(stack).inc(s.tokens)


class CellRun:
    """The client side of one cell: sends, records samples, ticks the progress bar."""

    def __init__(self, cell: Cell, shape: Shape, metrics: BenchMetrics, timeout_s: float) -> None:
        self.cell, self.shape, self.metrics, self.timeout_s = cell, shape, metrics, timeout_s
        self.samples: list[Sample] = []
        self.pending: set[asyncio.Future[None]] = set()  # rewards still to come after the completion
        self.failed = 0
        self.bar = tqdm(total=shape.requests, desc=f"{cell.stack} {cell.context} r{cell.repeat}", leave=False)

    def done(self, s: Sample) -> None:
        self.samples.append(s)
        self.metrics.observe(self.cell.stack, s)
        self.bar.update()

    async def settle(self) -> None:
        """Until every sent request has its reward or has failed (called once the workload has sent all)."""
        await asyncio.gather(*self.pending)
        self.pending.clear()

    def fail(self, why: str) -> None:
        self.failed += 1
        self.metrics.failed.labels(self.cell.stack).inc()
        tqdm.write(f"  {self.cell.stack} {self.cell.context}: a request failed ({why})")
        self.bar.update()


@dataclass
class PipelineSet:
    """One stack's servers and processes: broker, Redis, router, verifier, two pinned engines."""

    name: str
    spec: StackSpec
    work_dir: Path
    args: argparse.Namespace
    stack: Stack | None = None
    stages: dict[str, Stage] = field(default_factory=dict)
    ports: dict[str, int] = field(default_factory=dict)
    run_id: str = ""
    observer: Any = None
    publisher: Any = None
    redis: Redis | None = None

    async def start(self) -> None:
        """Servers now; the processes start here and are waited for in `ready`."""
        a = self.args
        self.run_id = f"bench-{self.name}-{uuid.uuid4().hex[:6]}"
        self.stack = Stack(
            StackSettings(
                run_id=self.run_id,
                work_dir=self.work_dir,
                engine_max_in_flight=a.max_in_flight,
                extra_env={
                    "VLLM_CPU_KVCACHE_SPACE": str(a.kv_cache_gib),
                    "PRIMERL_ENGINE__KV_CACHE_GIB": str(a.kv_cache_gib),
                    "PRIMERL_ENGINE__SPECULATION": str(self.spec.speculation).lower(),
                    "PRIMERL_LOG_LEVEL": "INFO",
                    **({"PRIMERL_ENGINE__BLOCK_SIZE": str(a.block_size)} if a.block_size else {}),
                },
            )
        )
        await self.stack.start_servers()
        env = self.stack.stage_env()
        common = ["--state-dir", str(self.stack.state_dir)]
        base = [sys.executable, "-m", "primerl"]
        cmds: dict[str, tuple[str, list[str], dict[str, str]]] = {
            "router": ("router", [*base, "router", "--policy", self.spec.policy, *common], env),
            "verifier": ("verifier", [*base, "verifier", *common], env),
        }
        for core in (0, 1):
            cmd, e = pinned(core, engine_command(common), env)
            cmds[f"engine-{core}"] = ("engine", cmd, e)
        for name, (kind, cmd, e) in cmds.items():
            self.ports[name] = free_port()
            log_dir = self.stack.log_dir / name
            log_dir.mkdir(parents=True, exist_ok=True)
            self.stages[name] = Stage(kind, [*cmd, "--metrics-port", str(self.ports[name])], e, log_dir)
            self.stages[name].start()

    async def ready(self, timeout_s: float = 600) -> None:
        """Every process up and the engines holding every rollout.routed partition; observer and publisher on."""
        from plumbing.kafka import Publisher
        from primerl.observe import RunObserver

        assert self.stack is not None and self.stack.cfg is not None
        cfg = self.stack.cfg
        deadline = time.monotonic() + timeout_s
        while not all([st.check_ready() for st in self.stages.values()]):
            for name, st in self.stages.items():
                if not st.alive():
                    raise RuntimeError(f"{self.name} {name} exited during start-up:\n{st.log_tail()}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"{self.name}: not ready after {timeout_s}s")
            await asyncio.sleep(1)
        self.redis = connect_redis(cfg, socket_timeout=None, socket_connect_timeout=None)
        await wait_workers(self.redis, cfg, lambda: all(st.alive() for st in self.stages.values()))
        self.observer = RunObserver(cfg, self.run_id, with_rewards=True)
        await self.observer.start()
        await asyncio.wait_for(self.observer.ready.wait(), 60)
        self.publisher = Publisher(cfg)
        await self.publisher.start()

    def targets(self) -> dict[str, str]:
        return {f"{self.name}-{n}": f"http://127.0.0.1:{p}/metrics" for n, p in self.ports.items()}

    def pids(self) -> dict[str, tuple[int, bool]]:
        """This set's process trees by name (`baseline-engine-0`, `prime-broker`, ...), for the CPU accounting."""
        out = {f"{self.name}-{n}": (st.proc.pid, True) for n, st in self.stages.items() if st.proc is not None}
        if self.stack is not None:
            for n, server in (("broker", self.stack.broker), ("redis", self.stack.redis)):
                if server is not None:
                    out[f"{self.name}-{n}"] = (server.pid, True)
        return out

    def renice(self, nice: int) -> bool:
        """Every process of this set at `nice`: the idle set at 19 while the other set's cell runs
        gives its busy-polling engines and its broker (~7 % of the cores together in the levers run)
        back to the set under test. False where the OS refuses (lowering it again needs root)."""
        ok = True
        for pid, _ in self.pids().values():
            for p in process_tree(pid):
                try:
                    p.nice(nice)
                except psutil.NoSuchProcess:
                    pass
                except psutil.AccessDenied:
                    ok = False
        return ok

    async def spec_counters(self) -> tuple[float, float]:
        """Draft tokens (drafted, accepted) summed over this set's engines."""
        if not self.spec.speculation:
            return 0.0, 0.0
        pages = await asyncio.gather(
            *(asyncio.to_thread(_get, f"http://127.0.0.1:{p}/metrics") for n, p in self.ports.items() if "engine" in n)
        )
        counts = [spec_counters(p) for p in pages]
        return sum(c[0] for c in counts), sum(c[1] for c in counts)

    async def send(self, req: PromptRequest, cell: CellRun) -> str:
        """Publish `req`; return its text once its completion arrived ("" if it failed). Its sample
        is recorded when its reward arrives, which `cell.settle()` waits for.

        The next turn of a session goes out on the completion, as the env hub sends it (it
        consumes rollout.completions; the reward scores the trajectory) and as the raw cells
        do; waiting for the reward instead puts the verifier's two Kafka hops in every turn's
        loop (`--turn-after reward`)."""
        req = msgspec.structs.replace(req, run_id=self.run_id)
        sent = time.time()
        await self.publisher.publish(PROMPTS.name, req, key=req.routing_key())
        deadline = time.monotonic() + cell.timeout_s
        view = await self._wait(req.id, cell, deadline, lambda v: bool(v.finals))
        if view is None:
            return ""
        rewarded = self._record(req, sent, cell, deadline)
        if self.args.turn_after == "reward":
            await rewarded
        else:
            cell.pending.add(asyncio.ensure_future(rewarded))
        return view.finals[0].text

    async def _record(self, req: PromptRequest, sent: float, cell: CellRun, deadline: float) -> None:
        view = await self._wait(req.id, cell, deadline, lambda v: bool(v.rewards and v.finals))
        if view is None:
            return
        final = view.finals[0]
        first = view.first_chunk_at or view.final_at
        tokens, prompt, cached = len(final.token_ids), final.prompt_tokens, final.cached_prompt_tokens
        cell.done(Sample(sent, first, view.reward_at, tokens, prompt, cached, final.worker_id, view.final_at,
                         kind_of(req)))  # fmt: skip

    async def _wait(
        self, req_id: str, cell: CellRun, deadline: float, until: Callable[[RequestView], bool]
    ) -> RequestView | None:
        """The request's view once `until(view)`; None (and the request failed) on a dead letter or the deadline."""
        while True:
            view = self.observer.requests.get(req_id)
            if view is not None and until(view):
                return view
            if view is not None and view.dead:  # no reward will come: fail now, not at the timeout
                cell.fail(f"dead-lettered: {next(iter(view.dead.values()))[:300]}")
                return None
            if time.monotonic() > deadline:
                cell.fail(f"no reward after {cell.timeout_s:.0f}s")
                return None
            await asyncio.sleep(0.05)  # the times come from the observer; this only paces the next turn

    async def stop(self) -> None:
        if self.observer is not None:
            await self.observer.stop()
        if self.publisher is not None:
            await self.publisher.stop()
        if self.redis is not None:
            await self.redis.aclose()
        for st in self.stages.values():
            st.stop(60)
        if self.stack is not None:
            self.stack.stop_servers()


def _get(url: str) -> str:
    import urllib.request

    with urllib.request.urlopen(url, timeout=10) as resp:
        return str(resp.read().decode())


class RawEngines:
    """Two offline engines in this process, one per core, configured as prime's engines."""

    def __init__(self, args: argparse.Namespace, cores: Sequence[int] = (0, 1)) -> None:
        self.args, self.cores = args, cores
        self.spec = specs_of(args)["raw"]
        self.engines: list[Any] = []
        self._home: dict[bytes, int] = {}

    async def start(self) -> None:
        from engine_workers.engine import Engine
        from plumbing.config import EngineConfig
        from plumbing.model_store import resolve_model

        a = self.args
        model = resolve_model(None)
        os.environ["VLLM_CPU_KVCACHE_SPACE"] = str(a.kv_cache_gib)
        for core in self.cores:
            # The engine core is spawned with this process's environment: bind its OpenMP threads to `core`.
            os.environ["VLLM_CPU_OMP_THREADS_BIND"] = str(core)
            cfg = EngineConfig(kv_cache_gib=a.kv_cache_gib, speculation=self.spec.speculation, block_size=a.block_size)
            e = Engine(cfg, model)
            await e.start()
            self.engines.append(e)
        os.environ.pop("VLLM_CPU_OMP_THREADS_BIND", None)

    def spec_counters(self) -> tuple[float, float]:
        stats = [e.speculation_stats() for e in self.engines]
        drafted = sum(s.get("forced_drafted", 0) + s.get("ngram_drafted", 0) for s in stats)
        accepted = sum(s.get("forced_accepted", 0) + s.get("ngram_accepted", 0) for s in stats)
        return float(drafted), float(accepted)

    def _engine_of(self, req: PromptRequest) -> int:
        """A session's turns and a group's samples stay on one engine; new keys alternate."""
        key = req.routing_key()
        if key not in self._home:
            self._home[key] = len(self._home) % len(self.engines)
        return self._home[key]

    async def send(self, req: PromptRequest, cell: CellRun) -> str:
        from engine_workers.requests import build_input
        from plumbing.prompts import BadRequest

        i = self._engine_of(req)
        engine = self.engines[i]
        sent = time.time()
        try:
            inp = build_input(req, engine.tokenizer, engine.max_model_len)
        except BadRequest as err:
            cell.fail(str(err))
            return ""
        first, tokens, text, cached = 0.0, 0, [], 0
        async for step in engine.stream(inp.prompt_token_ids, inp.params, req.id):
            for d in step.deltas:
                if d.token_ids and not first:
                    first = time.time()
                tokens += len(d.token_ids)
                text.append(d.text)
            cached = max(cached, step.num_cached_tokens)
        done = time.time()
        prompt = len(inp.prompt_token_ids)
        cell.done(Sample(sent, first or done, done, tokens, prompt, cached, str(i), done, kind_of(req)))
        return "".join(text)

    def shutdown(self) -> None:
        for e in self.engines:
            e.shutdown()
        self.engines = []


def model_max_len() -> int:
    """The served model's context (max_position_embeddings of its config; 8,192 for SmolLM2)."""
    import json

    from plumbing.model_store import resolve_model

    return int(json.loads((Path(resolve_model(None)) / "config.json").read_text())["max_position_embeddings"])


def shape_for(args: argparse.Namespace, context: int) -> Shape:
    """A cell's traffic: `--turns` per session, or as many as the context leaves room for."""
    return Shape(
        context=context,
        sessions=args.sessions,
        turns=args.turns,
        groups=args.groups,
        group_size=args.group_size,
        max_tokens=args.max_tokens,
        structured_share=args.structured_share,
        tasks=True,
    ).fitted(args.max_model_len)


async def run_cell(
    cell: Cell,
    args: argparse.Namespace,
    metrics: BenchMetrics,
    target: Any,
    pids: dict[str, tuple[int, bool]] | None = None,
    cpu: list[CpuRow] | None = None,
    requests: list[RequestRow] | None = None,
) -> Row:
    """One cell on `target` (a PipelineSet or RawEngines); with `pids`, the CPU each of those
    process trees used during the cell goes into `cpu`; each request's times go into `requests`."""
    await asyncio.sleep(args.pause_s)  # the idle engines' busy-polling readers go quiet first
    shape = shape_for(args, cell.context)
    cr = CellRun(cell, shape, metrics, args.request_timeout_s)
    before = await target.spec_counters() if isinstance(target, PipelineSet) else target.spec_counters()
    cpu_before, t_start = cpu_seconds(pids or {}), time.monotonic()
    await Workload(shape, f"{cell.stack}-{cell.context}-{cell.repeat}", cell.seed).run(lambda r: target.send(r, cr))
    await cr.settle()
    if pids and cpu is not None:
        cpu += cpu_rows(cell, cpu_before, cpu_seconds(pids), time.monotonic() - t_start, len(os.sched_getaffinity(0)))
    await asyncio.sleep(0.5)  # the engines' metrics / stats files catch up
    after = await target.spec_counters() if isinstance(target, PipelineSet) else target.spec_counters()
    cr.bar.close()
    if requests is not None:
        requests += request_rows(cell, cr.samples)
    spec = target.spec
    row = summarise(cell, cr.samples, acceptance(before, after) if spec.speculation else float("nan"), spec=spec)
    tqdm.write(
        f"{cell.stack:>8} {cell.context:>5} r{cell.repeat}: {row.tokens_per_s:6.1f} tok/s  TTFB {row.ttfb_ms:7.0f} ms"
        f"  p95 {row.p95_ms:7.0f} ms  hit {row.cache_hit_rate:.3f}  acc {row.acceptance_rate:.2f}"
        f"  {row.requests}/{shape.requests} req" + (f" ({cr.failed} failed)" if cr.failed else "")
    )
    return row


async def warm_up(args: argparse.Namespace, metrics: BenchMetrics, target: Any, name: str) -> None:
    """An unrecorded small phase: consumer groups joined, grammars compiled, the draft switch's first steps."""
    shape = Shape(256, sessions=1, turns=2, groups=1, group_size=args.group_size, max_tokens=args.max_tokens,
                  structured_share=0.5 if args.structured_share else 0.0, tasks=True)  # fmt: skip
    cr = CellRun(Cell(name, 256, -1, -1), shape, metrics, args.request_timeout_s)
    cr.bar.set_description(f"warm-up {name}")
    await Workload(shape, f"warmup-{name}", seed=-1 - len(name)).run(lambda r: target.send(r, cr))
    await cr.settle()
    cr.bar.close()
    if cr.failed:
        raise RuntimeError(f"{name}: {cr.failed} warm-up requests got no reward; see the logs")


async def bench(args: argparse.Namespace) -> list[Row]:
    """Every cell of the matrix; writes the artifacts."""
    from plumbing.metrics import serve_metrics

    out = Path(args.out_dir)
    prefix = "sample_" if args.smoke else ""
    work = Path(args.work_dir) / time.strftime("%Y%m%d-%H%M%S")
    metrics = BenchMetrics()
    bench_port = serve_metrics(MetricsConfig(port=0), metrics.registry)
    cells = cell_order(args.contexts, args.repeats, raw=not args.no_raw, seed=args.seed, raw_after=args.raw_after)
    rows: list[Row] = []
    cpu: list[CpuRow] = []
    reqs: list[RequestRow] = []
    t0 = time.time()
    print(f"{len(cells)} cells; logs under {work}", flush=True)

    async def run_raw(window: list[Cell]) -> None:
        """`window`'s raw cells on two offline engines started for it."""
        if not window:
            return
        raw = RawEngines(args)
        print("raw: starting two offline engines (one core each)...", flush=True)
        await raw.start()
        try:
            await warm_up(args, metrics, raw, "raw")
            for cell in window:
                rows.append(await run_cell(cell, args, metrics, raw, {"raw-engines": (os.getpid(), True)}, cpu, reqs))
        finally:
            raw.shutdown()

    await run_raw([c for c in cells if c.stack == "raw" and c.repeat < args.repeats])
    specs = specs_of(args)
    sets = {name: PipelineSet(name, specs[name], work / name, args) for name in PIPELINE}
    try:
        print("pipeline: starting baseline and prime (broker, Redis, router, verifier, 2 engines each)...", flush=True)
        for s in sets.values():
            await s.start()
        for s in sets.values():
            await s.ready()
            await warm_up(args, metrics, s, s.name)
        # Every process of both sets and this one (observer, publisher): where the cores go
        # while a pipeline cell runs, against the raw cells' engines in this process.
        pids = {"bench": (os.getpid(), False), **{k: v for s in sets.values() for k, v in s.pids().items()}}
        for cell in tqdm([c for c in cells if c.stack != "raw"], desc="cells"):
            if args.idle_nice and not all([s.renice(0 if s.name == cell.stack else args.idle_nice)
                                           for s in sets.values()]):  # fmt: skip
                tqdm.write("  could not renice the idle set (lowering it again needs root); --idle-nice 0: off")
            rows.append(await run_cell(cell, args, metrics, sets[cell.stack], pids, cpu, reqs))
        targets = {n: u for s in sets.values() for n, u in s.targets().items()}
        targets["bench"] = f"http://127.0.0.1:{bench_port}/metrics"
        metrics_path = write_scrape(out / f"{prefix}metrics.txt", await scrape(targets))
    finally:
        for s in sets.values():
            await s.stop()
    # The VM's speed drifts over a run (raw 2,048 made 18.5-26 tok/s across runs): the raw bound
    # measured again after the pipeline cells shows how much it moved within this one.
    await run_raw([c for c in cells if c.stack == "raw" and c.repeat >= args.repeats])
    csv_path = out / f"{prefix}perf_results.csv"
    write_csv(csv_path, rows)
    if cpu:
        write_csv(out / f"{prefix}perf_cpu.csv", cpu)
        print(f"\nCPU share of the cores during the cells (mean over cells):\n{cpu_table(cpu)}")
    if reqs:
        write_csv(out / f"{prefix}perf_requests.csv", reqs)
    rs = ratios(rows)
    plot(rows, rs, out / f"{prefix}perf_matrix.png", args)
    print(f"\nper cell ({(time.time() - t0) / 60:.1f} min):\n{table(rows)}")
    print(f"\nprime / baseline (means over repeats), pipelines' share of raw tokens/s:\n{table(rs)}")
    drift = raw_drift(rows, args.repeats)
    if drift:
        print("\nraw tokens/s before the pipeline cells -> after them (the VM's drift during the run):")
        print("\n".join(f"  {c:>5}: {b:6.1f} -> {a:6.1f} ({a / b - 1:+.0%})" for c, (b, a) in drift.items()))
    for r in rs:
        if r.context >= 2048:
            missed = [k for k, ok in meets(r).items() if not ok]
            print(f"targets at {r.context}: " + ("all met" if not missed else "missed " + ", ".join(missed)))
    print(f"wrote {csv_path}, {out / f'{prefix}perf_matrix.png'}, {metrics_path}")
    return rows


def cpu_table(cpu: Sequence[CpuRow]) -> str:
    """Mean core share per (stack of the cell, process), the busiest first within a stack."""
    by: dict[tuple[str, str], list[float]] = {}
    for r in cpu:
        by.setdefault((r.stack, r.process), []).append(r.core_share)
    means = sorted(((st, p, sum(v) / len(v)) for (st, p), v in by.items()), key=lambda t: (t[0], -t[2]))
    return "\n".join(f"  {st:>8} cell: {p:<22} {m:6.1%}" for st, p, m in means if m >= 0.005)


def plot(rows: Sequence[Row], rs: Sequence[Ratios], path: Path, args: argparse.Namespace) -> None:
    """Prime/baseline ratios per context with the targets, absolute hit rates, and the share of raw."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 6, figsize=(22, 3.8))
    xs = [r.context for r in rs]
    panels = [
        ("tokens_per_s", "tokens/s, prime / baseline", TARGETS["tokens_per_s"]),
        ("ttfb", "TTFB (median), prime / baseline", TARGETS["ttfb"]),
        ("p95", "p95 latency, prime / baseline", TARGETS["p95"]),
        ("hit_rate", "cache hit rate, prime / baseline", None),
    ]
    for ax, (name, title, target) in zip(axes, panels, strict=False):
        ax.plot(xs, [getattr(r, name) for r in rs], marker="o", color="C3")
        ax.axhline(1.0, color="grey", lw=0.8)
        if target is not None:
            ax.axhline(target, color="C2", ls="--", lw=1, label=f"target {target}")
            ax.legend()
        ax.set_title(title)
    ax = axes[4]
    for i, stack in enumerate(STACKS):
        pts = sorted({r.context for r in rows if r.stack == stack})
        ax.plot(pts, [_mean([r for r in rows if (r.stack, r.context) == (stack, c)], "cache_hit_rate") for c in pts],
                marker="o", color=f"C{i}", label=stack)  # fmt: skip
    ax.axhline(TARGETS["prime_hit_rate"], color="C2", ls="--", lw=1)
    ax.set_title("cache hit rate (vLLM)")
    ax.legend()
    ax = axes[5]
    ax.plot(xs, [r.raw_fraction for r in rs], marker="o", color="C1", label="prime")
    ax.plot(xs, [r.baseline_raw_fraction for r in rs], marker="o", color="C0", label="baseline")
    ax.axhline(TARGETS["raw_fraction"], color="C2", ls="--", lw=1, label="target 0.9")
    ax.set_title("pipeline tokens/s / raw engines")
    ax.legend()
    for ax in axes:
        ax.set_xlabel("context tokens")
        ax.set_xscale("log", base=2)
    fig.suptitle(
        f"primerl bench: W=2 engines (1 core each), SmolLM2-135M eager fp32 on vllm-cpu; {args.repeats} repeat(s), "
        f"{args.sessions}x{args.turns} session turns + {args.groups}x{args.group_size} group samples per cell"
    )
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


SMOKE = {"contexts": [512, 1024], "repeats": 1, "sessions": 2, "turns": 3, "groups": 1}


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ints = lambda s: [int(x) for x in s.split(",")]  # noqa: E731
    p.add_argument("--smoke", action="store_true", help="a few minutes: 512,1024, 1 repeat, fewer sessions; sample_*")
    p.add_argument("--contexts", type=ints, default=None, help="default 512,1024,2048,4096,8192")
    p.add_argument("--repeats", type=int, default=None, help="default 2 (smoke 1)")
    p.add_argument("--sessions", type=int, default=None, help="multi-turn sessions per cell (default 4, smoke 2)")
    p.add_argument(
        "--turns", type=int, default=None, help="turns per session (default 4, smoke 3; fewer where they do not fit)"
    )
    p.add_argument("--max-model-len", type=int, default=None, help="what a session's last turn must fit (the model's)")
    p.add_argument("--groups", type=int, default=None, help="GRPO groups per cell (default 2, smoke 1)")
    p.add_argument("--group-size", type=int, default=8)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--structured-share", type=float, default=0.5, help="share of sessions and groups asking JSON")
    p.add_argument("--kv-cache-gib", type=int, default=1, help="KV cache per engine (GiB)")
    p.add_argument("--block-size", type=int, default=None, help="KV block of every engine (default: vLLM's, 128)")
    p.add_argument("--max-in-flight", type=int, default=16, help="requests per engine worker at once")
    p.add_argument("--request-timeout-s", type=float, default=600)
    p.add_argument("--pause-s", type=float, default=2.0, help="pause before each cell")
    p.add_argument(
        "--turn-after",
        choices=("completion", "reward"),
        default="completion",
        help="when a session's next turn goes out (the env hub's way: completion)",
    )
    p.add_argument(
        "--idle-nice",
        type=int,
        default=19,
        choices=range(0, 20),
        metavar="0-19",
        help="nice value of the idle engine set during the other's cells (0: off)",
    )
    p.add_argument(
        "--prime-speculation",
        choices=("on", "off"),
        default="on",
        help="off: the routing-only ablation (prime's cache-aware router, prime and raw engines without speculation)",
    )
    p.add_argument("--no-raw", action="store_true", help="skip the raw-engine bound")
    p.add_argument(
        "--raw-after",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="run the raw cells again after the pipeline cells (the bound then spans the whole run)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out-dir", default=str(ARTIFACTS))
    p.add_argument("--work-dir", default=str(ROOT / ".primerl" / "bench"))
    return p


def resolve(args: argparse.Namespace) -> argparse.Namespace:
    """Fill the options not given: the smoke's where --smoke, else the full matrix's."""
    full = {"contexts": [512, 1024, 2048, 4096, 8192], "repeats": 2, "sessions": 4, "turns": 4, "groups": 2}
    for k, v in (SMOKE if args.smoke else full).items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    if args.max_model_len is None:
        args.max_model_len = model_max_len()
    return args


def main(argv: list[str] | None = None) -> None:
    """CLI of the benchmark (also `primerl bench`)."""
    args = resolve(parser().parse_args(argv))
    setup_logging("WARNING")
    run(bench(args))


if __name__ == "__main__":
    main()
