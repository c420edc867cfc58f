"""Building completions for the reward and sandbox tests."""

from __future__ import annotations

from schemas import Completion, Grammar, Timings


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
