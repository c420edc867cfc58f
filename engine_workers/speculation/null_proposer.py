"""The worker-side drafter: none. Drafts come from the scheduler (scheduler.py).

vLLM's `custom_class` hook turns on draft verification; this class proposes nothing,
because the worker process has neither the request ids nor the grammar state.
"""

from __future__ import annotations

from typing import Any


def sample_plainly_without_drafts() -> None:
    """Make a step in which no request has a draft sample like a plain engine's step.

    vLLM 0.32 sends every step of a speculative engine through its rejection sampler,
    which draws batch x vocab exponentials even when no request has a draft. Measured
    here (py-spy, free text at batch 8, no drafts): 7.5 % of the worker's time, and the
    speculative engine ran at 0.90x a plain one. With no drafts the logits are one row
    per request, exactly what the plain sampler takes.
    """
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    original = GPUModelRunner._sample
    if getattr(original, "primerl_plain_without_drafts", False):
        return

    def _sample(self: Any, logits: Any, spec_decode_metadata: Any) -> Any:
        if spec_decode_metadata is not None and spec_decode_metadata.max_spec_len == 0:
            spec_decode_metadata = None
        return original(self, logits, spec_decode_metadata)

    _sample.primerl_plain_without_drafts = True  # type: ignore[attr-defined]
    GPUModelRunner._sample = _sample  # type: ignore[method-assign]


class NullProposer:
    """Proposes no draft tokens; the scheduler fills them in."""

    def __init__(self, vllm_config: Any) -> None:
        self.vllm_config = vllm_config
        # Built inside the worker process, once per model runner: the place to adjust it.
        sample_plainly_without_drafts()

    def load_model(self, *args: Any, **kwargs: Any) -> None:
        """Nothing to load."""

    def propose(self, sampled_token_ids: list[list[int]], *args: Any, **kwargs: Any) -> list[list[int]]:
        """An empty draft per batch row."""
        return [[] for _ in sampled_token_ids]
