"""The code sandbox against hostile candidates, and the code reward on top of it.

Every hostile case runs twice: with the strongest barriers this host offers, and with
the audit hook as the only barrier besides rlimits (so a host without namespaces is
still covered).
"""

from __future__ import annotations

import asyncio
import os
import shutil
import time
from collections.abc import AsyncIterator
from pathlib import Path

import msgspec
import pytest

from plumbing.sandbox import Outcome, Sandbox
from schemas import RewardStatus
from tests.reward_helpers import make_completion
from verifier_workers.rewards import SandboxLimits
from verifier_workers.rewards.code import CodeReward, extract_code

# Small limits keep the timeouts fast; 2 s of CPU and 4 s of wall clock are far more
# than any honest candidate below needs.
FAST = SandboxLimits(cpu_s=2, wall_s=4.0, memory_bytes=256 * 1024 * 1024)
SYSTEM_PYTHON = "/usr/bin/python3.11"


@pytest.fixture(params=["strongest", "hook_only"])
async def sandbox(request: pytest.FixtureRequest) -> AsyncIterator[Sandbox]:
    limits = FAST if request.param == "strongest" else msgspec.structs.replace(FAST, use_netns=False, uid=None)
    box = Sandbox(limits)
    barriers = await box.barriers()
    if request.param == "hook_only":
        assert "netns" not in barriers and not any(b.startswith("uid:") for b in barriers)
    yield box


def _leftover_runners() -> list[int]:
    """Pids of this test process's sandboxed interpreters still alive (working dir in a sandbox temp dir)."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cwd = os.readlink(f"/proc/{pid}/cwd")
            parent = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        if "primerl-sandbox-" in cwd and parent == os.getpid():
            found.append(int(pid))
    return found


# ---------------------------------------------------------------- honest candidates


async def test_passing_candidate(sandbox: Sandbox) -> None:
    code = "import collections, json, re, fractions, typing\n\ndef add(a, b):\n    return a + b\n"
    result = await sandbox.run(code, "assert add(2, 3) == 5\nassert add('a', 'b') == 'ab'\n")
    assert result.outcome is Outcome.PASSED, result
    assert result.returncode == 0 and result.kill == ""


async def test_failing_candidate(sandbox: Sandbox) -> None:
    result = await sandbox.run("def add(a, b):\n    return a - b\n", "assert add(2, 3) == 5, 'add is wrong'\n")
    assert result.outcome is Outcome.FAILED
    assert result.reason == "AssertionError: add is wrong"


async def test_candidate_may_use_its_temp_dir(sandbox: Sandbox) -> None:
    code = (
        "import os, pathlib, tempfile\n"
        "pathlib.Path('notes.txt').write_text('hi')\n"
        "with tempfile.NamedTemporaryFile('w') as f:\n    f.write('x')\n"
        "os.mkdir('d'); os.rename('d', 'e'); os.rmdir('e')\n"
    )
    result = await sandbox.run(code, "assert open('notes.txt').read() == 'hi'\n")
    assert result.outcome is Outcome.PASSED, result


@pytest.mark.parametrize("exit_call", ["import os\nos._exit(0)", "import sys\nsys.exit(0)", "raise SystemExit"])
async def test_exiting_early_is_not_a_pass(sandbox: Sandbox, exit_call: str) -> None:
    result = await sandbox.run(exit_call, "assert False\n")
    assert result.outcome is Outcome.FAILED, result


@pytest.mark.parametrize(
    "code",
    [
        # Patch what the runner calls after a failure, so that it falls through to "passed".
        "import os, sys, builtins\nos._exit = lambda code: None\nsys.exit = lambda code=0: None\n"
        "builtins.exec = lambda *a, **k: None\n",
        # Raise the runner's completion event itself.
        "import sys\nsys.audit('primerl.sandbox.done')\n",
        # Find the runner's frame and use its bound functions.
        "import sys\nf = sys._getframe(1)\nf.f_locals['audit']('primerl.sandbox.done')\n",
        # Empty the tests, then run the runner again.
        "open('tests.py', 'w').close()\nimport __main__\n__main__.main()\n",
        # Jump over the asserts with a trace function.
        "import sys\nsys.settrace(lambda *a: None)\n",
        # Run code inside the hook through an argument of a forged event, to read the nonce from its frame.
        (
            "import os, sys\n"
            "class Evil:\n"
            "    def __rand__(self, other):\n"
            "        f = sys._getframe(1)\n"
            "        while f is not None:\n"
            "            if 'nonce' in f.f_locals:\n"
            "                os.write(1, b'\\n' + f.f_locals['nonce'] + b'\\n')\n"
            "                os._exit(0)\n"
            "            f = f.f_back\n"
            "        return 0\n"
            "sys.audit('open', 'x', None, Evil())\n"
        ),
        # Exit 0 from the runner's own final flush.
        "import os, sys\nclass Out:\n    def write(self, s): return len(s)\n"
        "    def flush(self): os._exit(0)\nsys.stdout = Out()\n",
    ],
)
async def test_a_pass_cannot_be_forged(sandbox: Sandbox, code: str) -> None:
    result = await sandbox.run(code, "assert False, 'the tests must fail'\n")
    assert result.outcome is not Outcome.PASSED, result


async def test_patched_builtins_do_not_reach_the_tests(sandbox: Sandbox) -> None:
    result = await sandbox.run("import builtins\nbuiltins.len = lambda x: 42\n", "assert len([1, 2]) == 2\n")
    assert result.outcome is Outcome.PASSED, result


# ---------------------------------------------------------------- time, processes, memory


async def test_infinite_loop_is_stopped_by_the_cpu_limit(sandbox: Sandbox) -> None:
    started = time.monotonic()
    result = await sandbox.run("while True:\n    pass\n", "")
    assert time.monotonic() - started < FAST.wall_s + 2
    assert result.outcome is Outcome.TIMEOUT and result.kill == "cpu_limit"


async def test_sleeping_forever_is_stopped_by_the_wall_clock(sandbox: Sandbox) -> None:
    started = time.monotonic()
    result = await sandbox.run("import time\nwhile True:\n    time.sleep(1)\n", "")
    assert time.monotonic() - started < FAST.wall_s + 2
    assert result.outcome is Outcome.TIMEOUT and result.kill == "wall_timeout"
    assert _leftover_runners() == []


@pytest.mark.parametrize(
    "code",
    [
        "import os\nwhile True:\n    os.fork()\n",
        "import subprocess\nwhile True:\n    subprocess.Popen(['sleep', '100'])\n",
        "import os\nos.system('sleep 100 &')\n",
        "import multiprocessing\nmultiprocessing.Process(target=print).start()\n",
        "import os\nos.execv('/bin/sh', ['sh', '-c', 'sleep 100'])\n",
        # Empty the runner's tables first: the hook keeps private copies.
        "import __main__, os\n__main__._BLOCKED_EVENTS = ()\n__main__._BLOCKED_MODULES = frozenset()\nos.fork()\n",
    ],
)
async def test_fork_bomb_is_stopped(sandbox: Sandbox, code: str) -> None:
    result = await sandbox.run(code, "")
    assert result.outcome in (Outcome.BLOCKED, Outcome.TIMEOUT), result
    assert result.kill in ("blocked", "wall_timeout", "cpu_limit")
    assert _leftover_runners() == []


async def test_a_caught_block_still_ends_the_run(sandbox: Sandbox) -> None:
    code = "import os\ntry:\n    os.fork()\nexcept BaseException:\n    pass\nprint('carried on')\n"
    result = await sandbox.run(code, "")
    assert result.outcome is Outcome.BLOCKED
    assert "carried on" not in result.stdout


@pytest.mark.parametrize(
    "code",
    [
        "chunks = []\nwhile True:\n    chunks.append(bytearray(10 ** 7))\n",
        "x = 'a' * (10 ** 10)\n",
    ],
)
async def test_memory_bomb_is_stopped(sandbox: Sandbox, code: str) -> None:
    result = await sandbox.run(code, "")
    assert result.outcome is Outcome.MEMORY, result
    assert result.reason == "memory limit" and result.kill == "memory_limit"


async def test_raising_the_limits_is_blocked(sandbox: Sandbox) -> None:
    code = "import resource\nresource.setrlimit(resource.RLIMIT_AS, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))\n"
    result = await sandbox.run(code, "")
    assert result.outcome is Outcome.BLOCKED and "resource.setrlimit" in result.reason


async def test_ctypes_and_signals_are_blocked(sandbox: Sandbox) -> None:
    assert (await sandbox.run("import ctypes\n", "")).outcome is Outcome.BLOCKED
    killed = await sandbox.run(f"import os\nos.kill({os.getpid()}, 9)\n", "")
    assert killed.outcome is Outcome.BLOCKED and "os.kill" in killed.reason


async def test_big_output_is_capped(sandbox: Sandbox) -> None:
    result = await sandbox.run("import sys\nfor _ in range(200):\n    sys.stdout.write('x' * 10000)\n", "assert True\n")
    assert result.outcome is Outcome.PASSED  # the pass marker is found after the overflow
    assert len(result.stdout) <= FAST.output_bytes


# ---------------------------------------------------------------- files and network


async def test_writing_outside_the_temp_dir_is_blocked(sandbox: Sandbox, tmp_path: Path) -> None:
    target = tmp_path / "escaped.txt"
    for code in (
        f"open({str(target)!r}, 'w').write('x')\n",
        f"import os\nos.close(os.open({str(target)!r}, os.O_WRONLY | os.O_CREAT))\n",
        f"import os\nos.symlink('/', 'up')\nopen('up/{target.relative_to('/')}', 'w')\n",
        f"import os\nos.chdir({str(tmp_path)!r})\nopen('escaped.txt', 'w')\n",
    ):
        result = await sandbox.run(code, "")
        assert result.outcome is Outcome.BLOCKED, (code, result)
        assert not target.exists()


async def test_reading_the_signing_key_is_blocked(sandbox: Sandbox, tmp_path: Path) -> None:
    secret = "ed25519-private-key-0123456789abcdef"
    key = tmp_path / "keys" / "verifier.key"
    key.parent.mkdir()
    key.write_text(secret)
    key.chmod(0o600)
    for code in (
        f"print(open({str(key)!r}).read())\n",
        f"import os\nfd = os.open({str(key)!r}, os.O_RDONLY)\nprint(os.read(fd, 100))\n",
        f"import os\nos.symlink({str(key)!r}, 'k')\nprint(open('k').read())\n",
        f"import os\nos.link({str(key)!r}, 'k')\nprint(open('k').read())\n",
        f"import pathlib\nprint(pathlib.Path({str(key)!r}).read_text())\n",
        f"print(open('/proc/self/root{key}').read())\n",
        f"import builtins\nbuiltins.type = lambda x: int\nprint(open({str(key)!r}).read())\n",
        f"print(open('../../../../../../..{key}').read())\n",
        f"import os\nprint(os.listdir({str(key.parent)!r}))\n",
    ):
        result = await sandbox.run(code, "")
        assert result.outcome is Outcome.BLOCKED, (code, result)
        everything = result.stdout + result.stderr_tail + result.reason
        assert secret not in everything
        assert "verifier.key" not in result.stdout


async def test_opening_a_socket_is_blocked(sandbox: Sandbox) -> None:
    connections = 0

    async def on_connect(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal connections
        connections += 1
        writer.close()

    server = await asyncio.start_server(on_connect, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        for code in (
            f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=1)\n",
            f"import urllib.request\nurllib.request.urlopen('http://127.0.0.1:{port}/', timeout=1)\n",
            "import socket\nsocket.socket().bind(('0.0.0.0', 0))\n",
        ):
            result = await sandbox.run(code, "")
            assert result.outcome is Outcome.BLOCKED, (code, result)
            assert "socket" in result.reason
        await asyncio.sleep(0.1)
    finally:
        server.close()
        await server.wait_closed()
    assert connections == 0


# ---------------------------------------------------------------- barriers and the parent


async def test_barriers_on_this_host() -> None:
    barriers = await Sandbox(FAST).barriers()
    assert {"rlimits", "audit_hook"} <= set(barriers)
    if shutil.which("unshare") and os.geteuid() == 0:
        assert "netns" in barriers  # the root path needs no user namespace


@pytest.mark.skipif(os.geteuid() != 0 or not os.access(SYSTEM_PYTHON, os.X_OK), reason="needs root and a system Python")
async def test_unprivileged_uid_with_a_world_executable_python(tmp_path: Path) -> None:
    # The venv's interpreter may live where an unprivileged uid cannot execute it; the
    # system one can, so this checks the uid barrier wherever it can work.
    box = Sandbox(msgspec.structs.replace(FAST, python=SYSTEM_PYTHON))
    barriers = await box.barriers()
    if "uid:65534" not in barriers:
        pytest.skip(f"uid barrier unavailable here: {barriers}")
    assert "nproc" in barriers
    assert (await box.run("import os\nuid = os.getuid()\n", "assert uid == 65534\n")).outcome is Outcome.PASSED
    key = tmp_path / "k.key"
    key.write_text("top secret")
    key.chmod(0o600)
    result = await box.run(f"print(open({str(key)!r}).read())\n", "")
    assert result.outcome is Outcome.BLOCKED and "top secret" not in result.stdout


async def test_the_event_loop_keeps_serving_while_code_runs() -> None:
    box = Sandbox(FAST)
    ticks = 0

    async def ticker() -> None:
        nonlocal ticks
        while True:
            await asyncio.sleep(0.05)
            ticks += 1

    tick_task = asyncio.create_task(ticker())
    results = await asyncio.gather(box.run("while True:\n    pass\n", ""), box.run("x = 1\n", "assert x == 1\n"))
    tick_task.cancel()
    assert [r.outcome for r in results] == [Outcome.TIMEOUT, Outcome.PASSED]
    assert ticks >= 10  # ~2 s of CPU-bound candidate did not block the loop


async def test_cancelling_a_run_kills_the_candidate() -> None:
    box = Sandbox(FAST)
    task = asyncio.create_task(box.run("import time\ntime.sleep(60)\n", ""))
    # Wait for the runner to exist (1 s was not always enough on 2 loaded cores).
    for _ in range(300):
        if _leftover_runners():
            break
        await asyncio.sleep(0.1)
    assert _leftover_runners() != [], "the candidate's runner never started"
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert _leftover_runners() == []


# ---------------------------------------------------------------- the code reward


def test_extract_code() -> None:
    text = "Here:\n```python\nx = 1\n```\nbetter:\n```python\ndef f():\n    return 2\n```\nDone."
    assert extract_code(text) == "def f():\n    return 2\n"
    assert extract_code("```\ny = 3\n```") == "y = 3\n"
    assert extract_code("```py\nz = 4\n") == "z = 4\n"  # truncated last block
    assert extract_code("def g(): pass") == "def g(): pass"


async def test_code_reward_statuses() -> None:
    fn = CodeReward(Sandbox(FAST))
    tests = "assert square(3) == 9\nassert square(-2) == 4\n"

    def completion(code: str) -> object:
        return make_completion(f"Sure.\n```python\n{code}\n```\n", task="code", reference=tests)

    right = await fn.score(completion("def square(x):\n    return x * x"))
    assert (right.status, right.scalar, right.components) == (RewardStatus.OK, 1.0, {"passed": 1.0})
    assert "audit_hook" in right.trace["barriers"] and "sandbox_kill" not in right.trace

    wrong = await fn.score(completion("def square(x):\n    return x + x"))
    assert (wrong.status, wrong.scalar) == (RewardStatus.POLICY_FAIL, 0.0)
    assert wrong.trace["reason"].startswith("AssertionError")

    crash = await fn.score(completion("def square(x):\n    return 1 / 0"))
    assert crash.status is RewardStatus.POLICY_FAIL and "ZeroDivisionError" in crash.trace["reason"]

    bomb = await fn.score(completion("import os\nwhile True:\n    os.fork()"))
    assert bomb.status is RewardStatus.POLICY_FAIL and bomb.trace["sandbox_kill"] == "blocked"

    memory = await fn.score(completion("x = bytearray(10 ** 10)"))
    assert memory.status is RewardStatus.POLICY_FAIL and memory.trace["reason"] == "memory limit"
    assert memory.trace["sandbox_kill"] == "memory_limit"

    loop = await fn.score(completion("while True:\n    pass"))
    assert (loop.status, loop.scalar) == (RewardStatus.TIMEOUT, 0.0)
    assert loop.trace["sandbox_kill"] == "cpu_limit"


async def test_code_reward_malformed_requests() -> None:
    fn = CodeReward(Sandbox(FAST))
    no_tests = await fn.score(make_completion("def f(): pass", task="code", reference=None))
    assert no_tests.status is RewardStatus.INFRA_FAIL and no_tests.trace["reason"] == "request carries no tests"
    no_code = await fn.score(make_completion("```python\n\n```", task="code", reference="assert True"))
    assert no_code.status is RewardStatus.POLICY_FAIL and no_code.trace["reason"] == "no code found"


async def test_code_reward_when_the_sandbox_cannot_start() -> None:
    fn = CodeReward(Sandbox(SandboxLimits(python="/nonexistent/python")))
    score = await fn.score(make_completion("x = 1", task="code", reference="assert x == 1"))
    assert score.status is RewardStatus.INFRA_FAIL and "sandbox failed to start" in score.trace["reason"]
