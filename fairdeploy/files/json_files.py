"""JSON files: written atomically (indented, a trailing newline), read with a one-line error naming the file."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from fairdeploy.errors import FairdeployError
from fairdeploy.files.atomic import atomic_path


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
