"""Draft sources of grammar-aware speculation: n-grams from related text, grammar-forced tokens."""

from __future__ import annotations

import pytest
import xgrammar
from transformers import AutoTokenizer

from engine_workers.model_store import resolve_model
from engine_workers.speculation.drafts import RoundsCache, forced_tokens, ngram_draft


def test_ngram_drafts_continue_the_longest_match_in_the_first_source_that_has_it() -> None:
    sibling = [5, 6, 7, 8, 9, 10]
    prompt = [1, 2, 7, 8, 42]
    assert ngram_draft([3, 6, 7, 8], [sibling, prompt], k=2) == [9, 10]  # 3-gram 6,7,8 in the sibling
    assert ngram_draft([0, 2, 7, 8], [sibling, prompt], k=3) == [42]  # 3-gram 2,7,8 only in the prompt
    assert ngram_draft([0, 1, 99], [sibling, prompt], k=3) == []
    assert ngram_draft([7, 8], [sibling], k=0) == []


def test_ngram_matches_are_token_aligned() -> None:
    # 256 = bytes 00 01 00 00: a byte-level search could match across token boundaries.
    assert ngram_draft([1, 0], [[256, 0, 0, 7], [1, 0, 5]], k=1) == [5]


def test_rounds_cache_keeps_recent_outputs_per_prompt() -> None:
    cache = RoundsCache(prompts=2, per_prompt=2)
    for out in ([1], [2], [3]):
        cache.add(10, out)
    cache.add(11, [4])
    cache.add(12, [5])  # evicts the least recent prompt (10)
    assert cache.get(10) == [] and cache.get(11) == [[4]] and cache.get(12) == [[5]]


@pytest.fixture(scope="module")
def compiler() -> xgrammar.GrammarCompiler:
    tok = AutoTokenizer.from_pretrained(resolve_model(None))
    info = xgrammar.TokenizerInfo.from_huggingface(tok, vocab_size=len(tok.get_vocab()))
    return xgrammar.GrammarCompiler(info), tok


def test_forced_tokens_are_the_masks_only_choices_and_leave_the_matcher_as_found(compiler) -> None:
    comp, tok = compiler
    matcher = xgrammar.GrammarMatcher(comp.compile_regex(r"<answer>[0-9]{1,3}</answer>"))
    bitmask = xgrammar.allocate_token_bitmask(1, len(tok.get_vocab()))
    forced = forced_tokens(matcher, bitmask, k=16)
    assert forced and "<answer>".startswith(tok.decode(forced))
    assert forced_tokens(matcher, bitmask, k=16) == forced, "the matcher was not rolled back"
    for t in forced:
        assert matcher.accept_token(t)
    assert forced_tokens(matcher, bitmask, k=16) == [], "digits are a free choice"



def test_a_free_choice_is_never_forced(compiler) -> None:
    # `{` of a JSON object can be spelled by several tokens ("{", '{"', ...): nothing is forced.
    comp, tok = compiler
    schema = '{"type":"object","properties":{"age":{"type":"integer"}},"required":["age"],"additionalProperties":false}'
    matcher = xgrammar.GrammarMatcher(comp.compile_json_schema(schema, any_whitespace=False, separators=(",", ":")))
    bitmask = xgrammar.allocate_token_bitmask(1, len(tok.get_vocab()))
    assert forced_tokens(matcher, bitmask, k=16) == []
