"""Parsing a model turn: a tool call `<tool name="NAME">ARGS</tool>`, or a final `<answer>...</answer>`.

ARGS is free text (an expression, a URL, code), taken verbatim up to `</tool>`. The
engine stops generation at the stop string `</tool>` and vLLM drops it from the text,
so a call running to the end of the text is complete when the caller says generation
stopped there (`stopped_at_close`), and unclosed otherwise (e.g. cut by max_tokens).

Whichever of `<tool` and `<answer>` comes first decides what the turn is; the first
call wins and later ones are counted, not run. Pure string scanning, no backtracking
regex on the whole text: `parse` never raises, whatever the model wrote.
"""

from __future__ import annotations

import re
from collections.abc import Collection
from typing import Literal

import msgspec

OPEN = "<tool"
CLOSE = "</tool>"
ANSWER_OPEN = "<answer>"
ANSWER_CLOSE = "</answer>"
MAX_ARGS_CHARS = 4000
# An opening tag longer than this is no tag: `<tool` followed by prose.
_MAX_OPEN_TAG = 200
# Only matched against the (short) opening tag: name="x", name='x' or name=x.
_NAME_ATTR = re.compile(r"""\bname\s*=\s*(?:"([^"]*)"|'([^']*)'|([^\s"'>]+))""")


class NoCall(msgspec.Struct, frozen=True, tag="none"):
    """Neither a tool call nor an answer."""


class Answer(msgspec.Struct, frozen=True, tag="answer"):
    """A final answer (stripped text between the tags)."""

    text: str


class Call(msgspec.Struct, frozen=True, tag="call"):
    """One well-formed call of a known tool; `ignored`: further calls in the text, not run."""

    tool: str
    args: str
    ignored: int = 0


class Malformed(msgspec.Struct, frozen=True, tag="malformed"):
    """A call (or answer) the model tried to write but got wrong; `reason` is for the model to read."""

    reason: str
    tool: str = ""  # the name it gave, when it gave one
    of: Literal["call", "answer"] = "call"


Parsed = NoCall | Answer | Call | Malformed


def _find_open(text: str, start: int = 0) -> int:
    """Index of the next `<tool` that starts a tag (`<tool>` or `<tool ...`, not `<toolbox>`), or -1."""
    i = text.find(OPEN, start)
    while i != -1:
        nxt = text[i + len(OPEN) : i + len(OPEN) + 1]
        if nxt == "" or nxt == ">" or nxt.isspace():
            return i
        i = text.find(OPEN, i + 1)
    return -1


def _count_opens(text: str) -> int:
    n, i = 0, _find_open(text)
    while i != -1:
        n += 1
        i = _find_open(text, i + 1)
    return n


def _answer(text: str, at: int) -> Answer | Malformed:
    body_start = at + len(ANSWER_OPEN)
    end = text.find(ANSWER_CLOSE, body_start)
    if end == -1:
        return Malformed("unclosed <answer> tag: end the answer with </answer>", of="answer")
    answer = text[body_start:end].strip()
    if not answer:
        return Malformed("empty <answer></answer>", of="answer")
    return Answer(answer)


def parse(
    text: str, tools: Collection[str], *, stopped_at_close: bool = False, max_args_chars: int = MAX_ARGS_CHARS
) -> Parsed:
    """What the model's turn `text` asks for; `tools`: the names this environment knows."""
    at_call, at_answer = _find_open(text), text.find(ANSWER_OPEN)
    if at_answer != -1 and (at_call == -1 or at_answer < at_call):
        return _answer(text, at_answer)
    if at_call == -1:
        return NoCall()
    tag_end = text.find(">", at_call, at_call + _MAX_OPEN_TAG)
    if tag_end == -1:
        return Malformed('unclosed opening tag: write <tool name="NAME">ARGUMENTS</tool>')
    attrs = text[at_call + len(OPEN) : tag_end]
    if "<" in attrs:
        return Malformed('"<" inside the opening tag: write <tool name="NAME">ARGUMENTS</tool>')
    m = _NAME_ATTR.search(attrs)
    if m is None:
        return Malformed(f'missing name attribute: write <tool name="NAME">, NAME one of {", ".join(sorted(tools))}')
    name = next(g for g in m.groups() if g is not None).strip()
    if name not in tools:
        known = ", ".join(sorted(tools)) or "none"
        return Malformed(f"unknown tool {name[:50]!r} (known: {known})", tool=name[:50])
    body_start = tag_end + 1
    close = text.find(CLOSE, body_start)
    if close == -1 and not stopped_at_close:
        return Malformed(f"unclosed tag: end the call with {CLOSE}", tool=name)
    body_end = len(text) if close == -1 else close
    args = text[body_start:body_end]
    if _find_open(args) != -1:
        return Malformed("nested <tool> tags: one call at a time", tool=name)
    args = args.strip()
    if not args:
        return Malformed("empty arguments", tool=name)
    if len(args) > max_args_chars:
        return Malformed(f"arguments of {len(args)} characters exceed the limit of {max_args_chars}", tool=name)
    rest = "" if close == -1 else text[close + len(CLOSE) :]
    return Call(tool=name, args=args, ignored=_count_opens(rest))
