"""The progress callback the library reports through, and the plain-line log a command writes off a terminal.

The CLI renders the callbacks as rich progress bars on a terminal; when its output is a file or a CI log it
writes the lines of a `ProgressLog` instead: one when a task finishes, and at least one every
`LINE_INTERVAL_S` seconds while anything runs, with an estimate of the time the current task still needs.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

LINE_INTERVAL_S = 30.0  # the longest a plain progress log stays silent while a command runs


class Progress(Protocol):
    def __call__(self, task: str, completed: int, total: int) -> None:  # pragma: no cover - protocol
        ...


def no_progress(task: str, completed: int, total: int) -> None:
    """The default: report nothing."""


def format_duration(seconds: float) -> str:
    """'45 s', '2 min 50 s', '1 h 05 min' (rounded to the second)."""
    s = max(0, round(seconds))
    if s < 60:
        return f"{s} s"
    if s < 3600:
        return f"{s // 60} min {s % 60:02d} s"
    return f"{s // 3600} h {s % 3600 // 60:02d} min"


@dataclass
class _Task:
    started: float  # when its count was `start_count` (see ProgressLog.update)
    start_count: int
    completed: int
    total: int
    updated: float  # the time of its last callback


class ProgressLog:
    """Plain progress lines from the library's (task, completed, total) callbacks; the caller prints them.

    - A task that finishes (completed >= total) gives its line at once: `[  12.3 s] task: 40/40` (a one-shot
      task, total 1, just its name).
    - A callback of an unfinished task gives a line when `interval_s` has passed since the last line:
      `[  30.0 s] task: 6/40, about 2 min 50 s left`.
    - `heartbeat()`, called by a timer when `next_due()` says so, gives a line when no callback did for
      `interval_s` (a step longer than that: one scoring batch, TensorRT's tactic search).

    The remaining time of a task is (total - completed) x its mean time per step, less the time since its last
    step. Its steps are timed from its first callback when that one reports 0 done; otherwise (the library
    reports a step after doing it) from the callback before it, of any task, or the log's start.
    """

    def __init__(self, clock: Callable[[], float] = time.monotonic, interval_s: float = LINE_INTERVAL_S) -> None:
        self._clock = clock
        self.interval_s = interval_s
        self._start = clock()
        self._last_line = self._start
        self._last_event = self._start
        self._tasks: dict[str, _Task] = {}
        self._current: str | None = None  # the unfinished task reported last
        self._last_task: str | None = None
        self._done: set[str] = set()

    def _line(self, now: float, text: str) -> str:
        self._last_line = now
        return f"[{now - self._start:7.1f} s] {text}"

    def remaining_s(self, task: str, now: float | None = None) -> float | None:
        """The estimated seconds `task` still needs (None before a step of it was timed)."""
        t = self._tasks.get(task)
        if t is None:
            return None
        steps, elapsed = t.completed - t.start_count, t.updated - t.started
        if steps <= 0 or elapsed <= 0:
            return None
        now = self._clock() if now is None else now
        return elapsed / steps * max(t.total - t.completed, 0) - (now - t.updated)

    def _left(self, task: str, now: float) -> str:
        left = self.remaining_s(task, now)
        if left is None:
            return ""
        return f", about {format_duration(left)} left" if left > 0 else ", past its estimate"

    def update(self, task: str, completed: int, total: int) -> str | None:
        now = self._clock()
        t = self._tasks.get(task)
        if t is None:
            t = self._tasks[task] = _Task(now if completed <= 0 else self._last_event, 0, completed, total, now)
        t.completed, t.total, t.updated = completed, total, now
        self._last_event, self._last_task = now, task
        if completed >= total:
            if self._current == task:
                self._current = None
            if task in self._done:
                return None
            self._done.add(task)
            return self._line(now, task + (f": {completed}/{total}" if total > 1 else ""))  # one-shot: its name
        self._current = task
        if now - self._last_line >= self.interval_s:
            return self._line(now, f"{task}: {completed}/{total}{self._left(task, now)}")
        return None

    def next_due(self) -> float:
        """Seconds until `heartbeat()` has a line to give (0: now)."""
        return max(0.0, self._last_line + self.interval_s - self._clock())

    def heartbeat(self) -> str | None:
        """A line when none was given for `interval_s`: the task in progress, or the time since the last step."""
        now = self._clock()
        if now - self._last_line < self.interval_s:
            return None
        quiet = format_duration(now - self._last_event)
        task = self._current
        if task is not None:
            t = self._tasks[task]
            return self._line(now, f"{task}: {t.completed}/{t.total}, working on the next step for "
                                   f"{quiet}{self._left(task, now)}")
        if self._last_task is None:
            return self._line(now, f"working: {quiet} since the start")
        return self._line(now, f"working: {quiet} since the last step (after {self._last_task})")
