"""Issue 20 §4: progress a person can plan with. Off a terminal a command writes a line at least every 30 s
while anything runs, with the time the current task still needs; a fake clock drives it (no sleeping)."""

from __future__ import annotations

import itertools
import re
import time

import pytest

from fairdeploy.progress import LINE_INTERVAL_S, ProgressLog, format_duration


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0  # any origin: lines show the time since the log started

    def __call__(self) -> float:
        return self.now


def _stamp(line: str) -> float:
    m = re.match(r"^\[\s*([0-9.]+) s\] ", line)
    assert m, line
    return float(m.group(1))


def test_format_duration() -> None:
    assert [format_duration(s) for s in (0, 44.6, 59.4, 60, 170, 3599, 3600, 3725)] == [
        "0 s", "45 s", "59 s", "1 min 00 s", "2 min 50 s", "59 min 59 s", "1 h 00 min", "1 h 02 min"]


def test_a_long_task_gives_a_line_every_30_s_with_the_time_left_by_hand() -> None:
    """A 40-step task, 5 s a step, then one step of 100 s (no callback: a heartbeat names it), then 5 s steps
    again. Every estimate below is (steps left) x (seconds per step so far) - (seconds since the last step)."""
    assert LINE_INTERVAL_S == 30.0
    clock = FakeClock()
    log = ProgressLog(clock)
    lines: list[str] = []

    def advance_to(t: float) -> None:
        """Fake time passes second by second up to `t`; at each second before it the timer asks for a
        heartbeat when one is due (a callback at `t` comes before the timer's check at `t`)."""
        while clock.now - 1000.0 < t:
            if log.next_due() == 0:
                line = log.heartbeat()
                assert line is not None
                lines.append(line)
            clock.now += 1.0

    for k in range(1, 13):  # steps 1..12 at t = 5, 10, ..., 60
        advance_to(5 * k)
        if (line := log.update("curvature (step 1)", k, 40)) is not None:
            lines.append(line)
    # the first step was reported done at t=5: timed from the log's start, 5 s a step
    assert lines == ["[   30.0 s] curvature (step 1): 6/40, about 2 min 50 s left",  # 34 x 5 s
                     "[   60.0 s] curvature (step 1): 12/40, about 2 min 20 s left"]  # 28 x 5 s
    advance_to(160)  # step 13 takes 100 s: heartbeats at 90, 120, 150
    assert lines[2:] == [
        "[   90.0 s] curvature (step 1): 12/40, working on the next step for 30 s, about 1 min 50 s left",  # 140-30
        "[  120.0 s] curvature (step 1): 12/40, working on the next step for 1 min 00 s, about 1 min 20 s left",
        "[  150.0 s] curvature (step 1): 12/40, working on the next step for 1 min 30 s, about 50 s left"]
    assert log.update("curvature (step 1)", 13, 40) is None  # t=160: 10 s after the last line
    advance_to(181)
    # 13 steps in 160 s; 27 left: 27 x 160 / 13 = 332.3 s, less the 20 s since step 13 = 312 s
    assert lines[5] == ("[  180.0 s] curvature (step 1): 13/40, working on the next step for 20 s, "
                        "about 5 min 12 s left")
    assert log.remaining_s("curvature (step 1)", 1180.0) == pytest.approx(27 * 160 / 13 - 20)
    for k in range(14, 41):  # the rest at 5 s a step: t = 185 .. 315
        advance_to(180 + 5 * (k - 13))
        if (line := log.update("curvature (step 1)", k, 40)) is not None:
            lines.append(line)
    assert lines[-1] == "[  315.0 s] curvature (step 1): 40/40"  # finished: a line at once
    advance_to(406)  # nothing runs a task now; still a line every 30 s: at 345, 375, 405
    assert lines[-1] == "[  405.0 s] working: 1 min 30 s since the last step (after curvature (step 1))"
    stamps = [0.0, *(_stamp(ln) for ln in lines)]
    gaps = [b - a for a, b in itertools.pairwise(stamps)]
    assert max(gaps) <= 30.0 and len(lines) == 14, lines


def test_a_line_before_any_callback() -> None:
    clock = FakeClock()
    log = ProgressLog(clock)
    clock.now += 29.9
    assert log.heartbeat() is None and log.next_due() == pytest.approx(0.1)
    clock.now += 0.1
    assert log.heartbeat() == "[   30.0 s] working: 30 s since the start"


def test_a_task_first_reported_at_zero_is_timed_from_then() -> None:
    clock = FakeClock()
    log = ProgressLog(clock)
    clock.now += 100  # something before it took 100 s
    assert log.update("validate: inference", 0, 10) == "[  100.0 s] validate: inference: 0/10"  # no estimate yet
    clock.now += 30
    line = log.update("validate: inference", 6, 10)  # 6 steps in 30 s: 4 x 5 s left
    assert line == "[  130.0 s] validate: inference: 6/10, about 20 s left"


def test_finished_and_one_shot_tasks_give_their_line_once() -> None:
    clock = FakeClock()
    log = ProgressLog(clock)
    clock.now += 2.5
    assert log.update("train epoch 1/2", 3, 3) == "[    2.5 s] train epoch 1/2: 3/3"
    assert log.update("train epoch 1/2", 3, 3) is None
    one_shot = "train epoch 1/2 done: val f1_macro 0.5"
    assert log.update(one_shot, 1, 1) == f"[    2.5 s] {one_shot}"


def test_rich_progress_off_a_terminal_uses_the_log_and_its_timer(capsys: pytest.CaptureFixture[str]) -> None:
    """The CLI's renderer: stdout lines only; its timer thread gives a heartbeat during a silent step (a real
    thread, a short interval: it waits for the line, at most 20 s)."""
    from fairdeploy.cli.progress_display import RichProgress

    clock = FakeClock()
    with RichProgress(clock=clock) as progress:
        clock.now += 31
        progress("prune scores", 1, 4)
        clock.now += 1
        progress("prune scores", 2, 4)
    cap = capsys.readouterr()
    assert cap.err == ""
    assert cap.out.splitlines() == ["[   31.0 s] prune scores: 1/4, about 1 min 33 s left"]  # 3 x 31 s

    seen = ""
    with RichProgress(interval_s=0.05) as progress:
        progress("slow step", 1, 3)
        deadline = time.monotonic() + 20
        while "working on the next step" not in seen and time.monotonic() < deadline:
            time.sleep(0.01)
            seen += capsys.readouterr().out
    assert "slow step: 1/3, working on the next step for" in seen
