"""Fuzz: the learner (rollout.completions + rollout.rewards, its own consumer loop), in-process.

Both input topics are swapped for private ones (the module's topic constants). The
trainer is a stand-in whose step records the groups it was given and reports "no
signal" (no weights written, nothing on rollout.policy): this test is about the
consumer loop, not the update (tests/test_learner.py covers a real step).

A record that does not decode, a reward that fails verification, or a completion of
the run without a valid engine signature (custody is on, the default: every storm
completion is unsigned or signed over other fields, so it is refused as `unsigned`,
`unknown_key` or `bad_signature`) must be dead-lettered exactly once; any other record
that decodes is taken in (a completion of another run is skipped), with no letter. The
good group after the storm is engine-signed, its rewards bind it (real hashes).
"""

from __future__ import annotations

import asyncio
import time
import uuid
from pathlib import Path

import msgspec
import pytest
import torch
from prometheus_client import CollectorRegistry

import learners.worker as learner_module
from learners.outcome_log import read_outcomes
from learners.worker import LearnerWorker
from plumbing.config import Config
from plumbing.kafka import Publisher
from plumbing.redis_client import connect_redis
from plumbing.trust import Keyring, Signer, generate_keypair
from schemas import Completion, Reward, Topic
from tests.fuzz.harness import (
    DEFAULT_N,
    Ledger,
    assert_clean,
    dlq_watch,
    heavy_n,
    make_topic,
    publish_storm,
    stop_stage,
    wait_accounted,
)
from tests.kafka_helpers import wait_until
from tests.reward_helpers import engine_signed, make_completion, reward_for


class _RecordingTrainer:
    """Trainer stand-in: records each step's groups, changes nothing."""

    def __init__(self) -> None:
        self.optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
        self.steps: list[list] = []

    def step(self, step, version, groups, current_version):  # noqa: ANN001 - Trainer.step's signature
        self.steps.append(groups)
        return None


@pytest.mark.parametrize("variant", ["default", pytest.param("heavy", marks=pytest.mark.fuzz)])
async def test_learner_survives_the_storm_and_accounts_for_every_record(
    cfg: Config, tmp_path: Path, monkeypatch, variant: str, pytestconfig
) -> None:
    n = DEFAULT_N if variant == "default" else heavy_n(pytestconfig)
    run_id = f"fz-learner-{uuid.uuid4().hex[:6]}"
    cfg.run_id = run_id
    cfg.learner.groups_per_step = 1
    completions_topic, rewards_topic = await make_topic(cfg, "completions", 4), await make_topic(cfg, "rewards", 4)
    monkeypatch.setattr(learner_module, "COMPLETIONS", Topic(completions_topic, 4, Completion, "fuzz"))
    monkeypatch.setattr(learner_module, "REWARDS", Topic(rewards_topic, 4, Reward, "fuzz"))
    priv, _ = generate_keypair(tmp_path / "keys", "fuzz-key")
    signer, ring = Signer.from_file(priv), Keyring.from_dir(tmp_path / "keys")
    trainer = _RecordingTrainer()
    redis = connect_redis(cfg)
    t0 = time.monotonic()
    async with Publisher(cfg) as pub:
        learner = LearnerWorker(
            cfg,
            trainer,
            ring,
            pub,
            redis,
            CollectorRegistry(),  # type: ignore[arg-type]
            checkpoint=tmp_path / "ckpt" / "learner.ckpt",
            policies_dir=tmp_path / "policies",
        )
        task = asyncio.create_task(learner.run())
        storms = [
            await publish_storm(cfg, completions_topic, Completion, n, seed=3141, run_id=run_id, tag=f"{run_id}-c"),
            await publish_storm(cfg, rewards_topic, Reward, n, seed=1618, run_id=run_id, tag=f"{run_id}-r"),
        ]
        ledger = Ledger(storms)
        ends = {(s.topic, p): end for s in storms for p, end in s.ends().items()}

        def read_all() -> bool:
            return all(learner.state.offsets.get(f"{t}:{p}", 0) >= end for (t, p), end in ends.items())

        watches = [await dlq_watch(cfg, ledger).start()]

        read_all_since: list[float] = []

        def settle() -> bool:
            """Once the learner read past every fuzz record: what decoded here and got no letter was taken in.

            Not at the first moment it has: the learner's offsets move as soon as a letter is acked,
            and the DLQ watch reads it a fetch later; counting then once took a lettered reward as
            taken in too (a 'doubled' record, in the full suite under load). 3 s is many fetches."""
            if not read_all():
                read_all_since.clear()
                return False
            read_all_since[:1] = read_all_since[:1] or [time.monotonic()]
            if time.monotonic() - read_all_since[0] < 3.0:
                return False
            for storm in storms:
                for s in storm.sent:
                    if (
                        s.decoded_id is not None
                        and not ledger.letters.get(s.fuzz_id)
                        and not ledger.outputs.get(s.fuzz_id)
                    ):
                        ledger.output_for_fuzz_id(s.fuzz_id)
            return True

        try:
            try:
                report = await wait_accounted(ledger, [task], extra=settle, what=f"learner {variant} n={n}")
            except AssertionError as err:
                raise AssertionError(f"{err}\nlearner read up to {learner.state.offsets}, fuzz ends {ends}") from None
            # A decoded completion of this run is held in the state (waiting for its reward that never
            # comes), or, in a storm longer than the orphan timeout (10,000 payloads: ~7 min on 2
            # cores), already dropped as an orphan and written to the outcome log: never silently gone.
            held = {
                s.decoded_id
                for s in storms[0].sent
                if s.decoded_id and s.decoded_run == run_id and not ledger.letters.get(s.fuzz_id)
            }
            dropped = {
                i for x in read_outcomes(learner.outcomes.path) if x.get("kind") == "drop" for i in x.get("ids", [])
            }
            kept = set(learner.state.buffer.completions) | dropped
            assert held <= kept | {None}, sorted(held - kept)[:5]
            good = [
                engine_signed(
                    msgspec.structs.replace(
                        make_completion(f"<answer>{i}</answer>", reference="1"),
                        run_id=run_id,
                        id=f"{run_id}-good/{i}",
                        request_id=f"{run_id}-good",
                        group_id=f"{run_id}-good",
                        group_size=2,
                        sample_index=i,
                    ),
                    cfg,
                )
                for i in range(2)
            ]
            for c, scalar in zip(good, (1.0, 0.0), strict=True):
                await pub.publish(completions_topic, c, key=c.group_id.encode())
                await pub.publish(rewards_topic, reward_for(c, signer, scalar), key=c.group_id.encode())
            await wait_until(
                lambda: any(g and g[0].group_id == good[0].group_id for groups in trainer.steps for g in groups),
                60,
                "the good group trained on after the storm",
            )
            assert not task.done(), f"the learner exited: {task.exception()!r}"
        finally:
            await stop_stage(learner.stop, task, watches)
            await redis.aclose()
    print(f"\n[fuzz] learner {variant}: n={n} per topic, {time.monotonic() - t0:.1f}s")
    wrongly_lettered = [
        s
        for storm in storms
        for s in storm.sent
        if s.decoded_id
        and ledger.letters.get(s.fuzz_id)
        and not any(letter.error_type == "Rejected" for letter in ledger.letters[s.fuzz_id])
    ]
    assert not wrongly_lettered, [
        (s.fuzz_id, s.category, [letter.error for letter in ledger.letters[s.fuzz_id]]) for s in wrongly_lettered[:5]
    ]
    assert_clean(report, f"learner {variant}")
    # Custody: no storm completion of this run became a candidate (each was refused, by reason).
    this_run = [s for s in storms[0].sent if s.decoded_id is not None and s.decoded_run == run_id]
    assert all(ledger.letters.get(s.fuzz_id) for s in this_run), "an unsigned storm completion was taken in"
    assert not any(c.run_id == run_id for cs in learner.state.buffer.completions.values() for c in cs)
