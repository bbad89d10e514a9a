"""Files shipped inside the package (export profiles, calibration recipes) and where a name is looked up.

A profile (`--profile NAME`) or calibration recipe (`--calib-recipe NAME`) is found in this order, first match wins:

1. a path (`--profile my/target.toml`, anything ending in .toml or naming a folder) is used as given, nothing else;
2. the folder named on the command line or in the environment: `--profiles-dir` / FAIRDEPLOY_PROFILES,
   `--recipes-dir` / FAIRDEPLOY_CALIBRATION;
3. `./export/NAME.toml` or `./calibration/NAME.toml` in the working directory: the user-editable copies (the
   repository's top-level folders, or a copy made next to one's data);
4. the copy inside the package, `fairdeploy/resources/profiles/` or `fairdeploy/resources/calibration/`, read
   with importlib.resources: an installed wheel has every built-in profile and recipe wherever it runs.

The repository's top-level export/*.toml and calibration/*.toml are byte-identical to the packaged ones
(tests/test_packaging.py fails when they drift): edit both, or add a deliberately different file only at the top
level as a local override.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from importlib.resources import files
from pathlib import Path
from typing import TYPE_CHECKING

from fairdeploy.errors import FairdeployError

if TYPE_CHECKING:  # a pathlib.Path is one too
    from importlib.resources.abc import Traversable

PROFILES = "profiles"
CALIBRATION = "calibration"
# The working-directory folder that overrides each kind of packaged file.
WORKDIR_FOLDERS = {PROFILES: "export", CALIBRATION: "calibration"}


def packaged(kind: str) -> Traversable:
    """The package's own folder of `kind` files (importlib.resources; a plain Path for an unzipped install)."""
    if kind not in WORKDIR_FOLDERS:
        raise ValueError(f"unknown resource kind {kind!r}; valid: {', '.join(WORKDIR_FOLDERS)}")
    return files(__name__).joinpath(kind)


def search_folders(kind: str, explicit: Path | None = None) -> list[Traversable]:
    """Folders a `kind` name is looked up in, first match wins: `explicit`, ./<export|calibration>, the package."""
    return [*([explicit] if explicit is not None else []), Path.cwd() / WORKDIR_FOLDERS[kind], packaged(kind)]


def toml_names(folders: Sequence[Traversable]) -> list[str]:
    """Every NAME with a NAME.toml in any of `folders` (missing folders are skipped)."""
    return sorted({f.name[: -len(".toml")] for d in folders if d.is_dir() for f in d.iterdir()
                   if f.name.endswith(".toml") and f.is_file()})


def find_toml(name: str | os.PathLike[str], folders: Sequence[Traversable], what: str) -> Traversable:
    """A .toml path given as such, or NAME.toml from the first of `folders` that has it; else one clear error
    naming the choices and the folders searched."""
    p = Path(name)
    if p.suffix == ".toml" or p.parent != Path("."):
        if not p.is_file():
            raise FairdeployError(f"{what} file {p} not found")
        return p
    for d in folders:
        candidate = d.joinpath(f"{p.name}.toml")
        if candidate.is_file():
            return candidate
    raise FairdeployError(
        f"unknown {what} {str(name)!r}; choose one of {', '.join(toml_names(folders)) or '(none found)'} "
        f"(searched {', '.join(str(d) for d in folders)}) or give a .toml path"
    )
