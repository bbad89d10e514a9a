"""SHA-256 of files and bytes (the hex digests every record and provenance check uses)."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path


def sha256_file(path: str | os.PathLike[str], chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def sha256_if_file(path: str | os.PathLike[str]) -> str | None:
    """The file's SHA-256, or None when `path` is not a file (a manifest given as something else)."""
    return sha256_file(path) if Path(path).is_file() else None


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()
