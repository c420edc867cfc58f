"""A real engine worker (`primerl engine`) as a subprocess, shared by the engine tests."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from plumbing.local_servers import free_port

ROOT = Path(__file__).resolve().parents[1]


class EngineProcess:
    """Starts, kills and restarts one `primerl engine` process; its log goes to a file."""

    def __init__(
        self, bootstrap: str, redis_url: str, log_dir: Path, max_in_flight: int = 8, state_dir: Path | None = None
    ) -> None:
        self.state_dir = state_dir  # shared with the test's stages: its engine key is what they trust
        self.bootstrap = bootstrap
        self.redis_url = redis_url
        self.log_dir = log_dir
        self.max_in_flight = max_in_flight
        self.proc: subprocess.Popen[bytes] | None = None
        self.metrics_port = 0
        self.starts = 0

    def start(self, timeout_s: float = 240) -> None:
        """Start a worker and wait until it serves /metrics and has joined its group."""
        self.metrics_port = free_port()
        self.starts += 1
        env = {
            **os.environ,
            "KAFKA_BOOTSTRAP_SERVERS": self.bootstrap,
            "REDIS_URL": self.redis_url,
            "PRIMERL_METRICS__PORT": str(self.metrics_port),
            "PRIMERL_ENGINE__MAX_IN_FLIGHT": str(self.max_in_flight),
            "VLLM_CPU_KVCACHE_SPACE": "1",
        }
        if self.state_dir is not None:
            env["PRIMERL_STATE_DIR"] = str(self.state_dir)
        self.log_file = self.log_dir / f"engine-{self.starts}.log"
        with open(self.log_file, "wb") as out:
            # Its own process group: a kill takes vLLM's engine-core children with it
            # (they outlive a SIGKILLed parent otherwise).
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "primerl", "engine"],
                cwd=ROOT,
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"engine exited with {self.proc.returncode}:\n{self.log_tail()}")
            if "engine assigned [" in self.log_file.read_text(errors="replace"):
                return
            time.sleep(0.5)
        raise TimeoutError(f"engine not serving after {timeout_s}s:\n{self.log_tail()}")

    def log_tail(self, lines: int = 40) -> str:
        """The end of the current worker's log."""
        return "\n".join(self.log_file.read_text(errors="replace").splitlines()[-lines:])

    def metrics(self) -> str:
        """The worker's /metrics page."""
        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=5) as resp:
            return resp.read().decode()

    def kill(self) -> None:
        """SIGKILL to the whole group: no clean-up, no commit."""
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(30)

    async def crash_and_restart(self) -> None:
        """`kill`, then `start`, in a thread: start() waits minutes for vLLM, and blocking an
        async test's loop that long starves its observer's heartbeat, so the observer rejoins
        its group and lags by tens of seconds (in a CI run a second kill then landed after the
        sample it was meant for had finished)."""
        await asyncio.to_thread(self.kill)
        await asyncio.to_thread(self.start)

    def stop(self) -> int | None:
        """SIGTERM and wait; returns the exit code."""
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(30)
        return self.proc.returncode if self.proc else None
