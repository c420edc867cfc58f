"""What `primerl up` shows: a step table, one progress line for the current wait, a summary.

Everything else (our logging, vLLM's, transformers', aiokafka's, tqdm bars, and what
vLLM's engine-core subprocess writes to the stdout/stderr it inherits) goes to a log
file: `quiet_output` points file descriptors 1 and 2 at it, which reaches child
processes and C code too, where redirecting Python logging alone does not. The console
writes to a duplicate of the original stdout.

On a terminal the table and the progress line are live (rich); elsewhere (a pipe, CI)
each finished wait and each step is one plain line.
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TextIO

from rich.console import Console, Group
from rich.live import Live
from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TaskID, TextColumn, TimeElapsedColumn
from rich.table import Table


def log_file(state_dir: Path, name: str = "up") -> Path:
    """A new `<state_dir>/logs/<name>-<time>.log`."""
    folder = state_dir / "logs"
    folder.mkdir(parents=True, exist_ok=True)
    return folder / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}.log"


@contextlib.contextmanager
def quiet_output(path: Path) -> Iterator[TextIO]:
    """Send fds 1 and 2 (and so every child process's output) to `path`; yields a stream
    on the original stdout for the console. Both are restored on exit."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved_out, saved_err = os.dup(1), os.dup(2)
    with open(path, "ab", buffering=0) as log:
        os.dup2(log.fileno(), 1)
        os.dup2(log.fileno(), 2)
        console_stream = os.fdopen(os.dup(saved_out), "w", buffering=1, encoding="utf-8")
        try:
            yield console_stream
        finally:
            console_stream.flush()
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(saved_out, 1)
            os.dup2(saved_err, 2)
            os.close(saved_out)
            os.close(saved_err)
            console_stream.close()


Progress_ = Callable[[float], None]  # set the current wait's completed count


class RunConsole:
    """The step table, the progress line and notes, live on a terminal, plain lines elsewhere."""

    def __init__(self, stream: TextIO | None = None, *, live: bool | None = None, width: int | None = None) -> None:
        self.console = Console(file=stream or sys.stdout, width=width, highlight=False)
        self.live = self.console.is_terminal if live is None else live
        self.columns: list[tuple[str, str]] = []  # (header, format spec)
        self.rows: list[list[str]] = []
        self._progress = Progress(
            SpinnerColumn(),
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            console=self.console,
        )
        self._live: Live | None = None
        self.log_path: Path | None = None  # where everything else goes, when it goes to a file
        if self.live:
            # No stdout/stderr redirection: library handlers bound to sys.stdout must not reach the screen.
            self._live = Live(
                self._render(), console=self.console, refresh_per_second=4, redirect_stdout=False, redirect_stderr=False
            )
            self._live.start()

    def _render(self) -> Group:
        table = Table(*(h for h, _ in self.columns), box=None, pad_edge=False, show_header=bool(self.columns))
        for row in self.rows:
            table.add_row(*row)
        return Group(table, self._progress) if self.columns else Group(self._progress)

    def _refresh(self) -> None:
        if self._live is not None:
            self._live.update(self._render(), refresh=True)

    def note(self, text: str) -> None:
        """One line above the live area (or a plain line)."""
        self.console.print(text, markup=False, soft_wrap=True)

    def table(self, columns: Sequence[tuple[str, str]]) -> None:
        """Start the step table: (header, format spec of the values) per column."""
        self.columns = list(columns)
        if not self.live:
            self.console.print(" ".join(f"{h:>8}" for h, _ in self.columns), markup=False, soft_wrap=True)
        self._refresh()

    def row(self, values: Sequence[object]) -> None:
        """One step's row (NaN and None print as `-`)."""
        cells = [_cell(v, spec) for v, (_, spec) in zip(values, self.columns, strict=True)]
        self.rows.append(cells)
        if not self.live:
            self.console.print(" ".join(f"{c:>8}" for c in cells), markup=False, soft_wrap=True)
        self._refresh()

    @contextlib.contextmanager
    def wait(self, label: str, total: float | None = None) -> Iterator[Progress_]:
        """A progress line for a long wait: a bar when `total` is known, else a spinner with the time.

        Yields a function to set how much is done. Plain output: one line when the wait ends.
        """
        t0 = time.monotonic()
        task: TaskID = self._progress.add_task(label, total=total)
        self._refresh()
        ok = False
        try:
            yield lambda done: self._progress.update(task, completed=done)
            ok = True
        finally:
            self._progress.remove_task(task)
            if ok:
                done_text = f"{label}: done in {time.monotonic() - t0:.0f}s"
                if self.live:
                    self._refresh()
                self.note(done_text)

    def close(self) -> None:
        """Stop the live display (its last frame stays on screen)."""
        if self._live is not None:
            self._live.stop()
            self._live = None


def _cell(value: object, spec: str) -> str:
    if value is None or (isinstance(value, float) and value != value):
        return "-"
    return format(value, spec)
