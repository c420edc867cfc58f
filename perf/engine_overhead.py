"""Pipeline overhead: the same GRPO workload through raw vLLM and through Kafka + engine worker.

Both modes use the same model, engine settings and cores, in one run, alternating
(raw, pipeline, raw, pipeline, ...) so drift hits both. Raw: requests go straight
into the AsyncLLM; TTFB is submission to first output. Pipeline: requests are
published to rollout.prompts; TTFB is publish to the first chunk read back from
rollout.completion-chunks by an outside consumer, so it includes both Kafka hops.

    python -m perf.engine_overhead --prompts 16 --group-size 4 --max-tokens 64 --repeats 2

Writes artifacts/engine_overhead.csv and artifacts/engine_overhead.png.
"""

from __future__ import annotations

import argparse
import asyncio
import time
import uuid

import msgspec

from engine_workers.engine import Engine
from engine_workers.requests import build_input
from perf.common import ARTIFACTS, percentile, write_csv
from plumbing.config import Config, load_config
from plumbing.infra import infra_for_run
from plumbing.model_store import resolve_model
from plumbing.runtime import run, setup_logging
from primerl.embedded import publish_prompts, start_stage
from primerl.observe import RunObserver
from primerl.serve import serve_engine
from producers.arithmetic import arithmetic_requests
from schemas import PromptRequest


class Row(msgspec.Struct):
    """One measured mode of one repeat."""

    mode: str
    requests: int
    samples: int
    generated_tokens: int
    tokens_per_s: float
    ttfb_p50_ms: float
    ttfb_p95_ms: float


def _workload(run_id: str, args: argparse.Namespace) -> list[PromptRequest]:
    return arithmetic_requests(run_id, args.prompts, args.group_size, max_tokens=args.max_tokens, seed=1)


async def raw_vllm(cfg: Config, args: argparse.Namespace) -> Row:
    """The workload submitted straight to the engine, all at once."""
    engine = Engine(cfg.engine, resolve_model(cfg.engine.model))
    await engine.start()
    reqs = _workload("raw", args)
    ttfbs: list[float] = []
    tokens = 0

    async def one(req: PromptRequest) -> None:
        nonlocal tokens
        inp = build_input(req, engine.tokenizer, engine.max_model_len)
        t0 = time.perf_counter()
        first = True
        async for step in engine.stream(inp.prompt_token_ids, inp.params, req.id):
            got = sum(len(d.token_ids) for d in step.deltas)
            if got and first:
                ttfbs.append((time.perf_counter() - t0) * 1000)
                first = False
            tokens += got

    try:
        t0 = time.perf_counter()
        await asyncio.gather(*(one(r) for r in reqs))
        wall = time.perf_counter() - t0
    finally:
        engine.shutdown()
    return Row(
        "raw_vllm",
        len(reqs),
        len(reqs) * args.group_size,
        tokens,
        tokens / wall,
        percentile(ttfbs, 50),
        percentile(ttfbs, 95),
    )


async def pipeline(cfg: Config, args: argparse.Namespace) -> Row:
    """The workload published to Kafka and served by an engine worker."""
    serving, worker = await start_stage(serve_engine, cfg)
    run_id = f"bench-{uuid.uuid4().hex[:8]}"
    obs = RunObserver(cfg, run_id)
    await obs.start()
    try:
        await asyncio.wait_for(worker.runner.assigned.wait(), 60)
        await asyncio.wait_for(obs.ready.wait(), 60)
        reqs = _workload(run_id, args)
        t0 = await publish_prompts(cfg, reqs)
        await obs.wait_finals(len(reqs) * args.group_size, timeout_s=1800)
        wall = max(v.final_at for v in obs.requests.values()) - t0
    finally:
        await obs.stop()
        worker.stop()
        await serving
    ttfbs = [(v.first_chunk_at - t0) * 1000 for v in obs.requests.values()]
    tokens = sum(len(c.token_ids) for c in obs.finals())
    return Row(
        "pipeline", len(reqs), len(obs.finals()), tokens, tokens / wall, percentile(ttfbs, 50), percentile(ttfbs, 95)
    )


def plot(rows: list[Row], path: str) -> None:
    """Bars of tokens/s and TTFB p95 per mode and repeat."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(9, 3.5))
    labels = [f"{r.mode}\n#{i // 2 + 1}" for i, r in enumerate(rows)]
    colors = ["tab:gray" if r.mode == "raw_vllm" else "tab:blue" for r in rows]
    a.bar(labels, [r.tokens_per_s for r in rows], color=colors)
    a.set_ylabel("generated tokens/s")
    b.bar(labels, [r.ttfb_p95_ms for r in rows], color=colors)
    b.set_ylabel("TTFB p95 (ms)")
    fig.suptitle("engine worker overhead vs raw vLLM (same model, cores, workload)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


async def main(args: argparse.Namespace) -> list[Row]:
    cfg = load_config()
    cfg = cfg.derive(**{"engine.max_in_flight": max(cfg.engine.max_in_flight, args.prompts)})
    rows: list[Row] = []
    async with infra_for_run(cfg) as cfg:
        for i in range(args.repeats):
            for mode in (raw_vllm, pipeline):
                print(f"[{i + 1}/{args.repeats}] {mode.__name__} ...", flush=True)
                row = await mode(cfg, args)
                print(f"    {row}", flush=True)
                rows.append(row)
    return rows


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--group-size", type=int, default=4)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    setup_logging("WARNING")
    rows = run(main(args))
    write_csv(ARTIFACTS / "engine_overhead.csv", rows)
    plot(rows, str(ARTIFACTS / "engine_overhead.png"))
    raw = [r for r in rows if r.mode == "raw_vllm"]
    pipe = [r for r in rows if r.mode == "pipeline"]
    ratio = sum(p.tokens_per_s for p in pipe) / sum(r.tokens_per_s for r in raw)
    print(
        f"pipeline/raw tokens/s = {ratio:.3f}; TTFB p95 raw {[round(r.ttfb_p95_ms) for r in raw]} "
        f"pipeline {[round(p.ttfb_p95_ms) for p in pipe]}"
    )
