"""Cache hit rate of environment-session turns: cache-aware routing against round-robin, side by side.

Two `primerl engine --no-router` processes (one core each, prefix caching on), the
env hub in this process running real tool calls, and a router in this process that
switches policy between phases. Each phase publishes fresh first turns of one
environment (`--env`, GRPO groups of `--group-size`) and waits until every session
has finished (its trajectory is out); the env hub builds every later turn from
tokens, so turn t+1's prompt extends turn t's context exactly, the workload where a
global prefix cache should matter most. Phases alternate their order per repeat.

    python -m perf.session_routing_bench --env calculator --groups 6 --group-size 4 --repeats 2

Writes artifacts/session_routing.csv (repeat, policy, sessions, turns, later_turns,
hit_rate_later_turns, hit_rate_first_turns, tokens_per_s, ttfb_p50_ms_later_turns,
wall_s) and artifacts/session_routing.png. Hit rate = vLLM's cached prompt tokens /
prompt tokens, token-level, over the turns named; TTFB = engine enqueue -> first token.
"""

from __future__ import annotations

import argparse
import asyncio
import uuid
from pathlib import Path

import msgspec
from aiokafka import AIOKafkaConsumer
from prometheus_client import CollectorRegistry

from perf.common import ARTIFACTS, percentile, write_csv
from perf.routing_bench import start_engines, with_suppress_kill
from perf.workload import wait_workers
from plumbing.config import Config, RoutingPolicy, load_config
from plumbing.infra import infra_for_run
from plumbing.kafka import Publisher, consumer_kwargs
from plumbing.model_store import resolve_model
from plumbing.redis_client import connect_redis
from plumbing.runtime import run, setup_logging
from primerl.embedded import publish_prompts, start_stage
from primerl.observe import RunObserver
from primerl.settings import RunSettings
from primerl.tasks import make_task
from router.router import Router
from schemas import Completion, Trajectory, decode
from schemas.topics import TRAJECTORIES


class Row(msgspec.Struct):
    """One policy in one repeat."""

    repeat: int
    policy: str
    sessions: int
    turns: int
    later_turns: int
    hit_rate_later_turns: float
    hit_rate_first_turns: float
    tokens_per_s: float
    ttfb_p50_ms_later_turns: float
    wall_s: float


def hit_rate(cs: list[Completion]) -> float:
    """Token-level: cached prompt tokens over prompt tokens, one entry per request (not per sample)."""
    firsts = {c.request_id: c for c in cs}.values()
    return sum(c.cached_prompt_tokens for c in firsts) / max(1, sum(c.prompt_tokens for c in firsts))


async def wait_trajectories(cfg: Config, run_id: str, count: int, timeout_s: float) -> list[Trajectory]:
    """Read rollout.trajectories from the start until `count` of `run_id`'s sessions finished."""
    consumer = AIOKafkaConsumer(TRAJECTORIES.name, **consumer_kwargs(cfg, f"observer-{uuid.uuid4().hex[:8]}"))
    await consumer.start()
    found: dict[str, Trajectory] = {}
    try:

        async def collect() -> None:
            while len(found) < count:
                for records in (await consumer.getmany(timeout_ms=500)).values():
                    for r in records:
                        t = decode(r.value or b"", Trajectory, list(r.headers or ()))
                        if t.run_id == run_id:
                            found[t.id] = t

        await asyncio.wait_for(collect(), timeout_s)
    finally:
        await consumer.stop()
    return list(found.values())


async def phase(cfg: Config, args: argparse.Namespace, repeat: int, policy: RoutingPolicy, tokenizer: object) -> Row:
    """One policy: a fresh batch of sessions, routed by `policy`, until all finished."""
    run_id = f"sess-{policy}-{repeat}-{uuid.uuid4().hex[:6]}"
    task = make_task(RunSettings(task=args.env, max_tokens=args.max_tokens, heldout=1))
    observer = RunObserver(cfg, run_id)
    await observer.start()
    redis = connect_redis(cfg)
    async with Publisher(cfg) as pub:
        router = Router(cfg, pub, redis, tokenizer, CollectorRegistry(), policy=policy)
        routing = asyncio.create_task(router.run())
        await asyncio.wait_for(router.runner.assigned.wait(), 60)
        # Fresh instances per phase (the seed): no phase reuses another's cached turns.
        reqs = task.train(
            run_id, 0, args.groups, args.group_size, args.seed + 1000 * repeat + (policy == "cache_aware")
        )
        t0 = await publish_prompts(cfg, reqs)
        trajectories = await wait_trajectories(cfg, run_id, args.groups * args.group_size, args.timeout_s)
        wall = max(t.completion.timings.finished_at for t in trajectories) - t0
        router.stop()
        await routing
    await redis.aclose()
    await observer.stop()
    finals = observer.finals()
    later = [c for c in finals if c.turn_index > 0]
    first = [c for c in finals if c.turn_index == 0]
    return Row(
        repeat=repeat,
        policy=policy,
        sessions=len(trajectories),
        turns=len({c.request_id for c in finals}),
        later_turns=len(later),
        hit_rate_later_turns=hit_rate(later),
        hit_rate_first_turns=hit_rate(first),
        tokens_per_s=sum(len(c.token_ids) for c in finals) / wall,
        ttfb_p50_ms_later_turns=percentile(
            [(c.timings.first_token_at - c.timings.enqueued_at) * 1000 for c in later], 50
        ),
        wall_s=wall,
    )


async def bench(args: argparse.Namespace) -> list[Row]:
    """Every (repeat, policy) phase, engines and env hub shared."""
    cfg = load_config()
    log_dir = Path(args.log_dir)
    log_dir.mkdir(parents=True, exist_ok=True)
    rows: list[Row] = []
    async with infra_for_run(cfg) as cfg:
        from transformers import AutoTokenizer

        from envhub.service import serve_envhub

        procs = start_engines(cfg, log_dir)
        redis = connect_redis(cfg, socket_timeout=None, socket_connect_timeout=None)
        hub_task = None
        try:
            print("starting two engine workers (one core each) and the env hub...", flush=True)
            await wait_workers(redis, cfg, lambda: all(p.poll() is None for p in procs))
            hub_task, hub = await start_stage(serve_envhub, cfg)
            await asyncio.wait_for(hub.ready.wait(), 120)
            tokenizer = AutoTokenizer.from_pretrained(resolve_model(cfg.engine.model))
            for repeat in range(args.repeats):
                order: tuple[RoutingPolicy, RoutingPolicy] = (
                    ("round_robin", "cache_aware") if repeat % 2 == 0 else ("cache_aware", "round_robin")
                )
                for policy in order:
                    row = await phase(cfg, args, repeat, policy, tokenizer)
                    rows.append(row)
                    print(msgspec.json.encode(row).decode(), flush=True)
            hub.stop()
            await hub_task
        finally:
            if hub_task is not None and not hub_task.done():
                hub_task.cancel()
            for p in procs:
                with_suppress_kill(p)
            await redis.aclose()
    return rows


def plot(rows: list[Row], path: Path) -> None:
    """Hit rate of later turns and of first turns, per policy and repeat."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.6))
    for ax, field, title in (
        (axes[0], "hit_rate_later_turns", "turns >= 1 (extend a session)"),
        (axes[1], "hit_rate_first_turns", "first turns (GRPO groups)"),
    ):
        for policy in ("round_robin", "cache_aware"):
            mine = [r for r in rows if r.policy == policy]
            ax.plot([r.repeat for r in mine], [getattr(r, field) for r in mine], "o-", label=policy)
        ax.set_title(title)
        ax.set_xlabel("repeat")
        ax.set_ylabel("prefix-cache hit rate (tokens)")
        ax.set_ylim(0, 1)
        ax.legend()
    fig.suptitle("environment sessions over two engines: cache-aware vs round-robin routing")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--env", default="calculator")
    parser.add_argument("--groups", type=int, default=6)
    parser.add_argument("--group-size", type=int, default=4)
    parser.add_argument("--max-tokens", type=int, default=40)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--timeout-s", type=float, default=1200)
    parser.add_argument("--log-dir", default=str(ARTIFACTS / "session_routing_logs"))
    args = parser.parse_args()
    setup_logging("WARNING")
    rows = run(bench(args))
    write_csv(ARTIFACTS / "session_routing.csv", rows)
    plot(rows, ARTIFACTS / "session_routing.png")
    print(f"wrote {ARTIFACTS}/session_routing.csv and session_routing.png")


if __name__ == "__main__":
    main()
