"""The tool-call parser: good calls, every malformed kind, the stop-string case, and arbitrary garbage."""

from __future__ import annotations

import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from envhub.tool_calls import Answer, Call, Malformed, NoCall, parse

TOOLS = ("calculator", "browser")


def test_a_well_formed_call() -> None:
    got = parse('Let me compute. <tool name="calculator"> 123 * 45 </tool>', TOOLS)
    assert got == Call(tool="calculator", args="123 * 45", ignored=0)


def test_args_are_free_text() -> None:
    code = 'for i in range(3):\n    print("<b>", i)\n'
    got = parse(f'<tool name="browser">{code}</tool>', TOOLS)
    assert isinstance(got, Call) and got.args == code.strip()


@pytest.mark.parametrize("tag", ["<tool name='calculator'>", "<tool name=calculator>", '<tool  name = "calculator" >'])
def test_attribute_spellings(tag: str) -> None:
    assert parse(f"{tag}1+1</tool>", TOOLS) == Call(tool="calculator", args="1+1")


def test_first_call_wins_and_the_rest_are_counted() -> None:
    text = '<tool name="calculator">1+1</tool> then <tool name="browser">/wiki/X</tool><tool name="calculator">2</tool>'
    assert parse(text, TOOLS) == Call(tool="calculator", args="1+1", ignored=2)


def test_stopped_at_the_close_tag() -> None:
    # vLLM drops the stop string `</tool>` from the text: complete when the engine stopped there.
    text = 'I will call it. <tool name="calculator">17 * 23'
    assert parse(text, TOOLS, stopped_at_close=True) == Call(tool="calculator", args="17 * 23")
    got = parse(text, TOOLS, stopped_at_close=False)
    assert isinstance(got, Malformed) and "unclosed" in got.reason and got.tool == "calculator"


@pytest.mark.parametrize(
    "text,reason",
    [
        ('<tool name="calculator"', "unclosed opening tag"),
        ('<tool name="calculator">1+1', "unclosed tag"),
        ("<tool>1+1</tool>", "missing name"),
        ('<tool id="calculator">1+1</tool>', "missing name"),
        ('<tool name="shell">rm -rf /</tool>', "unknown tool 'shell'"),
        ('<tool name="calculator">   </tool>', "empty arguments"),
        ('<tool name="calculator"><tool name="calculator">1</tool></tool>', "nested"),
        ('<tool name="calculator" <tool name="browser">x</tool>', '"<" inside'),
        ("<answer>42", "unclosed <answer>"),
        ("<answer>  </answer>", "empty <answer>"),
    ],
)
def test_malformed_calls_say_why(text: str, reason: str) -> None:
    got = parse(text, TOOLS)
    assert isinstance(got, Malformed) and reason in got.reason, got


def test_a_malformed_answer_is_not_a_call() -> None:
    assert parse("<answer>42", TOOLS) == Malformed("unclosed <answer> tag: end the answer with </answer>", of="answer")
    got = parse('<tool name="x">1</tool>', TOOLS)
    assert isinstance(got, Malformed) and got.of == "call"


def test_unknown_tool_lists_the_known_ones() -> None:
    got = parse('<tool name="python">print(1)</tool>', TOOLS)
    assert isinstance(got, Malformed) and "browser, calculator" in got.reason and got.tool == "python"


def test_oversized_arguments() -> None:
    ok = parse(f'<tool name="calculator">{"1" * 100}</tool>', TOOLS, max_args_chars=100)
    assert isinstance(ok, Call)
    got = parse(f'<tool name="calculator">{"1" * 101}</tool>', TOOLS, max_args_chars=100)
    assert isinstance(got, Malformed) and "101 characters exceed the limit of 100" in got.reason


def test_answers_and_plain_text() -> None:
    assert parse("The product is <answer> 5535 </answer>.", TOOLS) == Answer("5535")
    assert parse("I think it is 5535.", TOOLS) == NoCall()
    assert parse("my <toolbox> has </tool> in it", TOOLS) == NoCall()  # not a tag, and a stray close
    assert parse("", TOOLS) == NoCall()


def test_whichever_comes_first_decides() -> None:
    call_first = '<tool name="calculator">2*3</tool> <answer>6</answer>'
    assert parse(call_first, TOOLS) == Call(tool="calculator", args="2*3")
    assert parse('<answer>6</answer> <tool name="calculator">2*3</tool>', TOOLS) == Answer("6")


_pieces = st.sampled_from(
    ["<tool", "<tool ", ">", "</tool>", 'name="calculator"', "name=", '"', "'", "<answer>", "</answer>", "<", "\x00"]
)
_garbage = st.lists(st.one_of(_pieces, st.text(max_size=12)), max_size=30).map("".join)


@settings(max_examples=400, deadline=None)
@given(text=_garbage, stopped=st.booleans(), limit=st.integers(0, 50))
def test_parse_never_raises(text: str, stopped: bool, limit: int) -> None:
    got = parse(text, TOOLS, stopped_at_close=stopped, max_args_chars=limit)
    assert isinstance(got, NoCall | Answer | Call | Malformed)
    if isinstance(got, Call):
        assert got.tool in TOOLS and got.args and got.args == got.args.strip() and len(got.args) <= limit
        assert re.search(r"<tool(\s|>|$)", got.args) is None  # nested calls are refused, not run
    if isinstance(got, Malformed):
        assert got.reason


def test_huge_input_is_linear() -> None:
    # 2 MB of openings without a close: a backtracking regex would take minutes here.
    text = "<tool name=" * 200_000
    assert isinstance(parse(text, TOOLS), Malformed)
    assert isinstance(parse("<answer>" * 200_000, TOOLS), Malformed)
    many = '<tool name="calculator">1</tool>' + "<tool " * 200_000
    assert parse(many, TOOLS) == Call(tool="calculator", args="1", ignored=200_000)
