"""RunObserver: a dead letter of one of its run's requests or completions is noted on that request."""

from __future__ import annotations

import asyncio
import time
import uuid

import msgspec

from plumbing.config import Config, KafkaConfig
from primerl.observe import RunObserver
from schemas import ChatMessage, DeadLetter, PromptRequest, encode
from schemas.completions import completion_id
from schemas.topics import COMPLETIONS, PROMPTS
from tests.reward_helpers import make_completion


def _letter(payload: bytes, stage: str, topic: str) -> DeadLetter:
    return DeadLetter(
        run_id="any",
        stage=stage,
        error_type="Rejected",
        error="why",
        source_topic=topic,
        partition=0,
        offset=0,
        payload=payload,
    )


async def test_dead_letters_of_this_run_are_noted_and_others_ignored() -> None:
    cfg = Config(kafka=KafkaConfig(bootstrap_servers="127.0.0.1:9"))  # never connected: _dead_letter is called directly
    obs = RunObserver(cfg, "mine", with_rewards=True)
    completion = msgspec.structs.replace(make_completion("hello"), run_id="mine", id=completion_id("req-1", 0))
    forged = msgspec.structs.replace(completion, request_id="req-2", id="no-index")
    req = PromptRequest(run_id="mine", messages=[ChatMessage("user", "hi")], group_size=2)
    other = PromptRequest(run_id="theirs", messages=[ChatMessage("user", "hi")])
    obs._dead_letter(_letter(encode(completion), "verifier", COMPLETIONS.name))
    obs._dead_letter(_letter(encode(req), "router", PROMPTS.name))
    obs._dead_letter(_letter(encode(other), "router", PROMPTS.name))
    obs._dead_letter(_letter(b"\xff garbage", "router", PROMPTS.name))  # undecodable: not ours to judge
    obs._dead_letter(_letter(encode(req), "router", "no.such.topic"))
    obs._dead_letter(_letter(encode(forged), "verifier", COMPLETIONS.name))
    assert obs.requests[completion.request_id].dead == {completion.sample_index: "verifier: Rejected: why"}
    assert obs.requests[req.id].dead == {0: "router: Rejected: why", 1: "router: Rejected: why"}
    assert other.id not in obs.requests and len(obs.requests) == 2
    await obs.stop()


async def test_on_the_real_broker_a_dead_lettered_request_is_seen_before_any_reward(cfg: Config) -> None:
    """What the bench relies on to fail a request at once: the letter reaches the observer's view."""
    from plumbing.kafka import Publisher
    from schemas.topics import DLQ

    obs = RunObserver(cfg, f"t-{uuid.uuid4().hex[:8]}", with_rewards=True)
    await obs.start()
    publisher = Publisher(cfg)
    await publisher.start()
    try:
        await asyncio.wait_for(obs.ready.wait(), 60)
        req = PromptRequest(run_id=obs.run_id, messages=[ChatMessage("user", "hi")])
        await publisher.publish(DLQ.name, _letter(encode(req), "router", PROMPTS.name), key=b"router")
        deadline = time.monotonic() + 60
        while req.id not in obs.requests and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        assert obs.requests[req.id].dead == {0: "router: Rejected: why"}
        assert not obs.requests[req.id].rewards
    finally:
        await publisher.stop()
        await obs.stop()
