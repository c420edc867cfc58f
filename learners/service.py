"""Running a learner process: policy model, trainer, keyring, clients, metrics, signals."""

from __future__ import annotations

import asyncio
import logging
import signal

import torch
from prometheus_client import CollectorRegistry

from engine_workers.model_store import resolve_model
from learners.policy_model import PolicyModel
from learners.trainer import TrainConfig, Trainer
from learners.worker import LearnerWorker
from plumbing.config import Config
from plumbing.kafka import Publisher
from plumbing.metrics import serve_metrics
from plumbing.redis_client import connect_redis
from verifier_workers.signing import Keyring

log = logging.getLogger(__name__)


def build_trainer(cfg: Config) -> Trainer:
    """The policy (the engines' model) and its trainer from the learner config."""
    lc = cfg.learner
    torch.manual_seed(lc.seed)
    model_dir = resolve_model(cfg.engine.model)
    model = PolicyModel(model_dir, value_head=lc.algo == "ppo")
    reference = PolicyModel(model_dir).eval() if lc.kl_coef else None
    return Trainer(
        model,
        TrainConfig.from_learner(lc),
        reference,
    )


async def serve_learner(cfg: Config, started: asyncio.Future[LearnerWorker] | None = None) -> None:
    """Run one learner for `cfg.run_id` until SIGTERM/SIGINT (checkpointing on the way out)."""
    registry = CollectorRegistry()
    port = serve_metrics(cfg.metrics, registry)
    trainer = await asyncio.to_thread(build_trainer, cfg)
    keyring = Keyring.from_dir(cfg.keys_dir)
    if not keyring.key_ids():
        raise RuntimeError(f"no verifier public keys in {cfg.keys_dir}: the learner would reject every reward")
    redis = connect_redis(cfg)
    try:
        async with Publisher(cfg) as publisher:
            worker = LearnerWorker(
                cfg, trainer, keyring, publisher, redis, registry,
                checkpoint=cfg.state_dir / "learner" / cfg.run_id / "learner.ckpt",
                # Absolute: engines resolve it from their own working directory.
                policies_dir=(cfg.state_dir / "policies" / cfg.run_id).resolve(),
            )
            if started is None:  # a process of its own; an embedding driver owns the signals
                loop = asyncio.get_running_loop()
                for sig in (signal.SIGTERM, signal.SIGINT):
                    loop.add_signal_handler(sig, worker.stop)
            log.info("learner (%s) for run %s; trusted keys %s; metrics on :%d", cfg.learner.algo, cfg.run_id, keyring.key_ids(), port)
            if started is not None:
                started.set_result(worker)
            await worker.run()
    finally:
        await redis.aclose()
