"""`primerl up`: the embedded default run on one machine."""

from __future__ import annotations

import asyncio
import contextlib
import statistics
import time
import uuid

from plumbing.config import Config
from plumbing.infra import infra_for_run
from primerl.console import RunConsole
from primerl.embedded import publish_prompts, start_stage
from primerl.observe import RunObserver
from primerl.serve import serve_engine
from producers.arithmetic import arithmetic_requests


async def engine_demo(
    cfg: Config, prompts: int, group_size: int, max_tokens: int, keep: bool = False, console: RunConsole | None = None
) -> int:
    """Servers, one engine worker, a GRPO batch through it; prints per-request figures.

    Returns the process exit code (0 when every expected completion arrived).
    """
    console = console or RunConsole()
    async with contextlib.AsyncExitStack() as stack:
        with console.wait("starting the local broker and Redis"):
            served = await stack.enter_async_context(infra_for_run(cfg, keep))
        return await _engine_demo(served, prompts, group_size, max_tokens, console)


async def _engine_demo(cfg: Config, prompts: int, group_size: int, max_tokens: int, console: RunConsole) -> int:
    run_id = cfg.run_id if cfg.run_id != "default" else f"up-{uuid.uuid4().hex[:8]}"
    with console.wait("starting the engine (vLLM)"):
        serving, worker = await start_stage(serve_engine, cfg)
    observer = RunObserver(cfg, run_id)
    await observer.start()
    try:
        await asyncio.wait_for(worker.runner.assigned.wait(), 60)
        batch = arithmetic_requests(run_id, prompts, group_size, max_tokens=max_tokens)
        t0 = await publish_prompts(cfg, batch)
        expected = prompts * group_size
        with console.wait("completions", total=expected) as progress:
            seen = 0
            while seen < expected:
                await asyncio.sleep(0.2)
                if serving.done():
                    serving.result()
                    break
                seen = len(observer.finals())
                progress(seen)
                if time.time() - t0 > 1800:
                    break
        wall = time.time() - t0
    finally:
        await observer.stop()
        worker.stop()
        await serving
    finals = observer.finals()
    tokens = sum(len(c.token_ids) for c in finals)
    console.note(
        f"{'request':34s} {'samples':>7s} {'ttfb_ms':>8s} {'engine_ttfb_ms':>14s} {'tokens':>6s} {'cached/prompt':>13s}"
    )
    ttfbs = []
    for req in batch:
        view = observer.requests.get(req.id)
        if view is None:
            console.note(f"{req.id:34s} {'0':>7s} {'-':>8s}")
            continue
        ttfb = (view.first_chunk_at - t0) * 1000
        ttfbs.append(ttfb)
        any_final = next(iter(view.finals.values()), None)
        cache = f"{any_final.cached_prompt_tokens}/{any_final.prompt_tokens}" if any_final else "-"
        # As the engine saw it: from the record's enqueue time to its first token.
        engine_ttfb = (
            min((c.timings.first_token_at - c.timings.enqueued_at) * 1000 for c in view.finals.values())
            if view.finals
            else float("nan")
        )
        tokens_req = sum(len(c.token_ids) for c in view.finals.values())
        console.note(
            f"{req.id:34s} {len(view.finals):>7d} {ttfb:>8.0f} {engine_ttfb:>14.0f} {tokens_req:>6d} {cache:>13s}"
        )
    console.note(
        f"run {run_id}: {len(finals)}/{expected} completions, "
        f"{tokens} tokens in {wall:.1f}s = {tokens / wall:.1f} tokens/s; "
        f"TTFB p50 {statistics.median(ttfbs) if ttfbs else float('nan'):.0f} ms"
    )
    return 0 if len(finals) == expected else 1
