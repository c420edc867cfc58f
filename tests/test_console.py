"""The calm console of `primerl up`: plain lines off a terminal, and every other output in the log file."""

from __future__ import annotations

import io
import math
import subprocess
import sys
from pathlib import Path

from primerl.console import RunConsole, log_file, quiet_output


def test_plain_console_prints_one_line_per_wait_and_step() -> None:
    out = io.StringIO()
    console = RunConsole(out, live=False, width=200)
    with console.wait("starting the engine"):
        pass
    console.table([("step", "d"), ("reward", ".3f"), ("kl", ".4f")])
    with console.wait("training", total=2) as progress:
        console.row([1, 0.5, math.nan])
        progress(1)
        console.row([2, 0.75, 0.0012])
        progress(2)
    console.close()
    lines = out.getvalue().splitlines()
    assert lines[0].startswith("starting the engine: done in ")
    assert lines[1].split() == ["step", "reward", "kl"]
    assert lines[2].split() == ["1", "0.500", "-"]
    assert lines[3].split() == ["2", "0.750", "0.0012"]
    assert lines[4].startswith("training: done in ")
    assert len(lines) == 5


def test_a_failed_wait_prints_no_done_line() -> None:
    out = io.StringIO()
    console = RunConsole(out, live=False)
    try:
        with console.wait("evaluation"):
            raise RuntimeError("boom")
    except RuntimeError:
        pass
    assert "done" not in out.getvalue()


def test_live_console_renders_table_and_progress() -> None:
    out = io.StringIO()
    console = RunConsole(out, live=True, width=120)
    console.table([("step", "d"), ("reward", ".3f")])
    with console.wait("training", total=3) as progress:
        console.row([1, 0.25])
        progress(1)
    console.close()
    text = out.getvalue()
    assert "0.250" in text and "step" in text


def test_quiet_output_sends_children_and_logging_to_the_file(tmp_path: Path) -> None:
    """What vLLM's engine-core subprocess does (write to the inherited fds) lands in the log."""
    path = log_file(tmp_path)
    assert path.parent == tmp_path / "logs"
    with quiet_output(path) as console_stream:
        subprocess.run([sys.executable, "-c", "import sys; print('child out'); print('child err', file=sys.stderr)"])
        console_stream.write("for the person\n")
    log = path.read_text()
    assert "child out" in log and "child err" in log
    assert "for the person" not in log


def test_plain_lines_never_wrap_at_the_pipe_width() -> None:
    """Off a terminal rich assumes 80 columns: a long note or a wide step row stays one line."""
    out = io.StringIO()
    console = RunConsole(out, live=False)
    console.note("learning curve: " + "/very/long/path" * 12 + " (from the TensorBoard log)")
    console.table([(f"col{i}", ".3f") for i in range(12)])
    console.row([0.5] * 12)
    assert len(out.getvalue().splitlines()) == 3
