"""Manifest health: support per split x class x group, missing or unreadable images, empty cells."""

from __future__ import annotations

import warnings
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from PIL import Image

from fairdeploy.data.images import ImageRefused, check_usable
from fairdeploy.data.manifest import SPLITS, Duplicates, Manifest, Record, find_duplicates


@dataclass(frozen=True)
class InspectionReport:
    """What `inspect_manifest` found; `support` holds every (split, class, group, count), zeros too."""

    source: str
    root: str
    n_records: int
    classes: tuple[str, ...]
    groups: tuple[str, ...]
    splits: tuple[str, ...]
    support: tuple[tuple[str, str, str, int], ...]
    groups_per_split: tuple[tuple[str, tuple[str, ...]], ...]
    absent: tuple[tuple[str, str, str], ...]  # (split, class, group) with no image
    missing: tuple[str, ...]  # image paths that do not exist
    unreadable: tuple[tuple[str, str], ...]  # (image path, error)
    images_checked: bool
    duplicates: Duplicates = field(default_factory=Duplicates)  # duplicate rows, images in two splits / with two labels or groups

    @property
    def ok(self) -> bool:
        """True when every image exists and (if checked) opens."""
        return not self.missing and not self.unreadable

    def count(self, split: str, label: str, group: str) -> int:
        for s, c, g, n in self.support:
            if (s, c, g) == (split, label, group):
                return n
        return 0

    def support_dict(self) -> dict[str, dict[str, dict[str, int]]]:
        """{split: {class: {group: count}}}."""
        out: dict[str, dict[str, dict[str, int]]] = {}
        for s, c, g, n in self.support:
            out.setdefault(s, {}).setdefault(c, {})[g] = n
        return out

    def to_dict(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "root": self.root,
            "records": self.n_records,
            "ok": self.ok,
            "images_checked": self.images_checked,
            "classes": list(self.classes),
            "groups": list(self.groups),
            "splits": list(self.splits),
            "support": self.support_dict(),
            "groups_per_split": {s: list(g) for s, g in self.groups_per_split},
            "absent": [{"split": s, "class": c, "group": g} for s, c, g in self.absent],
            "missing": list(self.missing),
            "unreadable": [{"path": p, "error": e} for p, e in self.unreadable],
            "duplicates": self.duplicates.to_dict(),
        }


def support_table(records: Sequence[Record]) -> tuple[tuple[str, str, str, int], ...]:
    """(split, class, group, count) for every split present x every class x every group, zeros included."""
    counts = Counter((r.split, r.label, r.group) for r in records)
    classes = sorted({r.label for r in records})
    groups = sorted({r.group for r in records})
    return tuple(
        (s, c, g, counts[(s, c, g)]) for s in _splits_present(records) for c in classes for g in groups
    )


def _splits_present(records: Sequence[Record]) -> list[str]:
    present = {r.split for r in records}
    return [s for s in SPLITS if s in present] + sorted(present - set(SPLITS))


def image_problem(path: str) -> str | None:
    """None when the file opens, verifies and decodes (JPEGs at 1/8 scale) and is not one the loaders refuse
    (fairdeploy.data.images.check_usable: too small, floating-point); otherwise the error."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)  # refused when loading too
            with Image.open(path) as im:
                im.verify()
            with Image.open(path) as im:
                check_usable(im)  # the size in the header, before draft() scales a JPEG down
                im.draft("RGB", (1, 1))  # JPEG: decode every block but at the smallest DCT scale
                im.load()
    except ImageRefused as exc:
        return f"refused: {exc}"
    except Exception as exc:  # PIL raises many types (OSError, SyntaxError, ValueError, DecompressionBomb...)
        return f"{type(exc).__name__}: {exc}"
    return None


def inspect_manifest(manifest: Manifest, check_images: bool = True) -> InspectionReport:
    """Count support and look for problems. Existence is always checked; opening only with `check_images`."""
    records = manifest.records
    support = support_table(records)
    splits = tuple(_splits_present(records))
    groups_per_split = tuple((s, tuple(sorted({r.group for r in records if r.split == s}))) for s in splits)
    missing: list[str] = []
    unreadable: list[tuple[str, str]] = []
    for record in records:
        path = manifest.path_of(record)
        if not path.is_file():
            missing.append(str(path))
        elif check_images:
            problem = image_problem(str(path))
            if problem is not None:
                unreadable.append((str(path), problem))
    return InspectionReport(
        source=manifest.source,
        root=str(manifest.root),
        n_records=len(records),
        classes=tuple(manifest.classes),
        groups=tuple(manifest.groups),
        splits=splits,
        support=support,
        groups_per_split=groups_per_split,
        absent=tuple((s, c, g) for s, c, g, n in support if n == 0),
        missing=tuple(missing),
        unreadable=tuple(unreadable),
        images_checked=check_images,
        duplicates=find_duplicates(records),
    )


__all__ = ["InspectionReport", "image_problem", "inspect_manifest", "support_table"]
