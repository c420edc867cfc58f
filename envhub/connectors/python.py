"""The `python` tool: run the model's code in the verifier's sandbox (plumbing.sandbox), return its stdout.

The code runs with no tests: a run that ends normally is a success and its stdout is
the answer; an exception, a limit or a blocked operation is an error the model reads.
"""

from __future__ import annotations

import re
import time

from envhub.connectors import ToolOutput
from plumbing.sandbox import Outcome, Sandbox
from schemas.sessions import ToolTrace

MAX_OUTPUT_CHARS = 4000
# The sandbox ends a failed run with os._exit, which drops buffered stdout: line buffering keeps
# what the program printed before the error (the model needs it to see how far it got). The
# prefix is one line, so line numbers in errors are shifted back by one.
_PREFIX = "import sys; sys.stdout.reconfigure(line_buffering=True); del sys\n"
_LINE = re.compile(r"(solution\.py\W+line )(\d+)")


def _unshift(reason: str) -> str:
    return _LINE.sub(lambda m: f"{m.group(1)}{max(1, int(m.group(2)) - 1)}", reason)


class PythonTool:
    """The `python` tool over one Sandbox (its parallelism limit is per process)."""

    name = "python"

    def __init__(self, sandbox: Sandbox) -> None:
        self.sandbox = sandbox

    async def call(self, args: str, turn_index: int) -> ToolOutput:
        """Run `args` as a program. Raises only when the sandbox itself cannot start (infrastructure)."""
        started = time.monotonic()
        result = await self.sandbox.run(_PREFIX + args, "")
        stdout = result.stdout.rstrip("\n")
        if len(stdout) > MAX_OUTPUT_CHARS:
            stdout = stdout[:MAX_OUTPUT_CHARS] + f"\n[output cut at {MAX_OUTPUT_CHARS} characters]"
        ok = result.outcome is Outcome.PASSED
        error = "" if ok else f"{result.outcome.value}: {_unshift(result.reason)}"
        if ok:
            text = stdout or "(no output: print what you want to see)"
        else:
            text = f"{stdout}\nerror: {error}" if stdout else f"error: {error}"
        trace = ToolTrace(
            turn_index=turn_index,
            tool=self.name,
            ok=ok,
            error=error,
            latency_ms=(time.monotonic() - started) * 1000,
            bytes=len(result.stdout.encode()),
        )
        return ToolOutput(text, trace)

    async def aclose(self) -> None:
        pass
