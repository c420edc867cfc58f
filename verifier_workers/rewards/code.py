"""The code reward: run the completion's Python against the reference tests in the sandbox.

The reference is test code (plain asserts) run after the candidate in a copy of its
namespace. A SystemExit anywhere counts as a failure, so tests must not call
`sys.exit`/`unittest.main()`: a candidate that exits 0 early must not pass.
"""

from __future__ import annotations

import re

from plumbing.sandbox import Outcome, Sandbox
from schemas import Completion, RewardStatus
from verifier_workers.rewards.base import Score, clip, infra_fail, policy_fail, timed_out

_PYTHON_FENCE = re.compile(r"```(?:python3?|py)[ \t]*\n(.*?)(?:```|\Z)", re.DOTALL | re.IGNORECASE)
_ANY_FENCE = re.compile(r"```[ \t]*\n(.*?)(?:```|\Z)", re.DOTALL)


def extract_code(text: str) -> str:
    """The last ```python block (a truncated last block counts), else the last bare ``` block, else the whole text."""
    for fence in (_PYTHON_FENCE, _ANY_FENCE):
        blocks = fence.findall(text)
        if blocks:
            return blocks[-1]
    return text


class CodeReward:
    """1.0 (OK) when the tests pass; POLICY_FAIL when they fail or a barrier stops the code; TIMEOUT at a time limit."""

    name = "code"
    version = "1"

    def __init__(self, sandbox: Sandbox) -> None:
        self.sandbox = sandbox

    async def score(self, completion: Completion) -> Score:
        """Run the candidate and the tests; `sandbox_kill` in the trace names what stopped it, if anything."""
        if not (completion.reference or "").strip():
            return infra_fail("request carries no tests")
        code = extract_code(completion.text)
        if not code.strip():
            return policy_fail("no code found", {"passed": 0.0})
        try:
            result = await self.sandbox.run(code, completion.reference or "")
        except (OSError, RuntimeError) as err:
            return infra_fail(f"sandbox failed to start: {err}")
        trace = {
            "duration_ms": f"{result.duration_s * 1000:.0f}",
            "returncode": str(result.returncode),
            "barriers": ",".join(result.barriers),
        }
        if result.kill:
            trace["sandbox_kill"] = result.kill
        if result.outcome is Outcome.PASSED:
            return Score({"passed": 1.0}, 1.0, RewardStatus.OK, {**trace, "reason": "tests passed"})
        if result.outcome is Outcome.TIMEOUT:
            return timed_out(result.reason, {"passed": 0.0}, trace)
        return policy_fail(clip(result.reason), {"passed": 0.0}, trace)
