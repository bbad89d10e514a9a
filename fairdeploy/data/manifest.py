"""The manifest CSV: one row per image with `image`, `label`, `group`, `split` and any extra columns."""

from __future__ import annotations

import csv
import os
import warnings
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from fairdeploy.errors import FairdeployError
from fairdeploy.files.atomic import atomic_path
from fairdeploy.files.entries import is_symlink_loop

REQUIRED_COLUMNS = ("image", "label", "group", "split")
SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class Record:
    """One image: its path relative to the images root, class name, sensitive group, split."""

    image: str
    label: str
    group: str
    split: str
    extra: tuple[tuple[str, str], ...] = ()

    def get(self, column: str, default: str = "") -> str:
        return dict(self.extra).get(column, default)


@dataclass(frozen=True)
class Manifest:
    """A list of records and the directory their image paths are relative to."""

    records: tuple[Record, ...]
    root: Path
    source: str = "<memory>"
    extra_columns: tuple[str, ...] = field(default=())

    @property
    def classes(self) -> list[str]:
        return sorted({r.label for r in self.records})

    @property
    def groups(self) -> list[str]:
        return sorted({r.group for r in self.records})

    def split(self, name: str) -> list[Record]:
        """Records of one split; an unknown or empty split is a user error."""
        if name not in SPLITS:
            raise FairdeployError(f"unknown split {name!r}; choose one of {', '.join(SPLITS)}")
        rows = [r for r in self.records if r.split == name]
        if not rows:
            raise FairdeployError(f"{self.source}: split {name!r} is empty")
        return rows

    def path_of(self, record: Record) -> Path:
        return self.root / record.image


class ManifestWarning(UserWarning):
    """A manifest that reads but leaks between splits or repeats itself (duplicate rows, conflicting labels)."""


@dataclass(frozen=True)
class Duplicates:
    """Images that appear more than once (keyed by their path under the root, normalised).

    Each field: (image, description) per offending image; `rows` counts the redundant copies of a row.
    """

    rows: tuple[tuple[str, str], ...] = ()  # the same (image, label, group, split) row more than once
    cross_split: tuple[tuple[str, str], ...] = ()  # one image in two or more splits (leakage)
    labels: tuple[tuple[str, str], ...] = ()  # one image with two or more labels
    groups: tuple[tuple[str, str], ...] = ()  # one image with two or more groups

    def __bool__(self) -> bool:
        return bool(self.rows or self.cross_split or self.labels or self.groups)

    def lines(self) -> list[str]:
        """One line per kind found: the count and one example."""
        out = []
        for title, items in (("duplicate row(s)", self.rows), ("image(s) in more than one split", self.cross_split),
                             ("image(s) with more than one label", self.labels),
                             ("image(s) with more than one group", self.groups)):
            if items:
                image, what = items[0]
                out.append(f"{len(items)} {title}, e.g. {image} ({what})")
        return out

    def to_dict(self) -> dict[str, list[dict[str, str]]]:
        return {k: [{"image": i, "detail": d} for i, d in getattr(self, k)]
                for k in ("rows", "cross_split", "labels", "groups")}


def _image_key(image: str) -> str:
    return os.path.normpath(image)


def find_duplicates(records: Sequence[Record]) -> Duplicates:
    """Duplicate rows, images in two splits, images with two labels or two groups (path-normalised)."""
    by_image: dict[str, list[Record]] = defaultdict(list)
    for r in records:
        by_image[_image_key(r.image)].append(r)
    rows, cross, labels, groups = [], [], [], []
    for image, rs in by_image.items():
        if len(rs) < 2:
            continue
        seen: dict[tuple[str, str, str], int] = {}
        for r in rs:
            key = (r.label, r.group, r.split)
            seen[key] = seen.get(key, 0) + 1
        rows += [(image, f"{n} times as {lab}/{grp}/{spl}") for (lab, grp, spl), n in seen.items() if n > 1]
        for kind, out in (("split", cross), ("label", labels), ("group", groups)):
            values = sorted({getattr(r, kind) for r in rs})
            if len(values) > 1:
                out.append((image, f"{kind}s {', '.join(values)}"))
    return Duplicates(tuple(rows), tuple(cross), tuple(labels), tuple(groups))


class SymlinkLoop(Exception):
    """A path whose symlinks lead back to themselves."""


def _resolved(path: Path) -> Path:
    """path.resolve(), with a symlink loop as SymlinkLoop (Python < 3.13 raises RuntimeError, 3.13 OSError ELOOP)."""
    try:
        return path.resolve()
    except (RuntimeError, OSError) as exc:
        if is_symlink_loop(exc):
            raise SymlinkLoop(str(path)) from None
        raise


def _outside_root(root: Path, image: str) -> str | None:
    """Why `image` leaves `root` (absolute, '..' or a symlink pointing outside), or None when it stays inside;
    SymlinkLoop when its symlinks (or the root's) lead back to themselves."""
    target = root / image
    if os.path.isabs(image) and not _inside(Path(os.path.normpath(target)), Path(os.path.normpath(root.absolute()))):
        return "an absolute path outside the images root"
    if not _inside(Path(os.path.normpath(root.absolute() / image)), Path(os.path.normpath(root.absolute()))):
        return "'..' leaves the images root"
    if not _inside(_resolved(target), _resolved(root)):
        return "a symlink leads outside the images root"
    return None


def _inside(path: Path, root: Path) -> bool:
    return path == root or root in path.parents


def read_manifest(path: str | os.PathLike[str], images_root: str | os.PathLike[str] | None = None,
                  allow_outside_root: bool = False) -> Manifest:
    """Read and validate a manifest CSV. Image paths are relative to `images_root` (default: its folder).

    An image path that leaves the images root ('../', an absolute path elsewhere, a symlink pointing outside)
    is refused unless `allow_outside_root`. Duplicate rows, an image in two splits and an image with two labels
    (or groups) are read, with a ManifestWarning giving the counts and an example.
    """
    p = Path(path)
    if not p.is_file():
        raise FairdeployError(f"manifest {p} not found")
    try:
        with open(p, newline="", encoding="utf-8-sig") as f:  # -sig: a BOM is not part of the first column's name
            reader = csv.DictReader(f)
            header = reader.fieldnames or []
            missing = [c for c in REQUIRED_COLUMNS if c not in header]
            if missing:
                raise FairdeployError(
                    f"{p}: missing required column(s) {', '.join(missing)}; "
                    f"a manifest needs {', '.join(REQUIRED_COLUMNS)} (found: {', '.join(header) or 'none'})"
                )
            extra_cols = tuple(c for c in header if c not in REQUIRED_COLUMNS)
            records, lines = [], []
            for line, row in enumerate(reader, start=2):
                for col in REQUIRED_COLUMNS:
                    if row.get(col) is None or not row[col].strip():
                        raise FairdeployError(f"{p}: row {line}: column {col!r} is empty")
                split = row["split"].strip()
                if split not in SPLITS:
                    raise FairdeployError(
                        f"{p}: row {line}: split {split!r} is not one of {', '.join(SPLITS)}"
                    )
                records.append(
                    Record(
                        image=row["image"].strip(),
                        label=row["label"].strip(),
                        group=row["group"].strip(),
                        split=split,
                        extra=tuple((c, row.get(c) or "") for c in extra_cols),
                    )
                )
                lines.append(line)
    except UnicodeDecodeError as exc:
        raise FairdeployError(f"{p}: not a UTF-8 CSV file") from exc
    except csv.Error as exc:
        raise FairdeployError(f"{p}: malformed CSV: {exc}") from exc
    if not records:
        raise FairdeployError(f"{p}: the manifest has no rows")
    root = Path(images_root) if images_root is not None else p.parent
    if not allow_outside_root:
        for line, record in zip(lines, records):
            try:
                why = _outside_root(root, record.image)
            except SymlinkLoop:
                raise FairdeployError(f"{p}: row {line}: image {record.image!r} is a symlink loop ({root}): "
                                      "point the link at the image file, or remove the row") from None
            if why is not None:
                raise FairdeployError(
                    f"{p}: row {line}: image {record.image!r} is {why} ({root}); "
                    "give --images-root or --allow-outside-root"
                )
    dups = find_duplicates(records)
    if dups:
        warnings.warn(f"{p}: " + "; ".join(dups.lines()), ManifestWarning, stacklevel=2)
    return Manifest(records=tuple(records), root=root, source=str(p), extra_columns=extra_cols)


def write_manifest(records: Sequence[Record], path: str | os.PathLike[str]) -> None:
    """Write records as a manifest CSV atomically; extra columns are the union over records, in order."""
    extra_cols: list[str] = []
    for r in records:
        for k, _ in r.extra:
            if k not in extra_cols:
                extra_cols.append(k)
    with atomic_path(path) as tmp, open(tmp, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow([*REQUIRED_COLUMNS, *extra_cols])
        for r in records:
            extra = dict(r.extra)
            writer.writerow([r.image, r.label, r.group, r.split, *(extra.get(c, "") for c in extra_cols)])
