"""The chaos suite of issue 17, short: a training run through every stage (each its own
process) with one fault of each kind: SIGKILL of the router, engine, verifier, learner
and archiver, Redis restarted without its data, the broker paused past the session
timeout. Nothing may be lost and nothing may take effect twice (perf/chaos.py).

The long run (1,000 samples, 12 faults) is `make chaos`, or `pytest -m chaos`.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from learners.outcome_log import OutcomeLog, committed_steps, read_outcomes
from perf.chaos import FAULT_KINDS, _dups, schedule

ROOT = Path(__file__).resolve().parents[1]


def test_outcome_log_last_line_of_a_step_wins_and_uncommitted_steps_are_ignored(tmp_path: Path) -> None:
    log = OutcomeLog(tmp_path / "outcomes.jsonl")
    log.trained(0, 1, ["a/0", "a/1"], True)
    log.dropped("stale", 1, ["b/0"])
    log.trained(1, 2, ["c/0"], True)  # killed before its checkpoint: redone below
    log.trained(1, 2, ["d/0", "d/1"], True)
    log.trained(2, 3, ["e/0"], True)  # never checkpointed
    log.dropped("stale", 1, [])  # nothing to write
    log.close()
    with open(tmp_path / "outcomes.jsonl", "a") as f:
        f.write('{"kind": "step", "st')  # torn by a kill mid-write
    lines = read_outcomes(tmp_path / "outcomes.jsonl")
    assert [x["kind"] for x in lines] == ["step", "drop", "step", "step", "step"]
    steps = committed_steps(lines, checkpoint_step=2)
    assert sorted(steps) == [0, 1] and steps[1]["ids"] == ["d/0", "d/1"]
    assert sorted(committed_steps(lines)) == [0, 1, 2]


def test_schedule_has_every_fault_kind_and_is_seeded() -> None:
    for n in (1, 7, 12):
        plan = schedule(3, n)
        assert set(plan) == set(FAULT_KINDS) and len(plan) == max(n, len(FAULT_KINDS))
    assert schedule(5, 12) == schedule(5, 12) != schedule(6, 12)


def test_duplicate_records_tell_redeliveries_from_changed_content() -> None:
    msgs = [("x", 1), ("x", 1), ("x", 2), ("y", 1)]
    assert _dups(msgs, lambda m: m[0], lambda m: m[1]) == {
        "records": 4,
        "distinct": 2,
        "identical_redeliveries": 1,
        "differing_content": 1,
    }


def _run_chaos(tmp_path: Path, *args: str, timeout_s: float) -> dict:
    out = tmp_path / "chaos_report.json"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    with open(tmp_path / "chaos.log", "wb") as log:
        proc = subprocess.run(
            [sys.executable, "-m", "perf.chaos", *args, "--work-dir", str(tmp_path / "work"), "--out", str(out)],
            cwd=ROOT,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            timeout=timeout_s,
        )
    text = (tmp_path / "chaos.log").read_text(errors="replace")
    assert out.exists(), f"no report (exit {proc.returncode}):\n{text[-6000:]}"
    report = json.loads(out.read_text())
    print(text[-3000:])
    return report


def _check(report: dict) -> None:
    assert report["targets"]["every_kind_faulted"], report["faults"]
    assert report["samples"]["lost"] == 0, report["samples"]
    assert report["duplicate_effects"]["total"] == 0, report["duplicate_effects"]
    assert report["samples"]["trained"] > 0


@pytest.mark.engine
@pytest.mark.timeout(1500)
def test_chaos_short_loses_nothing_and_doubles_nothing(tmp_path: Path) -> None:
    report = _run_chaos(
        tmp_path, "--samples", "160", "--faults", "7", "--min-gap-s", "8", "--drain-idle-s", "60", timeout_s=1400
    )
    _check(report)


@pytest.mark.chaos
@pytest.mark.timeout(4000)
def test_chaos_long(tmp_path: Path) -> None:
    report = _run_chaos(tmp_path, "--samples", "1000", "--faults", "12", timeout_s=3900)
    _check(report)


def test_soak_judges_stages_on_drift_after_the_warm_up_and_not_the_servers() -> None:
    from perf.soak import judge

    rows = []
    for i in range(20):
        t = i * 5.0
        rows.append(
            {"t_s": t, "process": "engine", "rss_mb": 1000.0 + (500 if i < 4 else i), "fds": 40}
        )  # warm-up spike
        rows.append({"t_s": t, "process": "learner", "rss_mb": 800.0 + 10 * i, "fds": 30})  # grows 15 % after warm-up
        rows.append({"t_s": t, "process": "broker", "rss_mb": 50.0 * (i + 1), "fds": 20})
    v = judge(rows, warmup_s=20.0, tolerance=0.10)
    assert v["engine"]["pass"] and v["engine"]["judged"]
    assert not v["learner"]["pass"] and v["learner"]["rss_mb"]["max_drift"] > 0.10
    assert not v["broker"]["judged"]


def test_soak_tells_a_per_step_swing_from_a_leak() -> None:
    from perf.soak import judge

    swing = [
        {"t_s": i * 5.0, "process": "learner", "rss_mb": 4100.0 if i % 3 == 0 else 2500.0, "fds": 19} for i in range(60)
    ]
    leak = [
        {"t_s": i * 5.0, "process": "learner", "rss_mb": (4100.0 if i % 3 == 0 else 2500.0) + 12 * i, "fds": 19}
        for i in range(60)
    ]
    ok, bad = judge(swing, 60.0, 0.10)["learner"], judge(leak, 60.0, 0.10)["learner"]
    assert ok["pass"] and ok["rss_mb"]["max_sample_drift"] > 0.10  # a swing of 39 % per step, no growth
    assert not bad["pass"]  # the same swing, growing 12 MB a sample
