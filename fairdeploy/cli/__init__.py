"""The `fairdeploy` command line: thin Typer commands over the library. Nothing imports this package."""

from __future__ import annotations

import os
import sys

from fairdeploy.cli.app import app
from fairdeploy.errors import FairdeployError

INTERNAL_ERROR_EXIT = 4


def main() -> None:
    """Console-script entry point: one red line and a non-zero exit for a user error, never a traceback."""
    from fairdeploy.cli.common import print_error

    try:
        code = app(standalone_mode=False)
        # Outside standalone mode, click *returns* a typer.Exit's code instead of raising it (validate's gate).
        if isinstance(code, int) and code != 0:
            sys.exit(code)
    except FairdeployError as exc:
        print_error(str(exc))
        sys.exit(exc.exit_code)
    except SystemExit:
        raise
    except KeyboardInterrupt:
        print_error("interrupted")
        sys.exit(130)
    except Exception as exc:  # the parser's own usage errors, Exit and Abort (click, vendored or not)
        name = type(exc).__name__
        if name == "Abort":
            print_error("aborted")
            sys.exit(1)
        if name == "Exit":
            sys.exit(getattr(exc, "exit_code", 0))
        if hasattr(exc, "show") and hasattr(exc, "exit_code"):
            exc.show()
            sys.exit(exc.exit_code)
        if os.environ.get("FAIRDEPLOY_TRACEBACK"):
            raise
        # exit 1 means "a validation gate failed" to CI: an unexpected error gets its own code and one line
        print_error(f"internal error ({name}: {exc}); nothing was written unless a message above says so. "
                    f"Rerun with FAIRDEPLOY_TRACEBACK=1 for the traceback and report it.")
        sys.exit(INTERNAL_ERROR_EXIT)

__all__ = ["app", "main"]
