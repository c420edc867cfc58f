"""The first code the sandboxed interpreter runs: guard, then candidate, then tests.

Copied into the sandbox's temp dir and run as `python -I -S runner.py`; it imports
nothing from the project and only the standard library. Protocol with the parent
(verifier_workers.sandbox):

- stdin carries one line, a nonce, read before any candidate code runs;
- `solution.py` and `tests.py` in the working directory are run in that order, the
  tests in a copy of the solution's namespace;
- when the tests finish, the nonce is written as the last line of stdout and the
  process exits 0. An exit 0 without it (the candidate called `os._exit(0)` before the
  tests ran) is not a pass;
- an exception ends the run with exit 1 and a last stderr line `sandbox-error: ...`;
- a blocked operation ends it at once with exit 86 and `sandbox-blocked: ...`, so the
  candidate cannot catch it and carry on.

The audit hook (PEP 578) is one barrier among several (rlimits, a network namespace,
an unprivileged uid where available). It stops what the stdlib can do: processes,
sockets, ctypes, raising rlimits, signals to other processes, and file access
outside the temp dir (reads are also allowed under the interpreter's own stdlib).
It cannot stop a candidate that walks interpreter frames to find the nonce: it
contains damage, it does not prove the tests ran.
"""

from __future__ import annotations

import os
import pathlib
import sys
import traceback

BLOCKED_EXIT = 86
_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
# Events refused outright (prefix match): new processes, signals to other
# processes, network, foreign code, raised limits, heap walks that reach the runner.
_BLOCKED_EVENTS = (
    "os.fork",
    "os.forkpty",
    "os.system",
    "os.exec",
    "os.posix_spawn",
    "os.spawn",
    "os.kill",
    "os.killpg",
    "os.startfile",
    "subprocess.Popen",
    "pty.spawn",
    "socket.",
    "ctypes.",
    "resource.setrlimit",
    "resource.prlimit",
    "signal.pthread_kill",
    "gc.get_objects",
    "gc.get_referrers",
    "gc.get_referents",
)
_BLOCKED_MODULES = frozenset({"ctypes", "_ctypes", "_posixsubprocess", "_xxsubinterpreters", "_testcapi", "_testinternalcapi", "_multiprocessing"})
# event -> positions of its path arguments; dir_fd is refused because the hook
# resolves relative paths against the working directory, not against a descriptor.
_READ_EVENTS = {"os.listdir": (0,), "os.scandir": (0,), "os.chdir": (0,), "os.getxattr": (0,), "os.listxattr": (0,)}
_WRITE_EVENTS = {
    "os.remove": ((0,), 1),
    "os.rmdir": ((0,), 1),
    "os.mkdir": ((0,), 2),
    "os.rename": ((0, 1), 2),
    "os.link": ((0, 1), 2),
    "os.symlink": ((1,), 2),
    "os.chmod": ((0,), 2),
    "os.chown": ((0,), 3),
    "os.utime": ((0,), 3),
    "os.truncate": ((0,), None),
    "os.setxattr": ((0,), None),
    "os.removexattr": ((0,), None),
}
_DEVICES = ("/dev/null", "/dev/urandom", "/dev/random")


def _block(what: str) -> None:
    os.write(2, b"\nsandbox-blocked: " + what.encode("utf-8", "replace")[:300] + b"\n")
    os._exit(BLOCKED_EXIT)


def make_hook(root: str, read_roots: tuple[str, ...]):
    """The audit hook: `root` is the only writable tree, `read_roots` the readable ones."""

    def inside(path: str, roots: tuple[str, ...]) -> bool:
        return any(path == r or path.startswith(r.rstrip("/") + "/") for r in roots)

    def resolve(event: str, path: object) -> str | None:
        # Only exact built-in types: a candidate's str subclass or __fspath__ would run
        # candidate code inside the hook, and could answer differently each time.
        if path is None:
            path = "."
        if type(path) is int:
            return None  # an already open descriptor, obtained through a checked open
        if type(path) in (pathlib.PosixPath, pathlib.PurePosixPath):
            path = str(path)
        if type(path) is bytes:
            path = os.fsdecode(path)
        if type(path) is not str:
            _block(f"{event} with a path of type {type(path).__name__}")
        return os.path.realpath(os.path.join(os.getcwd(), path))

    def check(event: str, path: object, writing: bool) -> None:
        real = resolve(event, path)
        if real is None:
            return
        allowed = inside(real, (root,)) if writing else inside(real, read_roots) or real in _DEVICES
        if not allowed:
            _block(f"{event} {'write' if writing else 'read'} {real}")

    def hook(event: str, args: tuple) -> None:
        if event == "open":
            path, mode, flags = args
            writing = bool(flags & _WRITE_FLAGS) or (type(mode) is str and any(c in mode for c in "wax+"))
            check(event, path, writing)
        elif event in _READ_EVENTS:
            for i in _READ_EVENTS[event]:
                check(event, args[i], False)
        elif event in _WRITE_EVENTS:
            positions, dir_fd_at = _WRITE_EVENTS[event]
            if dir_fd_at is not None and any(a is not None for a in args[dir_fd_at:]):
                _block(f"{event} with dir_fd")
            for i in positions:
                check(event, args[i], True)
        elif event == "import":
            if args[0] in _BLOCKED_MODULES:
                _block(f"import {args[0]}")
        elif event.startswith(_BLOCKED_EVENTS):
            _block(event)

    return hook


def _report(err: BaseException) -> None:
    if isinstance(err, MemoryError):
        os.write(2, b"\nsandbox-error: MemoryError\n")  # no allocation: memory is what ran out
        return
    try:
        traceback.print_exception(err)
        sys.stderr.flush()
        line = f"{type(err).__name__}: {err}"
    except BaseException:  # noqa: BLE001 - a candidate's exception may break even str()
        line = type(err).__name__
    os.write(2, b"\nsandbox-error: " + line.replace("\n", " ").encode("utf-8", "replace")[:500] + b"\n")


def main() -> None:
    """Read the nonce, install the hook, run solution then tests, report."""
    nonce = sys.stdin.readline().strip()
    sys.stdin.close()
    root = os.path.realpath(os.getcwd())
    read_roots = tuple({os.path.realpath(p) for p in sys.path if p} | {root})
    with open("solution.py", encoding="utf-8") as f:
        solution = f.read()
    with open("tests.py", encoding="utf-8") as f:
        tests = f.read()
    sys.addaudithook(make_hook(root, read_roots))
    namespace = {"__name__": "solution", "__builtins__": __builtins__}
    try:
        exec(compile(solution, "solution.py", "exec"), namespace)
        exec(compile(tests, "tests.py", "exec"), {**namespace, "__name__": "__main__"})
        sys.stdout.flush()
    except BaseException as err:  # noqa: BLE001 - SystemExit too: exiting early is not passing
        _report(err)
        os._exit(1)
    os.write(1, b"\n" + nonce.encode() + b"\n")
    os._exit(0)


if __name__ == "__main__":
    main()
