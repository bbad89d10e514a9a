"""The one unit file sizes are printed and written in: MB = 10^6 bytes (as `ls --si` and `du --si` count)."""

from __future__ import annotations

BYTES_PER_MB = 1_000_000


def megabytes(size_bytes: int) -> str:
    """'11.66 MB': a file size as every command and the report print it."""
    return f"{size_bytes / BYTES_PER_MB:.2f} MB"
