"""Issue 22 on the real engine: a worker SIGKILLed mid-sample, twice; the redelivered
requests continue from the chunks the dead attempts got acknowledged.

One test, two kills (each engine restart costs ~40-60 s on this CPU): a greedy sample
against an uninterrupted run of the same prompt, and a sampled group of two.
"""

from __future__ import annotations

import asyncio
import time

import pytest

from plumbing.config import Config
from plumbing.kafka import Publisher
from primerl.observe import RunObserver
from schemas import ChatMessage, CompletionChunk, PromptRequest, SamplingParams
from schemas.topics import PROMPTS

pytestmark = pytest.mark.engine


async def _publish(cfg: Config, reqs: list[PromptRequest]) -> None:
    async with Publisher(cfg) as pub:
        await pub.publish_many(PROMPTS.name, [(r, r.routing_key()) for r in reqs])


def _attempts(chunks: list[CompletionChunk]) -> dict[str, list[CompletionChunk]]:
    """Each attempt's chunks in seq order (duplicates dropped), attempts in order of appearance."""
    out: dict[str, dict[int, CompletionChunk]] = {}
    for c in chunks:
        out.setdefault(c.attempt, {}).setdefault(c.seq, c)
    return {a: [by_seq[k] for k in sorted(by_seq)] for a, by_seq in out.items()}


def _tokens(chain: list[CompletionChunk]) -> list[int]:
    return [t for c in chain for t in c.token_ids]


async def _until(cond, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not cond():
        if time.monotonic() > deadline:
            raise TimeoutError(what)
        await asyncio.sleep(0.05)


def _streamed(obs: RunObserver, req: PromptRequest, index: int, attempt_no: int) -> int:
    """Tokens the `attempt_no`-th attempt (from 0) of a sample streamed so far."""
    view = obs.requests.get(req.id)
    chains = list(_attempts(view.chunks.get(index, [])).values()) if view else []
    return len(_tokens(chains[attempt_no])) if len(chains) > attempt_no else 0


async def test_samples_killed_twice_resume_from_their_chunks_and_finish_once(engine, cfg, observed) -> None:
    run_id, obs = observed
    story = [ChatMessage("user", "Tell me a long story about a lighthouse keeper and a storm.")]
    greedy = SamplingParams(temperature=0.0, max_tokens=96, min_tokens=96)
    reference = PromptRequest(run_id=run_id, messages=story, sampling=greedy)
    await _publish(cfg, [reference])
    await obs.wait_finals(1, timeout_s=300)
    uninterrupted = obs.requests[reference.id].finals[0]

    g = PromptRequest(run_id=run_id, messages=story, sampling=greedy)
    s = PromptRequest(
        run_id=run_id,
        messages=[ChatMessage("user", "Describe a city at night, street by street.")],
        group_size=2,
        sampling=SamplingParams(temperature=1.0, max_tokens=200, min_tokens=200),
    )
    await _publish(cfg, [g, s])
    await _until(lambda: _streamed(obs, g, 0, 0) >= 24 and _streamed(obs, s, 0, 0) >= 24, 300, "no tokens streamed")
    await engine.crash_and_restart()
    # The second attempt re-publishes its prefix, then streams more: kill it mid-way too.
    await _until(lambda: _streamed(obs, s, 0, 1) >= _streamed(obs, s, 0, 0) + 16, 300, "no resumed tokens")
    await engine.crash_and_restart()
    await obs.wait_finals(4, timeout_s=400)
    await asyncio.sleep(2)  # a duplicate final would show up now
    assert obs.duplicates == 0
    assert sorted(c.id for c in obs.finals()) == sorted([f"{reference.id}/0", f"{g.id}/0", f"{s.id}/0", f"{s.id}/1"])

    for req, index in ((g, 0), (s, 0), (s, 1)):
        final = obs.requests[req.id].finals[index]
        chains = list(_attempts(obs.requests[req.id].chunks[index]).values())
        assert len(chains) >= 2, f"{final.id}: never interrupted"
        assert len(final.token_ids) == len(final.logprobs) == req.sampling.max_tokens
        for chain in chains:  # every attempt's acked tokens are the final's, log-probs included
            n = len(_tokens(chain))
            assert final.token_ids[:n] == _tokens(chain)
            assert final.logprobs[:n] == [lp for c in chain for lp in c.logprobs]
            assert final.text.startswith("".join(c.text for c in chain))
        # The final is the previous attempt's whole chain plus the last attempt's continuation.
        previous, last = _tokens(chains[-2]), chains[-1]
        assert final.resumed_at_token == len(previous) > 0
        assert _tokens(last) == final.token_ids and "".join(c.text for c in last) == final.text
        cont = [c for c in last if c.seq > 0 and sum(len(x.token_ids) for x in last[: c.seq]) >= len(previous)]
        assert final.text == "".join(c.text for c in chains[-2]) + "".join(c.text for c in cont)
    assert len(list(_attempts(obs.requests[s.id].chunks[0]).values())) >= 3  # sample 0 of s: killed twice

    resumed = obs.requests[g.id].finals[0]
    assert resumed.token_ids == uninterrupted.token_ids and resumed.text == uninterrupted.text
    assert resumed.logprobs == pytest.approx(uninterrupted.logprobs, abs=1e-2)
    assert uninterrupted.resumed_at_token is None
    page = engine.metrics()
    assert "primerl_engine_resumed_samples_total" in page
