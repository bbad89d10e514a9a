"""A command's output policy and `claim_output`: everything it checks and holds before it writes its --out.

A command writes only what it owns. Its `--out` is locked against a second writer, its own stale temporaries are
removed, an output equal to an input is refused, and an existing `--out` that is not a previous output of the same
command is refused unless the user passes `--overwrite`.
"""

from __future__ import annotations

import contextlib
import fnmatch
import os
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fairdeploy.errors import FairdeployError
from fairdeploy.files.approvals import approved
from fairdeploy.files.atomic import _owned_by
from fairdeploy.files.entries import describe_entries, is_symlink_loop, special_file
from fairdeploy.files.lock import output_lock
from fairdeploy.files.temporaries import only_temporaries, remove_stale_temporaries


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


def _check_regular(out: Path, policy: OutputPolicy) -> None:
    """Refuse an --out that is a device, a FIFO, a socket or a symlink loop, with --overwrite too: writing there
    replaces the node (or, a FIFO, blocks forever); nothing is opened or replaced."""
    try:
        out.resolve()
    except (RuntimeError, OSError) as exc:
        if is_symlink_loop(exc):
            raise FairdeployError(f"--out {out} is a symlink loop: choose another --out") from None
    what = special_file(out)
    if what is not None:
        writes = f"{policy.what} file" if policy.kind == "file" else "a folder"
        raise FairdeployError(f"--out {out} is {what}, not a regular file or folder; {policy.command} writes "
                              f"{writes} there: choose another --out")


def _owned(out: Path, policy: OutputPolicy) -> bool:
    """Whether the folder `out` is a previous output of the command: its record file, or its `owned` predicate."""
    return _owned_by(out, policy.record) or _owned_by(out, policy.owned)


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
    owned = _owned(out, policy)
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
        names = policy.names

        def foreign(name: str) -> bool:
            return not any(fnmatch.fnmatchcase(name, pat) for pat in names)

        if any(foreign(e.name) for e in out.iterdir()):
            raise FairdeployError(f"{out} is a previous {cmd} output but also holds "
                                  f"{describe_entries(out, keep=foreign)}, which "
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
        owned_before = policy.kind == "dir" and final.is_dir() and _owned(final, policy)
        # inside the folder too when it is the command's own, when --overwrite gives it to the command, or when
        # it holds nothing but a killed run's temporaries (a first run killed before its record was written)
        remove_stale_temporaries(final, inside=policy.kind == "dir" and (
            owned_before or overwrite or only_temporaries(final)))
        replace = _check_owner(final, policy, overwrite, resume)
        with approved(final) if replace else contextlib.nullcontext():
            yield final
