"""Atomic writes: a file or folder appears complete under its name or not at all, with ordinary modes.

`atomic_dir` replaces an existing folder only when it is owned (its record file) or a claim approved it
(fairdeploy.files.outputs.claim_output).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

from fairdeploy.errors import FairdeployError
from fairdeploy.files.approvals import is_approved
from fairdeploy.files.entries import describe_entries, remove_entry


def check_writable_parent(path: Path) -> None:
    """Create `path`'s folder if missing; FairdeployError when it cannot be created or written."""
    parent = path.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise FairdeployError(f"cannot create output directory {parent}: {exc.strerror or exc}") from exc
    if not os.access(parent, os.W_OK):
        raise FairdeployError(f"output directory {parent} is not writable")


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def set_default_modes(path: Path) -> None:
    """Give `path` (a file, or a folder and everything in it) the modes a plain `open` / `mkdir` would: 0666 / 0777
    less the umask (0644 / 0755 with the usual 022). Temporary files (mkstemp, mkdtemp) and some writers
    (safetensors) make 0600 files; an artifact is an ordinary file."""
    mask = _umask()
    if path.is_dir() and not path.is_symlink():
        os.chmod(path, 0o777 & ~mask)
        for root, dirs, files in os.walk(path):
            for d in dirs:
                if not os.path.islink(os.path.join(root, d)):
                    os.chmod(os.path.join(root, d), 0o777 & ~mask)
            for f in files:
                if not os.path.islink(os.path.join(root, f)):
                    os.chmod(os.path.join(root, f), 0o666 & ~mask)
    elif path.exists() and not path.is_symlink():
        os.chmod(path, 0o666 & ~mask)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary file name beside `path`; rename it to `path` only if the block succeeds."""
    final = Path(path)
    check_writable_parent(final)
    fd, tmp = tempfile.mkstemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        set_default_modes(tmp_path)  # mkstemp makes 0600 (and a writer may recreate the file so)
        os.replace(tmp_path, final)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


Owner = str | Callable[[Path], bool]


def _owned_by(folder: Path, owner: Owner | None) -> bool:
    if owner is None:
        return False
    if callable(owner):
        return bool(owner(folder))
    return (folder / owner).is_file()


def _may_replace(final: Path, owner: Owner | None, overwrite: bool) -> None:
    """Raise unless the existing `final` may be replaced: empty, owned, --overwrite, or approved by a claim."""
    if not final.is_dir() or final.is_symlink():
        if overwrite or is_approved(final):
            return
        raise FairdeployError(f"{final} exists and is not a folder; refusing to replace it "
                              "(choose another --out, or pass --overwrite)")
    if overwrite or is_approved(final) or not any(final.iterdir()) or _owned_by(final, owner):
        return
    raise FairdeployError(f"{final} already exists and holds {describe_entries(final)}, which this command did not "
                          "write: choose another --out, or pass --overwrite to replace it")


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike[str], owner: Owner | None = None, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary directory beside `path`; it replaces `path` only if the block succeeds.

    An existing non-empty `path` is replaced only when it is owned (`owner`: the record file the writer puts
    there, or a predicate), when `overwrite` is set, or when `claim_output` approved it in this process;
    otherwise FairdeployError, before any work is done, and nothing is deleted.
    """
    final = Path(path)
    if final.exists() or final.is_symlink():
        _may_replace(final, owner, overwrite)
    check_writable_parent(final)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent))
    try:
        yield tmp
        set_default_modes(tmp)  # mkdtemp makes 0700, safetensors 0600 files
        if final.exists() or final.is_symlink():
            _may_replace(final, owner, overwrite)  # again: it may have appeared while the block ran
            old = final.with_name(f".{final.name}.old")
            if old.exists() or old.is_symlink():
                remove_entry(old)  # a stale .NAME.old from a killed run: a folder, or a file / link
            os.replace(final, old)
            os.replace(tmp, final)
            remove_entry(old)
        else:
            os.replace(tmp, final)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
