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

    from fairdeploy.cli import console as cli_console
    from fairdeploy.cli import interrupts, options

    started = time.perf_counter()
    _wide_help_off_a_terminal()
    cli_console.output.quiet = False
    cli_console.output.verbose = _debug_env()
    interrupts.forget_interrupt_note()
    previous_sigterm = interrupts.catch_sigterm()
    options.threads_option = None
    real_stdout = cli_console.console._file  # None: whatever sys.stdout is at print time (rich's default)
    captured = io.StringIO()
    cli_console.quiet_capture = captured  # the callback redirects the console here under --quiet
    previous_showwarning = warnings.showwarning
    warnings.showwarning = cli_console.show_warning
    try:
        app()  # standalone: ends in SystemExit unless an exception other than click's escapes
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    except KeyboardInterrupt:  # outside the command (Typer turns one inside it into exit 130)
        code = EXIT_INTERRUPTED
    except FairdeployError as exc:
        _print_traceback(exc, cli_console.output.verbose)
        cli_console.print_error(str(exc))
        code = exc.exit_code
        if getattr(exc, "resumable", False) and os.environ.get("RANK", "0") == "0":  # torchrun: rank 0 says it
            interrupts.print_continue(interrupts.kept_description())
    except Exception as exc:  # noqa: BLE001 - a bug: its own exit code (1 means "a gate failed" to CI), one line
        where = _write_traceback(exc)
        _print_traceback(exc, cli_console.output.verbose)
        first = (str(exc).strip().splitlines() or [""])[0]
        cli_console.print_error(f"internal error ({type(exc).__name__}: {first}); "
                                + (f"traceback in {where}" if where else "traceback not written")
                                + " (--verbose or FAIRDEPLOY_DEBUG=1 prints it); please report it")
        code = EXIT_INTERNAL_ERROR
    finally:
        _restore(cli_console, real_stdout, previous_showwarning)
        if previous_sigterm is not None:
            signal.signal(signal.SIGTERM, previous_sigterm)  # type: ignore[arg-type]
    if code == EXIT_INTERRUPTED:
        interrupts.exit_interrupted()
    if code in (0, EXIT_GATE_FAILED):  # after an error, the error stays the last line
        cli_console.debug(f"exit {code} after {time.perf_counter() - started:.1f} s")
    if cli_console.output.quiet and code in (0, EXIT_GATE_FAILED):
        lines = [ln for ln in captured.getvalue().splitlines() if ln.strip()]
        if lines:
            print(lines[-1], file=real_stdout or sys.stdout)
    if code:
        sys.exit(code)


def _print_traceback(exc: BaseException, verbose: bool) -> None:
    if verbose:
        import traceback

        traceback.print_exception(type(exc), exc, exc.__traceback__, file=sys.stderr)


def _restore(cli_console, real_stdout, previous_showwarning) -> None:  # fairdeploy.cli.console, its stdout, a hook
    import warnings

    cli_console.console.file = real_stdout
    warnings.showwarning = previous_showwarning


__all__ = ["app", "main"]
