"""The exclusive lock a command holds on its --out (`.NAME.lock` beside it): a second writer fails at once."""

from __future__ import annotations

import contextlib
import errno
import os
from collections.abc import Iterator
from pathlib import Path

from fairdeploy.errors import FairdeployError
from fairdeploy.files.atomic import check_writable_parent


def lock_path(out: str | os.PathLike[str]) -> Path:
    final = Path(out)
    return final.parent / f".{final.name}.lock"


@contextlib.contextmanager
def output_lock(out: str | os.PathLike[str]) -> Iterator[Path]:
    """Hold an exclusive, non-blocking flock on `.NAME.lock` beside `out` for the block; a second writer of the
    same output fails at once (FairdeployError). The lock dies with the process; the file is removed on exit."""
    import fcntl

    final = Path(out)
    try:
        check_writable_parent(final)
    except FairdeployError as exc:
        raise FairdeployError(f"cannot write {final}: {exc}") from exc
    path = lock_path(final)
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise FairdeployError(f"cannot create lock file {path}: {exc.strerror or exc}") from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(fd)
            if exc.errno in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                holder = ""
                with contextlib.suppress(OSError, ValueError):
                    pid = path.read_text().strip()
                    holder = f" (process {int(pid)})" if pid else ""
                raise FairdeployError(
                    f"{final} is being written by another fairdeploy command{holder}: wait for it to finish or "
                    f"choose another --out (lock {path})"
                ) from exc
            raise FairdeployError(f"cannot lock {path}: {exc.strerror or exc}") from exc
        # The holder before us may have removed the file after we opened it: lock the file that is there now.
        try:
            same = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    try:
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        yield path
    finally:
        with contextlib.suppress(OSError):
            path.unlink()  # while still holding the lock (see the inode check above)
        os.close(fd)
