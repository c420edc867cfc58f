"""Run untrusted Python (a candidate and its tests) in a limited subprocess.

Barriers, outermost first; `Sandbox.barriers()` says which are active on this host:

- `netns`: the child runs in an empty network namespace (`unshare --net`), so even
  code that slips past the audit hook reaches no network;
- `uid:N`: as root, the child drops to an unprivileged uid (`unshare --setuid`), so
  file permissions protect a 0600 signing key and RLIMIT_NPROC is enforced (the
  kernel does not enforce it for root). Needs an interpreter that uid may execute;
- `rlimits`: CPU seconds, address space, file size, open files, no core dumps, and a
  process count (`nproc`, listed only where the kernel enforces it);
- `audit_hook`: `sandbox_runner.py` blocks processes, sockets, ctypes, raising
  rlimits, signals, tracing, symlinks and file access outside the temp dir (reads
  also under the stdlib), and makes a pass unforgeable by an early `exit(0)`;
- always: `python -I -S` (no environment, no user or site packages), an empty
  environment, a fresh temp dir as working directory, a new session whose whole
  process group is killed at the wall-clock limit, and output read with a size cap.

The ladder of launchers is probed once per Sandbox (the first that can start the
interpreter wins), so a host without namespaces still runs code, with fewer barriers.
"""

from __future__ import annotations

import asyncio
import enum
import os
import resource
import secrets
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import msgspec

from plumbing import sandbox_runner
from plumbing.sandbox_runner import BLOCKED_EXIT, BLOCKED_MARK, ERROR_MARK

# The runner is copied into each temp dir: the sandboxed interpreter reads nothing
# outside it and its stdlib, and must not import the project.
_RUNNER = Path(sandbox_runner.__file__)
_TAIL_BYTES = 4096
_PROBE_TIMEOUT_S = 10.0
_DRAIN_TIMEOUT_S = 2.0


class SandboxLimits(msgspec.Struct, frozen=True, kw_only=True):
    """Limits of one sandboxed run, and how to launch it."""

    cpu_s: int = 5
    wall_s: float = 10.0
    memory_bytes: int = 512 * 1024 * 1024
    nproc: int = 32
    fsize_bytes: int = 1024 * 1024
    nofile: int = 64
    output_bytes: int = 64 * 1024
    python: str = sys.executable
    # Run as this uid/gid when the verifier is root (None: stay root, audit hook only).
    uid: int | None = 65534
    gid: int = 65534
    use_netns: bool = True
    max_parallel: int = 2


class Outcome(str, enum.Enum):
    """How a sandboxed run ended."""

    PASSED = "passed"
    FAILED = "failed"  # an exception, a failed assert, an early exit
    BLOCKED = "blocked"  # the audit hook refused an operation
    MEMORY = "memory"  # the address-space limit was hit
    CRASHED = "crashed"  # killed by a signal we did not send for a limit
    TIMEOUT = "timeout"  # wall-clock or CPU limit


class SandboxResult(msgspec.Struct, frozen=True, kw_only=True):
    """What a run produced. `kill` names the limit or barrier that stopped it, or is empty."""

    outcome: Outcome
    reason: str
    kill: str
    returncode: int | None
    duration_s: float
    stdout: str
    stderr_tail: str
    barriers: tuple[str, ...]


class _Launch(msgspec.Struct, frozen=True):
    prefix: list[str]
    barriers: tuple[str, ...]  # beyond the rlimits and the audit hook every launch has
    owner: tuple[int, int] | None  # uid/gid that must own the temp dir

    def all_barriers(self) -> tuple[str, ...]:
        return ("rlimits", "audit_hook", *self.barriers)


def _rlimits(limits: SandboxLimits) -> Callable[[], None]:
    """The preexec_fn: only setrlimit calls, no imports or locks, safe after fork."""

    def apply() -> None:
        # CPU: SIGXCPU at the soft limit, SIGKILL one second later if it is ignored.
        resource.setrlimit(resource.RLIMIT_CPU, (limits.cpu_s, limits.cpu_s + 1))
        resource.setrlimit(resource.RLIMIT_AS, (limits.memory_bytes, limits.memory_bytes))
        resource.setrlimit(resource.RLIMIT_FSIZE, (limits.fsize_bytes, limits.fsize_bytes))
        resource.setrlimit(resource.RLIMIT_NOFILE, (limits.nofile, limits.nofile))
        resource.setrlimit(resource.RLIMIT_NPROC, (limits.nproc, limits.nproc))
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))

    return apply


def _candidates(limits: SandboxLimits) -> list[_Launch]:
    """Launchers to try, strongest first."""
    found: list[_Launch] = []
    unshare = shutil.which("unshare")
    root = os.geteuid() == 0
    nproc = () if root else ("nproc",)  # the kernel does not enforce RLIMIT_NPROC for root
    if limits.use_netns and unshare:
        if root and limits.uid is not None:
            drop = ["--setgid", str(limits.gid), "--setuid", str(limits.uid)]
            found.append(
                _Launch(
                    [unshare, "--net", *drop, "--"], ("netns", f"uid:{limits.uid}", "nproc"), (limits.uid, limits.gid)
                )
            )
        # As root a plain network namespace needs no user namespace; otherwise map to root in one.
        found.append(
            _Launch(
                [unshare, "--net", "--"] if root else [unshare, "--net", "--map-root-user", "--"],
                ("netns", *nproc),
                None,
            )
        )
    found.append(_Launch([], nproc, None))
    return found


async def _read_capped(stream: asyncio.StreamReader, cap: int) -> tuple[bytes, bytes]:
    """(the first `cap` bytes, the last _TAIL_BYTES bytes), draining everything else."""
    head, tail = bytearray(), bytearray()
    while chunk := await stream.read(65536):
        if len(head) < cap:
            head += chunk[: cap - len(head)]
        tail += chunk
        del tail[:-_TAIL_BYTES]
    return bytes(head), bytes(tail)


def _last_line(text: str, mark: str) -> str | None:
    lines = [line[len(mark) :] for line in text.splitlines() if line.startswith(mark)]
    return lines[-1] if lines else None


def _kill_group(proc: asyncio.subprocess.Process) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass  # the group is already gone


class Sandbox:
    """Runs candidate code against tests under the limits; one per process (verifier, env hub)."""

    def __init__(self, limits: SandboxLimits | None = None) -> None:
        self.limits = limits or SandboxLimits()
        self._launch: _Launch | None = None
        self._probe_lock = asyncio.Lock()
        self._slots = asyncio.Semaphore(self.limits.max_parallel)

    async def barriers(self) -> tuple[str, ...]:
        """The barriers every run has on this host (probes the launchers on first use)."""
        return (await self._launcher()).all_barriers()

    async def _launcher(self) -> _Launch:
        async with self._probe_lock:
            if self._launch is None:
                for candidate in _candidates(self.limits):
                    if await self._probe(candidate):
                        self._launch = candidate
                        break
                else:
                    raise RuntimeError(f"sandbox cannot start {self.limits.python}")
            return self._launch

    async def _probe(self, launch: _Launch) -> bool:
        with tempfile.TemporaryDirectory(prefix="primerl-probe-") as tmp:
            if launch.owner:
                os.chown(tmp, *launch.owner)
            try:
                proc = await asyncio.create_subprocess_exec(
                    *launch.prefix,
                    self.limits.python,
                    "-I",
                    "-S",
                    "-c",
                    "pass",
                    stdin=asyncio.subprocess.DEVNULL,
                    stdout=asyncio.subprocess.DEVNULL,
                    stderr=asyncio.subprocess.DEVNULL,
                    cwd=tmp,
                    env={},
                    preexec_fn=_rlimits(self.limits),
                    start_new_session=True,
                )
            except OSError:
                return False
            try:
                return await asyncio.wait_for(proc.wait(), _PROBE_TIMEOUT_S) == 0
            except TimeoutError:
                _kill_group(proc)
                await proc.wait()
                return False

    async def run(self, code: str, tests: str) -> SandboxResult:
        """Run `code` then `tests` (plain asserts) in a fresh interpreter; never hangs past the wall limit.

        Raises OSError or RuntimeError when the sandbox itself cannot start (an
        infrastructure failure, not the candidate's).
        """
        launch = await self._launcher()
        async with self._slots:
            tmp = tempfile.mkdtemp(prefix="primerl-sandbox-")
            try:
                return await self._run_in(Path(tmp), launch, code, tests)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)

    async def _run_in(self, tmp: Path, launch: _Launch, code: str, tests: str) -> SandboxResult:
        limits = self.limits
        # errors="replace": a lone surrogate in model output is the candidate's problem, not a crash here.
        (tmp / "solution.py").write_text(code, encoding="utf-8", errors="replace")
        (tmp / "tests.py").write_text(tests, encoding="utf-8", errors="replace")
        shutil.copyfile(_RUNNER, tmp / "runner.py")
        if launch.owner:
            os.chown(tmp, *launch.owner)
        nonce = secrets.token_hex(16)
        started = time.monotonic()
        proc = await asyncio.create_subprocess_exec(
            *launch.prefix,
            limits.python,
            "-I",
            "-S",
            "runner.py",
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            cwd=str(tmp),
            env={"TMPDIR": str(tmp), "HOME": str(tmp), "LANG": "C.UTF-8"},
            preexec_fn=_rlimits(limits),
            start_new_session=True,
        )
        assert proc.stdin and proc.stdout and proc.stderr  # all three are pipes
        readers = asyncio.gather(
            _read_capped(proc.stdout, limits.output_bytes), _read_capped(proc.stderr, limits.output_bytes)
        )
        timed_out = False
        try:
            try:
                proc.stdin.write(nonce.encode() + b"\n")
                await proc.stdin.drain()
                proc.stdin.close()
            except (BrokenPipeError, ConnectionResetError):
                pass  # the child died before reading; its exit status tells why
            try:
                await asyncio.wait_for(proc.wait(), limits.wall_s)
            except TimeoutError:
                timed_out = True
        except BaseException:
            readers.cancel()
            raise
        finally:
            # Always, also on cancellation: nothing of the candidate outlives the run.
            _kill_group(proc)
            if proc.returncode is None:
                await proc.wait()
        try:
            (out, out_tail), (_, err_tail) = await asyncio.wait_for(readers, _DRAIN_TIMEOUT_S)
        except TimeoutError:  # a descendant outside the group holds a pipe: give up on output
            readers.cancel()
            out, out_tail, err_tail = b"", b"", b""
        stderr_tail = err_tail.decode("utf-8", "replace")
        passed = out_tail.rstrip().endswith(nonce.encode())
        outcome, reason, kill = _classify(proc.returncode, timed_out, passed, stderr_tail, limits)
        return SandboxResult(
            outcome=outcome,
            reason=reason,
            kill=kill,
            returncode=proc.returncode,
            duration_s=time.monotonic() - started,
            stdout=out.decode("utf-8", "replace").replace(nonce, ""),
            stderr_tail=stderr_tail,
            barriers=launch.all_barriers(),
        )


def _classify(
    rc: int | None, timed_out: bool, nonce_seen: bool, stderr_tail: str, limits: SandboxLimits
) -> tuple[Outcome, str, str]:
    """(outcome, reason, kill) from how the child ended; `nonce_seen`: stdout ended with the nonce."""
    if timed_out:
        return Outcome.TIMEOUT, f"wall-clock limit of {limits.wall_s:g} s", "wall_timeout"
    if rc == 0:
        if nonce_seen:
            return Outcome.PASSED, "tests passed", ""
        return Outcome.FAILED, "exited before the tests finished", ""
    if rc == BLOCKED_EXIT and (blocked := _last_line(stderr_tail, BLOCKED_MARK)):
        return Outcome.BLOCKED, f"blocked: {blocked}", "blocked"
    if rc in (-signal.SIGXCPU, -signal.SIGKILL):
        return Outcome.TIMEOUT, f"cpu limit of {limits.cpu_s} s", "cpu_limit"
    error = _last_line(stderr_tail, ERROR_MARK)
    if error == "MemoryError":
        return Outcome.MEMORY, "memory limit", "memory_limit"
    if rc == -signal.SIGXFSZ:
        return Outcome.FAILED, "file size limit", "file_size_limit"
    if rc is not None and rc < 0:
        return Outcome.CRASHED, f"killed by signal {-rc}", "signal"
    if error:
        return Outcome.FAILED, error, ""
    return Outcome.FAILED, f"exit code {rc}", ""
