"""The worker-side drafter: none. Drafts come from the scheduler (scheduler.py).

vLLM's `custom_class` hook turns on draft verification; this class proposes nothing,
because the worker process has neither the request ids nor the grammar state. Its
constructor applies the worker's vLLM patches (engine_workers/vllm_patches.py).
"""

from __future__ import annotations

from typing import Any

from engine_workers import vllm_patches


class NullProposer:
    """Proposes no draft tokens; the scheduler fills them in."""

    def __init__(self, vllm_config: Any) -> None:
        self.vllm_config = vllm_config
        # Built inside the worker process, once per model runner: the place to patch it.
        vllm_patches.apply(vllm_patches.WORKER)

    def load_model(self, *args: Any, **kwargs: Any) -> None:
        """Nothing to load."""

    def propose(self, sampled_token_ids: list[list[int]], *args: Any, **kwargs: Any) -> list[list[int]]:
        """An empty draft per batch row."""
        return [[] for _ in sampled_token_ids]
