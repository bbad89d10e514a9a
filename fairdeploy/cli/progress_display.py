"""The progress display of a command: rich bars on a terminal, plain timed lines in a log; silence on the
torchrun processes that do not report."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from typing import Any

from fairdeploy.cli.console import console, err_console


def progress_on_main() -> contextlib.AbstractContextManager[Any]:
    """The progress display on the process that reports (rank 0 under torchrun); silence on the others."""
    from fairdeploy.distributed import world
    from fairdeploy.progress import no_progress

    return RichProgress() if world().is_main else contextlib.nullcontext(no_progress)


class RichProgress:
    """Render the library's progress callbacks: rich progress bars on a terminal (one bar per task name, with
    the time elapsed and left), else the plain lines of fairdeploy.progress.ProgressLog on stdout (a line per
    finished task and at least one every `interval_s` seconds while the command runs, a timer thread giving it
    when no callback does)."""

    def __init__(self, clock: Callable[[], float] = time.monotonic, interval_s: float | None = None) -> None:
        import threading

        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        from fairdeploy.progress import LINE_INTERVAL_S, ProgressLog

        self._progress = Progress(
            TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
            TimeRemainingColumn(), console=err_console, transient=True,
        )
        self._tasks: dict[str, int] = {}
        # `cmd > log`: plain lines on stdout (the log), none on stderr (kept for errors)
        self._plain = not console.is_terminal
        self._log = ProgressLog(clock, LINE_INTERVAL_S if interval_s is None else interval_s)
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._timer: threading.Thread | None = None

    def __enter__(self) -> RichProgress:
        if self._plain:
            import threading

            self._timer = threading.Thread(target=self._heartbeats, name="fairdeploy-progress", daemon=True)
            self._timer.start()
            return self
        self._progress.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._timer is not None:
            self._stop.set()
            self._timer.join()
            self._timer = None
        if not self._plain:
            self._progress.__exit__(*exc)  # type: ignore[arg-type]

    def _print(self, line: str | None) -> None:
        if line is not None:
            console.print(line, highlight=False, soft_wrap=True, markup=False)

    def _heartbeats(self) -> None:
        while True:
            with self._lock:
                wait = self._log.next_due()
            if self._stop.wait(wait):
                return
            with self._lock:
                self._print(self._log.heartbeat())

    def __call__(self, task: str, completed: int, total: int) -> None:
        if self._plain:
            with self._lock:
                self._print(self._log.update(task, completed, total))
            return
        if task not in self._tasks:
            self._tasks[task] = self._progress.add_task(task, total=total)
        self._progress.update(self._tasks[task], completed=completed, total=total)
