"""Sessions (issue 23) through the real broker and Redis: the verifier scores a finished
session once, from rollout.trajectories, and the learner trains on it; session turns on
rollout.completions are neither scored nor candidates; forged or mis-laid sessions and
garbage on rollout.trajectories are dead-lettered once, and the stages go on."""

from __future__ import annotations

import asyncio
import json
import math
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import msgspec
import pytest
import torch
from prometheus_client import CollectorRegistry
from transformers import AutoTokenizer

import verifier_workers.worker as verifier_module
from learners.worker import LearnerWorker
from plumbing.config import Config
from plumbing.kafka import Publisher
from plumbing.model_store import resolve_model
from plumbing.redis_client import connect_redis
from plumbing.trust import (
    Keyring,
    MemoryReplayGuard,
    Signer,
    generate_keypair,
    prompt_hash,
    token_hash,
    verify_reward,
)
from primerl.rewards_reader import RewardsReader
from schemas import Completion, RewardStatus, Topic, Trajectory
from schemas.sessions import Segment
from schemas.topics import COMPLETIONS, REWARDS, TRAJECTORIES
from tests.kafka_helpers import dead_letters_matching, make_topic, wait_until
from tests.reward_helpers import consistent, engine_signed, make_completion, reward_for
from tests.session_helpers import BROWSER_CALLS, Turn, trajectory_of, with_session
from verifier_workers.rewards import build_registry, close_registry
from verifier_workers.worker import TOOL_CALLS_MAX_BYTES, VerifierWorker

EARLIER = [Turn([10, 11], [-0.1, -0.2], 0, [50, 51, 52]), Turn([20, 21, 22], [-0.3, -0.4, -0.5], 0, [60])]
NEAR_LIMIT = 1_048_576 - 4096  # as tests/test_poison_pills.py: under the producer's max_request_size


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(resolve_model(None))


def _last_turn(run_id: str, group: str, index: int, text: str, tokenizer, n: int = 1) -> Completion:
    """The unsigned last turn of a session: its output the text's tokens, as an engine makes them."""
    c = consistent(make_completion(text, reference="42"), tokenizer)
    return msgspec.structs.replace(
        c,
        run_id=run_id,
        id=f"{group}-t2/{index}",
        request_id=f"{group}-t2",
        group_id=group,
        group_size=n,
        sample_index=index,
    )


def _session(cfg: Config, run_id: str, group: str, index: int, text: str, tokenizer, n: int = 1) -> Completion:
    """A signed three-turn session's last completion (browser calls on the way)."""
    return engine_signed(
        with_session(_last_turn(run_id, group, index, text, tokenizer, n), EARLIER, BROWSER_CALLS), cfg
    )


def _bad_layout(c: Completion) -> Completion:
    """`c` with segments that skip a tool token."""
    assert c.session is not None
    segments = [*c.session.segments[:-1], Segment("tool", c.session.segments[-1].start + 1, c.session.segments[-1].end)]
    return msgspec.structs.replace(c, session=msgspec.structs.replace(c.session, segments=segments))


@pytest.fixture
async def verifier(cfg: Config, tmp_path: Path) -> AsyncIterator[tuple[VerifierWorker, Keyring]]:
    priv, _ = generate_keypair(tmp_path / "keys", "test-key")
    fns = build_registry()
    redis = connect_redis(cfg)
    async with Publisher(cfg) as pub:
        worker = VerifierWorker(cfg, fns, Signer.from_file(priv), pub, redis, CollectorRegistry())
        task = asyncio.create_task(worker.run())
        await asyncio.wait_for(worker.ready.wait(), 60)
        yield worker, Keyring.from_dir(tmp_path / "keys")
        worker.stop()
        await asyncio.wait_for(task, 30)
    await close_registry(fns)
    await redis.aclose()


async def _no_more_letters(cfg: Config, pred, count: int) -> None:
    with pytest.raises(TimeoutError):
        await dead_letters_matching(cfg, pred, count + 1, timeout_s=5)


async def test_the_verifier_scores_a_finished_session_once_with_its_tool_use_and_refuses_forged_ones(
    cfg: Config, verifier, tokenizer
) -> None:
    worker, ring = verifier
    run_id = f"sv-{uuid.uuid4().hex[:8]}"
    good = _session(cfg, run_id, f"{run_id}-g", 0, "so it is <answer>42</answer>", tokenizer)
    assert good.session is not None
    turn = engine_signed(with_session(_last_turn(run_id, f"{run_id}-g", 1, "<answer>42</answer>", tokenizer), []), cfg)
    tool_tampered = msgspec.structs.replace(
        _session(cfg, run_id, f"{run_id}-x", 0, "<answer>42</answer>", tokenizer),
        prompt_token_ids=[*good.prompt_token_ids[:-1], 61],  # the last tool token, after signing
    )
    layout_tampered = _bad_layout(_session(cfg, run_id, f"{run_id}-y", 0, "<answer>42</answer>", tokenizer))
    layout_signed = engine_signed(
        _bad_layout(with_session(_last_turn(run_id, f"{run_id}-z", 0, "x", tokenizer), EARLIER)), cfg
    )
    components = {"calls": 2.0, "call_errors": 1.0, "nan": math.nan}
    # The wrapper's own forgeries, around a genuine engine-signed session: components inflated
    # after the env hub signed, and no env hub signature at all.
    wrapped = _session(cfg, run_id, f"{run_id}-w", 0, "<answer>42</answer>", tokenizer)
    inflated = msgspec.structs.replace(trajectory_of(wrapped, cfg, components), components={"calls": 99.0})
    unsigned = trajectory_of(_session(cfg, run_id, f"{run_id}-u", 0, "<answer>42</answer>", tokenizer), None)
    async with RewardsReader(cfg, run_id) as reader, Publisher(cfg) as pub:
        await pub.publish(COMPLETIONS.name, turn, key=turn.group_id.encode())  # a turn: never scored
        await pub.publish(COMPLETIONS.name, good, key=good.group_id.encode())  # the last turn, as a turn: neither
        for t in (inflated, unsigned):
            await pub.publish(TRAJECTORIES.name, t, key=t.completion.group_id.encode())
        for c in (tool_tampered, layout_tampered, layout_signed, good, good):  # `good` twice: a redelivery
            await pub.publish(TRAJECTORIES.name, trajectory_of(c, cfg, components), key=c.group_id.encode())
        [reward] = await reader.wait_for(1, timeout_s=60)
        letters = await dead_letters_matching(
            cfg, lambda d: d.stage == "verifier" and run_id.encode() in d.payload, 5, timeout_s=60
        )
        await asyncio.sleep(2)  # a second reward would be here by now
    assert len(reader.rewards) == 1
    await verify_reward(reward, ring, MemoryReplayGuard())
    # Bound to the last turn's completion exactly as a single turn's reward is.
    assert reward.completion_id == good.id and reward.request_id == good.request_id
    assert reward.tokens_hash == token_hash(good.token_ids) and reward.prompt_hash == prompt_hash(good.prompt)
    assert reward.status is RewardStatus.OK and reward.scalar == 1.0  # the answer's
    assert reward.components["tool.calls"] == 2.0 and reward.components["tool.call_errors"] == 1.0
    assert "tool.nan" not in reward.components and reward.components["turns"] == 3.0
    assert {k for k in reward.components if not k.startswith("tool.")} > {"turns"}  # the answer's are there too
    calls = json.loads(reward.trace["tool_calls"])
    assert [(c["url"], c["status"], c["ok"], c["bytes"], c["latency_ms"]) for c in calls] == [
        ("http://example.test/a", 200, True, 512, 12.5),
        ("http://example.test/b", 404, False, 0, 3.0),
    ]
    assert calls[1]["error"] == "HTTP 404" and "tool_calls_dropped" not in reward.trace
    assert {d.error.split(":")[0] for d in letters} == {"bad_signature", "session_layout", "unsigned"}
    assert sum("trajectory " in d.error for d in letters) == 2  # the two wrappers, refused for the wrapper
    assert sorted(d.source_topic for d in letters) == [TRAJECTORIES.name] * 5
    await _no_more_letters(cfg, lambda d: d.stage == "verifier" and run_id.encode() in d.payload, 5)
    sample = worker.registry.get_sample_value
    # At least: group `verifier` also reads the session records other tests of the session wrote
    # (the per-run checks above are the exact ones).
    assert (sample("primerl_verifier_session_turns_skipped_total") or 0) >= 2
    assert (sample("primerl_verifier_trajectories_total", {"done_reason": "env_done"}) or 0) >= 1
    for reason in ("trajectory_bad_signature", "trajectory_unsigned"):
        assert (sample("primerl_verifier_completions_rejected_total", {"reason": reason}) or 0) == 1, reason


def test_the_tool_calls_trace_is_capped_at_whole_calls() -> None:
    many = BROWSER_CALLS * 200
    trace = verifier_module.tool_calls_trace(many)
    kept = json.loads(trace["tool_calls"])
    assert len(trace["tool_calls"].encode()) <= TOOL_CALLS_MAX_BYTES and 0 < len(kept) < len(many)
    assert int(trace["tool_calls_dropped"]) == len(many) - len(kept)


async def test_garbage_and_oversized_records_on_rollout_trajectories_are_dead_lettered_once(
    cfg: Config, tmp_path: Path, monkeypatch, tokenizer
) -> None:
    run_id = f"sp-{uuid.uuid4().hex[:8]}"
    source = await make_topic(cfg, 2)
    monkeypatch.setattr(verifier_module, "TRAJECTORIES", Topic(source, 2, Trajectory, "test"))
    monkeypatch.setattr(verifier_module, "COMPLETIONS", Topic(await make_topic(cfg, 1), 1, Completion, "test"))
    cfg.verifier.version = f"sp-{uuid.uuid4().hex[:6]}"
    priv, _ = generate_keypair(tmp_path / "keys", "pill-key")
    fns = build_registry()
    redis = connect_redis(cfg)
    good = _session(cfg, run_id, f"{run_id}-g", 0, "<answer>42</answer>", tokenizer)
    huge = run_id.encode() + b"\xc1" + uuid.uuid4().bytes * (NEAR_LIMIT // 16)
    not_a_trajectory = msgspec.msgpack.encode({"run_id": run_id, "completion": 3})
    async with Publisher(cfg) as pub, RewardsReader(cfg, run_id) as reader:
        worker = VerifierWorker(cfg, fns, Signer.from_file(priv), pub, redis, CollectorRegistry())
        task = asyncio.create_task(worker.run())
        try:
            await pub.publish_raw(source, huge, key=b"big")
            await pub.publish_raw(source, b"\xde\xad " + run_id.encode(), key=b"k")
            await pub.publish_raw(source, not_a_trajectory, key=b"k")
            await pub.publish(source, trajectory_of(good, cfg), key=good.group_id.encode())
            [reward] = await reader.wait_for(1, timeout_s=60)
            assert reward.completion_id == good.id and not task.done()
        finally:
            worker.stop()
            await asyncio.wait_for(task, 30)
            await close_registry(fns)
            await redis.aclose()
    letters = await dead_letters_matching(cfg, lambda d: d.source_topic == source, 3, timeout_s=30)
    assert sorted(d.payload_size for d in letters) == sorted([len(huge), len(not_a_trajectory), 3 + len(run_id)])
    assert {d.error_type for d in letters} == {"DecodeError"}
    await _no_more_letters(cfg, lambda d: d.source_topic == source, 3)


class _RecordingTrainer:
    """Trainer stand-in (as in tests/fuzz/test_fuzz_learner.py): no update, nothing trained."""

    def __init__(self) -> None:
        self.optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)

    def step(self, step, version, groups, current_version):  # noqa: ANN001 - Trainer.step's signature
        return None


async def test_the_learner_trains_on_trajectories_not_on_session_turns(cfg: Config, tmp_path: Path, tokenizer) -> None:
    run_id = f"sl-{uuid.uuid4().hex[:8]}"
    cfg.run_id = run_id
    cfg.learner.groups_per_step = 1000  # assemble only
    priv, _ = generate_keypair(tmp_path / "keys", "good")
    signer, ring = Signer.from_file(priv), Keyring.from_dir(tmp_path / "keys")
    group = f"{run_id}-g"
    sessions = [_session(cfg, run_id, group, i, f"<answer>{40 + i}</answer>", tokenizer, n=2) for i in range(2)]
    # An earlier turn of session 0, on rollout.completions with a reward bound to it: never a candidate.
    turn0 = engine_signed(with_session(_last_turn(run_id, f"{group}-t0", 0, "a", tokenizer, n=2), []), cfg)
    mislaid = engine_signed(
        _bad_layout(with_session(_last_turn(run_id, f"{run_id}-m", 0, "b", tokenizer), EARLIER)), cfg
    )
    redis = connect_redis(cfg)
    async with Publisher(cfg) as pub:
        for c in [turn0, *sessions]:  # the engine publishes every turn, the last one included
            await pub.publish(COMPLETIONS.name, c, key=c.group_id.encode())
        await pub.publish(REWARDS.name, reward_for(turn0, signer), key=group.encode())
        await pub.publish(TRAJECTORIES.name, trajectory_of(mislaid, cfg), key=mislaid.group_id.encode())
        for c, scalar in zip(sessions, [1.0, 0.0], strict=True):
            await pub.publish(TRAJECTORIES.name, trajectory_of(c, cfg), key=group.encode())
            await pub.publish(REWARDS.name, reward_for(c, signer, scalar), key=group.encode())
        learner = LearnerWorker(
            cfg,
            _RecordingTrainer(),  # type: ignore[arg-type]
            ring,
            pub,
            redis,
            CollectorRegistry(),
            checkpoint=tmp_path / "ckpt" / "learner.ckpt",
            policies_dir=tmp_path / "policies",
        )
        task = asyncio.create_task(learner.run())
        try:
            await wait_until(
                lambda: (
                    learner.buffer.ready_groups == 1
                    and learner.state.counters.get("session_turns_skipped", 0) == 3
                    and learner.state.counters.get("rejected_completion_session_layout", 0) == 1
                ),
                what="the session group ready, the turns skipped, the mis-laid session refused",
            )
        finally:
            learner.stop()
            await asyncio.wait_for(task, 30)
    await redis.aclose()
    [ready] = learner.state.buffer.ready
    assert [s.completion_id for s in ready] == [c.id for c in sessions]
    assert [s.reward for s in ready] == [1.0, 0.0]
    for s, c in zip(ready, sessions, strict=True):
        assert s.prompt_token_ids == make_completion("x").prompt_token_ids
        assert s.token_ids == [10, 11, 50, 51, 52, 20, 21, 22, 60, *c.token_ids]
        assert s.loss_mask == [1, 1, 0, 0, 0, 1, 1, 1, 0] + [1] * len(c.token_ids)
        assert s.logprobs == [-0.1, -0.2, 0.0, 0.0, 0.0, -0.3, -0.4, -0.5, 0.0, *c.logprobs]
    assert turn0.id not in learner.state.buffer.completions and turn0.id in learner.state.buffer.rewards
    letters = await dead_letters_matching(cfg, lambda d: d.stage == "learner" and mislaid.id.encode() in d.payload, 1)
    assert letters[0].error.startswith("session_layout") and letters[0].source_topic == TRAJECTORIES.name
