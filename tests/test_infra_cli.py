"""`primerl infra up/status/down` start and stop exactly their own processes."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from plumbing.local_servers import _alive, read_state


def _primerl(*args: str, state_dir: Path) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k not in ("KAFKA_BOOTSTRAP_SERVERS", "REDIS_URL")}
    return subprocess.run(
        [sys.executable, "-m", "primerl", *args, "--state-dir", str(state_dir)],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_infra_up_status_down_leaves_nothing_running(tmp_path: Path) -> None:
    up = _primerl("infra", "up", state_dir=tmp_path)
    assert up.returncode == 0, up.stderr
    assert (
        "export KAFKA_BOOTSTRAP_SERVERS=127.0.0.1:" in up.stdout and "export REDIS_URL=redis://127.0.0.1:" in up.stdout
    )
    state = read_state(tmp_path)
    assert state is not None and {p.name for p in state.processes} == {"kafka", "redis"}
    assert all(_alive(p) for p in state.processes)
    assert (tmp_path / "infra.env").read_text().count("export") == 2

    status = _primerl("infra", "status", state_dir=tmp_path)
    assert status.returncode == 0 and status.stdout.count("running") == 2

    again = _primerl("infra", "up", state_dir=tmp_path)  # idempotent: reuses, starts nothing new
    assert again.returncode == 0
    assert [p.pid for p in read_state(tmp_path).processes] == [p.pid for p in state.processes]

    down = _primerl("infra", "down", state_dir=tmp_path)
    assert down.returncode == 0 and "kafka" in down.stdout and "redis" in down.stdout
    assert not any(_alive(p) for p in state.processes)
    assert read_state(tmp_path) is None
    assert _primerl("infra", "status", state_dir=tmp_path).returncode == 1


@pytest.mark.integration
def test_infra_up_requires_the_generated_redis_user_and_primerl_commands_use_it(tmp_path: Path) -> None:
    """`infra up` (infra.auth, the default): credentials.toml is 0600, Redis refuses a client without the
    login, and a later primerl command (`status`, which reads Redis) logs in by itself."""
    up = _primerl("infra", "up", state_dir=tmp_path)
    try:
        assert up.returncode == 0, up.stderr
        assert "Redis requires ACL user 'primerl'" in up.stdout
        creds = tmp_path / "credentials.toml"
        assert (
            stat.S_IMODE(creds.stat().st_mode) == 0o600
            and stat.S_IMODE((tmp_path / "redis.acl").stat().st_mode) == 0o600
        )
        password = tomllib.loads(creds.read_text())["redis"]["password"]
        state = read_state(tmp_path)
        assert state is not None
        assert not any(password in " ".join(p.cmdline) for p in state.processes)  # nor in infra.json / ps
        assert password not in (tmp_path / "infra.json").read_text() + (tmp_path / "infra.env").read_text()
        assert password not in up.stdout + up.stderr
        url = state.env["REDIS_URL"]
        refused = subprocess.run(
            [sys.executable, "-c", f"import redis; redis.Redis.from_url({url!r}).ping()"],
            capture_output=True,
            text=True,
        )
        assert refused.returncode != 0 and "AuthenticationError" in refused.stderr
        status = _primerl("status", state_dir=tmp_path)
        assert status.returncode == 0, status.stdout + status.stderr
    finally:
        _primerl("infra", "down", state_dir=tmp_path)
    assert not creds.exists()


@pytest.mark.integration
def test_infra_up_no_auth_leaves_redis_open(tmp_path: Path) -> None:
    up = _primerl("infra", "up", "--no-auth", state_dir=tmp_path)
    try:
        assert up.returncode == 0, up.stderr
        assert not (tmp_path / "credentials.toml").exists() and "ACL user" not in up.stdout
        state = read_state(tmp_path)
        assert state is not None
        url = state.env["REDIS_URL"]
        opened = subprocess.run([sys.executable, "-c", f"import redis; redis.Redis.from_url({url!r}).ping()"])
        assert opened.returncode == 0
    finally:
        _primerl("infra", "down", state_dir=tmp_path)
