"""Running a verifier worker process: keys, reward functions, clients, metrics, signals."""

from __future__ import annotations

import asyncio
import logging

from plumbing.config import Config
from plumbing.custody import engine_keyring, engine_tokenizer, verifier_signer
from plumbing.sandbox import SandboxLimits
from plumbing.stage import StageContext, serve_stage
from verifier_workers.rewards import RewardConfig, build_registry, close_registry
from verifier_workers.rewards.remote import RemoteConfig
from verifier_workers.worker import VerifierWorker

log = logging.getLogger(__name__)


load_signer = verifier_signer  # the configured key, or this state dir's newest live one (made on first use)


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
    cfg = ctx.cfg
    engine_keys = engine_keyring(cfg)
    worker = VerifierWorker(
        cfg,
        fns,
        load_signer(cfg),
        ctx.publisher,
        ctx.need_redis(),
        ctx.registry,
        engine_keys=engine_keys,
        tokenizer=await asyncio.to_thread(engine_tokenizer, cfg),
    )
    log.info(
        "verifier signs with key %s; engine keys trusted: %s",
        worker.signer.key_id,
        engine_keys.key_ids() if engine_keys is not None else "any (custody.require_engine_signatures off)",
    )
    return worker, worker
