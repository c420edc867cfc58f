"""Chain of custody through the real broker and Redis: the real verifier and learner workers
(a stand-in trainer: groups are assembled, not stepped), completions published as an engine
would (signed with the state dir's engine key) and by an attacker who can write
rollout.completions. Each bad completion is dead-lettered once by each stage that reads it,
each genuine one is rewarded once and joins its group once, whatever arrived first.

Plus the engine worker's own finals (stand-in engine, in-process): signed, verifiable.
"""

from __future__ import annotations

import asyncio
import uuid
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import msgspec
import pytest
import torch
from prometheus_client import CollectorRegistry
from transformers import AutoTokenizer

from learners.worker import LearnerWorker
from plumbing.config import Config
from plumbing.custody import engine_keyring, engine_signer, verifier_signer
from plumbing.kafka import Publisher
from plumbing.model_store import resolve_model
from plumbing.redis_client import connect_redis
from plumbing.trust import Keyring, Signer, generate_keypair, rotate_keys, token_hash, verify_completion
from primerl.rewards_reader import RewardsReader
from schemas import Completion, DeadLetter, decode
from schemas.topics import COMPLETIONS
from tests.kafka_helpers import dead_letters_matching, wait_until
from tests.reward_helpers import consistent, make_completion
from verifier_workers.rewards import build_registry, close_registry
from verifier_workers.worker import VerifierWorker


@pytest.fixture(scope="module")
def tokenizer() -> Any:
    return AutoTokenizer.from_pretrained(resolve_model(None))


def _stand_in_trainer() -> Any:
    """What LearnerWorker touches of a Trainer when it never steps: an optimizer to checkpoint."""
    return SimpleNamespace(optimizer=torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1))


def _letter_id(d: DeadLetter) -> str:
    try:
        return decode(d.payload, Completion).id
    except Exception:  # noqa: BLE001 - not a completion
        return ""


async def test_forged_mismatched_unsigned_and_replayed_completions_are_refused_and_nothing_is_lost(
    cfg: Config, tmp_path: Path, tokenizer: Any
) -> None:
    run_id = f"cus-{uuid.uuid4().hex[:8]}"
    cfg.run_id = run_id
    cfg.learner.groups_per_step = 1000  # assemble only
    cfg.learner.group_timeout_s = 600
    engine = engine_signer(cfg)  # the genuine engine's key (the state dir's)
    attacker = Signer.from_file(generate_keypair(tmp_path / "attacker", engine.key_id, role="engine")[0])
    vpriv, _ = generate_keypair(tmp_path / "vkeys", "verifier-test")

    def completion(group: str, text: str, index: int = 0) -> Completion:
        c = consistent(make_completion(text, reference="42"), tokenizer)
        return msgspec.structs.replace(
            c,
            run_id=run_id,
            id=f"{run_id}-{group}/{index}",
            request_id=f"{run_id}-{group}",
            group_id=f"{run_id}-{group}",
            group_size=1,
            sample_index=index,
        )

    # A: a forgery with the genuine one's id and other tokens, arriving first.
    genuine_a = engine.sign(completion("A", "so it is <answer>42</answer>"))
    forged_a = attacker.sign(completion("A", "<answer>42</answer> trust me"))
    # B: text and tokens that disagree (signed by the engine key: a buggy or stolen engine), then the genuine one.
    wrong_tokens = tokenizer.encode("<answer>41</answer>", add_special_tokens=False)
    mismatched_b = engine.sign(msgspec.structs.replace(completion("B", "<answer>42</answer>"), token_ids=wrong_tokens))
    genuine_b = engine.sign(completion("B", "<answer>42</answer>"))
    # C: unsigned, and wrongly signed (the engine's key id, a corrupted signature), then the genuine one.
    genuine_c = engine.sign(completion("C", "<answer>42</answer>."))
    unsigned_c = msgspec.structs.replace(genuine_c, engine_key_id="", engine_signature=b"")
    bad_sig_c = msgspec.structs.replace(genuine_c, engine_signature=bytes(64))
    # D: the genuine signature of D/0 replayed onto another completion, and D/0 itself sent again.
    genuine_d = engine.sign(completion("D", "<answer>42</answer>!"))
    replayed_d = msgspec.structs.replace(
        completion("D2", "<answer>42</answer>"),
        engine_key_id=genuine_d.engine_key_id,
        engine_signature=genuine_d.engine_signature,
    )
    genuine = [genuine_a, genuine_b, genuine_c, genuine_d]
    bad = {"A": forged_a, "B": mismatched_b, "C0": unsigned_c, "C1": bad_sig_c, "D": replayed_d}

    fns = build_registry()
    redis = connect_redis(cfg)
    async with Publisher(cfg) as pub, RewardsReader(cfg, run_id) as reader:
        verifier = VerifierWorker(cfg, fns, Signer.from_file(vpriv), pub, redis, CollectorRegistry())
        learner = LearnerWorker(
            cfg,
            _stand_in_trainer(),
            Keyring.from_dir(tmp_path / "vkeys"),
            pub,
            redis,
            CollectorRegistry(),
            checkpoint=tmp_path / "ckpt" / "learner.ckpt",
            policies_dir=tmp_path / "policies",
        )
        tasks = [asyncio.create_task(verifier.run()), asyncio.create_task(learner.run())]
        await asyncio.wait_for(learner.assigned.wait(), 60)
        # One key per group: the order below is the order each stage reads them in.
        for c in (
            forged_a,
            genuine_a,
            mismatched_b,
            genuine_b,
            unsigned_c,
            bad_sig_c,
            genuine_c,
            genuine_d,
            replayed_d,
        ):
            await pub.publish(COMPLETIONS.name, c, key=c.group_id.encode())
        await reader.wait_for(4, timeout_s=90)
        await wait_until(lambda: len(learner.state.buffer.ready) == 4, timeout_s=60, what="four groups ready")
        await pub.publish(COMPLETIONS.name, genuine_d, key=genuine_d.group_id.encode())  # a verbatim re-send
        letters = await dead_letters_matching(
            # The learner reads the topic from its start: other tests' garbage is dead-lettered under this run too.
            cfg,
            lambda d: d.run_id == run_id and d.source_topic == COMPLETIONS.name and _letter_id(d).startswith(run_id),
            10,
            timeout_s=60,
        )
        await asyncio.sleep(3)  # a second reward or a second sample would be here by now
        verifier.stop()
        learner.stop()
        await asyncio.gather(*tasks)
    await close_registry(fns)
    await redis.aclose()

    # Every genuine completion rewarded once, for its own tokens.
    assert sorted(r.completion_id for r in reader.rewards) == sorted(c.id for c in genuine)
    by_id = {r.completion_id: r for r in reader.rewards}
    for c in genuine:
        assert by_id[c.id].tokens_hash == token_hash(c.token_ids) and by_id[c.id].scalar == 1.0
    # ... and trained on once (each group ready once, with the genuine tokens).
    ready = {s.completion_id: s.token_ids for g in learner.state.buffer.ready for s in g}
    assert ready == {c.id: c.token_ids for c in genuine}
    # Each bad one dead-lettered once by each stage that saw it (the text/token check is the verifier's;
    # the learner refuses that one when the genuine completion's reward does not bind it).
    got = sorted((d.stage, _letter_id(d), d.error.split(":")[0]) for d in letters)
    expected = sorted(
        [
            ("verifier", forged_a.id, "bad_signature"),
            ("learner", forged_a.id, "bad_signature"),
            ("verifier", mismatched_b.id, "text_tokens_mismatch"),
            ("learner", mismatched_b.id, "binding_mismatch"),
            ("verifier", genuine_c.id, "unsigned"),
            ("learner", genuine_c.id, "unsigned"),
            ("verifier", genuine_c.id, "bad_signature"),
            ("learner", genuine_c.id, "bad_signature"),
            ("verifier", replayed_d.id, "bad_signature"),
            ("learner", replayed_d.id, "bad_signature"),
        ]
    )
    assert got == expected, got
    assert len(bad) == 5
    rejected = {k: v for k, v in learner.state.counters.items() if k.startswith("rejected")}
    assert rejected == {
        "rejected_completion_bad_signature": 3,
        "rejected_completion_unsigned": 1,
        "rejected_binding_mismatch": 1,
    }
    assert verifier.metrics.duplicates._value.get() == 1  # the re-sent D/0: no second reward


async def test_the_engine_worker_signs_every_final_completion(cfg: Config, tokenizer: Any) -> None:
    import engine_workers.worker as worker_module
    from engine_workers.engine import SampleDelta, StepOutput
    from engine_workers.worker import EngineWorker
    from schemas import PromptRequest

    class StandIn:
        max_model_len, block_size, kv_events_endpoint, kv_events_topic, policy_version = 2048, 16, "", "kv", 0

        def __init__(self, tok: Any) -> None:
            self.tokenizer = tok

        async def stream(self, prompt_token_ids: list[int], params: Any, request_id: str):
            yield StepOutput(
                deltas=[
                    SampleDelta(index=i, text="x", token_ids=[87], logprobs=[-0.5], finish_reason="length")
                    for i in range(params.n)
                ],
                num_cached_tokens=0,
            )

    class Capture:
        def __init__(self) -> None:
            self.finals: list[Completion] = []

        async def send(self, topic: str, msg: Any, key: bytes | None = None) -> Any:
            fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
            fut.set_result(SimpleNamespace(partition=0, offset=0))  # what the producer's ack carries
            return fut

        async def publish_many(self, topic: str, items: list[tuple[Any, bytes]]) -> None:
            self.finals += [m for m, _ in items]

    redis = connect_redis(cfg)
    cap = Capture()
    worker = EngineWorker(cfg, StandIn(tokenizer), cap, redis, CollectorRegistry())  # type: ignore[arg-type]
    assert worker_module.COMPLETIONS.name == COMPLETIONS.name
    req = PromptRequest(run_id="r", group_id="g", group_size=3, text="Say x.")
    await worker._generate(req, "Say x.", [1, 2, 3], SimpleNamespace(n=3, max_tokens=8, min_tokens=0), 0.0)
    await redis.aclose()
    ring = engine_keyring(cfg)
    assert len(cap.finals) == 3 and ring is not None
    for c in cap.finals:
        assert c.engine_key_id == worker.signer.key_id  # type: ignore[union-attr]
        verify_completion(c, ring)


async def test_keys_rotated_mid_run_with_no_grace_lose_nothing(cfg: Config, tmp_path: Path, tokenizer: Any) -> None:
    """Both folders rotated while completions and rewards are in flight, old keys retired at
    once: the signers switch at their next signature, the checkers trust the new keys at once,
    and what the old keys signed before the rotation stays valid."""
    run_id = f"rot-{uuid.uuid4().hex[:8]}"
    cfg.run_id = run_id
    cfg.state_dir = tmp_path / "state"  # its own key folders: the session engine's keys are not rotated
    cfg.learner.groups_per_step = 1000  # assemble only
    cfg.learner.group_timeout_s = 600
    engine, vsigner = engine_signer(cfg), verifier_signer(cfg)
    old_engine, old_verifier = engine.key_id, vsigner.key_id

    def completion(i: int) -> Completion:
        c = consistent(make_completion(f"<answer>{i}</answer>", reference=str(i)), tokenizer)
        g = f"{run_id}-{i}"
        return msgspec.structs.replace(c, run_id=run_id, id=f"{g}/0", request_id=g, group_id=g, group_size=1)

    fns = build_registry()
    redis = connect_redis(cfg)
    async with Publisher(cfg) as pub, RewardsReader(cfg, run_id) as reader:
        verifier = VerifierWorker(cfg, fns, vsigner, pub, redis, CollectorRegistry())
        learner = LearnerWorker(
            cfg,
            _stand_in_trainer(),
            Keyring.from_dir(cfg.keys_dir),
            pub,
            redis,
            CollectorRegistry(),
            checkpoint=tmp_path / "ckpt" / "learner.ckpt",
            policies_dir=tmp_path / "policies",
        )
        tasks = [asyncio.create_task(verifier.run()), asyncio.create_task(learner.run())]
        try:
            await asyncio.wait_for(learner.assigned.wait(), 60)
            first = [engine.sign(completion(i)) for i in range(8)]
            for c in first:
                await pub.publish(COMPLETIONS.name, c, key=c.group_id.encode())
            await reader.wait_for(1, timeout_s=90)  # mid-run: some rewarded, the rest in flight
            rotate_keys(cfg.engine_keys_dir, "engine", grace_s=0)
            rotate_keys(cfg.keys_dir, "verifier", grace_s=0)
            second = [engine.sign(completion(i)) for i in range(8, 16)]
            for c in second:
                await pub.publish(COMPLETIONS.name, c, key=c.group_id.encode())
            await reader.wait_for(16, timeout_s=120)
            await wait_until(lambda: len(learner.state.buffer.ready) == 16, timeout_s=60, what="sixteen groups ready")
        finally:
            verifier.stop()
            learner.stop()
            await asyncio.gather(*tasks, return_exceptions=True)
            await close_registry(fns)
            await redis.aclose()

    assert {c.engine_key_id for c in first} == {old_engine}
    assert {c.engine_key_id for c in second} == {engine.key_id} and engine.key_id != old_engine
    assert vsigner.key_id != old_verifier and old_verifier in {r.key_id for r in reader.rewards}
    assert vsigner.key_id in {r.key_id for r in reader.rewards}
    assert sorted(r.completion_id for r in reader.rewards) == sorted(c.id for c in first + second)
    assert {s.completion_id for g in learner.state.buffer.ready for s in g} == {c.id for c in first + second}
    assert not [k for k in learner.state.counters if k.startswith("rejected")], learner.state.counters
    with pytest.raises(TimeoutError):  # not one letter for this run, from either stage
        await dead_letters_matching(
            cfg, lambda d: d.run_id == run_id or _letter_id(d).startswith(run_id), 1, timeout_s=5
        )
