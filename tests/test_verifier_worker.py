"""The verifier worker through the real broker and Redis, and end to end with the real engine."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import msgspec
import pytest
from prometheus_client import CollectorRegistry
from transformers import AutoTokenizer

from plumbing.config import Config
from plumbing.kafka import Publisher
from plumbing.model_store import resolve_model
from plumbing.redis_client import connect_redis
from plumbing.trust import Keyring, MemoryReplayGuard, RewardRejected, Signer, generate_keypair, verify_reward
from primerl.rewards_reader import RewardsReader
from producers.arithmetic import arithmetic_requests
from schemas import Grammar, GrammarKind, RewardStatus
from schemas.topics import COMPLETIONS, PROMPTS
from tests.kafka_helpers import dead_letters_matching
from tests.reward_helpers import consistent, engine_signed, make_completion
from verifier_workers.rewards import build_registry, close_registry
from verifier_workers.worker import VerifierWorker


@pytest.fixture
async def verifier(cfg: Config, tmp_path: Path) -> AsyncIterator[tuple[VerifierWorker, Keyring]]:
    priv, _ = generate_keypair(tmp_path / "keys", "test-key")
    fns = build_registry()
    redis = connect_redis(cfg)
    async with Publisher(cfg) as pub:
        worker = VerifierWorker(cfg, fns, Signer.from_file(priv), pub, redis, CollectorRegistry())
        task = asyncio.create_task(worker.run())
        yield worker, Keyring.from_dir(tmp_path / "keys")
        worker.stop()
        await task
    await close_registry(fns)
    await redis.aclose()


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(resolve_model(None))


@pytest.fixture
def completion(cfg: Config, tokenizer):
    """Completions as an engine makes them: token_ids are the text's, signed with the state dir's engine key."""

    def make(run_id: str, text: str, reference: str, index: int = 0, **kw: object):
        c = consistent(make_completion(text, reference=reference, **kw), tokenizer)  # type: ignore[arg-type]
        return engine_signed(
            msgspec.structs.replace(
                c, run_id=run_id, id=f"{run_id}-req/{index}", request_id=f"{run_id}-req", sample_index=index
            ),
            cfg,
        )

    return make


async def test_scores_signs_and_publishes_one_reward_per_completion(cfg: Config, verifier, completion) -> None:
    worker, ring = verifier
    run_id = f"v-{uuid.uuid4().hex[:8]}"
    right = completion(run_id, "so it is <answer>42</answer>", "42", 0)
    wrong = completion(run_id, "<answer>41</answer>", "42", 1)
    no_answer = completion(run_id, "I don't know", "42", 2)
    fmt = completion(
        run_id,
        '{"a": 1}',
        "",
        3,
        task="format",
        grammar=Grammar(GrammarKind.JSON_SCHEMA, '{"type": "object", "required": ["a"]}'),
    )
    async with RewardsReader(cfg, run_id) as reader, Publisher(cfg) as pub:
        for c in (right, wrong, no_answer, fmt, right):  # `right` twice: a redelivery
            await pub.publish(COMPLETIONS.name, c, key=c.group_id.encode())
        rewards = await reader.wait_for(4, timeout_s=60)
        await asyncio.sleep(2)  # a second reward for `right` would arrive by now
    by_completion = {r.completion_id: r for r in reader.rewards}
    assert len(reader.rewards) == 4 and len(by_completion) == 4
    assert by_completion[right.id].scalar == 1.0 and by_completion[right.id].status is RewardStatus.OK
    assert by_completion[wrong.id].scalar == 0.0 and by_completion[wrong.id].status is RewardStatus.OK
    assert by_completion[no_answer.id].status is RewardStatus.POLICY_FAIL
    assert by_completion[fmt.id].status is RewardStatus.OK and by_completion[fmt.id].scalar == 1.0
    guard = MemoryReplayGuard()
    for r in rewards:
        await verify_reward(r, ring, guard)
    with pytest.raises(RewardRejected):
        await verify_reward(rewards[0], ring, guard)


async def test_garbage_and_unknown_tasks_are_dead_lettered_and_the_worker_goes_on(
    cfg: Config, verifier, completion
) -> None:
    run_id = f"v-{uuid.uuid4().hex[:8]}"
    unknown = completion(run_id, "x", "y", 0, task="no-such-task")
    good = completion(run_id, "<answer>1</answer>", "1", 1)
    async with RewardsReader(cfg, run_id) as reader, Publisher(cfg) as pub:
        await pub.publish_raw(COMPLETIONS.name, b"\xde\xad garbage " + run_id.encode(), key=run_id.encode())
        await pub.publish_raw(
            COMPLETIONS.name, b'{"run_id": "' + run_id.encode() + b'", "text": 3}', key=run_id.encode()
        )
        await pub.publish(COMPLETIONS.name, unknown, key=run_id.encode())
        await pub.publish(COMPLETIONS.name, good, key=run_id.encode())
        rewards = await reader.wait_for(1, timeout_s=60)
    assert [r.completion_id for r in rewards] == [good.id]
    letters = await dead_letters_matching(cfg, lambda d: d.stage == "verifier" and run_id.encode() in d.payload, 3)
    assert {d.error_type for d in letters} == {"DecodeError", "UnknownTask"}
    assert any("no-such-task" in d.error for d in letters)


async def test_hostile_code_is_stopped_and_the_worker_keeps_serving(cfg: Config, verifier, completion) -> None:
    run_id = f"v-{uuid.uuid4().hex[:8]}"
    loop_forever = completion(run_id, "```python\nwhile True:\n    pass\n```", "assert True", 0, task="code")
    fork_bomb = completion(
        run_id, "```python\nimport os\nwhile True:\n    os.fork()\n```", "assert True", 1, task="code"
    )
    good = completion(
        run_id, "```python\ndef add(a, b):\n    return a + b\n```", "assert add(2, 3) == 5", 2, task="code"
    )
    async with RewardsReader(cfg, run_id) as reader, Publisher(cfg) as pub:
        for c in (loop_forever, fork_bomb, good):
            await pub.publish(COMPLETIONS.name, c, key=c.group_id.encode())
        await reader.wait_for(3, timeout_s=90)
    status = {r.completion_id: r.status for r in reader.rewards}
    assert status[loop_forever.id] is RewardStatus.TIMEOUT
    assert status[fork_bomb.id] in (RewardStatus.POLICY_FAIL, RewardStatus.TIMEOUT)
    assert status[good.id] is RewardStatus.OK


@pytest.mark.engine
async def test_end_to_end_prompts_to_signed_rewards_on_the_real_engine(engine, cfg: Config, verifier) -> None:
    _, ring = verifier
    run_id = f"e2e-{uuid.uuid4().hex[:8]}"
    reqs = arithmetic_requests(run_id, 4, 3, max_tokens=24, seed=5)
    async with RewardsReader(cfg, run_id) as reader, Publisher(cfg) as pub:
        await pub.publish_many(PROMPTS.name, [(r, r.routing_key()) for r in reqs])
        rewards = await reader.wait_for(12, timeout_s=400)
        await asyncio.sleep(2)
    assert len(reader.rewards) == 12
    assert sorted(r.completion_id for r in rewards) == sorted(f"{r.id}/{i}" for r in reqs for i in range(3))
    guard = MemoryReplayGuard()
    for r in rewards:
        await verify_reward(r, ring, guard)
        assert r.status in (RewardStatus.OK, RewardStatus.POLICY_FAIL) and r.verifier_id == "primerl-verifier"
