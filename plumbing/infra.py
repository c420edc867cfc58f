"""Bringing up the servers a run needs: the configured ones, else local processes.

`ensure_infra` is what `primerl infra up` and `primerl up` call: it starts a local
broker / Redis only where the configuration names none, waits until both answer,
creates every topic, and records what it started.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from aiokafka.admin import AIOKafkaAdminClient
from redis.asyncio import Redis

from plumbing.config import Config
from plumbing.kafka import create_topics
from plumbing.local_servers import (
    InfraState,
    clear_state,
    process_status,
    read_state,
    start_broker,
    start_redis,
    stop_process,
    write_state,
)

log = logging.getLogger(__name__)


async def wait_kafka(bootstrap: str, timeout_s: float = 60) -> None:
    """Return once the broker answers a metadata request."""
    deadline = time.monotonic() + timeout_s
    last: Exception | None = None
    while time.monotonic() < deadline:
        admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=5000)
        try:
            await admin.start()
            await admin.list_topics()
            return
        except Exception as err:  # noqa: BLE001 - retried until the deadline
            last = err
            await asyncio.sleep(0.5)
        finally:
            await admin.close()
    raise TimeoutError(f"Kafka at {bootstrap} did not answer within {timeout_s}s: {last}")


async def wait_redis(url: str, timeout_s: float = 30) -> None:
    """Return once Redis answers PING."""
    deadline = time.monotonic() + timeout_s
    client = Redis.from_url(url)
    try:
        while True:
            try:
                await client.ping()
                return
            except Exception as err:  # noqa: BLE001 - retried until the deadline
                if time.monotonic() > deadline:
                    raise TimeoutError(f"Redis at {url} did not answer within {timeout_s}s: {err}") from err
                await asyncio.sleep(0.2)
    finally:
        await client.aclose()


async def ensure_infra(cfg: Config) -> tuple[InfraState, Config]:
    """Make a broker and Redis available, with topics; returns the state and `cfg` pointed at them.

    Reuses servers from the environment or from an earlier `infra up` that still
    runs; starts local processes for what is missing.
    """
    state = read_state(cfg.state_dir) or InfraState(env={})
    # An earlier `infra up` whose processes died is forgotten, not reused.
    if any(not alive for _, alive in process_status(state)):
        for proc, alive in process_status(state):
            if alive:
                stop_process(proc)
        state = InfraState(env={})
    log_dir = cfg.state_dir / "logs"
    if not cfg.bootstrap:
        _, rec = start_broker(log_dir)
        state.processes.append(rec)
        cfg = cfg.derive(kafka_bootstrap_servers=f"127.0.0.1:{rec.port}")
        log.info("started local Kafka-compatible broker (Tansu) on %s, pid %d", cfg.kafka_bootstrap_servers, rec.pid)
    if not cfg.redis_url:
        _, rec = start_redis(log_dir)
        state.processes.append(rec)
        cfg = cfg.derive(redis_url=f"redis://127.0.0.1:{rec.port}/0")
        log.info("started local redis-server on %s, pid %d", cfg.redis_url, rec.pid)
    state.env = {"KAFKA_BOOTSTRAP_SERVERS": cfg.bootstrap, "REDIS_URL": cfg.redis_url}
    write_state(cfg.state_dir, state)
    await wait_kafka(cfg.bootstrap)
    await wait_redis(cfg.redis_url)
    await create_topics(cfg)
    return state, cfg


@asynccontextmanager
async def infra_for_run(cfg: Config, keep: bool = False) -> AsyncIterator[Config]:
    """`ensure_infra` for one run, yielding the config pointed at the servers: stops on exit what it
    started, never what was running before."""
    earlier = read_state(cfg.state_dir)
    owned = earlier is None or not all(alive for _, alive in process_status(earlier))
    _, cfg = await ensure_infra(cfg)
    try:
        yield cfg
    finally:
        if owned and not keep:
            teardown_infra(cfg)


def teardown_infra(cfg: Config) -> list[str]:
    """Stop exactly the processes `ensure_infra` recorded; returns what was stopped."""
    state = read_state(cfg.state_dir)
    if state is None:
        return []
    stopped = [f"{p.name} (pid {p.pid})" for p in state.processes if stop_process(p)]
    clear_state(cfg.state_dir)
    return stopped
