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
from pathlib import Path

from aiokafka.admin import AIOKafkaAdminClient
from redis.exceptions import AuthenticationError, NoPermissionError

from plumbing.config import Config
from plumbing.kafka import common_kwargs, create_topics
from plumbing.local_servers import (
    InfraState,
    clear_state,
    credentials_file,
    free_port,
    new_credentials,
    process_status,
    read_state,
    redis_acl_file,
    start_broker,
    start_redis,
    stop_process,
    write_credentials,
    write_state,
)
from plumbing.redis_client import connect_redis
from plumbing.security import redacted

log = logging.getLogger(__name__)


async def wait_kafka(cfg: Config, timeout_s: float = 60) -> None:
    """Return once the broker answers a metadata request (with the config's SASL / TLS settings).

    A refused login is retried like an outage: aiokafka reports both as "Unable to
    bootstrap", and the cause is in its log line before.
    """
    deadline = time.monotonic() + timeout_s
    last: Exception | None = None
    while time.monotonic() < deadline:
        admin = AIOKafkaAdminClient(**{**common_kwargs(cfg), "request_timeout_ms": 5000})
        try:
            await admin.start()
            await admin.list_topics()
            return
        except Exception as err:  # noqa: BLE001 - retried until the deadline
            last = err
            await asyncio.sleep(0.5)
        finally:
            await admin.close()
    raise TimeoutError(f"Kafka at {cfg.bootstrap} did not answer within {timeout_s}s: {last}")


async def wait_redis(cfg: Config, timeout_s: float = 30) -> None:
    """Return once Redis answers PING (as the config's ACL user); a refused login is final."""
    deadline = time.monotonic() + timeout_s
    client = connect_redis(cfg)
    try:
        while True:
            try:
                await client.ping()
                return
            except (AuthenticationError, NoPermissionError) as err:
                # NOAUTH (no login sent), WRONGPASS, NOPERM: waiting does not fix a password.
                raise PermissionError(
                    f"Redis at {redacted(cfg.redis_url)} refused the login ({err}); set redis.username / "
                    "redis.password (PRIMERL_REDIS__USERNAME / PRIMERL_REDIS__PASSWORD)"
                ) from err
            except Exception as err:  # noqa: BLE001 - retried until the deadline
                if time.monotonic() > deadline:
                    raise TimeoutError(
                        f"Redis at {redacted(cfg.redis_url)} did not answer within {timeout_s}s: {err}"
                    ) from err
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
        cfg = _start_local_redis(cfg, state, log_dir)
    state.env = {"KAFKA_BOOTSTRAP_SERVERS": cfg.bootstrap, "REDIS_URL": cfg.redis_url}
    write_state(cfg.state_dir, state)
    await wait_kafka(cfg)
    await wait_redis(cfg)
    await create_topics(cfg)
    return state, cfg


def _start_local_redis(cfg: Config, state: InfraState, log_dir: Path) -> Config:
    """Start redis-server; with infra.auth (the default) only a generated ACL user gets in.

    The password goes to <state_dir>/credentials.toml (0600), which load_config reads for
    this URL; the server's ACL file holds only its SHA-256.
    """
    port = free_port()
    url = f"redis://127.0.0.1:{port}/0"
    acl = None
    creds = None
    if cfg.infra.auth:
        creds = new_credentials(url)
        write_credentials(cfg.state_dir, creds)
        acl = redis_acl_file(cfg.state_dir / "redis.acl", creds.redis_username, creds.redis_password)
    _, rec = start_redis(log_dir, port=port, acl_file=acl)
    state.processes.append(rec)
    changes: dict[str, object] = {"redis_url": url}
    if creds is not None:
        changes |= {"redis.username": creds.redis_username, "redis.password": creds.redis_password}
    log.info(
        "started local redis-server on %s, pid %d (%s)",
        url,
        rec.pid,
        f"ACL user {creds.redis_username}, password in {credentials_file(cfg.state_dir)}" if creds else "no login",
    )
    return cfg.derive(**changes)


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
