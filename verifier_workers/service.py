"""Running a verifier worker process: keys, reward functions, clients, metrics, signals."""

from __future__ import annotations

import asyncio
import logging
import signal

from prometheus_client import CollectorRegistry

from plumbing.config import Config
from plumbing.kafka import Publisher
from plumbing.metrics import serve_metrics
from plumbing.redis_client import connect_redis
from verifier_workers.rewards import RewardConfig, build_registry, close_registry
from verifier_workers.rewards.remote import RemoteConfig
from verifier_workers.sandbox import SandboxLimits
from verifier_workers.signing import Signer, generate_keypair
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
    registry = CollectorRegistry()
    port = serve_metrics(cfg.metrics, registry)
    v = cfg.verifier
    fns = build_registry(
        RewardConfig(sandbox=SandboxLimits(wall_s=v.code_timeout_s), remote=RemoteConfig(url=v.remote_url, timeout_s=v.remote_timeout_s))
    )
    redis = connect_redis(cfg)
    try:
        async with Publisher(cfg) as publisher:
            worker = VerifierWorker(cfg, fns, load_signer(cfg), publisher, redis, registry)
            if started is None:  # a process of its own; an embedding driver owns the signals
                loop = asyncio.get_running_loop()
                for sig in (signal.SIGTERM, signal.SIGINT):
                    loop.add_signal_handler(sig, worker.stop)
            log.info("verifier %s v%s (key %s) serving; metrics on :%d", v.verifier_id, v.version, worker.signer.key_id, port)
            if started is not None:
                started.set_result(worker)
            await worker.run()
    finally:
        await close_registry(fns)
        await redis.aclose()
