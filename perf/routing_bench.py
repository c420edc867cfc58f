"""Round-robin vs cache-aware routing over two engine workers, side by side in one run.

Two `primerl engine --no-router` processes, pinned one core each (taskset +
VLLM_CPU_OMP_THREADS_BIND), prefix caching on in both; a router in this process
switches policy between phases. Per context size (512, 1024, 2048 tokens) both
policies run the same kind of workload on fresh text (no phase profits from another's
cache), within one policy version:

- multi-turn agentic sessions: every turn extends the previous turn's whole context
  (its prompt + the real answer + a new tool message) and is sent once the previous
  turn finished;
- GRPO groups of G=8 sent as 8 separate requests under a shared system prompt.

    python -m perf.routing_bench --sessions 4 --turns 4 --groups 2 --contexts 512,1024,2048

Writes artifacts/routing_bench.csv (context, policy, requests, tokens_per_s,
ttfb_p50_ms, ttfb_p95_ms, e2e_p95_ms, cache_hit_rate, load_max_over_mean),
artifacts/routing_bench_predictions.csv and artifacts/routing_bench.png.
TTFB is publish -> first chunk seen by a client; the hit rate is vLLM's cached prompt
tokens over prompt tokens; load_max_over_mean is over requests served per worker.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import subprocess
import time
import uuid
from collections import Counter
from pathlib import Path

import msgspec
from prometheus_client import CollectorRegistry
from tqdm import tqdm

from perf.common import ARTIFACTS, percentile, write_csv
from perf.workload import ROOT, Shape, Workload, engine_command, engine_env, pinned, wait_workers
from plumbing.config import Config, RoutingPolicy, load_config
from plumbing.infra import infra_for_run
from plumbing.kafka import Publisher
from plumbing.model_store import resolve_model
from plumbing.redis_client import connect_redis
from plumbing.runtime import run, setup_logging
from primerl.observe import RunObserver
from router.router import Router
from schemas import Completion, PromptRequest
from schemas.topics import PROMPTS


class Row(msgspec.Struct):
    """One policy at one context size."""

    context: int
    policy: str
    requests: int
    tokens_per_s: float
    ttfb_p50_ms: float
    ttfb_p95_ms: float
    e2e_p95_ms: float
    cache_hit_rate: float
    load_max_over_mean: float


class Predictions(msgspec.Struct):
    """How often the router's expected hits were real (cache-aware only)."""

    context: int
    policy: str
    routed_as_hits: int
    hits_that_missed: int
    missed_share: float


class Phase:
    """One policy at one context size: its workload, publish times and results."""

    def __init__(
        self, cfg: Config, pub: Publisher, obs: RunObserver, context: int, seed: int, args: argparse.Namespace
    ) -> None:
        self.cfg, self.pub, self.obs, self.context, self.args = cfg, pub, obs, context, args
        shape = Shape(context, args.sessions, args.turns, args.groups, args.group_size, args.max_tokens)
        self.workload = Workload(shape, obs.run_id, seed)
        self.published: dict[str, float] = {}
        self.bar = tqdm(total=shape.requests, desc=f"{context} tok", leave=False)

    async def _send(self, req: PromptRequest) -> str:
        self.published[req.id] = time.time()
        await self.pub.publish(PROMPTS.name, req, key=req.routing_key())
        while req.id not in self.obs.requests or not self.obs.requests[req.id].finals:
            await asyncio.sleep(0.02)
        self.bar.update()
        return self.obs.requests[req.id].finals[0].text

    async def run(self) -> tuple[float, list[Completion]]:
        wall = await self.workload.run(self._send)
        self.bar.close()
        return wall, self.obs.finals()


def summarise(
    context: int, policy: str, wall_s: float, finals: list[Completion], phase: Phase
) -> tuple[Row, Predictions]:
    """The CSV rows of one phase."""
    ttfb = [(phase.obs.requests[c.request_id].first_chunk_at - phase.published[c.request_id]) * 1000 for c in finals]
    e2e = [(phase.obs.requests[c.request_id].final_at - phase.published[c.request_id]) * 1000 for c in finals]
    per_worker = Counter(c.worker_id for c in finals)
    loads = list(per_worker.values()) + [0] * (2 - len(per_worker))
    hits = [c for c in finals if c.route is not None and c.route.predicted_cached_tokens > 0]
    missed = [c for c in hits if c.cached_prompt_tokens < c.route.predicted_cached_tokens]  # type: ignore[union-attr]
    row = Row(
        context=context,
        policy=policy,
        requests=len(finals),
        tokens_per_s=sum(len(c.token_ids) for c in finals) / wall_s,
        ttfb_p50_ms=percentile(ttfb, 50),
        ttfb_p95_ms=percentile(ttfb, 95),
        e2e_p95_ms=percentile(e2e, 95),
        cache_hit_rate=sum(c.cached_prompt_tokens for c in finals) / max(1, sum(c.prompt_tokens for c in finals)),
        load_max_over_mean=max(loads) / (sum(loads) / len(loads)),
    )
    return row, Predictions(context, policy, len(hits), len(missed), len(missed) / len(hits) if hits else 0.0)


def start_engines(cfg: Config, log_dir: Path) -> list[subprocess.Popen[bytes]]:
    """Two engine workers, one core each, no embedded router."""
    procs = []
    for core in (0, 1):
        cmd, env = pinned(core, engine_command(), {**engine_env(cfg), "PRIMERL_METRICS__PORT": "0"})
        with open(log_dir / f"engine-{core}.log", "wb") as out:
            procs.append(
                subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
            )
    return procs


async def bench(args: argparse.Namespace) -> None:
    """Run every (context, policy) phase and write the artifacts."""
    cfg = load_config()
    log_dir = Path(args.log_dir)
    log_dir.mkdir(parents=True, exist_ok=True)
    async with infra_for_run(cfg) as cfg:
        procs = start_engines(cfg, log_dir)
        redis = connect_redis(cfg, socket_timeout=None, socket_connect_timeout=None)
        try:
            print("starting two engine workers (one core each)...", flush=True)
            await wait_workers(redis, cfg, lambda: all(p.poll() is None for p in procs))
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(resolve_model(cfg.engine.model))
            rows, preds = [], []
            async with Publisher(cfg) as pub:
                for i, context in enumerate(args.contexts):
                    policies: tuple[RoutingPolicy, ...] = (
                        ("round_robin", "cache_aware") if i % 2 == 0 else ("cache_aware", "round_robin")
                    )
                    for j, policy in enumerate(policies):
                        obs = RunObserver(cfg, f"route-{policy}-{context}-{uuid.uuid4().hex[:6]}")
                        await obs.start()
                        router = Router(cfg, pub, redis, tokenizer, CollectorRegistry(), policy=policy)
                        routing = asyncio.create_task(router.run())
                        await asyncio.wait_for(router.runner.assigned.wait(), 60)
                        phase = Phase(cfg, pub, obs, context, seed=args.seed + 10 * i + j, args=args)
                        wall, finals = await phase.run()
                        router.stop()
                        await routing
                        await obs.stop()
                        row, pred = summarise(context, policy, wall, finals, phase)
                        rows.append(row)
                        preds.append(pred)
                        print(msgspec.json.encode(row).decode(), flush=True)
        finally:
            for p in procs:
                with_suppress_kill(p)
            await redis.aclose()
    rows.sort(key=lambda r: (r.context, r.policy != "round_robin"))
    write_csv(ARTIFACTS / "routing_bench.csv", rows)
    write_csv(ARTIFACTS / "routing_bench_predictions.csv", preds)
    plot(rows, ARTIFACTS / "routing_bench.png")
    print(f"wrote {ARTIFACTS}/routing_bench.csv, routing_bench_predictions.csv, routing_bench.png")


def with_suppress_kill(p: subprocess.Popen[bytes]) -> None:
    """SIGTERM the engine's process group (vLLM's children with it), SIGKILL if it lingers."""
    try:
        os.killpg(p.pid, signal.SIGTERM)
        p.wait(30)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def plot(rows: list[Row], path: Path) -> None:
    """Four panels: tokens/s, TTFB p95, hit rate and load balance by context, per policy."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 4, figsize=(16, 3.8))
    panels = [
        ("tokens_per_s", "generated tokens/s"),
        ("ttfb_p95_ms", "TTFB p95 (ms)"),
        ("cache_hit_rate", "cache hit rate (vLLM)"),
        ("load_max_over_mean", "load max/mean"),
    ]
    for ax, (field_name, title) in zip(axes, panels, strict=True):
        for policy in ("round_robin", "cache_aware"):
            pts = [(r.context, getattr(r, field_name)) for r in rows if r.policy == policy]
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=policy)
        ax.set_title(title)
        ax.set_xlabel("context tokens")
        ax.set_xscale("log", base=2)
    axes[0].legend()
    fig.suptitle("Two engine workers (1 core each), SmolLM2-135M on vllm-cpu: round-robin vs cache-aware routing")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    """CLI of the benchmark."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sessions", type=int, default=4)
    p.add_argument("--turns", type=int, default=4)
    p.add_argument("--groups", type=int, default=2)
    p.add_argument("--group-size", type=int, default=8)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--contexts", type=lambda s: [int(x) for x in s.split(",")], default=[512, 1024, 2048])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--log-dir", default=str(ROOT / ".primerl" / "logs" / "routing_bench"))
    args = p.parse_args()
    setup_logging("WARNING")
    run(bench(args))


if __name__ == "__main__":
    main()
