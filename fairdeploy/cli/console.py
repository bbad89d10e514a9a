"""The console every command prints to, and how much it says: --quiet / --verbose, debug lines, warnings."""

from __future__ import annotations

import dataclasses
import sys
from typing import Any

from rich.console import Console

# Wide tables stay readable when the output is a file or a CI log (rich defaults to 80 columns there).
console = Console(width=None if sys.stdout.isatty() else 160)
err_console = Console(stderr=True, width=None if sys.stderr.isatty() else 160)


def print_error(message: str) -> None:
    from rich.markup import escape

    err_console.print(f"[bold red]error:[/bold red] {escape(message)}", highlight=False, soft_wrap=True)


@dataclasses.dataclass
class OutputLevel:
    """Set once per command by the global options: quiet = errors and the final result line only; verbose =
    debug lines and full tracebacks (also FAIRDEPLOY_DEBUG=1)."""

    quiet: bool = False
    verbose: bool = False


output = OutputLevel()
quiet_capture: Any = None  # the buffer fairdeploy.cli.main gives the console under --quiet (last line shown)


def debug(message: str) -> None:
    """A detail shown with --verbose only (stderr, so that stdout stays the command's log)."""
    if output.verbose:
        err_console.print(f"debug: {message}", highlight=False, soft_wrap=True, markup=False)


def show_warning(message: Warning | str, category: type[Warning], filename: str, lineno: int,
                 file: Any = None, line: str | None = None) -> None:
    """warnings.showwarning for the CLI: one line `warning: ...` on stderr (none with --quiet; with --verbose
    the warning's class and where it was raised)."""
    if output.quiet:
        return
    where = f" [{category.__name__} at {filename}:{lineno}]" if output.verbose else ""
    text = " ".join(str(message).split())
    err_console.print(f"warning: {text}{where}", highlight=False, soft_wrap=True, markup=False)
