"""The built-in environments on scripted model turns, and their train/held-out instance splits."""

from __future__ import annotations

import json
import random
from collections.abc import AsyncIterator
from types import ModuleType

import msgspec
import pytest

from envhub.corpus import BY_NAME, ISLANDS
from envhub.corpus_server import corpus_server
from envhub.envs import calculator, python, retrieval
from envhub.envs.calculator import CalculatorEnv
from envhub.envs.python import PythonEnv
from envhub.envs.retrieval import RetrievalEnv
from envhub.protocol import EnvContext, StepResult
from plumbing.sandbox import Sandbox, SandboxLimits

CTX = EnvContext(max_observation_chars=300)
CALC_KEYS = {"tool_calls", "tool_errors", "malformed_calls"}


async def test_calculator_session() -> None:
    env = CalculatorEnv(CTX)
    inst = calculator.instances("train", 1, seed=0)[0]
    reset = env.reset(inst)
    assert reset.task == "math_format" and reset.reference == inst["answer"] and reset.grammar is not None
    assert [m.role for m in reset.messages] == ["system", "user"] and inst["question"] in reset.messages[1].content
    assert '<tool name="calculator">' in reset.messages[0].content and "<answer>" in reset.messages[0].content
    expr = inst["question"].removeprefix("What is ").removesuffix("?")
    # The engine stopped at `</tool>`, which vLLM dropped from the text.
    call = await env.step(reset.state, 0, f'I will compute it. <tool name="calculator">{expr}', stopped_at_close=True)
    a = inst["answer"]
    assert call == StepResult(
        observation=f"{a}\nIf {a} is the result asked for, answer <answer>{a}</answer>.",
        done=False,
        components={"tool_calls": 1.0, "tool_errors": 0.0, "malformed_calls": 0.0},
        calls=call.calls,
        state=reset.state,
    )
    assert call.calls[0].ok and call.calls[0].tool == "calculator" and call.calls[0].turn_index == 0
    done = await env.step(call.state, 1, f"<answer>{inst['answer']}</answer>")
    assert done.done and done.observation is None and done.calls == [] and set(done.components) == CALC_KEYS


@pytest.mark.parametrize(
    "text,stopped,says,components",
    [
        ('<tool name="calculator">12 *', False, "unclosed tag", (0, 0, 1)),
        ('<tool name="calc">12 * 3</tool>', False, "unknown tool 'calc'", (0, 0, 1)),
        ('<tool name="calculator"></tool>', False, "empty arguments", (0, 0, 1)),
        ('<tool name="calculator">__import__("os")', True, "error: unsupported expression", (1, 1, 0)),
        ('<tool name="calculator">1/0', True, "error: division by zero", (1, 1, 0)),
        ("The answer is probably 500.", False, "No tool call and no answer", (0, 0, 0)),
        ("so: <answer>500", False, "error: unclosed <answer> tag", (0, 0, 0)),
        ("\x00\ud800<<<>>>", False, "No tool call and no answer", (0, 0, 0)),
    ],
)
async def test_calculator_bad_turns_are_observations(
    text: str, stopped: bool, says: str, components: tuple[int, int, int]
) -> None:
    got = await CalculatorEnv(CTX).step("", 3, text, stopped_at_close=stopped)
    assert not got.done and got.observation is not None and says in got.observation
    assert (
        got.components["tool_calls"],
        got.components["tool_errors"],
        got.components["malformed_calls"],
    ) == components
    if components != (0, 0, 0):
        assert len(got.calls) == 1 and not got.calls[0].ok and got.calls[0].error and got.calls[0].turn_index == 3
    if components[2]:  # a malformed call shows a correct one
        assert '<tool name="calculator">12 * 34</tool>' in got.observation


def test_tools_need_their_connectors() -> None:
    class Broken(CalculatorEnv):
        tools = ("calculator", "python")

    with pytest.raises(ValueError, match="connectors"):
        Broken(CTX)


async def test_ignored_calls_are_mentioned() -> None:
    text = '<tool name="calculator">2*3</tool><tool name="calculator">4*5</tool>'
    got = await CalculatorEnv(CTX).step("", 0, text)
    assert got.observation is not None and got.observation.startswith("6\n") and "1 more ignored" in got.observation
    assert len(got.calls) == 1


async def test_random_turns_never_raise() -> None:
    env = CalculatorEnv(CTX)
    rng = random.Random(5)
    pieces = ['<tool name="calculator">', "</tool>", "<answer>", "</answer>", "1", "+", "*", "(", "x", " ", "**9"]
    for _ in range(300):
        text = "".join(rng.choice(pieces) for _ in range(rng.randint(0, 12)))
        got = await env.step("", 0, text, stopped_at_close=rng.random() < 0.5)
        assert got.done == (got.observation is None)


@pytest.fixture
async def corpus_ctx() -> AsyncIterator[EnvContext]:
    async with corpus_server(port=0) as url:
        yield EnvContext(corpus_url=url, http_timeout_s=2.0, max_observation_chars=400)


async def test_retrieval_session(corpus_ctx: EnvContext) -> None:
    env = RetrievalEnv(corpus_ctx)
    try:
        inst = next(
            i for i in retrieval.instances("train", 40, seed=1) if i["question"].startswith("What is the capital")
        )
        reset = env.reset(inst)
        assert reset.task == "answer_match" and reset.reference == BY_NAME[inst["page"]].capital
        assert '<tool name="browser">/wiki/' in reset.messages[0].content
        miss = await env.step(reset.state, 0, '<tool name="browser">/wiki/Nowhere', stopped_at_close=True)
        assert not miss.done and miss.observation is not None and "HTTP 404" in miss.observation
        assert miss.components == {"fetches": 1.0, "fetch_ok": 0.0, "tool_errors": 1.0, "malformed_calls": 0.0}
        assert miss.calls[0].status == 404 and not miss.calls[0].ok
        hit = await env.step(miss.state, 1, f'<tool name="browser">/wiki/{inst["page"]}</tool>')
        assert hit.observation is not None and f"Its capital is {inst['answer']}." in hit.observation
        assert hit.components == {"fetches": 1.0, "fetch_ok": 1.0, "tool_errors": 0.0, "malformed_calls": 0.0}
        trace = hit.calls[0]
        assert trace.ok and trace.status == 200 and trace.url.endswith(f"/wiki/{inst['page']}") and trace.bytes > 0
        off = await env.step(hit.state, 2, '<tool name="browser">http://example.com/</tool>')
        assert off.observation is not None and "allow-list" in off.observation and off.components["tool_errors"] == 1
        bad = await env.step(off.state, 3, '<tool name="calculator">1+1</tool>')
        assert bad.observation is not None and "unknown tool" in bad.observation and bad.components["malformed_calls"]
        done = await env.step(bad.state, 4, f"<answer>{inst['answer']}</answer>")
        assert done.done and done.observation is None
    finally:
        await env.aclose()


async def test_long_observations_are_truncated(corpus_ctx: EnvContext) -> None:
    env = RetrievalEnv(msgspec.structs.replace(corpus_ctx, max_observation_chars=60))
    try:
        got = await env.step("", 0, f'<tool name="browser">/wiki/{ISLANDS[0].name}</tool>')
    finally:
        await env.aclose()
    assert got.observation is not None and got.observation.endswith("characters shown]")
    assert got.observation.startswith(f"{ISLANDS[0].name} - Island Wiki") and len(got.observation) < 120


async def test_python_env_session() -> None:
    env = PythonEnv(CTX, Sandbox(SandboxLimits(cpu_s=2, wall_s=4.0, memory_bytes=256 * 1024 * 1024)))
    inst = python.instances("train", 1, seed=3)[0]
    n, *divisors = [int(w) for w in inst["question"].replace("?", "").split() if w.isdigit()][1:]
    code = f"print(sum(1 for i in range(1, {n} + 1) if any(i % d == 0 for d in {divisors})))"
    got = await env.step("", 0, f'<tool name="python">{code}', stopped_at_close=True)
    assert got.observation == inst["answer"] and got.calls[0].ok and got.components["tool_calls"] == 1
    crash = await env.step("", 1, '<tool name="python">raise ValueError("no")</tool>')
    assert crash.observation is not None and "ValueError: no" in crash.observation and crash.components["tool_errors"]


@pytest.mark.parametrize("module", [calculator, retrieval, python], ids=lambda m: m.__name__)
def test_instance_splits(module: ModuleType) -> None:
    make = module.instances
    train, heldout = make("train", 120, seed=0), make("heldout", 30, seed=0)
    assert len(train) == 120 and len(heldout) == 30
    assert {i["question"] for i in train}.isdisjoint(i["question"] for i in heldout)
    assert make("train", 120, seed=0) == train  # deterministic
    assert make("train", 120, seed=1) != train  # the seed matters
    assert all(set(i) >= {"question", "answer"} and i["answer"] for i in train + heldout)
    json.dumps(train)  # plain strings, ready for a producer's metadata


def test_retrieval_splits_share_no_island_and_answers_match_the_pages() -> None:
    train, heldout = retrieval.instances("train", 500, seed=0), retrieval.instances("heldout", 500, seed=0)
    assert {i["page"] for i in train}.isdisjoint(i["page"] for i in heldout)
    assert len({i["page"] for i in heldout}) == 8 and len({i["page"] for i in train}) == 32
    for i in train[:50]:
        island = BY_NAME[i["page"]]
        assert i["answer"] in {island.capital, str(island.founded), str(island.population), island.peak}


def test_calculator_answers_are_right() -> None:
    for inst in calculator.instances("heldout", 50, seed=9):
        expr = inst["question"].removeprefix("What is ").removesuffix("?")
        assert str(eval(expr, {"__builtins__": {}})) == inst["answer"]  # our own generated arithmetic
