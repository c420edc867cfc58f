"""`primerl up` as the console sees it: logs to a file, the run on a RunConsole, a summary."""

from __future__ import annotations

import contextlib
import logging
import math
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from plumbing.config import Config
from plumbing.infra import infra_for_run
from plumbing.runtime import run
from primerl.console import RunConsole, log_file, quiet_output
from primerl.curve import write_curve
from primerl.settings import RunSettings

if TYPE_CHECKING:
    from primerl.rl_loop import RunResult

log = logging.getLogger(__name__)


@contextlib.contextmanager
def up_console(cfg: Config, verbose: bool) -> Iterator[RunConsole]:
    """A console on the real stdout; without `verbose`, every other output goes to a log file
    under <state_dir>/logs (named on the console first and again on a failure)."""
    if verbose:
        console = RunConsole(sys.stdout)
        try:
            yield console
        finally:
            console.close()
        return
    path = log_file(cfg.state_dir)
    with quiet_output(path) as stream, _root_logging_to(path):
        console = RunConsole(stream)
        console.log_path = path
        console.note(f"logs: {path} (-v shows them here)")
        try:
            yield console
        finally:
            console.close()


@contextlib.contextmanager
def _root_logging_to(path: Path) -> Iterator[None]:
    """The root logger's records to `path` (not through whatever sys.stderr was when logging was set up)."""
    root = logging.getLogger()
    saved = root.handlers[:]
    handler = logging.FileHandler(path, encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root.handlers = [handler]
    try:
        yield
    finally:
        root.handlers = saved
        handler.close()


def run_up(cfg: Config, rs: RunSettings, *, keep: bool, verbose: bool, out_dir: Path, title: str, suffix: str) -> int:
    """The whole main job; returns the exit status."""
    with up_console(cfg, verbose) as console:
        try:
            return _run(cfg, rs, console, keep=keep, out_dir=out_dir, title=title, suffix=suffix)
        except Exception as err:
            if verbose:
                raise
            # The traceback goes to the log; the console gets one line and the exit status.
            log.exception("primerl up failed")
            console.close()
            console.note(f"primerl up failed: {err!r}; the whole story is in {console.log_path}")
            return 1


def _run(
    cfg: Config, rs: RunSettings, console: RunConsole, *, keep: bool, out_dir: Path, title: str, suffix: str
) -> int:
    # Imported only now: torch and vLLM print on import, and that belongs in the log.
    from primerl.main_job import engine_demo
    from primerl.rl_loop import rl_loop

    if rs.steps == 0:
        return run(engine_demo(cfg, rs.prompts_per_step, rs.group_size, rs.max_tokens, keep, console))
    t0 = time.monotonic()

    async def main() -> RunResult:
        async with contextlib.AsyncExitStack() as stack:
            with console.wait("starting the local broker and Redis"):
                served = await stack.enter_async_context(infra_for_run(cfg, keep))
            return await rl_loop(served, rs, console)

    result = run(main())
    csv_path, png_path = write_curve(result.events_dir, out_dir, title, suffix)
    console.note(summary(result, time.monotonic() - t0))
    console.note(f"learning curve: {csv_path} and {png_path} (from the TensorBoard log {result.events_dir})")
    return 0


def summary(result: RunResult, wall_s: float) -> str:
    """One line: steps, reward and held-out accuracy first to last, wall time."""
    rows = result.rows
    evals = [r.heldout_accuracy for r in rows if not math.isnan(r.heldout_accuracy)]
    rewards = [r.reward_mean for r in rows if not math.isnan(r.reward_mean)]
    parts = [f"run {result.run_id}: {len(rows) - 1} learner steps in {wall_s:.0f}s"]
    if rewards:
        parts.append(f"train reward {rewards[0]:.3f} -> {rewards[-1]:.3f}")
    if evals:
        parts.append(f"held-out accuracy {evals[0]:.3f} -> {evals[-1]:.3f}")
    return "; ".join(parts)
