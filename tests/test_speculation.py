"""Draft sources of grammar-aware speculation: n-gram votes over related text, grammar-forced
tokens, and the step-cost fit that decides how much drafting pays."""

from __future__ import annotations

import pytest
import xgrammar
from transformers import AutoTokenizer

from engine_workers.speculation.draft_switch import DraftSwitch
from engine_workers.speculation.drafts import (
    FORCED,
    FORCED_PROB,
    LAST_TOKEN_PROB,
    NGRAM,
    OutputsCache,
    continuations,
    propose,
)
from engine_workers.speculation.step_cost import StepCost
from plumbing.model_store import resolve_model


def test_continuations_use_the_longest_ngram_found_anywhere() -> None:
    sibling = [5, 6, 7, 8, 9, 10]
    prompt = [1, 2, 7, 8, 42]
    assert continuations([3, 6, 7, 8], [sibling, prompt]) == [(sibling, 4)]  # 3-gram 6,7,8 only in the sibling
    assert continuations([0, 2, 7, 8], [sibling, prompt]) == [(prompt, 4)]  # 3-gram 2,7,8 only in the prompt
    assert continuations([0, 9, 7, 8], [sibling, prompt]) == [(sibling, 4), (prompt, 4)]  # 2-gram 7,8 in both
    assert continuations([0, 1, 99], [sibling, prompt]) == []


def test_continuations_are_token_aligned_and_find_every_occurrence() -> None:
    # 256 = bytes 00 01 00 00: a byte-level search could match across token boundaries.
    assert continuations([1, 0], [[256, 0, 0, 7], [1, 0, 5]]) == [([1, 0, 5], 2)]
    src = [1, 2, 3, 1, 2, 4, 1, 2]
    assert continuations([1, 2], [src]) == [
        (src, 5),
        (src, 2),
    ]  # newest first; the match at the end has no continuation


def test_ngram_drafts_follow_the_majority_and_stop_where_it_becomes_a_guess() -> None:
    agree = [[9, 1, 2, 3, 4, 5], [8, 1, 2, 3, 4, 6], [7, 1, 2, 3, 4, 7]]
    drafts = propose([0, 1, 2], agree, k=4, min_prob=0.5)
    # Three matches agree on 3, 4 (p = 3/4 each, running 0.75 then 0.56); the next token
    # splits three ways (p = 1/4), so the draft stops before it.
    assert [d.token for d in drafts] == [3, 4] and {d.source for d in drafts} == {NGRAM}
    assert drafts[0].prob == pytest.approx(0.75) and drafts[1].prob == pytest.approx(0.5625)
    assert [d.token for d in propose([0, 1, 2], agree, k=4, min_prob=0.6)] == [3]
    assert propose([0, 1, 2], [[1, 2, 3]], k=4, min_prob=0.6) == [], "one lone match is a coin flip"
    assert [d.token for d in propose([0, 1, 2], [[1, 2, 3, 4]], k=4, min_prob=0.05)] == [3, 4]
    assert propose([0, 1, 2], agree, k=4, min_prob=0.0, ngram=False) == []


def test_outputs_cache_keeps_recent_outputs_per_key() -> None:
    cache = OutputsCache(keys=2, per_key=2)
    for out in ([1], [2], [3]):
        cache.add(10, out)
    assert cache.get(10) == [[3], [2]]
    cache.add(11, [4])
    cache.add(12, [5])  # evicts the least recent key (10)
    assert cache.get(10) == [] and cache.get(11) == [[4]] and cache.get(12) == [[5]]


def test_step_cost_fit_and_break_even() -> None:
    cost = StepCost(fixed_ms=90.0, per_token_ms=8.0, min_points=8)
    assert cost.break_even(1) == pytest.approx(8 / 98) and cost.break_even(32) == pytest.approx(256 / 346)
    for _ in range(4):
        for tokens in (1, 8, 16, 32):
            cost.observe(tokens, tokens, 20.0 + 0.5 * tokens)  # a GPU-like step: verification nearly free
    assert cost.line(8) == pytest.approx((20.0, 0.5))
    assert cost.break_even(8) == pytest.approx(4 / 24)
    same = StepCost(fixed_ms=90.0, per_token_ms=8.0, min_points=4, bucket_min_points=4)
    for _ in range(8):
        same.observe(8, 8, 150.0)  # one batch size, no drafts: the slope is unknown, keep the prior
    assert same.line(8) == (90.0, 8.0)


def test_step_cost_prices_drafts_by_the_line_of_their_batch_size() -> None:
    """A CPU step: weight-bound at batch 1 (a drafted token nearly free), compute-bound at
    batch 8 (3 ms a token). One line through both mispriced a draft at either."""
    cost = StepCost(fixed_ms=90.0, per_token_ms=8.0, min_points=8, bucket_min_points=8)
    for drafts in range(12):
        cost.observe(1, 1 + drafts, 20.0 + 0.2 * drafts)
        cost.observe(8, 8 + drafts, 55.0 + 3.0 * drafts)
    assert cost.line(1) == pytest.approx((19.8, 0.2))
    assert cost.line(8) == pytest.approx((31.0, 3.0))
    assert cost.break_even(8) == pytest.approx(24 / 55)
    assert cost.break_even(1) == pytest.approx(0.2 / 20)
    # A bucket not seen yet is priced by the line over all steps, steeper than either
    # (it runs from batch 1's cheap steps to batch 8's dear ones).
    fixed, per_token = cost.line(32)
    assert per_token > 4.0 and fixed < 5.0


@pytest.fixture(scope="module")
def compiler() -> xgrammar.GrammarCompiler:
    tok = AutoTokenizer.from_pretrained(resolve_model(None))
    info = xgrammar.TokenizerInfo.from_huggingface(tok, vocab_size=len(tok.get_vocab()))
    return xgrammar.GrammarCompiler(info), tok


def _encoder(tok):
    return lambda text: tok.encode(text, add_special_tokens=False)


def test_forced_text_is_drafted_in_the_tokenizers_split_and_leaves_the_matcher_as_found(compiler) -> None:
    comp, tok = compiler
    matcher = xgrammar.GrammarMatcher(comp.compile_regex(r"<answer>[0-9]{1,3}</answer>"))
    drafts = propose([], [], k=16, min_prob=0.3, matcher=matcher, encode=_encoder(tok))
    forced = [d.token for d in drafts]
    assert forced == tok.encode("<answer>", add_special_tokens=False) and {d.source for d in drafts} == {FORCED}
    expected = [FORCED_PROB ** (i + 1) for i in range(len(forced))]
    expected[-1] *= LAST_TOKEN_PROB / FORCED_PROB
    assert [d.prob for d in drafts] == pytest.approx(expected)
    assert [d.token for d in propose([], [], k=16, min_prob=0.3, matcher=matcher, encode=_encoder(tok))] == forced, (
        "the matcher was not rolled back"
    )
    assert len(propose([], [], k=2, min_prob=0.5, matcher=matcher, encode=_encoder(tok))) == 2, "k caps a forced run"
    rarely = {forced[1]}  # learned: the model seldom writes this one as drafted
    learned = propose(
        [],
        [],
        k=16,
        min_prob=0.3,
        matcher=matcher,
        encode=_encoder(tok),
        learned=lambda t, prior: 0.1 if t in rarely else prior,
    )
    assert [d.token for d in learned] == forced[:1], "drafting stops before a forced token the model seldom takes"
    for t in forced:
        assert matcher.accept_token(t)
    assert propose(forced, [], k=16, min_prob=0.5, matcher=matcher, encode=_encoder(tok)) == [], (
        "digits are a free choice"
    )
    assert (
        propose(
            [],
            [],
            k=16,
            min_prob=0.5,
            matcher=xgrammar.GrammarMatcher(comp.compile_regex(r"<answer>[0-9]</answer>")),
            forced=False,
            encode=_encoder(tok),
        )
        == []
    ), "forced drafts switched off"


def test_the_last_token_of_a_forced_text_is_a_coin_flip(compiler) -> None:
    # JSON's ": " before a value: the model may glue the space to the value (" true").
    comp, tok = compiler
    schema = '{"type":"object","properties":{"ok":{"type":"boolean"}},"required":["ok"],"additionalProperties":false}'
    matcher = xgrammar.GrammarMatcher(comp.compile_json_schema(schema, any_whitespace=False))
    drafts = propose([], [], k=16, min_prob=0.0, matcher=matcher, encode=_encoder(tok))
    assert tok.decode([d.token for d in drafts]) == '{"ok": '
    assert drafts[-1].prob == pytest.approx(drafts[-2].prob * LAST_TOKEN_PROB)
    assert (
        tok.decode([d.token for d in propose([], [], k=16, min_prob=0.5, matcher=matcher, encode=_encoder(tok))])
        == '{"ok":'
    )


def test_the_grammar_vetoes_ngram_votes_and_forced_tokens_follow(compiler) -> None:
    # Earlier outputs mostly continue "<answer>" with letters; the grammar allows only
    # digits, so the one digit continuation wins the vote among valid tokens, and the
    # closing tag, forced after one digit, follows it.
    comp, tok = compiler
    matcher = xgrammar.GrammarMatcher(comp.compile_regex(r"<answer>[0-9]</answer>"))
    tag = tok.encode("<answer>", add_special_tokens=False)
    for t in tag:
        assert matcher.accept_token(t)
    seven, letters = tok.encode("7", add_special_tokens=False), tok.encode("xyz", add_special_tokens=False)
    others = [[5] + tag + letters] * 3
    drafts = propose([1] + tag, others + [[6] + tag + seven], k=8, min_prob=0.05, matcher=matcher, encode=_encoder(tok))
    assert drafts[0].token == seven[0] and drafts[0].source == NGRAM and drafts[0].prob == pytest.approx(0.5)
    assert [d.token for d in drafts[1:]] == tok.encode("</answer>", add_special_tokens=False)
    assert {d.source for d in drafts[1:]} == {FORCED}
    assert not matcher.is_terminated() and matcher.accept_token(seven[0]), "the matcher was not rolled back"


def test_draft_switch_keeps_the_faster_policy_per_batch_size_and_probes_the_other() -> None:
    switch = DraftSwitch(steps=4, probe_every=20)
    # Batch 1: drafting emits tokens faster (2 tokens in 110 ms vs 1 in 100 ms).
    # Batch 32: slower (32 tokens in 420 ms with drafts vs 32 in 320 ms without).
    for _ in range(40):
        for batch, (ms_on, tok_on, ms_off, tok_off) in {1: (110, 2, 100, 1), 32: (420, 32, 320, 32)}.items():
            arm = switch.choose(batch)
            switch.observe(batch, arm, ms_on if arm else ms_off, tok_on if arm else tok_off)
    assert switch.drafting() == {"any": {"1": 1, "17-32": 0}}
    assert switch.fallbacks == 1 and switch.resumes == 0
    # After probe_every steps the losing policy is measured again, briefly.
    seen = []
    for _ in range(30):
        arm = switch.choose(32)
        seen.append(arm)
        switch.observe(32, arm, 420 if arm else 320, 32)
    assert sum(seen) == 4 and switch.drafting()["any"]["17-32"] == 0, seen
    # Another workload at the same batch size starts afresh (measures drafting first).
    assert switch.choose(32, "json") is True and switch.drafting()["any"]["17-32"] == 0


def test_draft_switch_times_both_policies_step_by_step_and_drafts_only_on_a_clear_win() -> None:
    def run(switch: DraftSwitch, batch: int, gain: float, steps: int = 40) -> list[bool]:
        arms = []
        for t in range(steps):
            cost = 100.0 if (t // 6) % 2 else 160.0  # bursts: a JSON record's forced keys come together
            arm = switch.choose(batch)
            arms.append(arm)
            switch.observe(batch, arm, cost * (1 - gain) if arm else cost, 10)
        return arms

    switch = DraftSwitch(steps=8, probe_every=1000)
    arms = run(switch, 8, 0.10)  # drafting 10 % faster at every moment: on, though the bursts dwarf the gain
    assert arms[:16] == [True, False] * 8, arms  # the trial alternates, so both policies see the same moments
    assert switch.drafting() == {"any": {"5-8": 1}} and switch.fallbacks == 0
    run(switch, 1, 0.02)  # 2 % faster: not a clear win, plain steps
    run(switch, 32, -0.02)  # 2 % slower: plain steps
    assert switch.drafting()["any"] == {"1": 0, "5-8": 1, "17-32": 0} and switch.fallbacks == 2
    switch = DraftSwitch(steps=8, probe_every=20)
    run(switch, 8, -0.10)
    run(switch, 8, 0.10, steps=60)  # the next trial finds drafting faster again
    assert switch.drafting()["any"]["5-8"] == 1 and switch.resumes == 1


def test_draft_positions_get_their_requests_temperature_on_cpu() -> None:
    # vLLM 0.32's CPU expand kernel left these uninitialised (NaN target probabilities).
    import torch
    from vllm.v1.sample import rejection_sampler

    from engine_workers import vllm_patches

    vllm_patches.apply(["expand_sampling_params_on_cpu"])
    out = rejection_sampler.expand_batch_to_tokens(
        torch.tensor([0.7, -1.0, 1.3]), torch.tensor([2, 2, 5], dtype=torch.int32), 5, replace_from=-1, replace_to=1
    )
    assert out.tolist() == pytest.approx([0.7, 0.7, 1.3, 1.3, 1.3])


def test_recovered_tokens_follow_the_residual_distribution_without_exponential_noise(monkeypatch) -> None:
    # vLLM drew a batch x vocab tensor of exponentials per drafting step (~1 ms per row on one core);
    # the inverse-CDF sampler draws one uniform per draft position, from the same distribution.
    import types
    from collections import Counter

    import torch
    from vllm.v1.sample import rejection_sampler

    from engine_workers import vllm_patches

    vllm_patches.apply(["recovered_tokens_by_inverse_cdf"])
    exponentials = []
    monkeypatch.setattr(torch.Tensor, "exponential_", lambda t, *a, **k: exponentials.append(t.numel()))
    # Request 0 drafts two tokens, request 1 none, request 2 one whose target put all mass on it.
    target = torch.tensor([[0.1, 0.2, 0.3, 0.4, 0.0], [0.0, 0.5, 0.0, 0.5, 0.0], [0.0, 1.0, 0.0, 0.0, 0.0]])
    drafts = torch.tensor([3, 1, 1], dtype=torch.int32)
    plain = types.SimpleNamespace(generators={})

    def sample(draft_probs=None, metadata=plain):
        out = rejection_sampler.sample_recovered_tokens(
            2, [2, 0, 1], torch.tensor([2, 2, 3]), drafts, draft_probs, target, metadata, torch.device("cpu")
        )
        assert out.dtype == drafts.dtype
        return out.tolist()

    torch.manual_seed(0)
    counts = [Counter() for _ in range(3)]
    for _ in range(4000):
        for position, token in enumerate(sample()):
            counts[position][token] += 1
    assert counts[2] == {1: 4000}  # no residual mass: the draft is kept (it is never rejected)
    for position, expected in ((0, {0: 2000 / 3, 1: 4000 / 3, 2: 2000}), (1, {3: 4000})):
        assert set(counts[position]) == set(expected), counts[position]  # never the draft, never a masked token
        for token, n in expected.items():
            assert abs(counts[position][token] - n) < 0.1 * n, (position, counts[position])
    # With draft probabilities the residual is max(target - draft, 0).
    draft_probs = torch.tensor([[0.1, 0.2, 0.0, 0.7, 0.0], [0.0, 0.5, 0.0, 0.5, 0.0], [0.0, 1.0, 0.0, 0.0, 0.0]])
    assert {sample(draft_probs)[0] for _ in range(200)} == {2}
    # A seeded request's positions come from its own generator: same seed, same tokens.
    seeded = [
        sample(metadata=types.SimpleNamespace(generators={0: torch.Generator().manual_seed(7)}))[:2] for _ in range(2)
    ]
    assert seeded[0] == seeded[1]
    # A -1 (vLLM's padding for a draft its grammar check dropped) zeroes nothing and raises nothing.
    padded = rejection_sampler.sample_recovered_tokens(
        1, [1], torch.tensor([1]), torch.tensor([-1], dtype=torch.int32), None, target[1:2], plain, torch.device("cpu")
    )
    assert padded.tolist()[0] in (1, 3)
    assert exponentials == []
