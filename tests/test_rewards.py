"""Reward functions on hand-made right, wrong and malformed completions; the registry; the remote verifier."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
from aiohttp import web

from schemas import Completion, Grammar, GrammarKind, RewardStatus
from tests.reward_helpers import make_completion
from verifier_workers.rewards import (
    Guarded,
    RemoteConfig,
    RemoteReward,
    RewardConfig,
    Score,
    UnknownTask,
    build_registry,
    close_registry,
    score_completion,
)
from verifier_workers.rewards.format import FormatReward
from verifier_workers.rewards.match import AnswerMatchReward, ExactReward, RegexReward
from verifier_workers.rewards.math import MathReward, extract_answer, safe_sympy
from verifier_workers.rewards.remote import BreakerState, CircuitBreaker

OK, POLICY_FAIL, INFRA_FAIL, TIMEOUT = (
    RewardStatus.OK,
    RewardStatus.POLICY_FAIL,
    RewardStatus.INFRA_FAIL,
    RewardStatus.TIMEOUT,
)


# ---------------------------------------------------------------- math


@pytest.mark.parametrize(
    ("text", "reference", "fmt"),
    [
        (r"so the answer is \boxed{\frac{3}{4}}.", "0.75", 1.0),
        ("<answer>42</answer>", "42", 1.0),
        ("We get 1,000 + 234 = 1,234", "1234", 0.0),
        (r"\boxed{2\sqrt{2}}", r"\sqrt{8}", 1.0),
        (r"\boxed{x^2+2x+1}", "(x+1)^2", 1.0),
        (r"\boxed{\frac{1}{\sqrt{2}}}", r"\frac{\sqrt{2}}{2}", 1.0),
        (r"\boxed{0.3333333}", "1/3", 1.0),
        ("<answer>72</answer>", "She pays 8 * 9 = 72 dollars.\n#### 72", 1.0),
        (r"$x = \boxed{-5}$", r"\boxed{-5}", 1.0),
        (r"\boxed{50\%}", "50", 1.0),
        (r"\boxed{\pi}", "3.14159265358979", 1.0),
        (r"first \boxed{3}, finally \boxed{\dfrac{7}{2}}", "3.5", 1.0),
        (r"the answer \boxed{12", "12", 0.0),  # truncated box: the last number still counts, format does not
    ],
)
async def test_math_right(text: str, reference: str, fmt: float) -> None:
    score = await MathReward().score(make_completion(text, reference=reference))
    assert score.status is OK, score
    assert score.scalar == 1.0
    assert score.components == {"correct": 1.0, "format": fmt}


@pytest.mark.parametrize(
    ("text", "reference"),
    [
        (r"\boxed{5}", "6"),
        ("<answer>0.75</answer>", "3/5"),
        (r"\boxed{x+1}", "x+2"),
        ("I think it is 41", "42"),
        (r"\boxed{banana}", "42"),
        (r"\boxed{1/0}", "1"),
    ],
)
async def test_math_wrong_is_ok_with_zero(text: str, reference: str) -> None:
    score = await MathReward().score(make_completion(text, reference=reference))
    assert score.status is OK
    assert score.scalar == 0.0
    assert score.components["correct"] == 0.0


async def test_math_no_answer_is_policy_fail() -> None:
    score = await MathReward().score(make_completion("I have no idea.", reference="4"))
    assert score.status is POLICY_FAIL
    assert score.scalar == 0.0
    assert score.trace["reason"] == "no answer found"


async def test_math_without_reference_is_infra_fail() -> None:
    score = await MathReward().score(make_completion(r"\boxed{4}", reference=None))
    assert score.status is INFRA_FAIL
    assert score.trace["reason"] == "request carries no reference"


async def test_math_power_tower_is_refused_quickly() -> None:
    started = time.monotonic()
    score = await MathReward().score(make_completion(r"\boxed{9^{9^{9^{9}}}}", reference="x"))
    assert time.monotonic() - started < 2.0
    assert score.status is OK and score.scalar == 0.0


async def test_math_answer_is_never_evaluated_as_python(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    text = rf"\boxed{{__import__('os').system('touch {marker}')}}"
    score = await MathReward().score(make_completion(text, reference="0"))
    assert score.status is OK and score.scalar == 0.0
    assert not marker.exists()
    assert safe_sympy("x.__class__") is None
    assert safe_sympy("(1).real") is None


async def test_math_symbolic_deadline_is_timeout() -> None:
    score = await MathReward(symbolic_timeout_s=0.0).score(make_completion(r"\boxed{x^2+2x+1}", reference="(x+1)^2"))
    assert score.status is TIMEOUT and score.scalar == 0.0
    assert score.trace["reason"] == "symbolic comparison timed out"


def test_math_extraction_order() -> None:
    assert extract_answer(r"<answer>1</answer> and \boxed{2}") == ("2", "boxed")
    assert extract_answer(r"\boxed{a{b}c}") == ("a{b}c", "boxed")
    assert extract_answer(r"<answer>\boxed{7}</answer>") == ("7", "boxed")
    assert extract_answer("<answer> 9 </answer>") == ("9", "answer_tag")
    assert extract_answer("values 3, then -2.5") == ("-2.5", "last_number")
    assert extract_answer("no digits") is None


# ---------------------------------------------------------------- exact and regex


async def test_exact_match() -> None:
    fn = ExactReward()
    assert (await fn.score(make_completion("  Paris\n", task="exact", reference="Paris"))).scalar == 1.0
    wrong = await fn.score(make_completion("paris", task="exact", reference="Paris"))
    assert wrong.status is OK and wrong.scalar == 0.0
    folded = await ExactReward(casefold=True).score(make_completion("PARIS", task="exact", reference="paris"))
    assert folded.scalar == 1.0


async def test_exact_malformed() -> None:
    empty = await ExactReward().score(make_completion("   ", task="exact", reference="Paris"))
    assert empty.status is POLICY_FAIL
    missing = await ExactReward().score(make_completion("Paris", task="exact", reference=None))
    assert missing.status is INFRA_FAIL


async def test_regex_match() -> None:
    fn = RegexReward()
    right = await fn.score(make_completion(" 2024-05-01 ", task="regex", reference=r"\d{4}-\d{2}-\d{2}"))
    assert right.status is OK and right.scalar == 1.0
    partial = await fn.score(make_completion("on 2024-05-01", task="regex", reference=r"\d{4}-\d{2}-\d{2}"))
    assert partial.status is OK and partial.scalar == 0.0


async def test_regex_invalid_pattern_is_infra_fail() -> None:
    score = await RegexReward().score(make_completion("abc", task="regex", reference="(unclosed"))
    assert score.status is INFRA_FAIL
    assert "invalid reference pattern" in score.trace["reason"]


# ---------------------------------------------------------------- format

_SCHEMA = json.dumps(
    {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"], "additionalProperties": False}
)
_LARK = """
start: "(" expr ")"
expr: NUMBER ("+" NUMBER)*
%import common.NUMBER
%import common.WS
%ignore WS
"""


@pytest.mark.parametrize(
    ("kind", "spec", "good", "bad"),
    [
        (GrammarKind.JSON_SCHEMA, _SCHEMA, '{"n": 3}', '{"n": "three"}'),
        (GrammarKind.JSON_SCHEMA, _SCHEMA, ' {"n": 3} ', '{"n": 3'),
        (GrammarKind.REGEX, r"(yes|no)", "yes\n", "maybe"),
        (GrammarKind.CHOICE, json.dumps(["red", "green"]), "green", "blue"),
        (GrammarKind.LARK, _LARK, "(1 + 2 + 3)", "(1 + )"),
        (GrammarKind.ANSWER_FORMAT, "", "so 6 times 7 <answer>42</answer>", "the answer is 42"),
        (GrammarKind.ANSWER_FORMAT, "", "<answer>-1.5</answer>", "<answer>x</answer>"),
    ],
)
async def test_format_good_and_bad(kind: GrammarKind, spec: str, good: str, bad: str) -> None:
    fn = FormatReward()
    grammar = Grammar(kind=kind, spec=spec)
    ok = await fn.score(make_completion(good, task="format", grammar=grammar))
    assert ok.status is OK and ok.scalar == 1.0 and ok.components == {"format": 1.0}, ok
    violated = await fn.score(make_completion(bad, task="format", grammar=grammar))
    assert violated.status is POLICY_FAIL and violated.scalar == 0.0, violated
    assert violated.trace["grammar"] == kind.value


@pytest.mark.parametrize(
    ("grammar", "reason"),
    [
        (None, "request carries no grammar"),
        (Grammar(kind=GrammarKind.GBNF, spec='root ::= "a"'), "gbnf check unsupported"),
        (Grammar(kind=GrammarKind.JSON_SCHEMA, spec="{not json"), "unusable json_schema grammar"),
        (Grammar(kind=GrammarKind.JSON_SCHEMA, spec='{"type": 5}'), "unusable json_schema grammar"),
        (Grammar(kind=GrammarKind.REGEX, spec="(bad"), "unusable regex grammar"),
        (Grammar(kind=GrammarKind.CHOICE, spec='"red"'), "unusable choice grammar"),
        (Grammar(kind=GrammarKind.LARK, spec="start: undefined_rule"), "unusable lark grammar"),
    ],
)
async def test_format_unusable_grammar_is_infra_fail(grammar: Grammar | None, reason: str) -> None:
    score = await FormatReward().score(make_completion('{"n": 1}', task="format", grammar=grammar))
    assert score.status is INFRA_FAIL
    assert score.trace["reason"].startswith(reason)


# ---------------------------------------------------------------- registry


def test_registry_has_every_task() -> None:
    registry = build_registry(RewardConfig())
    assert set(registry) == {"math", "math_format", "exact", "regex", "answer_match", "format", "code", "remote"}
    assert all(fn.name == task and fn.version for task, fn in registry.items())


async def test_unknown_task_raises() -> None:
    registry = build_registry()
    with pytest.raises(UnknownTask, match="unknown task 'poetry'"):
        await score_completion(registry, make_completion("x", task="poetry"))
    assert issubclass(UnknownTask, ValueError)


async def test_an_exception_in_a_scorer_is_infra_fail_not_zero() -> None:
    class Broken:
        name = "math"
        version = "0"

        async def score(self, completion: Completion) -> Score:
            raise KeyError("boom")

    score = await score_completion({"math": Guarded(Broken())}, make_completion(r"\boxed{1}", reference="1"))
    assert score.status is INFRA_FAIL and score.scalar == 0.0
    assert "KeyError" in score.trace["reason"]


async def test_registry_scores_each_task() -> None:
    registry = build_registry()
    try:
        math = await score_completion(registry, make_completion(r"\boxed{4}", reference="4"))
        exact = await score_completion(registry, make_completion("yes", task="exact", reference="yes"))
        remote = await score_completion(registry, make_completion("yes", task="remote", reference="yes"))
    finally:
        await close_registry(registry)
    assert (math.status, math.scalar) == (OK, 1.0)
    assert (exact.status, exact.scalar) == (OK, 1.0)
    assert remote.status is INFRA_FAIL and remote.trace["reason"] == "no remote verifier url configured"


# ---------------------------------------------------------------- remote

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@asynccontextmanager
async def serve(handler: Handler) -> AsyncIterator[str]:
    """A local HTTP verifier answering POST / with `handler`; yields its URL."""
    app = web.Application()
    app.router.add_post("/", handler)
    runner = web.AppRunner(app, shutdown_timeout=0.1)  # do not wait for a deliberately slow handler
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    try:
        yield f"http://127.0.0.1:{port}/"
    finally:
        await runner.cleanup()


def remote(url: str, **overrides: float) -> RemoteReward:
    settings: dict = {
        "url": url,
        "timeout_s": 2.0,
        "retries": 2,
        "backoff_s": 0.01,
        "breaker_failures": 3,
        "breaker_reset_s": 60.0,
    }
    return RemoteReward(RemoteConfig(**{**settings, **overrides}))


class Clock:
    """A clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


async def test_remote_answers() -> None:
    seen: list[dict] = []

    async def handler(request: web.Request) -> web.Response:
        seen.append(await request.json())
        return web.json_response({"components": {"judge": 0.75}, "scalar": 0.75})

    async with serve(handler) as url:
        fn = remote(url)
        score = await fn.score(make_completion("my text", task="remote", reference="ref"))
        await fn.aclose()
    assert (score.status, score.scalar, score.components) == (OK, 0.75, {"judge": 0.75})
    assert score.trace["url"] == url
    assert int(score.trace["latency_ms"]) >= 0
    assert score.trace["attempts"] == "1"
    assert seen[0]["text"] == "my text" and seen[0]["reference"] == "ref" and seen[0]["task"] == "remote"
    assert seen[0]["prompt"] == "Solve it."


async def test_remote_policy_fail_reply() -> None:
    async def handler(request: web.Request) -> web.Response:
        return web.json_response({"status": "POLICY_FAIL", "reason": "unparseable proof"})

    async with serve(handler) as url:
        fn = remote(url)
        score = await fn.score(make_completion("x", task="remote"))
        await fn.aclose()
    assert score.status is POLICY_FAIL and score.scalar == 0.0
    assert score.trace["reason"] == "unparseable proof"


async def test_remote_retries_then_succeeds() -> None:
    calls = 0

    async def handler(request: web.Request) -> web.Response:
        nonlocal calls
        calls += 1
        if calls <= 2:
            return web.Response(status=503, text="busy")
        return web.json_response({"components": {"ok": 1.0}, "scalar": 1.0})

    async with serve(handler) as url:
        fn = remote(url)
        score = await fn.score(make_completion("x", task="remote"))
        await fn.aclose()
    assert score.status is OK and score.scalar == 1.0
    assert calls == 3 and score.trace["attempts"] == "3"
    assert fn.breaker.state is BreakerState.CLOSED


async def test_remote_always_failing_opens_the_circuit_then_half_opens() -> None:
    calls = 0
    healthy = False

    async def handler(request: web.Request) -> web.Response:
        nonlocal calls
        calls += 1
        if healthy:
            return web.json_response({"scalar": 1.0})
        return web.Response(status=500)

    clock = Clock()
    async with serve(handler) as url:
        fn = RemoteReward(
            RemoteConfig(url=url, retries=1, backoff_s=0.01, breaker_failures=2, breaker_reset_s=30.0), clock=clock
        )
        first = await fn.score(make_completion("x", task="remote"))
        second = await fn.score(make_completion("x", task="remote"))
        assert first.status is INFRA_FAIL and second.status is INFRA_FAIL
        assert first.scalar == 0.0 and "HTTP 500" in first.trace["reason"]
        assert calls == 4  # two calls, one retry each
        assert fn.breaker.state is BreakerState.OPEN

        blocked = await fn.score(make_completion("x", task="remote"))
        assert blocked.status is INFRA_FAIL and blocked.trace["reason"] == "circuit open"
        assert calls == 4  # no request went out

        clock.now += 31  # half-open: one trial, which fails and reopens
        trial = await fn.score(make_completion("x", task="remote"))
        assert trial.status is INFRA_FAIL and trial.trace["reason"] != "circuit open"
        assert fn.breaker.state is BreakerState.OPEN

        clock.now += 31  # the next trial succeeds and closes the circuit
        healthy = True
        recovered = await fn.score(make_completion("x", task="remote"))
        assert recovered.status is OK and fn.breaker.state is BreakerState.CLOSED
        await fn.aclose()


async def test_remote_slow_is_timeout() -> None:
    async def handler(request: web.Request) -> web.Response:
        await asyncio.sleep(5)
        return web.json_response({"scalar": 1.0})

    async with serve(handler) as url:
        fn = remote(url, timeout_s=0.2, retries=1)
        started = time.monotonic()
        score = await fn.score(make_completion("x", task="remote"))
        elapsed = time.monotonic() - started
        await fn.aclose()
    assert score.status is TIMEOUT and score.scalar == 0.0
    assert elapsed < 2.0
    assert score.trace["attempts"] == "2" and score.trace["url"] == url


async def test_remote_client_error_and_malformed_reply_are_not_retried() -> None:
    calls = 0

    async def handler(request: web.Request) -> web.Response:
        nonlocal calls
        calls += 1
        return web.Response(status=400 if calls == 1 else 200, text="not json")

    async with serve(handler) as url:
        fn = remote(url)
        bad_request = await fn.score(make_completion("x", task="remote"))
        malformed = await fn.score(make_completion("x", task="remote"))
        await fn.aclose()
    assert bad_request.status is INFRA_FAIL and "HTTP 400" in bad_request.trace["reason"]
    assert malformed.status is INFRA_FAIL and "malformed reply" in malformed.trace["reason"]
    assert calls == 2


async def test_remote_unreachable_is_infra_fail() -> None:
    async def handler(request: web.Request) -> web.Response:
        return web.json_response({"scalar": 1.0})

    async with serve(handler) as url:
        pass  # the server is gone: its port refuses connections
    fn = remote(url, retries=1)
    score = await fn.score(make_completion("x", task="remote"))
    await fn.aclose()
    assert score.status is INFRA_FAIL and score.trace["url"] == url
    assert score.trace["attempts"] == "2"


def test_circuit_breaker_half_open_allows_one_trial() -> None:
    clock = Clock()
    breaker = CircuitBreaker(failures=2, reset_s=10, clock=clock)
    assert breaker.allow()
    breaker.record_failure()
    assert breaker.state is BreakerState.CLOSED
    breaker.record_failure()
    assert breaker.state is BreakerState.OPEN and not breaker.allow()
    clock.now += 10
    assert breaker.state is BreakerState.HALF_OPEN
    assert breaker.allow()
    assert not breaker.allow()  # the trial is in flight
    breaker.record_success()
    assert breaker.state is BreakerState.CLOSED and breaker.allow()


async def test_formatted_math_reward_shapes_format_and_success() -> None:
    from verifier_workers.rewards.math import FormattedMathReward, MathReward

    fn = FormattedMathReward(MathReward())
    right = await fn.score(make_completion("<answer>7</answer>", reference="7"))
    wrong_in_tags = await fn.score(make_completion("<answer>8</answer>", reference="7"))
    right_untagged = await fn.score(make_completion("it is 7", reference="7"))
    assert (right.scalar, right.components["success"]) == (1.0, 1.0)
    assert (wrong_in_tags.scalar, wrong_in_tags.components["success"]) == (0.5, 0.0)
    assert (right_untagged.scalar, right_untagged.components["success"]) == (0.0, 0.0)


@pytest.mark.parametrize(
    ("text", "components", "scalar"),
    [
        ("It says <answer> Port  Vell. </answer>", {"format": 1.0, "correct": 1.0, "success": 1.0}, 1.0),
        ("<answer>Nope</answer>", {"format": 1.0, "correct": 0.0, "success": 0.0}, 0.5),
        ("Port Vell", {"format": 0.0, "correct": 0.0, "success": 0.0}, 0.0),  # right, but not in the tags
    ],
)
async def test_answer_match_wants_the_reference_in_tags(text: str, components: dict[str, float], scalar: float) -> None:
    s = await AnswerMatchReward().score(make_completion(text, task="answer_match", reference="port vell"))
    assert (s.components, s.scalar, s.status) == (components, scalar, RewardStatus.OK)
    missing = await AnswerMatchReward().score(make_completion(text, task="answer_match"))
    assert missing.status == RewardStatus.INFRA_FAIL
