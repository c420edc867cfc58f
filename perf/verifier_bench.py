"""What custody and scoring cost: the verifier's throughput, signatures, the learner's check.

Parts, each timed over `--items` items on this machine:
- math_score: the math verifier's scoring alone (math-verify), in process;
- verifier_process: one real VerifierWorker, custody on, through Kafka and Redis:
  signed completions published, rewards read back (rewards/s per verifier process);
- sign_completion / verify_completion, sign_reward / verify_reward: Ed25519 per message;
- text_tokens_check: decoding token_ids with the engine's tokenizer (custody.check_text_tokens);
- learner_check: the learner's whole per-sample chain (engine signature, verifier
  signature, reward-to-completion binding).

Then the pipeline with custody on over off, in one run: one real engine worker (which
signs either way: signing is not optional) and a verifier restarted per mode with the
custody checks on or off, modes alternating; tokens/s counts tokens whose rewards came back.

    python -m perf.verifier_bench --items 2000 --prompts 16 --repeats 2

Writes artifacts/verifier_bench.csv (verifier,items,seconds,items_per_s),
artifacts/verifier_bench_pipeline.csv and artifacts/verifier_bench.png.
"""

from __future__ import annotations

import argparse
import asyncio
import time
import uuid
from collections.abc import Callable
from typing import Any, TypeVar

import msgspec
from prometheus_client import CollectorRegistry
from tqdm import tqdm

from learners.group_buffer import binding_mismatch
from perf.common import ARTIFACTS, write_csv
from plumbing.config import Config, load_config
from plumbing.custody import decoded_text, engine_signer, engine_tokenizer, verifier_signer
from plumbing.infra import infra_for_run
from plumbing.kafka import Publisher
from plumbing.redis_client import connect_redis
from plumbing.runtime import run, setup_logging
from plumbing.trust import Keyring, Signer, prompt_hash, token_hash
from primerl.embedded import publish_prompts, start_stage
from primerl.observe import RunObserver
from primerl.rewards_reader import RewardsReader
from primerl.serve import serve_engine
from producers.arithmetic import arithmetic_requests
from schemas import Completion, Reward, RewardStatus, Timings
from schemas.topics import COMPLETIONS
from verifier_workers.rewards import build_registry, close_registry, score_completion
from verifier_workers.service import serve_verifier
from verifier_workers.worker import VerifierWorker


class Row(msgspec.Struct):
    """One timed part (the issue's columns)."""

    verifier: str
    items: int
    seconds: float
    items_per_s: float


class PipelineRow(msgspec.Struct):
    """One mode of one repeat of the pipeline run."""

    custody: str  # on | off
    repeat: int
    samples: int
    tokens: int
    seconds: float
    tokens_per_s: float
    rewards: int


def completions(n: int, tokenizer: Any, run_id: str = "bench") -> list[Completion]:
    """`n` math completions whose token_ids are their text tokenized, as an engine makes them."""
    out = []
    for i in range(n):
        a, b = i % 17, (i * 7) % 13
        text = f"{a} plus {b} is {a + b}. <answer>{a + b}</answer>"
        ids = tokenizer.encode(text, add_special_tokens=False)
        out.append(
            Completion(
                run_id=run_id,
                request_id=f"{run_id}-r{i}",
                group_id=f"{run_id}-g{i}",
                group_size=1,
                sample_index=0,
                id=f"{run_id}-r{i}/0",
                prompt=f"What is {a} + {b}?",
                prompt_token_ids=tokenizer.encode(f"What is {a} + {b}?"),
                text=text,
                token_ids=ids,
                logprobs=[-0.5] * len(ids),
                finish_reason="stop",
                policy_version=0,
                worker_id="engine-bench",
                timings=Timings(enqueued_at=1.0, started_at=1.1, first_token_at=1.2, finished_at=1.3),
                prompt_tokens=8,
                cached_prompt_tokens=0,
                task="math",
                reference=str(a + b),
            )
        )
    return out


def reward_of(c: Completion, signer: Signer) -> Reward:
    """A signed reward bound to `c`, as the verifier makes it."""
    return signer.sign(
        Reward(
            id=f"rw-{c.id}",
            run_id=c.run_id,
            completion_id=c.id,
            request_id=c.request_id,
            group_id=c.group_id,
            prompt_hash=prompt_hash(c.prompt),
            tokens_hash=token_hash(c.token_ids),
            policy_version=c.policy_version,
            verifier_id="bench",
            verifier_version="bench/math@1",
            components={"correct": 1.0},
            scalar=1.0,
            status=RewardStatus.OK,
        )
    )


T = TypeVar("T")


def timed(name: str, items: list[T], fn: Callable[[T], object]) -> Row:
    """Run `fn` over `items` once; the row of its throughput."""
    t0 = time.perf_counter()
    for it in tqdm(items, desc=name, leave=False):
        fn(it)
    s = time.perf_counter() - t0
    return Row(name, len(items), s, len(items) / s)


async def micro(cfg: Config, n: int) -> list[Row]:
    """Every in-process part: scoring, signatures, the text check, the learner's chain."""
    tokenizer = engine_tokenizer(cfg.derive(**{"custody.check_text_tokens": True}))
    engine_key, verifier_key = engine_signer(cfg), verifier_signer(cfg)
    engine_keys, verifier_keys = Keyring.from_dir(cfg.engine_keys_dir), Keyring.from_dir(cfg.keys_dir)
    plain = completions(n, tokenizer)
    rows = []
    fns = build_registry()
    try:
        t0 = time.perf_counter()
        for c in tqdm(plain, desc="math_score", leave=False):
            await score_completion(fns, c)
        s = time.perf_counter() - t0
        rows.append(Row("math_score", n, s, n / s))
    finally:
        await close_registry(fns)
    rows.append(timed("sign_completion", list(plain), lambda c: engine_key.sign(c)))
    signed = [engine_key.sign(c) for c in plain]
    rows.append(timed("verify_completion", list(signed), lambda c: engine_keys.check_signature(c)))
    rows.append(timed("text_tokens_check", list(signed), lambda c: decoded_text(c, tokenizer)))
    rows.append(timed("sign_reward", list(signed), lambda c: reward_of(c, verifier_key)))
    pairs = [(c, reward_of(c, verifier_key)) for c in signed]
    rows.append(timed("verify_reward", [r for _, r in pairs], lambda r: verifier_keys.check_signature(r)))

    def learner_check(pair: tuple[Completion, Reward]) -> None:
        c, r = pair
        engine_keys.check_signature(c)
        verifier_keys.check_signature(r)
        if binding_mismatch(c, r) is not None:
            raise AssertionError(f"a genuine pair did not bind: {binding_mismatch(c, r)}")

    rows.append(timed("learner_check", list(pairs), learner_check))
    return rows


async def verifier_process(cfg: Config, n: int) -> Row:
    """One VerifierWorker with custody on: `n` signed completions in, `n` rewards out."""
    run_id = f"vbench-{uuid.uuid4().hex[:8]}"
    cfg = cfg.derive(**{"custody.require_engine_signatures": True, "custody.check_text_tokens": True})
    signer = engine_signer(cfg)
    batch = [signer.sign(c) for c in completions(n, engine_tokenizer(cfg), run_id)]
    fns = build_registry()
    redis = connect_redis(cfg)
    async with Publisher(cfg) as pub, RewardsReader(cfg, run_id) as rewards:
        worker = VerifierWorker(cfg, fns, verifier_signer(cfg), pub, redis, CollectorRegistry())
        task = asyncio.create_task(worker.run())
        try:
            await asyncio.wait_for(worker.runner.assigned.wait(), 120)
            t0 = time.perf_counter()
            await pub.publish_many(COMPLETIONS.name, [(c, c.group_id.encode()) for c in batch])
            with tqdm(total=n, desc="verifier_process", leave=False) as bar:
                while len(rewards.rewards) < n:
                    await asyncio.sleep(0.1)
                    bar.update(len(rewards.rewards) - bar.n)
                    if time.perf_counter() - t0 > 600:
                        raise TimeoutError(f"{len(rewards.rewards)}/{n} rewards after 600 s")
            s = time.perf_counter() - t0
        finally:
            worker.stop()
            await asyncio.gather(task, return_exceptions=True)
            await close_registry(fns)
            await redis.aclose()
    return Row("verifier_process", n, s, n / s)


async def pipeline(cfg: Config, prompts: int, repeats: int, max_tokens: int) -> list[PipelineRow]:
    """Engine + verifier, custody checks on and off alternating; tokens/s up to the last reward."""
    rows = []
    serving, engine = await start_stage(serve_engine, cfg)
    try:
        await asyncio.wait_for(engine.runner.assigned.wait(), 120)
        for rep in range(repeats):
            # ABBA order (on, off, off, on, ...): the first cell of a run pays the engine's warm-up.
            for mode in ("on", "off") if rep % 2 == 0 else ("off", "on"):
                vcfg = cfg.derive(
                    **{"custody.require_engine_signatures": mode == "on", "custody.check_text_tokens": mode == "on"}
                )
                verifying, verifier = await start_stage(serve_verifier, vcfg)
                run_id = f"cbench-{mode}-{rep}-{uuid.uuid4().hex[:6]}"
                obs = RunObserver(cfg, run_id, with_rewards=True)
                await obs.start()
                try:
                    await asyncio.wait_for(verifier.runner.assigned.wait(), 120)
                    await asyncio.wait_for(obs.ready.wait(), 60)
                    reqs = arithmetic_requests(run_id, prompts, 4, max_tokens=max_tokens, seed=rep)
                    n = prompts * 4
                    t0 = await publish_prompts(cfg, reqs)
                    with tqdm(total=n, desc=f"custody {mode} #{rep + 1}", leave=False) as bar:
                        while (got := sum(len(v.rewards) for v in obs.requests.values())) < n:
                            await asyncio.sleep(0.2)
                            bar.update(got - bar.n)
                            if time.time() - t0 > 1200:
                                raise TimeoutError(f"{got}/{n} rewards after 1200 s")
                    last = max(v.reward_at for v in obs.requests.values())
                finally:
                    await obs.stop()
                    verifier.stop()
                    await verifying
                finals = obs.finals()
                tokens = sum(len(c.token_ids) for c in finals)
                rows.append(PipelineRow(mode, rep, len(finals), tokens, last - t0, tokens / (last - t0), n))
                print(f"    {rows[-1]}", flush=True)
    finally:
        engine.stop()
        await serving
    return rows


def plot(rows: list[Row], pipe: list[PipelineRow], path: str) -> None:
    """Throughput per part (log scale) and the pipeline's tokens/s per mode and repeat."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4), gridspec_kw={"width_ratios": [3, 2]})
    a.barh([r.verifier for r in rows], [r.items_per_s for r in rows], color="tab:blue")
    a.set_xscale("log")
    a.set_xlabel("items/s (one process)")
    if pipe:
        b.bar(
            [f"{p.custody}\n#{p.repeat + 1}" for p in pipe],
            [p.tokens_per_s for p in pipe],
            color=["tab:green" if p.custody == "on" else "tab:gray" for p in pipe],
        )
        b.set_ylabel("tokens/s to rewards")
        b.set_title("pipeline: custody checks on vs off")
    fig.suptitle("verifier and custody costs")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


async def main(args: argparse.Namespace) -> tuple[list[Row], list[PipelineRow]]:
    cfg = load_config()
    async with infra_for_run(cfg) as cfg:
        print("in-process parts ...", flush=True)
        rows = await micro(cfg, args.items)
        for r in rows:
            print(f"    {r.verifier:18s} {r.items_per_s:12.1f}/s  ({1e6 / r.items_per_s:9.1f} us each)", flush=True)
        print("verifier process through Kafka ...", flush=True)
        rows.append(await verifier_process(cfg, args.process_items))
        print(f"    {rows[-1]}", flush=True)
        pipe: list[PipelineRow] = []
        if args.repeats:
            print("pipeline, custody on vs off ...", flush=True)
            pipe = await pipeline(cfg, args.prompts, args.repeats, args.max_tokens)
    return rows, pipe


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--items", type=int, default=2000, help="items per in-process part")
    parser.add_argument("--process-items", type=int, default=1000, help="completions through the verifier process")
    parser.add_argument("--prompts", type=int, default=16, help="prompts (x4 samples) per pipeline mode")
    parser.add_argument("--max-tokens", type=int, default=48)
    parser.add_argument("--repeats", type=int, default=2, help="pipeline repeats (0: skip the pipeline)")
    args = parser.parse_args()
    setup_logging("WARNING")
    rows, pipe = run(main(args))
    write_csv(ARTIFACTS / "verifier_bench.csv", rows)
    if pipe:
        write_csv(ARTIFACTS / "verifier_bench_pipeline.csv", pipe)
        on = sum(p.tokens_per_s for p in pipe if p.custody == "on")
        off = sum(p.tokens_per_s for p in pipe if p.custody == "off")
        print(f"pipeline tokens/s custody on / off = {on / off:.3f}")
    plot(rows, pipe, str(ARTIFACTS / "verifier_bench.png"))
