"""Replaying an output through the grammar's token mask: the accepted-mask ratio.

Independent of the engine: the grammar is compiled again here with xgrammar, the way
the engine compiles it (compact JSON, see engine.py), and every emitted token must be
one the mask allows at its position.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any

import xgrammar

from schemas import Grammar, GrammarKind
from schemas.prompts import ANSWER_FORMAT_REGEX


class GrammarReplay:
    """Counts the tokens of outputs that a grammar's mask accepts."""

    def __init__(self, tokenizer: Any) -> None:
        info = xgrammar.TokenizerInfo.from_huggingface(tokenizer, vocab_size=len(tokenizer.get_vocab()))
        self._compiler = xgrammar.GrammarCompiler(info)
        self._compile = lru_cache(maxsize=64)(self._compile_uncached)

    def _compile_uncached(self, grammar: Grammar) -> xgrammar.CompiledGrammar:
        if grammar.kind is GrammarKind.JSON_SCHEMA:
            return self._compiler.compile_json_schema(grammar.spec, any_whitespace=False, separators=(",", ":"))
        if grammar.kind in (GrammarKind.REGEX, GrammarKind.ANSWER_FORMAT):
            return self._compiler.compile_regex(grammar.spec or ANSWER_FORMAT_REGEX)
        if grammar.kind is GrammarKind.GBNF:
            return self._compiler.compile_grammar(grammar.spec)
        raise ValueError(f"replay of {grammar.kind.value} grammars is not supported")

    def accepted(self, grammar: Grammar, token_ids: list[int]) -> int:
        """How many leading tokens of `token_ids` the mask accepts (all of them for a conforming output)."""
        matcher = xgrammar.GrammarMatcher(self._compile(grammar))
        for i, token in enumerate(token_ids):
            if not matcher.accept_token(token):
                return i
        return len(token_ids)
