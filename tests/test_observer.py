"""RunObserver: a dead letter of one of its run's requests or completions is noted on that request."""

from __future__ import annotations

import msgspec
import pytest

from plumbing.config import Config, KafkaConfig
from primerl.observe import RunObserver
from schemas import ChatMessage, DeadLetter, PromptRequest, encode
from tests.reward_helpers import make_completion

pytestmark = pytest.mark.unit


def _letter(payload: bytes, stage: str) -> DeadLetter:
    return DeadLetter(
        run_id="any",
        stage=stage,
        error_type="Rejected",
        error="why",
        source_topic="t",
        partition=0,
        offset=0,
        payload=payload,
    )


async def test_dead_letters_of_this_run_are_noted_and_others_ignored() -> None:
    cfg = Config(kafka=KafkaConfig(bootstrap_servers="127.0.0.1:9"))  # never connected: _dead_letter is called directly
    obs = RunObserver(cfg, "mine", with_rewards=True)
    completion = msgspec.structs.replace(make_completion("hello"), run_id="mine")
    req = PromptRequest(run_id="mine", messages=[ChatMessage("user", "hi")])
    other = PromptRequest(run_id="theirs", messages=[ChatMessage("user", "hi")])
    obs._dead_letter(_letter(encode(completion), "verifier"))
    obs._dead_letter(_letter(encode(req), "router"))
    obs._dead_letter(_letter(encode(other), "router"))
    obs._dead_letter(_letter(b"\xff garbage", "router"))  # undecodable originals are not ours to judge
    assert obs.requests[completion.request_id].dead == {completion.sample_index: "verifier: Rejected: why"}
    assert obs.requests[req.id].dead == {-1: "router: Rejected: why"}
    assert other.id not in obs.requests and len(obs.requests) == 2
    await obs.stop()
