"""What an interrupt leaves: the running command's note of what it kept, SIGTERM handled as Ctrl-C, and the lines
printed at the end (what was kept, the command that continues or repeats the run)."""

from __future__ import annotations

import dataclasses
import os
import shlex
import sys
from collections.abc import Callable

from fairdeploy.cli.console import print_error
from fairdeploy.errors import EXIT_INTERRUPTED, EXIT_TERMINATED

NOTHING_KEPT = "nothing was written (outputs are renamed into place only when complete)"


@dataclasses.dataclass
class InterruptNote:
    """What Ctrl-C leaves behind: the running command registers a function that describes what was kept (and sets
    `resume_option` when a flag continues it); fairdeploy.cli.main prints it with the command to run again."""

    kept: Callable[[], str] | None = None
    resume_option: str | None = None
    terminated: bool = False  # the interrupt was SIGTERM (fairdeploy.cli.main: exit 143), not Ctrl-C


interrupt_note = InterruptNote()


def on_interrupt(kept: Callable[[], str], resume_option: str | None = None) -> None:
    """Register what the running command keeps when interrupted (and the flag that continues it)."""
    interrupt_note.kept, interrupt_note.resume_option = kept, resume_option


def forget_interrupt_note() -> None:
    """A new command: nothing registered, not terminated."""
    interrupt_note.kept, interrupt_note.resume_option = None, None
    interrupt_note.terminated = False


def _launcher() -> list[str]:
    """How this process was started again: `torchrun --nproc-per-node N -m` under torchrun (--nnodes too for a
    job of several nodes; other torchrun options, e.g. a multi-node rendezvous, are the user's to repeat)."""
    from fairdeploy.distributed import launched_by_torchrun

    if not launched_by_torchrun():
        return []
    nodes = os.environ.get("GROUP_WORLD_SIZE", "1")
    return ["torchrun", *([f"--nnodes={nodes}"] if nodes not in ("", "1") else []),
            f"--nproc-per-node={os.environ.get('LOCAL_WORLD_SIZE', os.environ.get('WORLD_SIZE', '1'))}", "-m"]


def _resume_command() -> str:
    args = [*_launcher(), "fairdeploy", *sys.argv[1:]]
    option = interrupt_note.resume_option
    if option and option not in args:
        args.append(option)
    return shlex.join(args)


def kept_description() -> str:
    """What the running command kept, as it describes it ('' when it registered nothing or cannot say)."""
    if interrupt_note.kept is None:
        return ""
    try:
        return interrupt_note.kept()
    except Exception:  # noqa: BLE001 - describing the leftovers must not hide the interrupt
        return ""


def print_continue(kept: str | None = None) -> None:
    """The 'to continue: COMMAND' line (after what was kept, when given), on stderr."""
    if kept is not None:
        print(kept or NOTHING_KEPT, file=sys.stderr)
    verb = "continue" if interrupt_note.resume_option else "run it again"
    print(f"to {verb}: {_resume_command()}", file=sys.stderr)


def exit_interrupted() -> None:
    """Ctrl-C (exit 130) or SIGTERM (exit 143): what was kept and the exact command that continues (or
    repeats) the run."""
    what = "terminated (SIGTERM)" if interrupt_note.terminated else "interrupted"
    print_error(f"{what}; {kept_description() or NOTHING_KEPT}")
    print_continue()
    sys.exit(EXIT_TERMINATED if interrupt_note.terminated else EXIT_INTERRUPTED)


def _on_sigterm(signum: int, frame: object) -> None:
    """SIGTERM (a scheduler, `kill`, a container stop) unwinds the command as Ctrl-C does: temporaries removed,
    the output lock released, then what was kept and the command to continue (exit 143)."""
    interrupt_note.terminated = True
    raise KeyboardInterrupt


def catch_sigterm() -> object:
    """Install the SIGTERM handler (main thread only); returns the previous handler, or None when not
    installed."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        return None
    return signal.signal(signal.SIGTERM, _on_sigterm)
