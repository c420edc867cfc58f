"""Fuzz: the env hub's session stage (rollout.completions -> rollout.prompts / rollout.trajectories), in-process.

Its topics are swapped for private ones (the module's constants, read when the worker
is built), so the storm reaches no other reader. A storm record that does not decode is
dead-lettered once; one that decodes without a session is not the env hub's (skipped,
no letter: the verifier scores it); one with a session carries no valid engine
signature and is refused for custody, once. After the storm a signed session turn is
still continued: its next turn appears on the private prompts topic.
"""

from __future__ import annotations

import asyncio
import time
import uuid

import msgspec
import pytest
from prometheus_client import CollectorRegistry
from transformers import AutoTokenizer

import envhub.worker as envhub_module
from envhub.protocol import EnvContext
from envhub.worker import EnvhubWorker
from plumbing.config import Config
from plumbing.kafka import Publisher
from plumbing.model_store import resolve_model
from plumbing.redis_client import connect_redis
from schemas import Completion, PromptRequest, SamplingParams, Session, Topic, Trajectory, decode
from tests.fuzz.harness import (
    DEFAULT_N,
    Ledger,
    Watch,
    assert_clean,
    dlq_watch,
    heavy_n,
    make_topic,
    publish_storm,
    stop_stage,
    wait_accounted,
)
from tests.kafka_helpers import wait_until
from tests.reward_helpers import engine_signed, make_completion


@pytest.mark.parametrize("variant", ["default", pytest.param("heavy", marks=pytest.mark.fuzz)])
async def test_envhub_survives_the_storm_and_accounts_for_every_record(
    cfg: Config, monkeypatch, variant: str, pytestconfig
) -> None:
    n = DEFAULT_N if variant == "default" else heavy_n(pytestconfig)
    run_id = f"fz-envhub-{uuid.uuid4().hex[:6]}"
    source = await make_topic(cfg, "completions", 4)
    prompts, trajectories = await make_topic(cfg, "prompts", 4), await make_topic(cfg, "trajectories", 4)
    monkeypatch.setattr(envhub_module, "COMPLETIONS", Topic(source, 4, Completion, "fuzz"))
    monkeypatch.setattr(envhub_module, "PROMPTS", Topic(prompts, 4, PromptRequest, "fuzz"))
    monkeypatch.setattr(envhub_module, "TRAJECTORIES", Topic(trajectories, 4, Trajectory, "fuzz"))
    tokenizer = AutoTokenizer.from_pretrained(resolve_model(None))
    redis = connect_redis(cfg)
    registry = CollectorRegistry()
    t0 = time.monotonic()
    async with Publisher(cfg) as pub:
        worker = EnvhubWorker(cfg, tokenizer, 2048, pub, redis, registry, EnvContext())
        task = asyncio.create_task(worker.run())
        storm = await publish_storm(cfg, source, Completion, n, seed=1729, run_id=run_id, tag=run_id)
        ledger = Ledger([storm])
        nexts: list[PromptRequest] = []

        def on_prompt(r) -> None:
            nexts.append(decode(r.value, PromptRequest, list(r.headers)))

        watches = [await dlq_watch(cfg, ledger).start(), await Watch(cfg, prompts, on_prompt).start()]
        settled_since: list[float] = []

        def settle() -> bool:
            """Once the stage consumed every storm record (3 s on, so late letters are in): a record that
            decoded and got no letter was skipped (no session), the one outcome without an output."""
            consumed = registry.get_sample_value("primerl_records_consumed_total", {"group": "envhub"}) or 0
            if consumed < n:
                settled_since.clear()
                return False
            settled_since[:1] = settled_since[:1] or [time.monotonic()]
            if time.monotonic() - settled_since[0] < 3.0:
                return False
            for s in storm.sent:
                if s.decoded_id is not None and not ledger.letters.get(s.fuzz_id) and not ledger.outputs.get(s.fuzz_id):
                    ledger.output_for_fuzz_id(s.fuzz_id)
            return True

        try:
            report = await wait_accounted(ledger, [task], extra=settle, what=f"envhub {variant} n={n}")
            ids = tokenizer.encode('<tool name="calculator">2 * 21</tool>', add_special_tokens=False)
            good = engine_signed(
                msgspec.structs.replace(
                    make_completion('<tool name="calculator">2 * 21</tool>'),
                    run_id=run_id,
                    id=f"{run_id}-good/0",
                    request_id=f"{run_id}-good",
                    token_ids=ids,
                    logprobs=[-0.5] * len(ids),
                    session=Session(env="calculator", prompt_len=3, sampling=SamplingParams(max_tokens=16)),
                ),
                cfg,
            )
            await pub.publish(source, good, key=good.group_id.encode())
            await wait_until(lambda: any(r.run_id == run_id for r in nexts), 60, "the good turn continued")
            nxt = next(r for r in nexts if r.run_id == run_id)
            assert nxt.session is not None and nxt.session.calls[0].ok and nxt.turn_index == 1
            assert not task.done(), "the env hub exited"
        finally:
            await stop_stage(worker.stop, task, watches)
            await worker.aclose()
            await redis.aclose()
    print(f"\n[fuzz] envhub {variant}: n={n}, {time.monotonic() - t0:.1f}s")
    assert_clean(report, f"envhub {variant}")
    # Only the good turn was continued: no storm record became a next turn.
    assert [r.run_id for r in nexts] == [run_id]
