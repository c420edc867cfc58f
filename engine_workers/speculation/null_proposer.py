"""The worker-side drafter: none. Drafts come from the scheduler (scheduler.py).

vLLM's `custom_class` hook turns on draft verification; this class proposes nothing,
because the worker process has neither the request ids nor the grammar state. Its
constructor applies the worker's vLLM patches (engine_workers/vllm_patches.py).
"""

from __future__ import annotations

from typing import Any, cast

from engine_workers import vllm_patches
from engine_workers.speculation.scheduler import CONFIG_KEY


class NullProposer:
    """Proposes no draft tokens; the scheduler fills them in."""

    def __init__(self, vllm_config: Any) -> None:
        self.vllm_config = vllm_config
        # Built inside the worker process, once per model runner: the place to patch it.
        vllm_patches.apply(worker_patches(vllm_config))

    def load_model(self, *args: Any, **kwargs: Any) -> None:
        """Nothing to load."""

    def propose(self, sampled_token_ids: list[list[int]], *args: Any, **kwargs: Any) -> list[list[int]]:
        """An empty draft per batch row."""
        return [[] for _ in sampled_token_ids]


def worker_patches(vllm_config: Any) -> list[str]:
    """The worker's patches this engine asked for (engine.py writes `inverse_cdf_sampler`)."""
    cfg = dict(cast(dict[str, Any], getattr(vllm_config, "additional_config", None) or {})).get(CONFIG_KEY, {})
    skip = set() if cfg.get("inverse_cdf_sampler", True) else {"plain_tokens_by_inverse_cdf"}
    return [name for name in vllm_patches.WORKER if name not in skip]
