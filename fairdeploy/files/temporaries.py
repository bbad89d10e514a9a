"""What killed runs leave beside (and inside) an output: hidden temporaries, scratch folders, replaced folders.

Their names: `.NAME.XXXXXXXX.tmp` (fairdeploy.files.atomic), `.NAME.scratch.XXXXXXXX` (fairdeploy.distributed's
scratch folder) and `.NAME.old` (a folder atomic_dir was replacing).
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from fairdeploy.files.entries import remove_entry

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
                remove_entry(entry)
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
