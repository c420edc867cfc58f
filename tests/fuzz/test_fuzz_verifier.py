"""Fuzz: the verifier stage (rollout.completions -> rollout.rewards), in-process.

Its input and output topics are swapped for private ones (the module's topic constants,
read when the worker is built), so the storm never reaches the session's other readers
of rollout.completions; the code path is the one `primerl verifier` runs.

Custody is on (the default): a storm record that decodes is unsigned (or carries a
signature that is not over its fields), so it is dead-lettered by reason (`unsigned`,
`unknown_key`, `bad_signature`); that is still exactly one letter. The good completion
after the storm is made as an engine makes it (token_ids of its text, engine-signed).

The same storm on rollout.trajectories (issue 23: the verifier's second runner, same
group): every decoded Trajectory carries an unsigned or mis-signed completion, so it is
refused for custody, once; a signed session after the storm is scored.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from pathlib import Path

import msgspec
import pytest
from prometheus_client import CollectorRegistry

import verifier_workers.worker as verifier_module
from plumbing.config import Config
from plumbing.kafka import Publisher
from plumbing.redis_client import connect_redis
from plumbing.trust import Signer, generate_keypair
from schemas import Completion, Reward, Topic, Trajectory, decode
from tests.fuzz.harness import (
    DEFAULT_N,
    Ledger,
    Watch,
    assert_clean,
    dlq_watch,
    heavy_n,
    make_topic,
    publish_storm,
    stop_stage,
    wait_accounted,
)
from tests.kafka_helpers import wait_until
from tests.reward_helpers import as_engine, make_completion
from tests.session_helpers import BROWSER_CALLS, Turn, trajectory_of, with_session
from verifier_workers.rewards import build_registry, close_registry
from verifier_workers.worker import VerifierWorker


@pytest.mark.parametrize("variant", ["default", pytest.param("heavy", marks=pytest.mark.fuzz)])
async def test_verifier_survives_the_storm_and_accounts_for_every_record(
    cfg: Config, tmp_path: Path, monkeypatch, variant: str, pytestconfig
) -> None:
    n = DEFAULT_N if variant == "default" else heavy_n(pytestconfig)
    run_id = f"fz-verifier-{uuid.uuid4().hex[:6]}"
    source, out = await make_topic(cfg, "completions", 4), await make_topic(cfg, "rewards", 4)
    monkeypatch.setattr(verifier_module, "COMPLETIONS", Topic(source, 4, Completion, "fuzz"))
    monkeypatch.setattr(verifier_module, "REWARDS", Topic(out, 4, Reward, "fuzz"))
    cfg.verifier.version = f"fuzz-{uuid.uuid4().hex[:6]}"  # a fresh ledger
    priv, _ = generate_keypair(tmp_path / "keys", "fuzz-key")
    fns = build_registry()
    redis = connect_redis(cfg)
    t0 = time.monotonic()
    async with Publisher(cfg) as pub:
        worker = VerifierWorker(cfg, fns, Signer.from_file(priv), pub, redis, CollectorRegistry())
        task = asyncio.create_task(worker.run())
        storm = await publish_storm(cfg, source, Completion, n, seed=2718, run_id=run_id, tag=run_id)
        ledger = Ledger([storm])
        rewards: list[Reward] = []

        def on_reward(r) -> None:
            reward = decode(r.value, Reward, list(r.headers))
            rewards.append(reward)
            ledger.output_for_msg_id(reward.completion_id)

        watches = [await dlq_watch(cfg, ledger).start(), await Watch(cfg, out, on_reward).start()]
        try:
            report = await wait_accounted(ledger, [task], what=f"verifier {variant} n={n}")
            good = as_engine(
                msgspec.structs.replace(
                    make_completion("so <answer>4</answer>", reference="4"),
                    run_id=run_id,
                    id=f"{run_id}-good/0",
                    request_id=f"{run_id}-good",
                ),
                cfg,
            )
            await pub.publish(source, good, key=good.group_id.encode())
            await wait_until(
                lambda: any(r.completion_id == good.id for r in rewards), 60, "the good completion rewarded"
            )
            assert next(r for r in rewards if r.completion_id == good.id).scalar == 1.0
            assert not task.done(), "the verifier exited"
        finally:
            await stop_stage(worker.stop, task, watches)
            await close_registry(fns)
            await redis.aclose()
    print(f"\n[fuzz] verifier {variant}: n={n}, {time.monotonic() - t0:.1f}s")
    assert not watches[1].errors, watches[1].errors[:5]
    assert_clean(report, f"verifier {variant}")
    # No storm record carries an engine signature over its fields: whatever decodes is refused
    # for custody (a Rejected letter), never scored.
    decoded = [s for s in storm.sent if s.decoded_id is not None]
    assert not [s.fuzz_id for s in decoded if ledger.outputs.get(s.fuzz_id)], "an unsigned storm record was scored"
    not_custody = [
        (s.fuzz_id, [letter.error for letter in ledger.letters[s.fuzz_id]])
        for s in decoded
        if not any(letter.error_type == "Rejected" for letter in ledger.letters.get(s.fuzz_id, []))
    ]
    assert not not_custody, not_custody[:5]


@pytest.mark.parametrize("variant", ["default", pytest.param("heavy", marks=pytest.mark.fuzz)])
async def test_verifier_survives_a_storm_on_rollout_trajectories(
    cfg: Config, tmp_path: Path, monkeypatch, variant: str, pytestconfig
) -> None:
    n = DEFAULT_N if variant == "default" else heavy_n(pytestconfig)
    run_id = f"fz-vtraj-{uuid.uuid4().hex[:6]}"
    source, quiet, out = (
        await make_topic(cfg, "trajectories", 4),
        await make_topic(cfg, "completions", 1),
        await make_topic(cfg, "rewards", 4),
    )
    monkeypatch.setattr(verifier_module, "TRAJECTORIES", Topic(source, 4, Trajectory, "fuzz"))
    monkeypatch.setattr(verifier_module, "COMPLETIONS", Topic(quiet, 1, Completion, "fuzz"))
    monkeypatch.setattr(verifier_module, "REWARDS", Topic(out, 4, Reward, "fuzz"))
    cfg.verifier.version = f"fuzz-{uuid.uuid4().hex[:6]}"
    priv, _ = generate_keypair(tmp_path / "keys", "fuzz-key")
    fns = build_registry()
    redis = connect_redis(cfg)
    t0 = time.monotonic()
    async with Publisher(cfg) as pub:
        worker = VerifierWorker(cfg, fns, Signer.from_file(priv), pub, redis, CollectorRegistry())
        task = asyncio.create_task(worker.run())
        storm = await publish_storm(cfg, source, Trajectory, n, seed=3141, run_id=run_id, tag=run_id)
        ledger = Ledger([storm])
        rewards: list[Reward] = []

        def on_reward(r) -> None:
            reward = decode(r.value, Reward, list(r.headers))
            rewards.append(reward)
            ledger.output_for_msg_id(reward.completion_id)

        watches = [await dlq_watch(cfg, ledger).start(), await Watch(cfg, out, on_reward).start()]
        try:
            report = await wait_accounted(ledger, [task], what=f"verifier trajectories {variant} n={n}")
            last = msgspec.structs.replace(
                make_completion("so <answer>4</answer>", reference="4"),
                run_id=run_id,
                id=f"{run_id}-good/0",
                request_id=f"{run_id}-good",
            )
            good = as_engine(with_session(last, [Turn([10], [-0.5], 0, [50, 51])], BROWSER_CALLS), cfg)
            await pub.publish(source, trajectory_of(good, cfg), key=good.group_id.encode())
            await wait_until(lambda: any(r.completion_id == good.id for r in rewards), 60, "the good session rewarded")
            assert next(r for r in rewards if r.completion_id == good.id).scalar == 1.0
            assert not task.done(), "the verifier exited"
        finally:
            await stop_stage(worker.stop, task, watches)
            await close_registry(fns)
            await redis.aclose()
    print(f"\n[fuzz] verifier trajectories {variant}: n={n}, {time.monotonic() - t0:.1f}s")
    assert not watches[1].errors, watches[1].errors[:5]
    assert_clean(report, f"verifier trajectories {variant}")
    # The output topic is private: a reward for anything but the good session is a storm record scored.
    assert [r.completion_id for r in rewards] == [good.id], "an unsigned storm session was scored"
    decoded = [s for s in storm.sent if s.decoded_id is not None]
    not_custody = [
        (s.fuzz_id, [letter.error for letter in ledger.letters[s.fuzz_id]])
        for s in decoded
        if not any(letter.error_type == "Rejected" for letter in ledger.letters.get(s.fuzz_id, []))
    ]
    assert not not_custody, not_custody[:5]
