"""Running an engine worker process: the engine, the worker, its embedded router and deferral."""

from __future__ import annotations

import asyncio
import logging

from engine_workers.deferral import Deferral
from engine_workers.engine import Engine
from engine_workers.speculation.metrics import SpeculationCollector
from engine_workers.worker import EngineWorker
from plumbing.config import Config
from plumbing.model_store import resolve_model
from plumbing.stage import Stage, StageContext, Supervised, serve_stage
from router.router import Router

log = logging.getLogger(__name__)


async def serve_engine(cfg: Config, started: asyncio.Future[EngineWorker] | None = None) -> None:
    """Run one engine worker until SIGTERM/SIGINT (graceful) or engine death (FatalError).

    `started`, when given, receives the worker once it consumes (for in-process drivers).
    """
    await serve_stage(cfg, "engine worker", build_engine, started)


async def build_engine(ctx: StageContext) -> tuple[EngineWorker, Stage]:
    """Start the engine (shut down with the process) and the worker with the stages embedded beside it.

    The router (`routing.embedded`) and the deferral (`engine.deferral_embedded`) are
    supervised with the worker: a dead embedded router would leave the engine idle and
    nobody told, so one that ends on its own stops the process with its cause.
    """
    cfg, redis = ctx.cfg, ctx.need_redis()
    engine = Engine(cfg.engine, resolve_model(cfg.engine.model))
    await engine.start()
    ctx.stack.callback(engine.shutdown)
    if cfg.engine.speculation:
        ctx.registry.register(SpeculationCollector(engine.speculation_stats))
    worker = EngineWorker(cfg, engine, ctx.publisher, redis, ctx.registry)
    embedded: list[Stage] = []
    if cfg.routing.embedded:
        embedded.append(
            Router(
                cfg,
                ctx.publisher,
                redis,
                engine.tokenizer,
                ctx.registry,
                dead_letters=worker.dead_letters.for_stage("router"),
                consumer_metrics=worker.runner.metrics,
            )
        )
    if cfg.engine.deferral_embedded:
        embedded.append(
            Deferral(
                cfg,
                ctx.publisher,
                worker.policy,
                worker.dead_letters.for_stage("deferral"),
                ctx.registry,
                consumer_metrics=worker.runner.metrics,
            )
        )
    log.info(
        "engine worker %s on %s (embedded: %s)",
        worker.worker_id,
        engine.model_path,
        ", ".join(type(s).__name__ for s in embedded) or "nothing",
    )
    return worker, Supervised(worker, embedded)


async def serve_router(cfg: Config) -> None:
    """Run one router alone (group `router`) until SIGTERM/SIGINT."""

    async def build(ctx: StageContext) -> tuple[Router, Router]:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(resolve_model(ctx.cfg.engine.model))
        router = Router(ctx.cfg, ctx.publisher, ctx.need_redis(), tokenizer, ctx.registry)
        log.info("router policy: %s", router.policy)
        return router, router

    await serve_stage(cfg, "router", build)
