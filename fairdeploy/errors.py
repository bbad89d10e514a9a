"""The one exception type a user mistake becomes, and the process exit codes."""

from __future__ import annotations

# Exit codes: distinct so that a CI gate can tell "the artifact drifted" from "the call was wrong".
EXIT_OK = 0
EXIT_GATE_FAILED = 1  # a validation tolerance was exceeded
EXIT_USER_ERROR = 2  # bad input: file, column, value, option
EXIT_MISSING_DEPENDENCY = 3  # an optional package (TensorRT, onnxruntime-gpu) is not installed
EXIT_INTERNAL_ERROR = 4  # an unexpected exception (a bug): one line, the traceback written to a file
EXIT_INTERRUPTED = 130  # Ctrl-C (128 + SIGINT, as shells report it)
EXIT_TERMINATED = 143  # SIGTERM (128 + SIGTERM): handled as Ctrl-C is, its own code so a scheduler sees which


class FairdeployError(Exception):
    """A problem the user can fix. The CLI prints its message as one line and exits non-zero."""

    exit_code = EXIT_USER_ERROR


class MissingDependencyError(FairdeployError):
    """An optional runtime (TensorRT, CUDA provider) is not installed here."""

    exit_code = EXIT_MISSING_DEPENDENCY
