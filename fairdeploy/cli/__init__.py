"""The `fairdeploy` command line: thin Typer commands over the library. Nothing imports this package."""

from __future__ import annotations

import io
import os
import shlex
import sys
import time

from fairdeploy.cli.app import app
from fairdeploy.errors import EXIT_GATE_FAILED, EXIT_INTERNAL_ERROR, EXIT_INTERRUPTED, FairdeployError

INTERNAL_ERROR_EXIT = EXIT_INTERNAL_ERROR  # the name tests and older callers use
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


def _resume_command() -> str:
    from fairdeploy.cli.common import interrupt_note

    args = ["fairdeploy", *sys.argv[1:]]
    option = interrupt_note.resume_option
    if option and option not in args:
        args.append(option)
    return shlex.join(args)


def _interrupted() -> None:
    """Ctrl-C: what was kept and the exact command that continues (or repeats) the run; exit 130."""
    from fairdeploy.cli.common import interrupt_note, print_error

    kept = ""
    if interrupt_note.kept is not None:
        try:
            kept = interrupt_note.kept()
        except Exception:  # noqa: BLE001 - describing the leftovers must not hide the interrupt
            kept = ""
    print_error(f"interrupted; {kept or 'nothing was written (outputs are renamed into place only when complete)'}")
    verb = "continue" if interrupt_note.resume_option else "run it again"
    print(f"to {verb}: {_resume_command()}", file=sys.stderr)
    sys.exit(EXIT_INTERRUPTED)


def main() -> None:
    """Console-script entry point: one red line and a non-zero exit for a user error, never a traceback.

    Exit codes (fairdeploy.errors): 0 ok, 1 a validation gate failed, 2 bad input, 3 a missing optional
    dependency, 4 an internal error (a bug: one line, the traceback in a file), 130 interrupted (Ctrl-C).
    """
    import warnings

    from fairdeploy.cli import common
    from fairdeploy.cli.common import print_error

    started = time.perf_counter()
    _wide_help_off_a_terminal()
    common.output.quiet = False
    common.output.verbose = _debug_env()
    common.interrupt_note.kept, common.interrupt_note.resume_option = None, None
    common.threads_option = None
    real_stdout = common.console._file  # None: whatever sys.stdout is at print time (rich's default)
    captured = io.StringIO()
    common.quiet_capture = captured  # the callback redirects the console here under --quiet
    previous_showwarning = warnings.showwarning
    warnings.showwarning = common.show_warning
    code = 0
    try:
        result = app(standalone_mode=False)
        # Outside standalone mode, click *returns* a typer.Exit's code instead of raising it (validate's gate);
        # typer turns Ctrl-C (KeyboardInterrupt) into Exit(130), which comes back here as 130.
        if isinstance(result, int):
            code = result
        if code == EXIT_INTERRUPTED:
            _restore(common, real_stdout, previous_showwarning)
            _interrupted()
    except FairdeployError as exc:
        if common.output.verbose:
            import traceback

            traceback.print_exception(type(exc), exc, exc.__traceback__, file=sys.stderr)
        print_error(str(exc))
        code = exc.exit_code
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    except KeyboardInterrupt:
        _restore(common, real_stdout, previous_showwarning)
        _interrupted()
    except Exception as exc:  # noqa: BLE001 - the parser's usage errors, Exit and Abort (click, vendored or not)
        name = type(exc).__name__
        if name == "Abort":
            print_error("aborted")
            code = EXIT_GATE_FAILED
        elif name == "Exit":
            code = getattr(exc, "exit_code", 0)
        elif hasattr(exc, "show") and hasattr(exc, "exit_code"):
            exc.show()
            code = exc.exit_code
        else:
            # exit 1 means "a validation gate failed" to CI: an unexpected error gets its own code and one line
            where = _write_traceback(exc)
            if common.output.verbose:
                import traceback

                traceback.print_exception(type(exc), exc, exc.__traceback__, file=sys.stderr)
            first = (str(exc).strip().splitlines() or [""])[0]
            print_error(f"internal error ({name}: {first}); "
                        + (f"traceback in {where}" if where else "traceback not written")
                        + " (--verbose or FAIRDEPLOY_DEBUG=1 prints it); please report it")
            code = EXIT_INTERNAL_ERROR
    finally:
        _restore(common, real_stdout, previous_showwarning)
    if code in (0, EXIT_GATE_FAILED):  # after an error, the error stays the last line
        common.debug(f"exit {code} after {time.perf_counter() - started:.1f} s")
    if common.output.quiet and code in (0, EXIT_GATE_FAILED):
        lines = [ln for ln in captured.getvalue().splitlines() if ln.strip()]
        if lines:
            print(lines[-1], file=real_stdout or sys.stdout)
    if code:
        sys.exit(code)


def _restore(common, real_stdout, previous_showwarning) -> None:  # the cli.common module, its stdout, a hook
    import warnings

    common.console.file = real_stdout
    warnings.showwarning = previous_showwarning


__all__ = ["app", "main"]
