"""Atomic file and directory writes, the output policy of every command, content hashing, JSON helpers.

Output policy (`claim_output`): a command writes only what it owns. Its `--out` is locked against a second
writer, its own stale temporaries are removed, an output equal to an input is refused, and an existing
`--out` that is not a previous output of the same command is refused unless the user passes `--overwrite`.
`atomic_dir` replaces an existing folder only when it is owned (its record file) or a claim approved it.
"""

from __future__ import annotations

import contextlib
import errno
import fnmatch
import hashlib
import json
import os
import re
import shutil
import stat
import tempfile
import threading
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fairdeploy.errors import FairdeployError


def _check_writable_parent(path: Path) -> None:
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
    _check_writable_parent(final)
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


def _remove(path: Path) -> None:
    """Remove a file, link or folder (a folder's tree; a link itself, never its target)."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def _may_replace(final: Path, owner: Owner | None, overwrite: bool) -> None:
    """Raise unless the existing `final` may be replaced: empty, owned, --overwrite, or approved by a claim."""
    if not final.is_dir() or final.is_symlink():
        if overwrite or _is_approved(final):
            return
        raise FairdeployError(f"{final} exists and is not a folder; refusing to replace it "
                              "(choose another --out, or pass --overwrite)")
    if overwrite or _is_approved(final) or not any(final.iterdir()) or _owned_by(final, owner):
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
    _check_writable_parent(final)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent))
    try:
        yield tmp
        set_default_modes(tmp)  # mkdtemp makes 0700, safetensors 0600 files
        if final.exists() or final.is_symlink():
            _may_replace(final, owner, overwrite)  # again: it may have appeared while the block ran
            old = final.with_name(f".{final.name}.old")
            if old.exists() or old.is_symlink():
                _remove(old)  # a stale .NAME.old from a killed run: a folder, or a file / link
            os.replace(final, old)
            os.replace(tmp, final)
            _remove(old)
        else:
            os.replace(tmp, final)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


# ---------------------------------------------------------------------------------------------------------------
# Output policy: what a command may write, the lock, stale temporaries.

@dataclass(frozen=True)
class OutputPolicy:
    """How one command writes its `--out`.

    kind: "dir" or "file".
    record: (dir) the file whose presence proves the folder is a previous output of the command.
    owned: alternative proof, a predicate on the existing path (file outputs: their content).
    names: (dir, replacing writers) glob patterns of every entry the command writes; an owned folder that also
        holds anything else is refused (replacing it would delete what the command did not write).
        None: the command writes into the folder in place and never deletes other entries.
    resume_option: the option that continues an owned output (train: --resume); without it an owned output is
        refused like a foreign one.
    what: how messages name the output ("a manifest", "a metrics JSON").
    """

    command: str
    kind: str = "dir"
    record: str | None = None
    owned: Callable[[Path], bool] | None = None
    names: tuple[str, ...] | None = None
    resume_option: str | None = None
    what: str = "output"
    proof: str | None = None  # how messages name the proof when it is a predicate ("stages.json")


_approved: set[Path] = set()
_approved_lock = threading.Lock()


def _is_approved(path: Path) -> bool:
    try:
        p = path.resolve()
    except OSError:
        return False
    with _approved_lock:
        return any(a == p or a in p.parents for a in _approved)  # the claimed output and what is inside it


def describe_entries(folder: Path, limit: int = 5) -> str:
    """'a.txt, models/ and 3 more' (hidden entries included; folders end in /)."""
    try:
        entries = sorted(folder.iterdir(), key=lambda p: p.name)
    except OSError as exc:
        return f"unreadable entries ({exc.strerror or exc})"
    names = [e.name + ("/" if e.is_dir() else "") for e in entries]
    if not names:
        return "nothing"
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


# A temporary's random part, as tempfile makes it: 8 characters of [a-z0-9_].
_RAND = r"[a-z0-9_]{8}"


def _stale_pattern(name: str | None) -> re.Pattern[str]:
    n = re.escape(name) if name is not None else r"[^/]+?"
    return re.compile(rf"^\.{n}\.(?:{_RAND}\.tmp|scratch\.{_RAND}|old)$")


def remove_stale_temporaries(out: str | os.PathLike[str], inside: bool = False) -> list[Path]:
    """Remove what killed runs writing `out` left behind: `.NAME.XXXXXXXX.tmp` (atomic writes),
    `.NAME.scratch.XXXXXXXX` (pruning scratch) and `.NAME.old` (a replaced folder) beside it; with `inside`,
    also such hidden temporaries of any name inside `out` and its direct sub-folders (call it only for a
    folder the command owns). Returns what was removed. The caller must hold the output's lock."""
    final = Path(out)
    removed: list[Path] = []
    places: list[tuple[Path, re.Pattern[str]]] = [(final.parent, _stale_pattern(final.name))]
    if inside and final.is_dir() and not final.is_symlink():
        anyname = _stale_pattern(None)
        places.append((final, anyname))
        places += [(d, anyname) for d in final.iterdir() if d.is_dir() and not d.is_symlink()
                   and not anyname.match(d.name)]
    for folder, pattern in places:
        try:
            entries = list(folder.iterdir())
        except OSError:
            continue
        for entry in entries:
            if pattern.match(entry.name):
                _remove(entry)
                removed.append(entry)
    return removed


def only_temporaries(folder: Path) -> bool:
    """True when `folder` is a folder (not a link) holding entries, every one a hidden temporary that
    fairdeploy's atomic writers and scratch folders leave when killed (`.NAME.XXXXXXXX.tmp`,
    `.NAME.scratch.XXXXXXXX`, `.NAME.old`)."""
    if not folder.is_dir() or folder.is_symlink():
        return False
    try:
        names = [e.name for e in folder.iterdir()]
    except OSError:
        return False
    anyname = _stale_pattern(None)
    return bool(names) and all(anyname.match(n) for n in names)


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
        _check_writable_parent(final)
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


def _same_or_inside(a: Path, b: Path) -> bool:
    return a == b or b in a.parents


def _check_inputs(out: Path, policy: OutputPolicy, inputs: Mapping[str, Any]) -> None:
    resolved = out.resolve()
    for option, value in inputs.items():
        values = value if isinstance(value, (list, tuple)) else [value]
        for v in values:
            if v is None:
                continue
            inp = Path(v).resolve()
            if inp == resolved:
                raise FairdeployError(f"--out {out} is the same path as the input {option} {v}: "
                                      "choose another --out (the input would be overwritten)")
            if policy.kind == "dir" and policy.names is not None and _same_or_inside(inp, resolved):
                raise FairdeployError(f"--out {out} contains the input {option} {v}: replacing it would delete "
                                      "the input; choose another --out")


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


def _check_regular(out: Path, policy: OutputPolicy) -> None:
    """Refuse an --out that is a device, a FIFO, a socket or a symlink loop, with --overwrite too: writing there
    replaces the node (or, a FIFO, blocks forever); nothing is opened or replaced."""
    try:
        out.resolve()
    except (RuntimeError, OSError) as exc:  # a symlink loop: RuntimeError before Python 3.13, OSError ELOOP after
        if isinstance(exc, RuntimeError) or exc.errno == errno.ELOOP:
            raise FairdeployError(f"--out {out} is a symlink loop: choose another --out") from None
    what = special_file(out)
    if what is not None:
        writes = f"{policy.what} file" if policy.kind == "file" else "a folder"
        raise FairdeployError(f"--out {out} is {what}, not a regular file or folder; {policy.command} writes "
                              f"{writes} there: choose another --out")


def _check_owner(out: Path, policy: OutputPolicy, overwrite: bool, resume: bool | None) -> bool:
    """Raise unless `policy.command` may write `out`; returns whether an existing output may be replaced."""
    cmd = f"`fairdeploy {policy.command}`"
    if not (out.exists() or out.is_symlink()):
        return False
    if policy.kind == "file":
        if out.is_dir():
            raise FairdeployError(f"--out {out} is a folder; {policy.command} writes {policy.what} file there: "
                                  "give a file path")
        if overwrite or (policy.owned is not None and policy.owned(out)):
            return True
        proof = f" (no {policy.proof})" if policy.proof else ""
        raise FairdeployError(f"{out} already exists and is not {policy.what} written by {cmd}{proof}: choose "
                              "another --out, or pass --overwrite to replace it")
    if not out.is_dir():
        raise FairdeployError(f"--out {out} is a file; {policy.command} writes a folder there: give a folder path")
    if not any(out.iterdir()):
        return False
    owned = (policy.record is not None and (out / policy.record).is_file()) or bool(
        policy.owned is not None and policy.owned(out))
    proof = policy.proof or policy.record or "its record file"
    action = "replace it" if policy.names is not None else "write into it"
    if overwrite:
        return True
    if not owned:
        raise FairdeployError(f"{out} already exists and is not a previous {cmd} output (no {proof}; it holds "
                              f"{describe_entries(out)}): choose another --out, or pass --overwrite to {action}")
    if policy.resume_option is not None and not resume:
        raise FairdeployError(f"{out} holds an earlier {cmd} run ({proof}): pass {policy.resume_option} to "
                              "continue it, or --overwrite to replace it")
    if policy.names is not None:
        extra = [e.name + ("/" if e.is_dir() else "") for e in sorted(out.iterdir(), key=lambda p: p.name)
                 if not any(fnmatch.fnmatchcase(e.name, pat) for pat in policy.names)]
        if extra:
            shown = ", ".join(extra[:5]) + (f" and {len(extra) - 5} more" if len(extra) > 5 else "")
            raise FairdeployError(f"{out} is a previous {cmd} output but also holds {shown}, which "
                                  f"{policy.command} did not write and would delete: move it, choose another "
                                  "--out, or pass --overwrite to replace it all")
    return True


@contextlib.contextmanager
def claim_output(
    out: str | os.PathLike[str],
    policy: OutputPolicy,
    *,
    overwrite: bool = False,
    inputs: Mapping[str, Any] | None = None,
    resume: bool | None = None,
) -> Iterator[Path]:
    """Everything a writing command does before it writes `out`, held for the whole command:

    1. an output equal to an input (or, for a folder the command replaces, containing one) is refused;
    2. the output's lock is taken (a second writer fails at once);
    3. the command's own stale temporaries beside `out` (and inside it, when it owns it) are removed;
    4. an existing `out` that is not a previous output of this command is refused unless `overwrite`.
    Yields `out`; library writes (`atomic_dir`) may then replace it. Errors are one line, exit 2.
    """
    final = Path(out)
    _check_regular(final, policy)
    _check_inputs(final, policy, inputs or {})
    with output_lock(final):
        _check_regular(final, policy)  # again, under the lock
        owned_before = policy.kind == "dir" and final.is_dir() and (
            (policy.record is not None and (final / policy.record).is_file())
            or bool(policy.owned is not None and policy.owned(final)))
        # inside the folder too when it is the command's own, when --overwrite gives it to the command, or when
        # it holds nothing but a killed run's temporaries (a first run killed before its record was written)
        remove_stale_temporaries(final, inside=policy.kind == "dir" and (
            owned_before or overwrite or only_temporaries(final)))
        replace = _check_owner(final, policy, overwrite, resume)
        key = final.resolve()
        with _approved_lock:
            fresh = key not in _approved
            if replace:
                _approved.add(key)
        try:
            yield final
        finally:
            if replace and fresh:
                with _approved_lock:
                    _approved.discard(key)


def write_json(path: str | os.PathLike[str], data: Any) -> None:
    """Write JSON atomically (sorted keys off, indented, trailing newline)."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2, default=_json_default) + "\n")


def read_json(path: str | os.PathLike[str]) -> Any:
    p = Path(path)
    if not p.is_file():
        raise FairdeployError(f"{p}: file not found")
    try:
        return json.loads(p.read_text())
    except json.JSONDecodeError as exc:
        raise FairdeployError(f"{p}: not valid JSON (line {exc.lineno}, column {exc.colno}: {exc.msg})") from exc


def _json_default(obj: Any) -> Any:
    if hasattr(obj, "to_dict"):
        return obj.to_dict()
    if hasattr(obj, "item"):  # numpy / torch scalars
        return obj.item()
    if hasattr(obj, "tolist"):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


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
