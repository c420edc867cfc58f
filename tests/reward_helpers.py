"""Building completions for the reward, sandbox, verifier and learner tests (signed like an engine's)."""

from __future__ import annotations

import functools
from typing import Any

import msgspec

from plumbing.config import Config
from plumbing.custody import engine_signer
from plumbing.trust import Signer, prompt_hash, token_hash
from schemas import Completion, Grammar, Reward, RewardStatus, Timings


def make_completion(
    text: str, *, task: str = "math", reference: str | None = None, grammar: Grammar | None = None
) -> Completion:
    """A final completion with every required field filled with something plausible."""
    return Completion(
        run_id="test-run",
        request_id="req-1",
        group_id="group-1",
        group_size=1,
        sample_index=0,
        prompt="Solve it.",
        prompt_token_ids=[1, 2, 3],
        text=text,
        token_ids=[4, 5],
        logprobs=[-0.5, -0.25],
        finish_reason="stop",
        policy_version=0,
        worker_id="engine-test",
        timings=Timings(enqueued_at=1.0, started_at=1.1, first_token_at=1.2, finished_at=1.3),
        prompt_tokens=3,
        cached_prompt_tokens=0,
        task=task,
        reference=reference,
        grammar=grammar,
    )


def consistent(c: Completion, tokenizer: Any) -> Completion:
    """`c` with token_ids that are its text tokenized (and the text their decoding), as an engine makes them."""
    ids = tokenizer.encode(c.text, add_special_tokens=False)
    return msgspec.structs.replace(
        c, token_ids=ids, text=tokenizer.decode(ids, skip_special_tokens=True), logprobs=[-0.5] * len(ids)
    )


def engine_signed(c: Completion, cfg: Config) -> Completion:
    """`c` signed with the config's engine key (the one verifiers and learners built from `cfg` trust)."""
    return engine_signer(cfg).sign(c)


def reward_for(c: Completion, signer: Signer, scalar: float = 1.0) -> Reward:
    """A verifier-signed reward that binds `c` (its ids, prompt hash and tokens hash)."""
    return signer.sign(
        Reward(
            run_id=c.run_id,
            completion_id=c.id,
            request_id=c.request_id,
            group_id=c.group_id,
            prompt_hash=prompt_hash(c.prompt),
            tokens_hash=token_hash(c.token_ids),
            policy_version=c.policy_version,
            verifier_id="v",
            verifier_version="1",
            components={"correct": scalar},
            scalar=scalar,
            status=RewardStatus.OK,
        )
    )


@functools.lru_cache(maxsize=4)
def _tokenizer(model: str | None) -> Any:
    from transformers import AutoTokenizer

    from plumbing.model_store import resolve_model

    return AutoTokenizer.from_pretrained(resolve_model(model))


def as_engine(c: Completion, cfg: Config) -> Completion:
    """`c` as the config's engine would publish it: token_ids its text's, signed with its engine key."""
    return engine_signed(consistent(c, _tokenizer(cfg.custody.tokenizer or cfg.engine.model)), cfg)


def char_tokens(text: str, cfg: Config) -> list[int]:
    """`text` as one token per byte-level character of the config's engine tokenizer: token_ids
    that decode to `text` (SmolLM2's are ids under 256, inside tests.ops_helpers.tiny_llama's vocabulary)."""
    tok = _tokenizer(cfg.custody.tokenizer or cfg.engine.model)
    pieces = tok.convert_ids_to_tokens(tok.encode(text, add_special_tokens=False))
    ids = [tok.convert_tokens_to_ids(ch) for piece in pieces for ch in piece]
    assert tok.decode(ids, skip_special_tokens=True) == text, (text, ids)
    return list(ids)
