"""Resume vs restart after an engine is SIGKILLed mid-batch (issue 22).

    python -m perf.resume_bench                       # 4 prompts x 2 samples x 512 tokens
    python -m perf.resume_bench --prompts 8 --group-size 4 --max-tokens 1024

One broker, one Redis, one `primerl engine` process at a time (the real engine, SmolLM2-135M,
eager). Long samples: min_tokens = max_tokens, so every sample runs to the length cut.
Four phases, each a fresh batch (prompts tagged per phase, so no phase reuses another's
prefix cache), each starting on a freshly started engine:
- nofail/resume and nofail/restart: the batch runs through; engine.resume on vs off, to
  price resuming when nothing fails (the pointer SET, the GET on each request);
- kill/resume and kill/restart: once half the batch's tokens streamed, the engine's process
  group is SIGKILLed and a new one started; it finishes the redelivered requests by
  resuming them from the chunk log, or by generating them anew.
Reported per phase: tokens acked before the kill, carried over, generated again; the time
to finish the batch (from the first publish, and from the restarted engine's readiness);
generated tokens/s; for resumed samples, whether the final's first tokens and log-probs
are exactly the dead attempt's chunks. CSV and plot to artifacts/resume_bench.{csv,png}.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys
import time
import uuid
from pathlib import Path

import msgspec

from perf.common import ARTIFACTS, write_csv
from perf.stack import Stack, StackSettings
from plumbing.kafka import Publisher
from primerl.observe import RunObserver
from schemas import ChatMessage, CompletionChunk, PromptRequest, SamplingParams
from schemas.topics import PROMPTS

log = logging.getLogger("perf.resume_bench")

TOPICS_OF_STORIES = ["a lighthouse keeper", "a city at night", "a long sea voyage", "a mountain village", "a library"]


class Row(msgspec.Struct):
    phase: str  # nofail or kill
    mode: str  # resume or restart
    repeat: int
    samples: int
    tokens: int  # in the finals
    tokens_before_kill: int  # acked in chunks when the engine died
    tokens_carried: int  # continued from the chunks (resumed_at_token)
    tokens_regenerated: int  # acked before the kill and generated again
    saved_share: float  # carried / before the kill
    prefixes_exact: int  # resumed samples whose tokens and log-probs start with the chunks exactly
    resumed_samples: int
    batch_s: float  # first publish to last final
    after_ready_s: float  # the (re)started engine ready to last final
    gen_tok_s: float  # tokens generated in this phase / batch_s


def _requests(run_id: str, phase: str, args: argparse.Namespace) -> list[PromptRequest]:
    sampling = SamplingParams(temperature=1.0, max_tokens=args.max_tokens, min_tokens=args.max_tokens)
    return [
        PromptRequest(
            run_id=run_id,
            messages=[ChatMessage("user", f"[{phase} {i}] Tell me a long story about {TOPICS_OF_STORIES[i % 5]}.")],
            group_size=args.group_size,
            sampling=sampling,
        )
        for i in range(args.prompts)
    ]


def _first_attempt(chunks: list[CompletionChunk]) -> list[CompletionChunk]:
    if not chunks:
        return []
    first = chunks[0].attempt
    by_seq: dict[int, CompletionChunk] = {}
    for c in chunks:
        if c.attempt == first:
            by_seq.setdefault(c.seq, c)
    return [by_seq[k] for k in sorted(by_seq)]


async def _phase(stack: Stack, obs: RunObserver, mode: str, phase: str, repeat: int, args: argparse.Namespace) -> Row:
    engine = stack.stages["engine"]
    engine.env = {**engine.env, "PRIMERL_ENGINE__RESUME": "true" if mode == "resume" else "false"}
    await _start(engine)
    ready_at = time.time()
    assert stack.cfg is not None
    reqs = _requests(stack.s.run_id, f"{phase}-{mode}-{repeat}", args)
    n = len(reqs) * args.group_size
    t0 = time.time()
    async with Publisher(stack.cfg) as pub:
        await pub.publish_many(PROMPTS.name, [(r, r.routing_key()) for r in reqs])
    ids = {r.id for r in reqs}

    def streamed() -> int:
        return sum(
            len(c.token_ids)
            for rid in ids
            if rid in obs.requests
            for ch in obs.requests[rid].chunks.values()
            for c in ch
        )

    def finals() -> int:
        return sum(len(obs.requests[rid].finals) for rid in ids if rid in obs.requests)

    if phase == "kill":
        while streamed() < n * args.max_tokens * args.kill_at:
            await asyncio.sleep(0.05)
        engine.kill()
        log.info("%s: engine SIGKILLed after %d streamed tokens", mode, streamed())
        await asyncio.sleep(1)  # the observer catches up with what was acked
        await _start(engine)
        ready_at = time.time()
    deadline = time.monotonic() + args.timeout_s
    while finals() < n:
        if time.monotonic() > deadline:
            raise TimeoutError(f"{phase}/{mode}: {finals()} of {n} finals")
        await asyncio.sleep(0.05)
    done = max(obs.requests[rid].final_at for rid in ids)
    await asyncio.sleep(1)
    engine.stop()
    before = carried = exact = resumed = tokens = 0
    for rid in ids:
        view = obs.requests[rid]
        for i, final in view.finals.items():
            tokens += len(final.token_ids)
            if phase != "kill":
                continue
            first = _first_attempt(view.chunks.get(i, []))
            acked = [t for c in first for t in c.token_ids]
            # A sample that finished before the kill kept its single attempt: nothing was lost.
            if first and first[0].attempt and len({c.attempt for c in view.chunks[i]}) > 1:
                before += len(acked)
            if final.resumed_at_token is not None:
                resumed += 1
                carried += final.resumed_at_token
                k = len(acked)
                lps = [lp for c in first for lp in c.logprobs]
                exact += final.token_ids[:k] == acked and final.logprobs[:k] == lps
    generated = tokens - carried
    batch_s = done - t0
    return Row(
        phase=phase,
        mode=mode,
        repeat=repeat,
        samples=n,
        tokens=tokens,
        tokens_before_kill=before,
        tokens_carried=carried,
        tokens_regenerated=before - carried,
        saved_share=carried / before if before else 0.0,
        prefixes_exact=exact,
        resumed_samples=resumed,
        batch_s=batch_s,
        after_ready_s=done - ready_at,
        gen_tok_s=generated / batch_s if batch_s > 0 else 0.0,
    )


async def _start(engine) -> None:  # noqa: ANN001 - perf.stack.Stage
    engine.start()
    deadline = time.monotonic() + 400
    while not engine.check_ready():
        if not engine.alive():
            raise RuntimeError(f"engine exited:\n{engine.log_tail()}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"engine not ready:\n{engine.log_tail()}")
        await asyncio.sleep(0.5)


def plot(rows: list[Row], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    modes = ["restart", "resume"]
    kill = {m: [r for r in rows if r.phase == "kill" and r.mode == m] for m in modes}
    nofail = {m: [r for r in rows if r.phase == "nofail" and r.mode == m] for m in modes}
    fig, axes = plt.subplots(1, 3, figsize=(13, 4))
    axes[0].bar(modes, [_mean(kill[m], "tokens_regenerated") for m in modes], color=["tab:red", "tab:green"])
    axes[0].set_title("tokens generated again after the kill")
    axes[1].bar(modes, [_mean(kill[m], "after_ready_s") for m in modes], color=["tab:red", "tab:green"])
    axes[1].set_title("restarted engine ready -> batch done (s)")
    axes[2].bar(modes, [_mean(nofail[m], "gen_tok_s") for m in modes], color=["tab:gray", "tab:blue"])
    axes[2].set_title("no failure: generated tok/s (mean)")
    fig.suptitle(f"resume vs restart, {rows[0].samples} samples x {rows[0].tokens // rows[0].samples} tokens")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


async def main(args: argparse.Namespace) -> list[Row]:
    run_id = f"resume-bench-{uuid.uuid4().hex[:6]}"
    work = Path(args.work_dir or f"/tmp/{run_id}")
    stack = Stack(StackSettings(run_id=run_id, work_dir=work, kinds=("engine",), engine_max_in_flight=16))
    cfg = await stack.start_servers()
    stack.build_stages()
    obs = RunObserver(cfg, run_id)
    await obs.start()
    rows: list[Row] = []
    try:
        for repeat in range(args.repeats):
            modes = args.modes.split(",")
            # ABBA: odd rounds run the modes in reverse, so a drift in the machine's load over
            # the run (measured 80-95 s per 512-token batch on a loaded 2-core box) does not
            # always favour the mode that runs first.
            for mode in modes if repeat % 2 == 0 else modes[::-1]:
                for phase in args.phases.split(","):
                    row = await _phase(stack, obs, mode, phase, repeat, args)
                    log.info("%s", json.dumps(msgspec.to_builtins(row)))
                    rows.append(row)
        rtt = await _redis_round_trips(cfg)
    finally:
        await obs.stop()
        stack.stop_all()
        stack.stop_servers()
    log.info("resume's extra Redis work per first delivery (GET miss + SET NX): %.3f ms", rtt * 1000)
    return rows


async def _redis_round_trips(cfg, n: int = 500) -> float:  # noqa: ANN001 - plumbing.config.Config
    """Seconds of what resuming adds to a request when nothing fails: the pointer GET (a miss) and SET NX."""
    from redis.asyncio import Redis

    from schemas import keys

    redis = Redis.from_url(cfg.redis_url)
    try:
        t0 = time.perf_counter()
        for i in range(n):
            key = keys.resume_hint(f"rtt-{i}")
            await redis.get(key)
            await redis.set(key, "0:0", nx=True, ex=60)
        return (time.perf_counter() - t0) / n
    finally:
        await redis.aclose()


def _mean(rows: list[Row], attr: str) -> float:
    return sum(getattr(r, attr) for r in rows) / len(rows) if rows else float("nan")


def cli() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--prompts", type=int, default=4)
    p.add_argument("--group-size", type=int, default=2)
    p.add_argument("--max-tokens", type=int, default=512)
    p.add_argument("--kill-at", type=float, default=0.5, help="share of the batch's tokens streamed at the kill")
    p.add_argument("--timeout-s", type=float, default=900)
    p.add_argument("--phases", default="nofail,kill", help="comma-separated: nofail, kill")
    p.add_argument("--modes", default="resume,restart", help="order of the modes in each round")
    p.add_argument("--repeats", type=int, default=1, help="rounds of every phase in both modes")
    p.add_argument("--work-dir", default="")
    p.add_argument("--out", type=Path, default=ARTIFACTS / "resume_bench.csv")
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s", stream=sys.stderr)
    rows = asyncio.run(main(args))
    write_csv(args.out, rows)
    plot(rows, args.out.with_suffix(".png"))
    summary: dict[str, object] = {}
    kill = {m: [r for r in rows if r.phase == "kill" and r.mode == m] for m in ("resume", "restart")}
    nofail = {m: [r for r in rows if r.phase == "nofail" and r.mode == m] for m in ("resume", "restart")}
    if kill["resume"] and kill["restart"]:
        summary |= {
            "saved_share": sum(r.tokens_carried for r in kill["resume"])
            / max(1, sum(r.tokens_before_kill for r in kill["resume"])),
            "regenerated": {m: sum(r.tokens_regenerated for r in kill[m]) for m in kill},
            "after_ready_s": {m: round(_mean(kill[m], "after_ready_s"), 1) for m in kill},
            "batch_s": {m: round(_mean(kill[m], "batch_s"), 1) for m in kill},
            "prefixes_exact": f"{sum(r.prefixes_exact for r in kill['resume'])}/"
            f"{sum(r.resumed_samples for r in kill['resume'])}",
        }
    if nofail["resume"] and nofail["restart"]:
        summary["nofail_tok_s"] = {m: [round(r.gen_tok_s, 1) for r in nofail[m]] for m in nofail}
        summary["nofail_throughput_ratio"] = _mean(nofail["resume"], "gen_tok_s") / _mean(
            nofail["restart"], "gen_tok_s"
        )
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    cli()
