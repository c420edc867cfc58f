"""`primerl scale KIND N`: start or stop local worker processes so that N of a kind run.

Each worker is a `primerl engine|verifier|learner` subprocess in its own process group
(a stop reaches vLLM's engine-core children too), recorded with its pid and /proc start
time in `<state_dir>/workers.json`, so a recycled pid is never mistaken for ours and a
later `scale` or `status` call knows what runs. New workers join their consumer group;
stopped ones get SIGTERM, on which every worker stops taking records, finishes what is
in flight, commits, and leaves the group (its partitions move to the others). SIGKILL
of the whole group only after `stop_timeout_s`.

Learners are one per run (the group `learner-<run_id>` holds the run's group assembly
and optimizer state), so `scale learner` takes a run id and at most 1.
"""

from __future__ import annotations

import fcntl
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import msgspec

from plumbing.config import Config
from plumbing.local_servers import (
    free_port,
    start_ticks,  # the pid-recycling guard infra records use too
)
from plumbing.security import server_env

ROLES = ("engine", "verifier", "learner")
# The log line that says a worker has joined its group and is serving. An engine process
# also runs a router and a deferral consumer, whose groups settle first (~0.5 s earlier):
# its own group's line is the one that says it takes rollout.routed work.
_READY = {"engine": "engine assigned [", "verifier": " assigned [", "learner": "learner assigned ["}


class WorkerProcess(msgspec.Struct, kw_only=True):
    """One worker `scale` started."""

    role: str
    pid: int
    start_ticks: int
    cmdline: list[str]
    log_file: str
    metrics_port: int
    started_at: float
    run_id: str = ""

    def alive(self) -> bool:
        """Still the process we started (same pid and start time, not a zombie)."""
        return start_ticks(self.pid) == self.start_ticks


class ScaleResult(msgspec.Struct, kw_only=True):
    """What a scale call changed."""

    role: str
    started: list[WorkerProcess]
    stopped: list[tuple[WorkerProcess, int | None]]  # with the exit code (None: not our child)
    running: list[WorkerProcess]


def _records_path(state_dir: Path) -> Path:
    return state_dir / "workers.json"


@contextmanager
def _locked(state_dir: Path) -> Iterator[None]:
    """One `scale` at a time per state dir: two would read and rewrite the records at once."""
    state_dir.mkdir(parents=True, exist_ok=True)
    with open(state_dir / "workers.lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def read_workers(state_dir: Path) -> list[WorkerProcess]:
    """The recorded workers that still run (dead ones are dropped from the view)."""
    path = _records_path(state_dir)
    if not path.exists():
        return []
    return [w for w in msgspec.json.decode(path.read_bytes(), type=list[WorkerProcess]) if w.alive()]


def _write_workers(state_dir: Path, workers: list[WorkerProcess]) -> None:
    path = _records_path(state_dir)
    tmp = path.with_suffix(".tmp")
    tmp.write_bytes(msgspec.json.encode(workers))
    os.replace(tmp, path)


def start_worker(
    cfg: Config,
    role: str,
    *,
    run_id: str = "",
    extra_env: dict[str, str] | None = None,
    extra_args: list[str] | None = None,
) -> WorkerProcess:
    """Start one `primerl <role>` in a new session (process group); returns its record."""
    port = free_port()
    log_dir = cfg.state_dir / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "primerl", role, "--state-dir", str(cfg.state_dir), "--metrics-port", str(port)]
    if role == "learner":
        cmd += ["--run-id", run_id]
    cmd += extra_args or []
    env = {**os.environ, **server_env(cfg), **(extra_env or {})}
    if role == "engine":
        env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    log_file = log_dir / f"{role}-{int(time.time() * 1000)}-{port}.log"
    with open(log_file, "ab") as out:
        proc = subprocess.Popen(
            cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env, start_new_session=True
        )
    return WorkerProcess(
        role=role,
        pid=proc.pid,
        start_ticks=start_ticks(proc.pid) or 0,
        cmdline=cmd,
        log_file=str(log_file),
        metrics_port=port,
        started_at=time.time(),
        run_id=run_id,
    )


def wait_ready(worker: WorkerProcess, timeout_s: float) -> None:
    """Wait until the worker's log says it serves; RuntimeError (with the log's end) if it died."""
    deadline = time.monotonic() + timeout_s
    marker = _READY[worker.role]
    path = Path(worker.log_file)
    while time.monotonic() < deadline:
        text = path.read_text(errors="replace") if path.exists() else ""
        if marker in text:
            return
        if not worker.alive():
            _reap(worker.pid)
            raise RuntimeError(
                f"{worker.role} pid {worker.pid} exited during start-up:\n" + "\n".join(text.splitlines()[-30:])
            )
        time.sleep(0.5)
    raise TimeoutError(f"{worker.role} pid {worker.pid} not serving after {timeout_s}s (log: {worker.log_file})")


def _reap(pid: int) -> int | None:
    """The exit code when `pid` is our exited child; None otherwise."""
    try:
        done, status = os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        return None
    return os.waitstatus_to_exitcode(status) if done == pid else None


def stop_worker(worker: WorkerProcess, timeout_s: float = 120) -> int | None:
    """SIGTERM (graceful: in-flight work finishes and is committed), then SIGKILL of the
    whole process group after `timeout_s`; returns the exit code when known."""
    if not worker.alive():
        return _reap(worker.pid)
    os.kill(worker.pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        # Alive first, then reap: a worker that exits between the two is a zombie, reaped
        # below with its code (the other order returned None for a clean exit, now and then).
        exited = not worker.alive()
        code = _reap(worker.pid)
        if code is not None or exited:
            _kill_group_leftovers(worker.pid)
            return code
        time.sleep(0.2)
    os.killpg(worker.pid, signal.SIGKILL)
    time.sleep(0.5)
    return _reap(worker.pid)


def _kill_group_leftovers(pgid: int) -> None:
    """vLLM's engine core can outlive its parent for a moment: the group goes with the worker."""
    try:
        os.killpg(pgid, signal.SIGTERM)
    except ProcessLookupError:
        pass


def scale(
    cfg: Config,
    role: str,
    count: int,
    *,
    run_id: str = "",
    wait: bool = True,
    start_timeout_s: float = 240,
    stop_timeout_s: float = 120,
    extra_env: dict[str, str] | None = None,
) -> ScaleResult:
    """Start or stop `role` workers (the ones this state dir recorded) until `count` run."""
    if role not in ROLES:
        raise ValueError(f"unknown kind {role!r}: one of {', '.join(ROLES)}")
    if count < 0:
        raise ValueError("the count must be >= 0")
    if role == "learner":
        if not run_id:
            raise ValueError("scale learner needs the run id (--run-id)")
        if count > 1:
            raise ValueError(
                "one learner per run: the group learner-<run_id> holds that run's groups and optimizer state"
            )
    with _locked(cfg.state_dir):
        everyone = read_workers(cfg.state_dir)
        mine = [w for w in everyone if w.role == role and (role != "learner" or w.run_id == run_id)]
        others = [w for w in everyone if w not in mine]
        started: list[WorkerProcess] = []
        stopped: list[tuple[WorkerProcess, int | None]] = []
        try:
            while len(mine) + len(started) < count:
                started.append(start_worker(cfg, role, run_id=run_id, extra_env=extra_env))
                _write_workers(cfg.state_dir, others + mine + started)
            if wait:
                for w in started:
                    wait_ready(w, start_timeout_s)
            # Newest first: the oldest members keep their partitions and warm caches.
            for w in sorted(mine, key=lambda w: w.started_at, reverse=True)[: max(0, len(mine) - count)]:
                stopped.append((w, stop_worker(w, stop_timeout_s)))
                mine.remove(w)
                _write_workers(cfg.state_dir, others + mine + started)
        finally:
            _write_workers(cfg.state_dir, [w for w in others + mine + started if w.alive()])
    return ScaleResult(role=role, started=started, stopped=stopped, running=mine + started)
