"""Running an engine worker process: engine, clients, metrics server, signals."""

from __future__ import annotations

import asyncio
import logging
import signal

from prometheus_client import CollectorRegistry

from engine_workers.deferral import Deferral
from engine_workers.engine import Engine
from engine_workers.model_store import resolve_model
from engine_workers.routing.router import Router
from engine_workers.speculation.metrics import SpeculationCollector
from engine_workers.worker import EngineWorker
from plumbing.config import Config
from plumbing.consumer import FatalError
from plumbing.kafka import Publisher
from plumbing.metrics import serve_metrics
from plumbing.redis_client import connect_redis

log = logging.getLogger(__name__)


async def serve_engine(cfg: Config, started: asyncio.Future[EngineWorker] | None = None) -> None:
    """Run one engine worker until SIGTERM/SIGINT (graceful) or engine death (FatalError).

    `started`, when given, receives the worker once it consumes (for in-process drivers).
    """
    registry = CollectorRegistry()
    port = serve_metrics(cfg.metrics, registry)
    engine = Engine(cfg.engine, resolve_model(cfg.engine.model))
    await engine.start()
    if cfg.engine.speculation:
        registry.register(SpeculationCollector(engine.speculation_stats))
    redis = connect_redis(cfg)
    try:
        async with Publisher(cfg) as publisher:
            worker = EngineWorker(cfg, engine, publisher, redis, registry)
            router = (
                Router(cfg, publisher, redis, engine.tokenizer, registry,
                       dead_letters=worker.dead_letters.for_stage("router"), consumer_metrics=worker.runner.metrics)
                if cfg.routing.embedded else None
            )
            deferral = (
                Deferral(cfg, publisher, worker.policy, worker.dead_letters.for_stage("deferral"), registry,
                         consumer_metrics=worker.runner.metrics)
                if cfg.engine.deferral_embedded else None
            )
            if started is None:  # a process of its own; an embedding driver owns the signals
                loop = asyncio.get_running_loop()
                for sig in (signal.SIGTERM, signal.SIGINT):
                    loop.add_signal_handler(sig, worker.stop)
            log.info("engine worker %s serving %s; metrics on :%d", worker.worker_id, engine.model_path, port)
            if started is not None:
                started.set_result(worker)
            await run_with_companions(worker, [s for s in (router, deferral) if s is not None])
    finally:
        await redis.aclose()
        engine.shutdown()


async def run_with_companions(worker: EngineWorker, companions: list[Router | Deferral]) -> None:
    """Run the worker and the stages embedded with it (router, deferral).

    They stop when the worker does; one that ends on its own stops the worker with
    its cause (a dead embedded router would leave the engine idle and nobody told).
    """
    tasks = {asyncio.create_task(c.run(), name=type(c).__name__.lower()): c for c in companions}
    serving = asyncio.create_task(worker.run(), name="engine worker")
    try:
        done, _ = await asyncio.wait({serving, *tasks}, return_when=asyncio.FIRST_COMPLETED)
        if serving not in done:
            ended = next(iter(done))
            cause = ended.exception() if not ended.cancelled() else None
            log.error("embedded %s ended (%r): stopping the engine worker", ended.get_name(), cause)
            worker.stop()
            await asyncio.gather(serving, return_exceptions=True)
            raise FatalError(f"embedded {ended.get_name()} ended: {cause!r}") from cause
        await serving
    finally:
        for c in companions:
            c.stop()
        await asyncio.gather(*tasks, return_exceptions=True)


async def serve_router(cfg: Config) -> None:
    """Run one router alone (group `router`) until SIGTERM/SIGINT."""
    from transformers import AutoTokenizer

    registry = CollectorRegistry()
    port = serve_metrics(cfg.metrics, registry)
    tokenizer = AutoTokenizer.from_pretrained(resolve_model(cfg.engine.model))
    redis = connect_redis(cfg)
    try:
        async with Publisher(cfg) as publisher:
            router = Router(cfg, publisher, redis, tokenizer, registry)
            loop = asyncio.get_running_loop()
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(sig, router.stop)
            log.info("router (%s) serving; metrics on :%d", router.policy, port)
            await router.run()
    finally:
        await redis.aclose()
