"""The `fairdeploy` command line: thin Typer commands over the library. Nothing imports this package."""

from __future__ import annotations

import io
import os
import shlex
import sys
import time

from fairdeploy.cli.app import app
from fairdeploy.errors import (
    EXIT_GATE_FAILED,
    EXIT_INTERNAL_ERROR,
    EXIT_INTERRUPTED,
    EXIT_TERMINATED,
    FairdeployError,
)

WIDE_HELP = 160  # columns for help text and tables when stdout is not a terminal (rich would cut at 80)


def _debug_env() -> bool:
    return any(os.environ.get(v, "") not in ("", "0") for v in ("FAIRDEPLOY_DEBUG", "FAIRDEPLOY_TRACEBACK"))


def _wide_help_off_a_terminal() -> None:
    """`fairdeploy prune --help > file` must not cut option names at 80 columns (`--channels-per-r…`)."""
    if sys.stdout.isatty() or os.environ.get("COLUMNS") or os.environ.get("TERMINAL_WIDTH"):
        return
    import typer.rich_utils

    typer.rich_utils.MAX_WIDTH = WIDE_HELP


def _write_traceback(exc: BaseException) -> str:
    """The full traceback in a file under the temporary folder; returns its path ('' if it cannot be written)."""
    import tempfile
    import traceback

    text = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    path = os.path.join(tempfile.gettempdir(), f"fairdeploy-error-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.txt")
    try:
        with open(path, "w", encoding="utf-8") as f:
            f.write(f"fairdeploy {' '.join(shlex.quote(a) for a in sys.argv[1:])}\n\n{text}")
    except OSError:
        return ""
    return path


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
    from fairdeploy.cli.common import interrupt_note

    args = [*_launcher(), "fairdeploy", *sys.argv[1:]]
    option = interrupt_note.resume_option
    if option and option not in args:
        args.append(option)
    return shlex.join(args)


def _kept() -> str:
    """What the running command kept, as it describes it ('' when it registered nothing or cannot say)."""
    from fairdeploy.cli.common import interrupt_note

    if interrupt_note.kept is None:
        return ""
    try:
        return interrupt_note.kept()
    except Exception:  # noqa: BLE001 - describing the leftovers must not hide the interrupt
        return ""


NOTHING_KEPT = "nothing was written (outputs are renamed into place only when complete)"


def _print_continue(kept: str | None = None) -> None:
    """The 'to continue: COMMAND' line (after what was kept, when given), on stderr."""
    from fairdeploy.cli.common import interrupt_note

    if kept is not None:
        print(kept or NOTHING_KEPT, file=sys.stderr)
    verb = "continue" if interrupt_note.resume_option else "run it again"
    print(f"to {verb}: {_resume_command()}", file=sys.stderr)


def _interrupted() -> None:
    """Ctrl-C (exit 130) or SIGTERM (exit 143): what was kept and the exact command that continues (or
    repeats) the run."""
    from fairdeploy.cli.common import interrupt_note, print_error

    what = "terminated (SIGTERM)" if interrupt_note.terminated else "interrupted"
    print_error(f"{what}; {_kept() or NOTHING_KEPT}")
    _print_continue()
    sys.exit(EXIT_TERMINATED if interrupt_note.terminated else EXIT_INTERRUPTED)


def _on_sigterm(signum: int, frame: object) -> None:
    """SIGTERM (a scheduler, `kill`, a container stop) unwinds the command as Ctrl-C does: temporaries removed,
    the output lock released, then what was kept and the command to continue (exit 143)."""
    from fairdeploy.cli.common import interrupt_note

    interrupt_note.terminated = True
    raise KeyboardInterrupt


def _catch_sigterm() -> object:
    """Install _on_sigterm (main thread only); returns the previous handler, or None when not installed."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        return None
    return signal.signal(signal.SIGTERM, _on_sigterm)


def main() -> None:
    """Console-script entry point. Typer runs in standalone mode: it reports a usage error (exit 2), turns
    Ctrl-C into exit 130 and exits with a command's `typer.Exit` code. Every other exception reaches this
    function: a FairdeployError becomes one red line (here, and nowhere else), anything else is a bug.

    Exit codes (fairdeploy.errors): 0 ok, 1 a validation gate failed, 2 bad input (and a torchrun peer that
    died: with what was kept and the command that continues), 3 a missing optional dependency, 4 an internal
    error (a bug: one line, the traceback in a file), 130 interrupted (Ctrl-C), 143 terminated (SIGTERM, handled
    as Ctrl-C is).
    """
    import signal
    import warnings

    from fairdeploy.cli import common
    from fairdeploy.cli.common import print_error

    started = time.perf_counter()
    _wide_help_off_a_terminal()
    common.output.quiet = False
    common.output.verbose = _debug_env()
    common.interrupt_note.kept, common.interrupt_note.resume_option = None, None
    common.interrupt_note.terminated = False
    previous_sigterm = _catch_sigterm()
    common.threads_option = None
    real_stdout = common.console._file  # None: whatever sys.stdout is at print time (rich's default)
    captured = io.StringIO()
    common.quiet_capture = captured  # the callback redirects the console here under --quiet
    previous_showwarning = warnings.showwarning
    warnings.showwarning = common.show_warning
    try:
        app()  # standalone: ends in SystemExit unless an exception other than click's escapes
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    except KeyboardInterrupt:  # outside the command (Typer turns one inside it into exit 130)
        code = EXIT_INTERRUPTED
    except FairdeployError as exc:
        _print_traceback(exc, common.output.verbose)
        print_error(str(exc))
        code = exc.exit_code
        if getattr(exc, "resumable", False) and os.environ.get("RANK", "0") == "0":  # torchrun: rank 0 says it
            _print_continue(_kept())
    except Exception as exc:  # noqa: BLE001 - a bug: its own exit code (1 means "a gate failed" to CI), one line
        where = _write_traceback(exc)
        _print_traceback(exc, common.output.verbose)
        first = (str(exc).strip().splitlines() or [""])[0]
        print_error(f"internal error ({type(exc).__name__}: {first}); "
                    + (f"traceback in {where}" if where else "traceback not written")
                    + " (--verbose or FAIRDEPLOY_DEBUG=1 prints it); please report it")
        code = EXIT_INTERNAL_ERROR
    finally:
        _restore(common, real_stdout, previous_showwarning)
        if previous_sigterm is not None:
            signal.signal(signal.SIGTERM, previous_sigterm)  # type: ignore[arg-type]
    if code == EXIT_INTERRUPTED:
        _interrupted()
    if code in (0, EXIT_GATE_FAILED):  # after an error, the error stays the last line
        common.debug(f"exit {code} after {time.perf_counter() - started:.1f} s")
    if common.output.quiet and code in (0, EXIT_GATE_FAILED):
        lines = [ln for ln in captured.getvalue().splitlines() if ln.strip()]
        if lines:
            print(lines[-1], file=real_stdout or sys.stdout)
    if code:
        sys.exit(code)


def _print_traceback(exc: BaseException, verbose: bool) -> None:
    if verbose:
        import traceback

        traceback.print_exception(type(exc), exc, exc.__traceback__, file=sys.stderr)


def _restore(common, real_stdout, previous_showwarning) -> None:  # the cli.common module, its stdout, a hook
    import warnings

    common.console.file = real_stdout
    warnings.showwarning = previous_showwarning


__all__ = ["app", "main"]
