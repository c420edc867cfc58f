"""`primerl up`: a whole RL run on one machine: servers, engine, verifier, learner, N GRPO steps.

A feeder publishes one training batch per step under admission control (it runs at
most `max_policy_lag` versions ahead of the learner); held-out prompts (never trained
on) are scored greedily every `eval_every` versions through the same engine and
verifier. Shows a per-step table and the current wait on a RunConsole (primerl/console.py),
logs every step to TensorBoard event files (<state_dir>/tensorboard/<run_id>), from which
the caller writes the learning curve's CSV and plot (primerl/curve.py).
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from learners.service import serve_learner
from learners.worker import LearnerWorker
from plumbing.config import Config
from plumbing.model_store import resolve_model
from plumbing.stage import Stage
from plumbing.tracking import StepLog
from primerl.console import RunConsole
from primerl.curve import CurveRow, log_row
from primerl.embedded import publish_prompts, start_stage
from primerl.observe import RunObserver
from primerl.rewards_reader import RewardsReader
from primerl.serve import serve_engine
from primerl.settings import RunSettings
from primerl.tasks import RunTask, make_task
from schemas import RewardStatus
from verifier_workers.service import load_signer, serve_verifier

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RunResult:
    """What a run leaves: its curve, its id and its TensorBoard event folder."""

    rows: list[CurveRow]
    run_id: str
    events_dir: Path


async def evaluate(
    cfg: Config, run_id: str, version: int, task: RunTask, console: RunConsole | None = None
) -> tuple[float, int]:
    """Greedy success on the task's held-out prompts under policy >= `version`; returns (success, version served)."""
    eval_run = f"{run_id}-eval-v{version}"
    reqs = task.heldout(eval_run)
    for r in reqs:
        r.min_policy_version = version
    console = console or RunConsole()
    async with RewardsReader(cfg, eval_run) as reader:
        await publish_prompts(cfg, reqs)
        with console.wait(f"held-out evaluation, policy v{version}", total=len(reqs)) as progress:
            rewards = await reader.wait_for(len(reqs), timeout_s=900, on_progress=progress)
    scored = [r for r in rewards if r.status in (RewardStatus.OK, RewardStatus.POLICY_FAIL)]
    # Strict task success (arithmetic: a correct answer in the required format).
    acc = sum(r.components.get(task.success_component, 0.0) for r in scored) / max(1, len(scored))
    return acc, min(r.policy_version for r in rewards)


async def rl_loop(
    cfg: Config, rs: RunSettings, console: RunConsole | None = None, task: RunTask | None = None
) -> RunResult:
    """Run `rs.steps` learner steps on `task` (default: arithmetic); returns the learning curve (servers must be up)."""
    console = console or RunConsole()
    task = task or make_task(rs)
    run_id = cfg.run_id if cfg.run_id != "default" else f"run-{uuid.uuid4().hex[:8]}"
    events_dir = cfg.state_dir / "tensorboard" / run_id
    console.note(f"run {run_id}: TensorBoard log in {events_dir} (tensorboard --logdir {events_dir.parent})")
    with console.wait("preparing the model (converted once, then cached)"):
        # A thread: conversion takes ~20 s the first time and the console keeps drawing.
        model = await asyncio.to_thread(resolve_model, cfg.engine.model)
    # One step trains on one published batch: with --prompts below learner.groups_per_step the
    # learner waited for groups admission control would never publish (the run stalled).
    cfg = cfg.derive(
        run_id=run_id,
        **{"engine.policy_run": run_id, "engine.model": model, "learner.groups_per_step": rs.prompts_per_step},
    )
    load_signer(cfg)  # the verifier's key exists before the learner reads the keyring
    with console.wait("starting the engine (vLLM)"):
        engine_task, engine = await start_stage(serve_engine, cfg)
    with console.wait("starting the verifier and the learner"):
        verifier_task, verifier = await start_stage(serve_verifier, cfg)
        learner_task, learner = await start_stage(serve_learner, cfg)
    tasks = [engine_task, verifier_task, learner_task]
    stages: list[Stage] = [engine, verifier, learner]
    if task.uses_envhub:
        from envhub.service import serve_envhub

        with console.wait("starting the env hub (tools, next turns)"):
            envhub_task, envhub = await start_stage(serve_envhub, cfg)
        tasks.append(envhub_task)
        stages.append(envhub)
    step_log = StepLog(events_dir)
    observer = RunObserver(cfg, run_id)
    await observer.start()
    batches: dict[int, tuple[float, list[str]]] = {}

    async def feeder() -> None:
        """Batches until the learner has made `rs.steps` steps. Admission control: at most
        `max_policy_lag + 1` batches published whose samples the learner has not yet
        consumed (trained on, or dropped as stale: dropping never stalls the run)."""
        per_batch = rs.prompts_per_step * rs.group_size
        k = 0
        while len(learner.history) < rs.steps:
            # A sample whose reward was rejected is never consumed: after twice the group
            # timeout without reaching the mark, feed anyway rather than stall.
            waited = 0.0
            while learner.state.counters.get("consumed", 0) < (k - cfg.learner.max_policy_lag) * per_batch:
                if len(learner.history) >= rs.steps:
                    return
                if waited > 2 * cfg.learner.group_timeout_s:
                    log.warning(
                        "admission: the learner consumed fewer samples than published; feeding batch %d anyway", k
                    )
                    break
                await asyncio.sleep(0.2)
                waited += 0.2
            reqs = task.train(run_id, k, rs.prompts_per_step, rs.group_size, rs.seed)
            batches[k] = (await publish_prompts(cfg, reqs), [r.id for r in reqs])
            k += 1

    rows: list[CurveRow] = []
    published_at: dict[int, float] = {}  # policy version -> when the learner announced it
    t_start = time.time()
    try:
        with console.wait("joining the consumer groups"):
            for stage in stages:
                await asyncio.wait_for(stage.ready.wait(), 120)
        acc, _ = await evaluate(cfg, run_id, 0, task, console)
        feed = asyncio.create_task(feeder(), name="feeder")
        tasks.append(feed)
        console.table(_COLUMNS)
        rows.append(CurveRow(0, time.time() - t_start, math.nan, acc, 0.0, math.nan, math.nan))
        log_row(step_log, rows[-1])
        console.row(_cells(rows[-1]))
        done = 0
        with console.wait("training", total=rs.steps) as progress:
            while done < rs.steps:
                await _next_step(learner, done, tasks)
                stats = learner.history[done]
                if stats.samples:  # a step that changed the weights announced a new version
                    published_at[stats.policy_version] = time.time()
                done += 1
                tps, cache = _batch_figures(observer, batches.get(stats.step))
                acc = math.nan
                if done % rs.eval_every == 0 or done == rs.steps:
                    acc, _ = await evaluate(cfg, run_id, stats.policy_version, task, console)
                trained = stats.samples > 0  # a step without a learning signal has no loss, KL or clips
                row = CurveRow(
                    done,
                    time.time() - t_start,
                    stats.reward_mean,
                    acc,
                    stats.policy_lag_mean,
                    tps,
                    cache,
                    reward_std=stats.reward_std,
                    loss=stats.loss if trained else math.nan,
                    kl=stats.kl if trained else math.nan,
                    clip_frac=stats.clip_frac if trained else math.nan,
                )
                rows.append(row)
                log_row(step_log, row)
                console.row(_cells(row))
                progress(done)
        _report_switch_latency(observer, published_at, console)
    finally:
        step_log.close()
        await observer.stop()
        for stage in stages:
            stage.stop()
        for t in tasks[len(stages) :]:  # the feeder may wait on admission forever: cancel it
            t.cancel()
        _, pending = await asyncio.wait(tasks, timeout=60)
        for name, t in zip(("engine", "verifier", "learner", "envhub"), tasks[: len(stages)], strict=False):
            if t in pending:
                log.error("%s did not stop within 60s; cancelling it", name)
                t.cancel()
        # Bounded too: a task that absorbs its cancel once kept `primerl up` from ever
        # returning (plumbing/ledger.py's renewer, fixed); the run's summary is still printed.
        _, pending = await asyncio.wait(tasks, timeout=30)
        for t in pending:
            log.error("%s still running 30s after its cancel; leaving it", t.get_name())
    return RunResult(rows, run_id, events_dir)


# The step table: header, format of the values.
_COLUMNS = [
    ("step", "d"),
    ("wall_s", ".0f"),
    ("reward", ".3f"),
    ("±std", ".3f"),
    ("heldout", ".3f"),
    ("loss", ".4f"),
    ("kl", ".4f"),
    ("clip", ".3f"),
    ("lag", ".2f"),
    ("tok/s", ".1f"),
    ("cache", ".2f"),
]


def _cells(row: CurveRow) -> list[object]:
    return [
        row.step,
        row.wall_s,
        row.reward_mean,
        row.reward_std,
        row.heldout_accuracy,
        row.loss,
        row.kl,
        row.clip_frac,
        row.policy_lag_mean,
        row.tokens_per_s,
        row.cache_hit_rate,
    ]


async def _next_step(
    learner: LearnerWorker, done: int, tasks: list[asyncio.Task[None]], timeout_s: float = 1800
) -> None:
    """Return once the learner has made step `done` + 1; raise at once if a stage (or the feeder) ends first.

    A stage that died used to be noticed only after the next learner step, up to 1,800 s later.
    """

    async def stepped() -> None:
        async with learner.version_published:
            await learner.version_published.wait_for(lambda: len(learner.history) > done)

    waiter = asyncio.create_task(stepped())
    try:
        finished, _ = await asyncio.wait({waiter, *tasks}, timeout=timeout_s, return_when=asyncio.FIRST_COMPLETED)
    finally:
        if not waiter.done():
            waiter.cancel()
    if waiter in finished:
        return
    if not finished:
        raise TimeoutError(f"no learner step within {timeout_s:.0f}s")
    ended = next(iter(finished))
    cause = None if ended.cancelled() else ended.exception()
    raise RuntimeError(f"a stage ended during the run ({ended.get_name()}): {cause!r}") from cause


def _report_switch_latency(observer: RunObserver, published_at: dict[int, float], console: RunConsole) -> None:
    """Time from a version's announcement to the first completion served under it."""
    first_final: dict[int, float] = {}
    for view in observer.requests.values():
        for c in view.finals.values():
            first_final[c.policy_version] = min(first_final.get(c.policy_version, math.inf), c.timings.finished_at)
    gaps = sorted(first_final[v] - t for v, t in published_at.items() if v in first_final)
    if gaps:
        console.note(
            f"publish -> first completion under the new policy: median {gaps[len(gaps) // 2]:.1f}s, "
            f"max {gaps[-1]:.1f}s over {len(gaps)} versions (includes the engine's drain of in-flight requests)"
        )


def _batch_figures(observer: RunObserver, batch: tuple[float, list[str]] | None) -> tuple[float, float]:
    """Generated tokens/s and token-level prefix-cache hit rate of one training batch."""
    if batch is None:
        return math.nan, math.nan
    t0, ids = batch
    views = [observer.requests[i] for i in ids if i in observer.requests and observer.requests[i].finals]
    if not views:
        return math.nan, math.nan
    tokens = sum(len(c.token_ids) for v in views for c in v.finals.values())
    wall = max(v.final_at for v in views) - t0
    firsts = [next(iter(v.finals.values())) for v in views]
    prompt = sum(c.prompt_tokens for c in firsts)
    return tokens / wall if wall > 0 else math.nan, sum(c.cached_prompt_tokens for c in firsts) / max(1, prompt)
