"""A live learner (real broker, Redis, archiver) trains two steps, the second on a group
that timed out with 3 of its 4 samples; `replay_learner` replays the steps its outcome
log recorded and gets the live run's weights byte for byte: the same safetensors
checksums as the PolicyUpdates the learner published, and the same tensors as the live
trainer's. Assembling groups from the run log instead (no step list) cannot know about
the timed-out group, and does not."""

from __future__ import annotations

import asyncio
import json
import uuid
from pathlib import Path

import msgspec
import torch
from prometheus_client import CollectorRegistry

from archiver.archiver import Archiver
from learners.outcome_log import read_outcomes
from learners.policy_model import Batch, PolicyModel
from learners.service import build_trainer
from learners.worker import LearnerWorker
from operations.replay import RunLog, replay_learner, tensors_sha256
from plumbing.config import Config
from plumbing.kafka import Publisher
from plumbing.redis_client import connect_redis
from plumbing.trust import Keyring, Signer, generate_keypair
from schemas import Completion, Reward
from schemas.topics import COMPLETIONS, POLICY, REWARDS
from tests.kafka_helpers import wait_until
from tests.ops_helpers import tiny_llama
from tests.reward_helpers import engine_signed, make_completion, reward_for

G = 4


def _group(cfg: Config, group: str, gi: int, policy: PolicyModel) -> list[Completion]:
    """G samples with the starting policy's own log-probs (ratio 1), signed with the state dir's engine key."""
    out = []
    for i in range(G):
        prompt, tokens = [2, 40 + gi, 50], [10 + gi, 20 + i, 30 + (i * gi) % 7, 1]
        batch = Batch([prompt], [tokens], [[]], policy.pad_id)
        with torch.no_grad():
            logp, _ = policy(batch)
        c = msgspec.structs.replace(
            make_completion("x"),
            id=f"{group}/{i}",
            run_id=cfg.run_id,
            request_id=f"{group}-req",
            group_id=group,
            group_size=G,
            sample_index=i,
            prompt_token_ids=prompt,
            token_ids=tokens,
            logprobs=logp[0][batch.mask[0] == 1].tolist(),
        )
        out.append(engine_signed(c, cfg))
    return out


def _reward(c: Completion, signer: Signer, scalar: float) -> Reward:
    """A verifier-signed reward binding `c` (its ids, prompt hash and tokens hash)."""
    return reward_for(c, signer, scalar)


async def test_replaying_the_recorded_steps_gives_the_live_weights_byte_for_byte(cfg: Config, tmp_path: Path) -> None:
    run_id = f"lr-{uuid.uuid4().hex[:8]}"
    cfg.run_id = run_id
    cfg.state_dir = tmp_path / "state"
    cfg.archive.root = tmp_path / "runs"
    cfg.archive.flush_interval_s = 0.5
    cfg.engine.model = tiny_llama(tmp_path / "tiny")
    cfg.learner.groups_per_step = 1
    cfg.learner.lr = 1e-3
    cfg.learner.group_timeout_s = 5.0
    signer = Signer.from_file(generate_keypair(tmp_path / "keys", "k")[0])
    trainer = await asyncio.to_thread(build_trainer, cfg)
    initial = tensors_sha256(trainer.model.lm)
    a, b = (_group(cfg, g, gi, trainer.model) for gi, g in enumerate(("A", "B")))
    redis = connect_redis(cfg)
    archiver = Archiver(cfg, CollectorRegistry(), group_id=f"archiver-{run_id}")
    async with Publisher(cfg) as pub:
        learner = LearnerWorker(
            cfg,
            trainer,
            Keyring.from_dir(tmp_path / "keys"),
            pub,
            redis,
            CollectorRegistry(),
            checkpoint=cfg.state_dir / "learner" / run_id / "learner.ckpt",
            policies_dir=tmp_path / "policies",
        )
        tasks = [asyncio.create_task(learner.run()), asyncio.create_task(archiver.run())]
        try:
            # Group A: completions first, rewards in reverse sample order; group B: rewards first,
            # and only 3 of its 4 samples (trained once it timed out).
            await pub.publish_many(COMPLETIONS.name, [(c, b"A") for c in a])
            await pub.publish_many(
                REWARDS.name,
                [(_reward(c, signer, s), b"A") for c, s in reversed(list(zip(a, (1.0, 0.0, 0.5, 0.0), strict=False)))],
            )
            await wait_until(lambda: learner.state.version == 1, 60, "step 0")
            await pub.publish_many(
                REWARDS.name, [(_reward(c, signer, s), b"B") for c, s in zip(b[:3], (0.0, 1.0, 0.2), strict=False)]
            )
            await pub.publish_many(COMPLETIONS.name, [(c, b"B") for c in b[:3]])
            await wait_until(lambda: learner.state.version == 2, 60, "step 1")

            def archived() -> bool:
                path = cfg.archive.root / run_id / "manifest.json"
                counts = json.loads(path.read_text())["messages_per_topic"] if path.exists() else {}
                return counts == {COMPLETIONS.name: 2 * G - 1, REWARDS.name: 2 * G - 1, POLICY.name: 2}

            # The archiver's group is new: it reads the test session's whole history of five
            # topics first (more of it since the session tests of issue 23; 60 s ran out once).
            await wait_until(archived, 240, "the run archived")
        finally:
            learner.stop()
            archiver.stop()
            await asyncio.gather(*tasks)
    await redis.aclose()
    live = tensors_sha256(trainer.model.lm)
    steps = [x for x in read_outcomes(cfg.state_dir / "learner" / run_id / "outcomes.jsonl") if x["kind"] == "step"]
    assert [(x["step"], x["updated"], x["ids"], x["group_sizes"]) for x in steps] == [
        (0, True, [c.id for c in a], [G]),
        (1, True, [c.id for c in b[:3]], [3]),
    ]  # in sample order, however they joined
    assert learner.state.counters == {"consumed": 2 * G - 1, "groups_partial": 1}

    result = await asyncio.to_thread(replay_learner, cfg, RunLog(cfg.archive.root, run_id), f"{run_id}-replay")
    assert result.mode == "recorded_steps" and result.samples_missing == 0 and result.steps_mismatched == 0
    assert result.threads == steps[0]["threads"] == torch.get_num_threads()
    assert result.initial_sha256 == initial != live
    assert sorted(result.original_checksums) == [1, 2] and all(result.original_checksums.values())
    assert result.replay_file_checksums == result.original_checksums  # the safetensors files, byte for byte
    assert result.identical_versions == [1, 2] and result.different_versions == []
    assert result.final_sha256 == live  # and the tensors the live trainer holds

    assembled = await asyncio.to_thread(
        replay_learner, cfg, RunLog(cfg.archive.root, run_id), f"{run_id}-assembled", use_step_list=False
    )
    assert assembled.mode == "assembled" and assembled.groups_incomplete == 1 and len(assembled.steps) == 1
    assert assembled.replay_file_checksums == {} and assembled.final_sha256 != live
