"""Running a verifier worker process: keys, reward functions, clients, metrics, signals."""

from __future__ import annotations

import asyncio
import logging

from plumbing.config import Config
from plumbing.stage import StageContext, serve_stage
from plumbing.trust import Signer, generate_keypair
from verifier_workers.rewards import RewardConfig, build_registry, close_registry
from verifier_workers.rewards.remote import RemoteConfig
from verifier_workers.sandbox import SandboxLimits
from verifier_workers.worker import VerifierWorker

log = logging.getLogger(__name__)


def load_signer(cfg: Config) -> Signer:
    """The configured private key, or this state dir's verifier key (generated on first use)."""
    if cfg.verifier.key_file is not None:
        return Signer.from_file(cfg.verifier.key_file)
    existing = sorted(cfg.keys_dir.glob("*.key"))
    if existing:
        return Signer.from_file(existing[-1])
    priv, _ = generate_keypair(cfg.keys_dir)
    log.info("generated verifier key %s (public key next to it: learners trust that folder)", priv)
    return Signer.from_file(priv)


async def serve_verifier(cfg: Config, started: asyncio.Future[VerifierWorker] | None = None) -> None:
    """Run one verifier worker until SIGTERM/SIGINT."""
    await serve_stage(cfg, f"verifier {cfg.verifier.verifier_id} v{cfg.verifier.version}", build_verifier, started)


async def build_verifier(ctx: StageContext) -> tuple[VerifierWorker, VerifierWorker]:
    """The verifier worker with its reward functions (closed with the process)."""
    v = ctx.cfg.verifier
    fns = build_registry(
        RewardConfig(
            sandbox=SandboxLimits(wall_s=v.code_timeout_s),
            remote=RemoteConfig(url=v.remote_url, timeout_s=v.remote_timeout_s),
        )
    )
    ctx.stack.push_async_callback(close_registry, fns)
    worker = VerifierWorker(ctx.cfg, fns, load_signer(ctx.cfg), ctx.publisher, ctx.need_redis(), ctx.registry)
    log.info("verifier signs with key %s", worker.signer.key_id)
    return worker, worker
