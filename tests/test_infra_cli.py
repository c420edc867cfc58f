"""`primerl infra up/status/down` start and stop exactly their own processes."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

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
