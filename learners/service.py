"""Running a learner process: policy model, trainer, keyring, clients, metrics, signals."""

from __future__ import annotations

import asyncio
import logging

import torch

from learners.policy_model import PolicyModel
from learners.trainer import TrainConfig, Trainer
from learners.worker import LearnerWorker
from plumbing.config import Config
from plumbing.model_store import resolve_model
from plumbing.stage import StageContext, serve_stage
from plumbing.trust import Keyring

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
    await serve_stage(cfg, f"learner ({cfg.learner.algo}) for run {cfg.run_id}", build_learner, started)


async def build_learner(ctx: StageContext) -> tuple[LearnerWorker, LearnerWorker]:
    """The learner with its trainer and keyring; refuses to start with no verifier key to trust."""
    cfg = ctx.cfg
    keyring = Keyring.from_dir(cfg.keys_dir)
    if not keyring.key_ids():
        raise RuntimeError(f"no verifier public keys in {cfg.keys_dir}: the learner would reject every reward")
    trainer = await asyncio.to_thread(build_trainer, cfg)
    worker = LearnerWorker(
        cfg,
        trainer,
        keyring,
        ctx.publisher,
        ctx.need_redis(),
        ctx.registry,
        checkpoint=cfg.state_dir / "learner" / cfg.run_id / "learner.ckpt",
        # Absolute: engines resolve it from their own working directory.
        policies_dir=(cfg.state_dir / "policies" / cfg.run_id).resolve(),
    )
    log.info("learner trusts keys %s", keyring.key_ids())
    return worker, worker
