"""Output grammars of prompt requests, as vLLM structured-output parameters."""

from __future__ import annotations

import json

from vllm.sampling_params import StructuredOutputsParams

from schemas import Grammar, GrammarKind
from schemas.prompts import ANSWER_FORMAT_REGEX


class GrammarError(ValueError):
    """A grammar this engine cannot compile (bad JSON schema, empty regex, ...)."""


def structured_outputs(grammar: Grammar) -> StructuredOutputsParams:
    """The vLLM structured-output parameters that enforce `grammar`."""
    kind, spec = grammar.kind, grammar.spec
    if kind is GrammarKind.ANSWER_FORMAT:
        return StructuredOutputsParams(regex=spec or ANSWER_FORMAT_REGEX)
    if not spec:
        raise GrammarError(f"grammar {kind.value} needs a non-empty spec")
    if kind is GrammarKind.JSON_SCHEMA:
        try:
            schema = json.loads(spec)
        except json.JSONDecodeError as err:
            raise GrammarError(f"json_schema spec is not JSON: {err}") from err
        if not isinstance(schema, dict):
            raise GrammarError("json_schema spec must be a JSON object")
        return StructuredOutputsParams(json=schema)
    if kind is GrammarKind.REGEX:
        return StructuredOutputsParams(regex=spec)
    if kind is GrammarKind.CHOICE:
        try:
            return StructuredOutputsParams(choice=grammar.choices())
        except ValueError as err:
            raise GrammarError(str(err)) from err
    # Lark and GBNF both go to the grammar field; the backend tells them apart.
    return StructuredOutputsParams(grammar=spec)
