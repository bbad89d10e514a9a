"""What is at a path: a folder's entries described, an entry removed, a device / FIFO / socket named."""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import stat
from collections.abc import Callable
from pathlib import Path


def describe_entries(folder: Path, limit: int = 5, keep: Callable[[str], bool] | None = None) -> str:
    """'a.txt, models/ and 3 more' (hidden entries included; folders end in /); with `keep`, only the entries whose
    name it accepts."""
    try:
        entries = sorted(folder.iterdir(), key=lambda p: p.name)
    except OSError as exc:
        return f"unreadable entries ({exc.strerror or exc})"
    names = [e.name + ("/" if e.is_dir() else "") for e in entries if keep is None or keep(e.name)]
    if not names:
        return "nothing"
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def is_symlink_loop(exc: BaseException) -> bool:
    """Whether `exc`, raised by Path.resolve(), says the path is a symlink loop (Python < 3.13 raises RuntimeError,
    3.13 OSError ELOOP)."""
    return isinstance(exc, RuntimeError) or (isinstance(exc, OSError) and exc.errno == errno.ELOOP)


def remove_entry(path: Path) -> None:
    """Remove a file, link or folder (a folder's tree; a link itself, never its target)."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


_SPECIAL_FILES = ((stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
                  (stat.S_ISFIFO, "a named pipe (FIFO)"), (stat.S_ISSOCK, "a socket"))


def special_file(path: Path) -> str | None:
    """What `path` is when it exists and is neither a regular file nor a folder (itself, or what its symlink
    points at): 'a character device', 'a named pipe (FIFO)', ...; None otherwise. Only stat: never opened."""
    for follow in (False, True):
        try:
            mode = os.stat(path, follow_symlinks=follow).st_mode
        except OSError:
            continue
        for test, what in _SPECIAL_FILES:
            if test(mode):
                return what + ("" if not follow or not path.is_symlink() else f" (through the symlink {path})")
    return None
