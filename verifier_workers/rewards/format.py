"""The format reward: does the completion obey the output grammar of its request?

Supported kinds: `json_schema` (JSON parse + jsonschema validation), `regex` (full
match), `choice` (the text is one of a JSON list of strings), `lark` (parsed by
lark's Earley parser from the `start` rule) and `answer_format` (the math task's
answer regex, or the request's own spec when it carries one, as the engine does).

GBNF is NOT checked: there is no GBNF parser in our dependencies, so a `gbnf`
grammar scores INFRA_FAIL with reason "gbnf check unsupported" (a verifier gap, never
the model's fault).

Surrounding whitespace is ignored for the text kinds (regex, choice, answer_format):
a trailing newline is not a format error worth training against.
"""

from __future__ import annotations

import json
import re
from collections import OrderedDict

import jsonschema
import lark

from schemas import Completion, Grammar, GrammarKind, RewardStatus
from schemas.prompts import ANSWER_FORMAT_REGEX
from verifier_workers.rewards.base import Score, infra_fail, policy_fail

# Earley parsing and backtracking regexes grow fast with the input; outputs longer than
# this are rejected before parsing so one completion cannot stall the verifier.
MAX_FORMAT_TEXT = 32_768
_LARK_CACHE_SIZE = 64


class _Invalid(Exception):
    """The model's output breaks the grammar (POLICY_FAIL)."""


class _BadGrammar(Exception):
    """The request's grammar itself cannot be used (INFRA_FAIL)."""


class FormatReward:
    """1.0 (OK) when the text obeys `completion.grammar`, POLICY_FAIL with the violation otherwise."""

    name = "format"
    version = "1"

    def __init__(self) -> None:
        # Requests of one run share a handful of grammars; compiling a Lark grammar
        # costs far more than parsing one answer, so compiled parsers are kept (LRU).
        self._lark: OrderedDict[str, lark.Lark] = OrderedDict()

    async def score(self, completion: Completion) -> Score:
        """Check the text against the request's grammar."""
        grammar = completion.grammar
        if grammar is None:
            return infra_fail("request carries no grammar")
        trace = {"grammar": grammar.kind.value}
        if completion.grammar_completed is not None:
            trace["grammar_completed"] = str(completion.grammar_completed).lower()
        if grammar.kind is GrammarKind.GBNF:
            return infra_fail("gbnf check unsupported", trace=trace)
        if len(completion.text) > MAX_FORMAT_TEXT:
            return policy_fail(f"output longer than {MAX_FORMAT_TEXT} characters", {"format": 0.0}, trace)
        try:
            self._check(grammar, completion.text)
        except _BadGrammar as err:
            return infra_fail(f"unusable {grammar.kind.value} grammar: {err}", trace=trace)
        except _Invalid as err:
            return policy_fail(str(err), {"format": 0.0}, trace)
        return Score({"format": 1.0}, 1.0, RewardStatus.OK, trace)

    def _check(self, grammar: Grammar, text: str) -> None:
        kind, spec = grammar.kind, grammar.spec
        if kind is GrammarKind.JSON_SCHEMA:
            _check_json_schema(spec, text)
        elif kind is GrammarKind.REGEX:
            _check_regex(spec, text)
        elif kind is GrammarKind.ANSWER_FORMAT:
            _check_regex(spec or ANSWER_FORMAT_REGEX, text)
        elif kind is GrammarKind.CHOICE:
            _check_choice(grammar, text)
        elif kind is GrammarKind.LARK:
            self._check_lark(spec, text)
        else:  # a kind added to the schema but not taught to the verifier
            raise _BadGrammar(f"unknown grammar kind {kind.value}")

    def _check_lark(self, spec: str, text: str) -> None:
        parser = self._lark.get(spec)
        if parser is None:
            try:
                parser = lark.Lark(spec)
            except lark.exceptions.LarkError as err:
                raise _BadGrammar(str(err)) from err
            self._lark[spec] = parser
            if len(self._lark) > _LARK_CACHE_SIZE:
                self._lark.popitem(last=False)
        self._lark.move_to_end(spec)
        try:
            parser.parse(text)
        except lark.exceptions.LarkError as err:
            raise _Invalid(f"does not parse: {err}") from err


def _check_json_schema(spec: str, text: str) -> None:
    try:
        schema = json.loads(spec)
        if not isinstance(schema, (dict, bool)):
            raise TypeError("a JSON schema is an object or a boolean")
        validator_cls = jsonschema.validators.validator_for(schema)
        validator_cls.check_schema(schema)
    except (json.JSONDecodeError, jsonschema.SchemaError, TypeError) as err:
        raise _BadGrammar(str(err)) from err
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        raise _Invalid(f"not JSON: {err}") from err
    error = jsonschema.exceptions.best_match(validator_cls(schema).iter_errors(value))
    if error is not None:
        raise _Invalid(f"schema violation at {error.json_path}: {error.message}")


def _check_regex(spec: str, text: str) -> None:
    if not spec:
        raise _BadGrammar("empty regex")
    try:
        pattern = re.compile(spec)
    except re.error as err:
        raise _BadGrammar(str(err)) from err
    if not pattern.fullmatch(text.strip()):
        raise _Invalid("does not match the regex")


def _check_choice(grammar: Grammar, text: str) -> None:
    try:
        choices = grammar.choices()
    except ValueError as err:
        raise _BadGrammar(str(err)) from err
    if text.strip() not in choices:
        raise _Invalid("not one of the choices")
