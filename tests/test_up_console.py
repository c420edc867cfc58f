"""`primerl up`'s wiring without servers: the console gets the waits, table and summary, the log the rest."""

from __future__ import annotations

import contextlib
import logging
import math
import os
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

import primerl.rl_loop
import primerl.up
from plumbing.config import Config, load_config
from plumbing.tracking import StepLog
from primerl.console import RunConsole
from primerl.curve import CurveRow, log_row
from primerl.rl_loop import RunResult
from primerl.settings import RunSettings


@pytest.fixture
def no_servers(monkeypatch: pytest.MonkeyPatch) -> None:
    @contextlib.asynccontextmanager
    async def infra(cfg: Config, keep: bool = False) -> AsyncIterator[Config]:
        yield cfg

    monkeypatch.setattr(primerl.up, "infra_for_run", infra)


def _run_up(tmp_path: Path) -> int:
    cfg = load_config(None, state_dir=tmp_path / "state")
    out = tmp_path / "curve"
    return primerl.up.run_up(cfg, RunSettings(steps=1), keep=False, verbose=False, out_dir=out, title="t", suffix="")


def test_a_run_prints_waits_table_and_summary_and_logs_the_rest(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str], no_servers: None
) -> None:
    async def fake_loop(cfg: Config, rs: RunSettings, console: RunConsole) -> RunResult:
        # What vLLM's engine-core subprocess and C code do: write to the inherited fds.
        os.write(1, b"INFO vllm: hundreds of lines like this\n")
        os.write(2, b"WARNING engine core\n")
        logging.getLogger("aiokafka.fake").warning("a library's logging record")
        events = cfg.state_dir / "tensorboard" / "r1"
        rows = [CurveRow(0, 1.0, math.nan, 0.1, 0.0, math.nan, math.nan), CurveRow(1, 2.0, 0.5, 0.3, 0.0, 9.0, 0.5)]
        console.table([("step", "d"), ("reward", ".3f")])
        with StepLog(events) as log:
            for r in rows:
                log_row(log, r)
                console.row([r.step, r.reward_mean])
        return RunResult(rows, "r1", events)

    monkeypatch.setattr(primerl.rl_loop, "rl_loop", fake_loop)
    assert _run_up(tmp_path) == 0
    out, err = capfd.readouterr()
    lines = out.splitlines()
    assert lines[0].startswith("logs: ") and lines[1].startswith("starting the local broker and Redis: done")
    assert lines[-2].startswith("run r1: 1 learner steps") and "held-out accuracy 0.100 -> 0.300" in lines[-2]
    assert lines[-1].startswith("learning curve: ")
    assert len(lines) == 7 and err == ""
    log = next((tmp_path / "state" / "logs").glob("up-*.log")).read_text()
    assert "hundreds of lines" in log and "WARNING engine core" in log and "a library's logging record" in log
    assert (tmp_path / "curve" / "learning_curve.csv").read_text().splitlines()[2].startswith("1,2.0,0.5")


def test_a_failure_is_one_line_and_the_traceback_goes_to_the_log(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str], no_servers: None
) -> None:
    async def broken(cfg: Config, rs: RunSettings, console: RunConsole) -> RunResult:
        raise RuntimeError("engine died")

    monkeypatch.setattr(primerl.rl_loop, "rl_loop", broken)
    assert _run_up(tmp_path) == 1
    out, err = capfd.readouterr()
    assert "primerl up failed: RuntimeError('engine died')" in out.splitlines()[-1] and err == ""
    log = next((tmp_path / "state" / "logs").glob("up-*.log")).read_text()
    assert "Traceback" in log and "engine died" in log
