"""Running the env hub process: the model's tokenizer and context, the corpus server, clients, metrics, signals."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from envhub.corpus_server import corpus_server
from envhub.protocol import EnvContext
from envhub.worker import EnvhubWorker
from plumbing.config import Config
from plumbing.stage import StageContext, serve_stage

log = logging.getLogger(__name__)


async def serve_envhub(cfg: Config, started: asyncio.Future[EnvhubWorker] | None = None) -> None:
    """Run one env hub worker until SIGTERM/SIGINT."""
    await serve_stage(cfg, "env hub", build_envhub, started)


def model_facts(cfg: Config) -> tuple[Any, int]:
    """The engine model's tokenizer and context length (the engine's cap when configured)."""
    from transformers import AutoConfig, AutoTokenizer

    from plumbing.model_store import resolve_model

    path = resolve_model(cfg.engine.model)
    tokenizer = AutoTokenizer.from_pretrained(path)
    context = cfg.engine.max_model_len or int(AutoConfig.from_pretrained(path).max_position_embeddings)
    return tokenizer, context


async def build_envhub(ctx: StageContext) -> tuple[EnvhubWorker, EnvhubWorker]:
    """The worker, with the bundled corpus server started beside it unless envhub.corpus_url names one."""
    e = ctx.cfg.envhub
    url = e.corpus_url
    if not url:
        url = await ctx.stack.enter_async_context(corpus_server(host="127.0.0.1", port=0))
        log.info("corpus server (the browser's web) on %s", url)
    tokenizer, context = await asyncio.to_thread(model_facts, ctx.cfg)
    worker = EnvhubWorker(
        ctx.cfg,
        tokenizer,
        context,
        ctx.publisher,
        ctx.need_redis(),
        ctx.registry,
        EnvContext(
            corpus_url=url,
            sandbox_wall_s=e.sandbox_wall_s,
            http_timeout_s=e.http_timeout_s,
            max_observation_chars=e.max_observation_chars,
        ),
    )
    ctx.stack.push_async_callback(worker.aclose)
    return worker, worker
