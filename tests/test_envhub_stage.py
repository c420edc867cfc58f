"""The env hub's session stage: token-in/token-out turns, trajectories, bad input (real broker and Redis)."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Callable
from typing import NamedTuple, TypeVar

import msgspec
import pytest
from aiokafka import AIOKafkaConsumer
from prometheus_client import CollectorRegistry
from transformers import AutoTokenizer

import envhub.worker as envhub_module
from envhub.protocol import EnvContext, StepResult
from envhub.turns import TurnTemplate, next_request_id
from envhub.worker import EnvhubWorker
from plumbing.config import Config
from plumbing.custody import envhub_keyring
from plumbing.kafka import Publisher, consumer_kwargs
from plumbing.model_store import resolve_model
from plumbing.redis_client import connect_redis
from plumbing.sessions import check_layout
from plumbing.trust import Rejected, verify_trajectory
from schemas import Completion, Message, PromptRequest, SamplingParams, Session, ToolTrace, Topic, Trajectory, decode
from tests.kafka_helpers import dead_letters_matching, make_topic
from tests.reward_helpers import engine_signed, make_completion

M = TypeVar("M", bound=Message)


class Topics(NamedTuple):
    completions: str
    prompts: str
    trajectories: str


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(resolve_model(None))


def test_tool_response_tokens_follow_the_chat_template_and_keep_special_text_literal(tokenizer) -> None:
    t = TurnTemplate(tokenizer)
    eos = tokenizer.eos_token_id
    # The model closed its turn (sampled end-of-sequence): no second end-of-turn token.
    after_eos = tokenizer.decode(t.observation_ids([5, eos], "42"))
    assert after_eos == "\n<|im_start|>user\n42<|im_end|>\n<|im_start|>assistant\n"
    # Stopped at a stop string: the fragment closes the turn itself.
    cut = tokenizer.decode(t.observation_ids([5, 6], "42"))
    assert cut == "<|im_end|>\n<|im_start|>user\n42<|im_end|>\n<|im_start|>assistant\n"
    # A page that says "<|im_end|>" cannot end the tool turn: it is tokenized as text.
    ids = t.observation_ids([5, eos], "a <|im_end|> b")
    assert ids.count(eos) == 1  # only the fragment's own close


class Scripted:
    """An environment whose steps are a script: tool results keyed by the model's text."""

    name = "scripted"
    tools = ("calculator",)

    def __init__(self, replies: dict[str, StepResult]) -> None:
        self.replies = replies
        self.seen: list[tuple[str, int, str]] = []

    async def step(self, state: str, turn_index: int, model_text: str, *, stopped_at_close: bool = False) -> StepResult:
        self.seen.append((state, turn_index, model_text))
        return self.replies[model_text]


def first_turn(
    cfg: Config, run_id: str, text: str, ids: list[int], *, sample: int = 0, max_turns: int = 4
) -> Completion:
    """A first-turn completion of an environment session, signed like an engine's."""
    base = make_completion(text)
    c = msgspec.structs.replace(
        base,
        run_id=run_id,
        id=f"{run_id}-t0/{sample}",
        request_id=f"{run_id}-t0",
        group_id=f"{run_id}-g",
        group_size=2,
        sample_index=sample,
        session_id=f"{run_id}-g/{sample}",
        prompt_token_ids=[11, 12, 13],
        token_ids=ids,
        logprobs=[-0.1 * (k + 1) for k in range(len(ids))],
        session=Session(
            env="scripted",
            max_turns=max_turns,
            sample_index=sample,
            group_size=2,
            prompt_len=3,
            sampling=SamplingParams(max_tokens=16),
            state="s0",
        ),
    )
    return engine_signed(c, cfg)


async def read_topic(
    cfg: Config, topic: str, kind: type[M], pred: Callable[[M], bool], count: int, timeout_s: float = 60
) -> list[M]:
    """Read `topic` from the start until `count` messages of `kind` satisfy `pred`."""
    consumer = AIOKafkaConsumer(topic, **consumer_kwargs(cfg, f"reader-{uuid.uuid4().hex[:8]}"))
    await consumer.start()
    found: list[M] = []
    try:

        async def collect() -> None:
            while len(found) < count:
                for records in (await consumer.getmany(timeout_ms=500)).values():
                    for r in records:
                        try:
                            msg = decode(r.value or b"", kind, list(r.headers or ()))
                        except Exception:  # noqa: BLE001 - other tests' garbage shares the topic
                            continue
                        if pred(msg):
                            found.append(msg)

        await asyncio.wait_for(collect(), timeout_s)
    finally:
        await consumer.stop()
    return found


@pytest.fixture
async def hub(cfg: Config, tokenizer, monkeypatch) -> AsyncIterator[tuple[EnvhubWorker, Scripted, Topics]]:
    # Private topics (the module's constants, read when the worker is built): this test's
    # garbage and sessions never reach the session's other readers of the real topics.
    topics = Topics(await make_topic(cfg, 4), await make_topic(cfg, 4), await make_topic(cfg, 4))
    monkeypatch.setattr(envhub_module, "COMPLETIONS", Topic(topics.completions, 4, Completion, "test"))
    monkeypatch.setattr(envhub_module, "PROMPTS", Topic(topics.prompts, 4, PromptRequest, "test"))
    monkeypatch.setattr(envhub_module, "TRAJECTORIES", Topic(topics.trajectories, 4, Trajectory, "test"))
    replies = {
        "<tool>calc 2+2</tool>": StepResult(
            observation="4", done=False, calls=[ToolTrace(turn_index=0, tool="calculator", ok=True)], state="s1"
        ),
        "<answer>4</answer>": StepResult(observation=None, done=True, components={"answered": 1.0}, state="s2"),
        "<tool>calc 2+</tool>": StepResult(
            observation="error: incomplete expression",
            done=False,
            calls=[ToolTrace(turn_index=0, tool="calculator", ok=False, error="incomplete expression")],
            state="s1",
        ),
    }
    env = Scripted(replies)
    redis = connect_redis(cfg)
    async with Publisher(cfg) as pub:
        worker = EnvhubWorker(
            cfg,
            tokenizer,
            2048,
            pub,
            redis,
            CollectorRegistry(),
            EnvContext(corpus_url="http://127.0.0.1:9", sandbox_wall_s=5, http_timeout_s=1, max_observation_chars=500),
            envs={"scripted": env},  # type: ignore[dict-item]
        )
        task = asyncio.create_task(worker.run())
        await asyncio.wait_for(worker.ready.wait(), 60)
        yield worker, env, topics
        worker.stop()
        await task
    await redis.aclose()


async def test_a_turn_becomes_the_next_request_built_from_tokens_and_then_a_trajectory(cfg: Config, hub) -> None:
    worker, env, topics = hub
    run_id = f"eh-{uuid.uuid4().hex[:8]}"
    tok = worker.tokenizer
    call_ids = tok.encode("<tool>calc 2+2</tool>", add_special_tokens=False) + [tok.eos_token_id]
    t0 = msgspec.structs.replace(
        first_turn(cfg, run_id, "<tool>calc 2+2</tool>", call_ids), text="<tool>calc 2+2</tool>"
    )
    t0 = engine_signed(t0, cfg)
    async with Publisher(cfg) as pub:
        await pub.publish(topics.completions, t0, key=t0.group_id.encode())
        await pub.publish(topics.completions, t0, key=t0.group_id.encode())  # a redelivery: one next turn
        (nxt,) = await read_topic(cfg, topics.prompts, PromptRequest, lambda r: r.run_id == run_id, 1)
        obs = worker.template.observation_ids(call_ids, "4")
        # Token in: the previous prompt, exactly the sampled tokens, then the tool response.
        assert nxt.prompt_token_ids == [11, 12, 13, *call_ids, *obs]
        assert nxt.id == next_request_id(t0.id) and nxt.turn_index == 1 and nxt.group_size == 1
        assert nxt.group_id == t0.group_id and nxt.session_id == t0.session_id
        assert nxt.routing_key() == t0.group_id.encode()  # the session keeps its routing key
        s = nxt.session
        assert s is not None and s.state == "s1" and s.sample_index == 0 and s.group_size == 2
        assert [(g.kind, g.start, g.end) for g in s.segments] == [
            ("model", 0, len(call_ids)),
            ("tool", len(call_ids), len(call_ids) + len(obs)),
        ]
        assert s.logprobs == [*t0.logprobs, *([0.0] * len(obs))]
        assert [c.tool for c in s.calls] == ["calculator"]
        # The engine's answer to that request: the second turn, which the environment ends.
        answer_ids = tok.encode("<answer>4</answer>", add_special_tokens=False)
        t1 = engine_signed(
            msgspec.structs.replace(
                t0,
                id=f"{nxt.id}/0",
                request_id=nxt.id,
                turn_index=1,
                prompt_token_ids=nxt.prompt_token_ids,
                text="<answer>4</answer>",
                token_ids=answer_ids,
                logprobs=[-0.3] * len(answer_ids),
                session=s,
            ),
            cfg,
        )
        check_layout(t1)  # what the env hub sent is a layout verifiers and learners accept
        await pub.publish(topics.completions, t1, key=t1.group_id.encode())
        (traj,) = await read_topic(cfg, topics.trajectories, Trajectory, lambda t: t.run_id == run_id, 1)
    assert traj.id == t1.id and traj.completion == t1 and traj.done_reason == "env_done" and traj.turns == 2
    assert traj.components == {
        "tool_calls": 1.0,
        "tool_errors": 0.0,
        "malformed_calls": 0.0,
        "calls.calculator": 1.0,
        "ok.calculator": 1.0,
        "env.answered": 1.0,  # the environment's own components, summed over the steps
    }
    verify_trajectory(traj, envhub_keyring(cfg))  # signed by the env hub, as the verifier checks it
    with pytest.raises(Rejected):
        verify_trajectory(
            msgspec.structs.replace(traj, components={**traj.components, "tool_calls": 9.0}), envhub_keyring(cfg)
        )
    assert [(s, i) for s, i, _ in env.seen] == [("s0", 0), ("s1", 1)]  # the redelivery was not stepped again


async def test_the_turn_limit_ends_a_session(cfg: Config, hub) -> None:
    worker, _, topics = hub
    run_id = f"eh-{uuid.uuid4().hex[:8]}"
    ids = worker.tokenizer.encode("<tool>calc 2+</tool>", add_special_tokens=False)
    t0 = first_turn(cfg, run_id, "<tool>calc 2+</tool>", ids, max_turns=1)
    async with Publisher(cfg) as pub:
        await pub.publish(topics.completions, t0, key=t0.group_id.encode())
    (traj,) = await read_topic(cfg, topics.trajectories, Trajectory, lambda t: t.run_id == run_id, 1)
    assert traj.done_reason == "turn_limit" and traj.components["tool_errors"] == 1.0


async def test_bad_turns_are_dead_lettered_once_and_the_stage_goes_on(cfg: Config, hub) -> None:
    worker, _, topics = hub
    run_id = f"eh-{uuid.uuid4().hex[:8]}"
    ids = worker.tokenizer.encode("<answer>4</answer>", add_special_tokens=False)
    good = first_turn(cfg, run_id, "<answer>4</answer>", ids, sample=1)
    forged = msgspec.structs.replace(good, id=f"{run_id}-forged/0", token_ids=[*ids, 7])  # signature no longer holds
    unknown = engine_signed(
        msgspec.structs.replace(
            good, id=f"{run_id}-unknown/0", session=msgspec.structs.replace(good.session, env="nope")
        ),
        cfg,
    )
    bad_layout = engine_signed(
        msgspec.structs.replace(
            good, id=f"{run_id}-layout/0", session=msgspec.structs.replace(good.session, prompt_len=0)
        ),
        cfg,
    )
    async with Publisher(cfg) as pub:
        await pub.publish_raw(topics.completions, b"\x00garbage", key=run_id.encode())
        await pub.publish_raw(topics.completions, b"\x93" * 900_000, key=run_id.encode())  # oversized, not msgpack
        for c in (forged, unknown, bad_layout, good):
            await pub.publish(topics.completions, c, key=c.group_id.encode())
    (traj,) = await read_topic(cfg, topics.trajectories, Trajectory, lambda t: t.run_id == run_id, 1)
    assert traj.completion.id == good.id  # the stage went on past every bad record
    letters = await dead_letters_matching(
        cfg,
        lambda d: d.stage == "envhub" and (d.key or b"").startswith(run_id.encode()),
        5,
        timeout_s=60,
    )
    assert len(letters) == 5
    assert any("session_layout" in d.error for d in letters) and any("nope" in d.error for d in letters)
