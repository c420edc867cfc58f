"""Helpers shared by the operations tests: reading a run's prompts back from the topic, a tiny model."""

from __future__ import annotations

import asyncio
import uuid
from pathlib import Path

from aiokafka import AIOKafkaConsumer

from plumbing.config import Config
from plumbing.kafka import consumer_kwargs
from schemas import PromptRequest, decode
from schemas.topics import PROMPTS


async def prompts_of_run(
    cfg: Config, run_id: str, count: int, timeout_s: float = 30, settle_s: float = 1.0
) -> list[PromptRequest]:
    """Every prompt request of `run_id` on rollout.prompts (a private group, from the start):
    waits for `count`, then `settle_s` more so that extra ones would show up."""
    consumer = AIOKafkaConsumer(PROMPTS.name, **consumer_kwargs(cfg, f"prompts-reader-{uuid.uuid4().hex[:8]}"))
    await consumer.start()
    found: list[PromptRequest] = []
    loop = asyncio.get_running_loop()
    try:
        deadline = loop.time() + timeout_s
        settle_until: float | None = None
        while True:
            now = loop.time()
            if settle_until is None and len(found) >= count:
                settle_until = now + settle_s
            if (settle_until is not None and now >= settle_until) or now > deadline:
                break
            for records in (await consumer.getmany(timeout_ms=200)).values():
                for r in records:
                    try:
                        req = decode(r.value or b"", PromptRequest, list(r.headers or ()))
                    except ValueError:
                        continue
                    if req.run_id == run_id:
                        found.append(req)
    finally:
        await consumer.stop()
    return found


def tiny_llama(path: Path) -> str:
    """A 2-layer Llama with random weights (seed 0) saved at `path`: a starting policy that
    trains in a second on the CPU."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=256,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        pad_token_id=0,
        eos_token_id=1,
        bos_token_id=2,
    )
    LlamaForCausalLM(cfg).save_pretrained(path)
    return str(path)
