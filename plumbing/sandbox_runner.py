"""The first code the sandboxed interpreter runs: guard, then candidate, then tests.

Copied into the sandbox's temp dir and run as `python -I -S runner.py`; it imports
nothing from the project and only the standard library. Protocol with the parent
(plumbing.sandbox):

- stdin carries one line, a nonce, read before any candidate code runs;
- `solution.py` then `tests.py` (from the working directory) run in one namespace
  each, the tests with a copy of the solution's names and a copy of the builtins
  taken before the candidate ran (so `builtins.len = ...` does not reach the tests);
- when the tests return, the nonce is written as the last line of stdout and the
  process exits 0. An exit 0 without it (`os._exit(0)` before the tests) is no pass;
- an exception ends the run with exit 1 and a last stderr line `sandbox-error: ...`;
- a blocked operation ends it at once with exit 86 and `sandbox-blocked: ...`, so the
  candidate cannot catch it and carry on.

Why the candidate cannot forge the pass: the nonce lives only in the audit hook's
closure (no frame holds it), and the hook writes it only for the `DONE` event raised
from the runner's own `main` frame, after the tests returned. The hook and `main`
use functions bound before the candidate runs (the candidate may patch `os`,
`builtins`, `sys`), tracing is blocked (it could jump over asserts), and paths are
resolved by the hook itself from system calls, not by patchable library code.

The audit hook (PEP 578) is one barrier among several (rlimits, a network namespace,
an unprivileged uid where available). It stops what the standard library can do:
processes, sockets, ctypes, raising rlimits, signals, tracing, heap walks, symlinks
(a thread could swap one between the check and the open), and file access outside
the temp dir (reads are also allowed under the interpreter's own stdlib). It does
not stop semantic cheating, e.g. returning an object whose `__eq__` is always true.
"""

from __future__ import annotations

import builtins
import os
import sys
import traceback
from collections.abc import Callable

BLOCKED_EXIT = 86
BLOCKED_MARK = "sandbox-blocked: "
ERROR_MARK = "sandbox-error: "
DONE = "primerl.sandbox.done"
_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
# Events refused outright (prefix match): new processes, signals, network, foreign
# code, raised limits, tracing, heap walks, symlinks.
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
    "os.symlink",
    "subprocess.Popen",
    "pty.spawn",
    "socket.",
    "ctypes.",
    "resource.setrlimit",
    "resource.prlimit",
    "signal.pthread_kill",
    "sys.settrace",
    "sys.setprofile",
    "gc.get_objects",
    "gc.get_referrers",
    "gc.get_referents",
)
_BLOCKED_MODULES = frozenset(
    {
        "ctypes",
        "_ctypes",
        "_posixsubprocess",
        "_xxsubinterpreters",
        "_testcapi",
        "_testinternalcapi",
        "_multiprocessing",
    }
)
# event -> positions of its path arguments; read events take no dir_fd.
_READ_EVENTS = {"os.listdir": (0,), "os.scandir": (0,), "os.chdir": (0,), "os.getxattr": (0,), "os.listxattr": (0,)}
# event -> (positions of its path arguments, position of its first dir_fd argument,
# -1 when not given). dir_fd is refused: the hook resolves relative paths against
# the working directory, not against a descriptor.
_WRITE_EVENTS = {
    "os.remove": ((0,), 1),
    "os.rmdir": ((0,), 1),
    "os.mkdir": ((0,), 2),
    "os.rename": ((0, 1), 2),
    "os.link": ((0, 1), 2),
    "os.chmod": ((0,), 2),
    "os.chown": ((0,), 3),
    "os.utime": ((0,), 3),
    "os.truncate": ((0,), None),
    "os.setxattr": ((0,), None),
    "os.removexattr": ((0,), None),
}
_DEVICES = ("/dev/null", "/dev/urandom", "/dev/random")
_S_IFMT, _S_IFLNK = 0o170000, 0o120000
_MEMORY_ERROR_LINE = f"\n{ERROR_MARK}MemoryError\n".encode()
_MAX_LINKS = 40


def make_hook(root: str, read_roots: tuple[str, ...], nonce: bytes, main_frame: object) -> Callable[[str, tuple], None]:
    """The audit hook: `root` is the only writable tree, `read_roots` the readable ones.

    The hook must not depend on anything the candidate can change, and must never run
    candidate code (its frames would reach `nonce`). So every name it uses is bound
    here, before the candidate exists: functions of `posix` and `sys`, builtins
    (`builtins.type` can be replaced, the local `type_` cannot), private copies of
    the tables, and the type of every argument is checked before it is touched
    (`sys.audit` lets the candidate pass any object as an argument).
    """
    write, exit_, lstat, readlink, getcwd, getframe = (
        os.write,
        os._exit,
        os.lstat,
        os.readlink,
        os.getcwd,
        sys._getframe,
    )
    type_, int_, str_, bytes_, len_ = type, int, str, bytes, len
    encoding = sys.getfilesystemencoding()
    blocked_exit, blocked_prefix, done = BLOCKED_EXIT, ("\n" + BLOCKED_MARK).encode(), DONE
    blocked_events, blocked_modules, devices = _BLOCKED_EVENTS, _BLOCKED_MODULES, _DEVICES
    read_events, write_events = dict(_READ_EVENTS), dict(_WRITE_EVENTS)
    write_flags, s_ifmt, s_iflnk, max_links = _WRITE_FLAGS, _S_IFMT, _S_IFLNK, _MAX_LINKS
    write_roots = (root,)

    def block(what: str) -> None:
        write(2, blocked_prefix + what.encode("utf-8", "replace")[:300] + b"\n")
        exit_(blocked_exit)

    def resolve(path: str) -> str:
        """Absolute path with every symlink resolved, like os.path.realpath (non-strict)."""
        if not path.startswith("/"):
            path = getcwd() + "/" + path
        pending = path.split("/")[::-1]
        resolved, links = "", 0
        while pending:
            part = pending.pop()
            if part in ("", "."):
                continue
            if part == "..":
                resolved = resolved.rpartition("/")[0]
                continue
            candidate = resolved + "/" + part
            try:
                mode = lstat(candidate).st_mode
            except OSError:
                resolved = candidate  # does not exist (yet): nothing to follow
                continue
            if mode & s_ifmt != s_iflnk:
                resolved = candidate
                continue
            links += 1
            if links > max_links:
                block(f"symlink loop at {candidate}")
            target = readlink(candidate)
            if target.startswith("/"):
                resolved = ""
            pending.extend(target.split("/")[::-1])
        return resolved or "/"

    def inside(path: str, roots: tuple[str, ...]) -> bool:
        for r in roots:
            if path == r or path.startswith(r.rstrip("/") + "/"):
                return True
        return False

    def check(event: str, path: object, writing: bool) -> None:
        if path is None:
            path = "."
        if type_(path) is int_:
            return  # an already open descriptor, obtained through a checked open
        if type_(path) is bytes_:
            # `path: object` is narrowed by the local `type_ is bytes_` check above, which mypy cannot follow
            # (it calls only names bound before the candidate exists, so no `typing.cast` here).
            path = path.decode(encoding, "surrogateescape")  # type: ignore[attr-defined]
        if type_(path) is not str_:
            block(f"{event} with a path of an unsupported type")
        real = resolve(path)  # type: ignore[arg-type]
        allowed = inside(real, write_roots) if writing else inside(real, read_roots) or real in devices
        if not allowed:
            block(f"{event} {'write' if writing else 'read'} {real}")

    def hook(event: str, args: tuple) -> None:
        if event == "open":
            if len_(args) != 3:
                block("malformed open event")
            path, mode, flags = args
            if type_(flags) is not int_ or (mode is not None and type_(mode) is not str_):
                block("malformed open event")
            writing = (flags & write_flags) != 0
            if mode is not None:
                for c in "wax+":
                    writing = writing or c in mode
            check(event, path, writing)
        elif event in read_events:
            for i in read_events[event]:
                check(event, args[i], False)
        elif event in write_events:
            positions, dir_fd_at = write_events[event]
            if dir_fd_at is not None:
                for a in args[dir_fd_at:]:
                    if a is not None and (type_(a) is not int_ or a != -1):
                        block(f"{event} with dir_fd")
            for i in positions:
                check(event, args[i], True)
        elif event == "import":
            if type_(args[0]) is not str_ or args[0] in blocked_modules:
                block(f"import {args[0] if type_(args[0]) is str_ else '?'}")
        elif event == done:
            if getframe(1) is not main_frame:
                block(f"{done} raised outside the runner")
            write(1, b"\n" + nonce + b"\n")
            exit_(0)
        elif event.startswith(blocked_events):
            block(event)

    return hook


def _report(err: BaseException, write: Callable[[int, bytes], int]) -> None:
    if isinstance(err, MemoryError):
        write(2, _MEMORY_ERROR_LINE)  # built in advance: memory is what ran out
        return
    try:
        traceback.print_exception(err)
        sys.stderr.flush()
        line = f"{type(err).__name__}: {err}"
    except BaseException:  # noqa: BLE001 - a candidate's exception may break even str()
        line = type(err).__name__
    write(2, ("\n" + ERROR_MARK).encode() + line.replace("\n", " ").encode("utf-8", "replace")[:500] + b"\n")


def main() -> None:
    """Read the nonce, install the hook, run solution then tests, report."""
    # Bound before the candidate runs: it may replace os._exit, builtins.exec, sys.audit.
    exit_, write, audit, exec_, compile_ = os._exit, os.write, sys.audit, exec, compile
    root = os.path.realpath(os.getcwd())
    read_roots = tuple({os.path.realpath(p) for p in sys.path if p} | {root})
    with open("solution.py", encoding="utf-8") as f:
        solution = f.read()
    with open("tests.py", encoding="utf-8") as f:
        tests = f.read()
    builtins_copy = dict(builtins.__dict__)
    sys.addaudithook(make_hook(root, read_roots, sys.stdin.readline().strip().encode(), sys._getframe()))
    sys.stdin.close()
    namespace = {"__name__": "solution", "__builtins__": builtins}
    try:
        exec_(compile_(solution, "solution.py", "exec"), namespace)
        exec_(compile_(tests, "tests.py", "exec"), {**namespace, "__name__": "__main__", "__builtins__": builtins_copy})
    except BaseException as err:  # noqa: BLE001 - SystemExit too: exiting early is not passing
        _report(err, write)
        exit_(1)
    try:
        sys.stdout.flush()
    except BaseException:  # noqa: BLE001 - the candidate's stdout; the verdict goes to fd 1 anyway
        pass
    audit(DONE)  # the hook writes the nonce and exits 0; returning means it refused
    exit_(1)


if __name__ == "__main__":
    main()
