"""The outputs a claim in this process approved for replacement (claim_output grants, atomic_dir asks)."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from pathlib import Path

_approved: set[Path] = set()
_approved_lock = threading.Lock()


def is_approved(path: Path) -> bool:
    """True when `path` is a claimed output approved for replacement, or inside one."""
    try:
        p = path.resolve()
    except OSError:
        return False
    with _approved_lock:
        return any(a == p or a in p.parents for a in _approved)  # the claimed output and what is inside it


@contextlib.contextmanager
def approved(path: Path) -> Iterator[None]:
    """`path` approved for replacement while the block runs (an approval held already by an enclosing claim of
    the same path stays until that claim ends)."""
    key = path.resolve()
    with _approved_lock:
        fresh = key not in _approved
        _approved.add(key)
    try:
        yield
    finally:
        if fresh:
            with _approved_lock:
                _approved.discard(key)
