"""The learner: a real update step on SmolLM2, and the worker through the real broker
(signature rejection, staleness drop, group assembly across a restart)."""

from __future__ import annotations

import asyncio
import uuid
from pathlib import Path

import msgspec
import pytest
import torch
from prometheus_client import CollectorRegistry

from learners.policy_model import Batch, PolicyModel
from learners.samples import Sample
from learners.trainer import TrainConfig, Trainer
from learners.worker import LearnerWorker
from plumbing.config import Config, LearnerConfig
from plumbing.kafka import Publisher
from plumbing.model_store import resolve_model
from plumbing.redis_client import connect_redis
from plumbing.trust import Keyring, Signer, generate_keypair
from schemas import Reward, RewardStatus
from schemas.topics import COMPLETIONS, REWARDS
from tests.kafka_helpers import wait_until
from tests.reward_helpers import engine_signed, make_completion, reward_for


@pytest.fixture(scope="module")
def trainer() -> Trainer:
    torch.manual_seed(0)
    return Trainer(PolicyModel(resolve_model(None)), TrainConfig.from_learner(LearnerConfig(lr=2e-6)))


def _samples(trainer: Trainer, rewards: list[float], group: str) -> list[Sample]:
    """A group whose sampling log-probs are the current policy's own (ratio 1)."""
    prompt = [1, 504, 3458, 314]
    completions = [[28, 3313, 30 + i, 2] for i in range(len(rewards))]
    batch = Batch([prompt] * len(rewards), completions, [[]] * len(rewards), trainer.model.pad_id)
    with torch.no_grad():
        logp, _ = trainer.model(batch)
    return [
        Sample(
            completion_id=f"{group}/{i}",
            group_id=group,
            group_size=len(rewards),
            sample_index=i,
            prompt_token_ids=prompt,
            token_ids=c,
            logprobs=logp[i][batch.mask[i] == 1].tolist(),
            policy_version=0,
            reward=r,
            status=RewardStatus.OK,
        )
        for i, (c, r) in enumerate(zip(completions, rewards, strict=True))
    ]


def test_one_real_update_changes_the_weights_and_lowers_the_loss(trainer: Trainer) -> None:
    groups = [_samples(trainer, [1.0, 0.0, 0.0, 1.0], "g1"), _samples(trainer, [0.0, 1.0, 0.0, 0.0], "g2")]
    samples, advs = trainer.prepare(groups)
    assert len(samples) == 8
    before = trainer.loss_on(samples, advs)
    weights = trainer.model.lm.lm_head.weight.detach().clone()
    stats = trainer.step(0, 1, groups, current_version=0)
    assert stats is not None and stats.samples == 8 and stats.policy_lag_mean == 0
    after = trainer.loss_on(samples, advs)
    assert after < before
    assert not torch.equal(weights, trainer.model.lm.lm_head.weight)


def test_groups_without_signal_and_masked_samples_are_not_trained(trainer: Trainer) -> None:
    flat = _samples(trainer, [1.0, 1.0, 1.0], "flat")  # zero variance: DAPO filter
    broken = [
        msgspec.structs.replace(s, status=RewardStatus.INFRA_FAIL) for s in _samples(trainer, [1.0, 0.0], "broken")
    ]
    assert trainer.prepare([flat, broken]) == ([], [])
    assert trainer.step(1, 2, [flat, broken], current_version=1) is None


def _reward_for(c, signer: Signer, scalar: float = 1.0) -> Reward:
    return reward_for(c, signer, scalar)


async def test_learner_assembles_groups_across_a_restart_and_rejects_bad_rewards(
    cfg: Config, trainer: Trainer, tmp_path: Path
) -> None:
    run_id = f"l-{uuid.uuid4().hex[:8]}"
    cfg.run_id = run_id
    cfg.learner.groups_per_step = 1000  # assemble only
    cfg.learner.max_policy_lag = 1
    priv, _ = generate_keypair(tmp_path / "keys", "good")
    signer = Signer.from_file(priv)
    stranger = Signer.from_file(generate_keypair(tmp_path / "other", "good")[0])  # same key id, wrong key
    ring = Keyring.from_dir(tmp_path / "keys")
    redis = connect_redis(cfg)

    def completions(group: str, n: int, version: int = 0):
        return [
            engine_signed(
                msgspec.structs.replace(
                    make_completion(f"<answer>{i}</answer>", reference="1"),
                    run_id=run_id,
                    id=f"{group}/{i}",
                    group_id=group,
                    group_size=n,
                    sample_index=i,
                    policy_version=version,
                ),
                cfg,
            )
            for i in range(n)
        ]

    group_a = completions("A", 4, version=2)

    def learner() -> LearnerWorker:
        return LearnerWorker(
            cfg,
            trainer,
            ring,
            pub,
            redis,
            CollectorRegistry(),
            checkpoint=tmp_path / "ckpt" / "learner.ckpt",
            policies_dir=tmp_path / "policies",
        )

    async with Publisher(cfg) as pub:
        for c in group_a:
            await pub.publish(COMPLETIONS.name, c, key=b"A")
        early = [_reward_for(c, signer) for c in group_a[:2]]
        for r in early:
            await pub.publish(REWARDS.name, r, key=b"A")
        first = learner()
        task = asyncio.create_task(first.run())
        await wait_until(lambda: len(first.state.buffer.groups.get("A", [])) == 2, what="two samples of group A")
        first.stop()
        await task

        second = learner()  # resumes from the checkpoint
        assert len(second.state.buffer.groups["A"]) == 2 and len(second.state.buffer.completions) == 2
        second.state.version = 3  # the policy moved on: group B (v1) is too stale, A (v2) is not
        replayed = early[0]  # the very same signed reward, sent again
        forged = _reward_for(group_a[2], stranger)
        group_b = completions("B", 2, version=1)
        for c in group_b:
            await pub.publish(COMPLETIONS.name, c, key=b"B")
            await pub.publish(REWARDS.name, _reward_for(c, signer), key=b"B")
        await pub.publish(REWARDS.name, replayed, key=b"A")
        await pub.publish(REWARDS.name, forged, key=b"A")
        for c in group_a[2:]:
            await pub.publish(REWARDS.name, _reward_for(c, signer), key=b"A")
        task = asyncio.create_task(second.run())
        await wait_until(
            lambda: len(second.state.buffer.ready) == 1 and second.state.counters.get("stale", 0) == 2,
            what="group A ready",
        )
        await asyncio.sleep(1)
        second.stop()
        await task
    [ready] = second.state.buffer.ready
    assert sorted(s.completion_id for s in ready) == [c.id for c in group_a]
    assert second.state.counters == {"consumed": 2, "rejected_replay": 1, "rejected_bad_signature": 1, "stale": 2}
    assert "B" not in second.state.buffer.groups
    await redis.aclose()


def test_a_ppo_update_with_the_value_head_lowers_the_loss() -> None:
    torch.manual_seed(0)
    ppo = Trainer(
        PolicyModel(resolve_model(None), value_head=True),
        TrainConfig.from_learner(LearnerConfig(algo="ppo", lr=2e-6, lam=0.95)),
    )
    groups = [_samples(ppo, [1.0, 0.0, 0.0, 1.0], "p1")]
    samples, advs = ppo.prepare(groups)
    before = ppo.loss_on(samples, advs)
    head = ppo.model.value_head.weight.detach().clone()
    assert ppo.step(0, 1, groups, current_version=0) is not None
    assert ppo.loss_on(samples, advs) < before
    assert not torch.equal(head, ppo.model.value_head.weight)
