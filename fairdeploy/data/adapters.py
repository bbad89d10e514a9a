"""Dataset adapters: turn Fitzpatrick 17k, ISIC 2019, HAM10000 or a plain CSV into manifest records."""

from __future__ import annotations

import csv
import math
import os
import warnings
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fairdeploy.data.manifest import SPLITS, Record
from fairdeploy.data.splits import DEFAULT_FRACTIONS, assign_splits
from fairdeploy.errors import FairdeployError

FORMATS = ("fitzpatrick17k", "isic2019", "ham10000", "csv")
ATTRIBUTES = ("sex", "age")
GROUPINGS = ("binary", "six")
UNKNOWN_POLICIES = ("drop", "as-dark")
FITZPATRICK_LABEL_COLUMNS = ("label", "nine_partition_label", "three_partition_label")
ISIC2019_CLASSES = ("MEL", "NV", "BCC", "AK", "BKL", "DF", "VASC", "SCC", "UNK")
SEXES = ("female", "male")
DEFAULT_AGE_THRESHOLD = 60.0
DEFAULT_IMAGE_EXT = ".jpg"  # the image files' extension in the Fitzpatrick 17k, ISIC 2019 and HAM10000 tables

# Reasons a row is dropped or recoded: constants so that reports and tests agree on the wording.
DROP_UNKNOWN_SKIN_TYPE = "fitzpatrick_scale is -1 (unknown)"
RECODE_UNKNOWN_AS_DARK = "fitzpatrick_scale -1 (unknown) counted as dark"
DROP_MISSING_SEX = "sex blank or unknown"
DROP_MISSING_AGE = "age blank"
DROP_MISSING_GROUP = "group blank"
DROP_NOT_IN_METADATA = "image not in the metadata CSV"


class AdapterWarning(UserWarning):
    """A dataset's tables read, but part of them was left out silently otherwise (e.g. metadata rows without a
    ground-truth row)."""


@dataclass(frozen=True)
class AdapterResult:
    """Records from one dataset (split "" until assigned) and what happened to the rows read.

    `report` holds: format, source, rows_read, rows_kept, dropped {reason: n}, recoded {reason: n},
    group_by (a description), label_column, classes {name: n}, groups {name: n}, plus per-format keys
    (unknown_policy for fitzpatrick17k, ground_truth for isic2019, splits once assigned).
    """

    records: tuple[Record, ...]
    report: dict[str, Any]

    @property
    def rows_read(self) -> int:
        return int(self.report["rows_read"])

    @property
    def dropped(self) -> dict[str, int]:
        return dict(self.report["dropped"])


# ---------------------------------------------------------------------------------------------- helpers


def _choice(value: str, choices: Sequence[str], what: str) -> str:
    if value not in choices:
        raise FairdeployError(f"unknown {what} {value!r}; choose one of {', '.join(choices)}")
    return value


def _read_table(
    path: str | os.PathLike[str], required: Sequence[str], what: str
) -> list[tuple[int, dict[str, str]]]:
    """Read a CSV into (line number, row) pairs, with every value a stripped string ("" when absent)."""
    p = Path(path)
    if not p.is_file():
        raise FairdeployError(f"{what} {p} not found")
    try:
        with open(p, newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            header = [h.strip() for h in (reader.fieldnames or [])]
            reader.fieldnames = header
            missing = [c for c in required if c not in header]
            if missing:
                raise FairdeployError(
                    f"{p}: missing required column(s) {', '.join(missing)}; the {what} needs "
                    f"{', '.join(required)} (found: {', '.join(header) or 'none'})"
                )
            rows = [
                (line, {k: (v or "").strip() for k, v in row.items() if isinstance(k, str)})
                for line, row in enumerate(reader, start=2)
            ]
    except UnicodeDecodeError as exc:
        raise FairdeployError(f"{p}: not a UTF-8 CSV file") from exc
    except csv.Error as exc:
        raise FairdeployError(f"{p}: malformed CSV: {exc}") from exc
    if not rows:
        raise FairdeployError(f"{p}: the {what} has no rows")
    return rows


def _require(p: str | os.PathLike[str], line: int, row: dict[str, str], column: str) -> str:
    value = row.get(column, "")
    if not value:
        raise FairdeployError(f"{p}: row {line}: column {column!r} is empty")
    return value


def _normalise_ext(image_ext: str) -> str:
    ext = image_ext.strip()
    if ext and not ext.startswith("."):
        ext = "." + ext
    if "/" in ext or "\\" in ext:
        raise FairdeployError(f"image extension {image_ext!r} must not contain a path separator")
    return ext


def _image_path(name: str, image_prefix: str, image_ext: str = "") -> str:
    """`<prefix>/<name><ext>` with forward slashes; the prefix is a folder relative to the images root."""
    prefix = image_prefix.strip().replace("\\", "/").rstrip("/")
    file_name = f"{name}{image_ext}"
    return f"{prefix}/{file_name}" if prefix else file_name


def _check_threshold(age_threshold: float) -> float:
    if not math.isfinite(age_threshold) or age_threshold <= 0:
        raise FairdeployError(f"age threshold must be a positive number of years (got {age_threshold})")
    return float(age_threshold)


def _age_group(age: float, threshold: float) -> str:
    return f"<{threshold:g}" if age < threshold else f">={threshold:g}"


@dataclass(frozen=True)
class _ByAttribute:
    """Groups by sex or by age band (below / at or above a threshold), read from a table's named columns."""

    attribute: str
    threshold: float
    sex_column: str
    age_column: str

    @classmethod
    def checked(cls, attribute: str, age_threshold: float, sex_column: str, age_column: str) -> _ByAttribute:
        _choice(attribute, ATTRIBUTES, "attribute")
        return cls(attribute, _check_threshold(age_threshold), sex_column, age_column)

    def group(self, p: Path, line: int, row: dict[str, str]) -> tuple[str | None, str]:
        """The group of one row, or (None, drop reason) when the value is missing."""
        if self.attribute == "sex":
            sex = row.get(self.sex_column, "").lower()
            if sex in ("", "unknown"):
                return None, DROP_MISSING_SEX
            if sex not in SEXES:
                raise FairdeployError(
                    f"{p}: row {line}: {self.sex_column} {row[self.sex_column]!r} is not one of "
                    f"{', '.join(SEXES)} (blank or 'unknown' rows are dropped)"
                )
            return sex, ""
        raw = row.get(self.age_column, "")
        if not raw:
            return None, DROP_MISSING_AGE
        try:
            age = float(raw)
        except ValueError:
            age = math.nan
        if not math.isfinite(age) or age < 0:
            raise FairdeployError(f"{p}: row {line}: {self.age_column} {raw!r} is not a non-negative number of years")
        return _age_group(age, self.threshold), ""

    def description(self) -> str:
        if self.attribute == "sex":
            return f"{self.sex_column} (female, male)"
        return f"{self.age_column} (<{self.threshold:g}, >={self.threshold:g})"


def _check_unique_images(records: Sequence[Record], lines: Sequence[int], p: Path) -> None:
    seen: dict[str, int] = {}
    for record, line in zip(records, lines):
        if record.image in seen:
            raise FairdeployError(
                f"{p}: row {line}: image {record.image!r} already appears in row {seen[record.image]}"
            )
        seen[record.image] = line


class _Kept:
    """What an adapter keeps of a table (records, each with its CSV line) and drops (a count per reason)."""

    def __init__(self, source: Path, image_ext: str = "", image_prefix: str = "") -> None:
        self.source, self.image_ext, self.image_prefix = source, image_ext, image_prefix
        self.records: list[Record] = []
        self.lines: list[int] = []
        self.dropped: Counter[str] = Counter()

    def keep(self, line: int, name: str, label: str, group: str, split: str = "",
             extra: tuple[tuple[str, str], ...] = ()) -> None:
        """A record for the image `name` (`<prefix>/<name><ext>`)."""
        image = _image_path(name, self.image_prefix, self.image_ext)
        self.records.append(Record(image=image, label=label, group=group, split=split, extra=extra))
        self.lines.append(line)

    def drop(self, reason: str) -> None:
        self.dropped[reason] += 1

    def keep_lesion(self, by: _ByAttribute, p: Path, line: int, row: dict[str, str], name: str, label: str) -> None:
        """Keep the image of a sex/age table row in its attribute group, its lesion_id kept as an extra column;
        drop it (counted by reason) when the attribute is missing."""
        group, reason = by.group(p, line, row)
        if group is None:
            self.drop(reason)
        else:
            self.keep(line, name, label, group, extra=(("lesion_id", row.get("lesion_id", "")),))

    def result(self, rows_read: int, **info: Any) -> AdapterResult:
        """Check the kept records and build the report (shared keys first, then the adapter's own `info`)."""
        records, p = self.records, self.source
        _check_unique_images(records, self.lines, p)
        if not records:
            reasons = ", ".join(f"{reason}: {n}" for reason, n in self.dropped.items()) or "none"
            raise FairdeployError(f"{p}: no rows left after dropping ({reasons})")
        recoded: dict[str, int] = info.pop("recoded", {})
        report: dict[str, Any] = {
            "format": info.pop("format"),
            "source": str(p),
            **info,
            "rows_read": rows_read,
            "rows_kept": len(records),
            "dropped": dict(self.dropped),
            "recoded": recoded,
            "classes": dict(sorted(Counter(r.label for r in records).items())),
            "groups": dict(sorted(Counter(r.group for r in records).items())),
        }
        return AdapterResult(records=tuple(records), report=report)


# --------------------------------------------------------------------------------------------- adapters


def from_fitzpatrick17k(
    metadata: str | os.PathLike[str],
    *,
    label_column: str = "label",
    grouping: str = "binary",
    unknown: str = "drop",
    image_ext: str = DEFAULT_IMAGE_EXT,
    image_prefix: str = "",
) -> AdapterResult:
    """Fitzpatrick 17k: image `<md5hash><ext>`, groups light (1-3) / dark (4-6) or "1".."6".

    `unknown` decides what happens to skin type -1: `drop` (default) or `as-dark` (binary grouping only);
    `report["unknown_policy"]` says how many rows it touched.
    """
    _choice(label_column, FITZPATRICK_LABEL_COLUMNS, "fitzpatrick17k label column")
    _choice(grouping, GROUPINGS, "grouping")
    _choice(unknown, UNKNOWN_POLICIES, "unknown skin type policy")
    if unknown == "as-dark" and grouping != "binary":
        raise FairdeployError(
            f"unknown skin type policy 'as-dark' needs grouping 'binary' (grouping {grouping!r} has no "
            "'dark' group); use policy 'drop'"
        )
    p = Path(metadata)
    kept = _Kept(p, _normalise_ext(image_ext), image_prefix)
    rows = _read_table(p, ("md5hash", "fitzpatrick_scale", label_column), "fitzpatrick17k metadata CSV")
    touched = 0
    for line, row in rows:
        md5 = _require(p, line, row, "md5hash")
        label = _require(p, line, row, label_column)
        raw = row.get("fitzpatrick_scale", "")
        try:
            scale_f = float(raw)
        except ValueError:
            scale_f = math.nan
        if scale_f not in (-1, 1, 2, 3, 4, 5, 6):
            raise FairdeployError(
                f"{p}: row {line}: fitzpatrick_scale {raw!r} is not one of -1 (unknown), 1, 2, 3, 4, 5, 6"
            )
        scale = int(scale_f)
        if scale == -1:
            touched += 1
            if unknown == "drop":
                kept.drop(DROP_UNKNOWN_SKIN_TYPE)
                continue
            group = "dark"
        elif grouping == "binary":
            group = "light" if scale <= 3 else "dark"
        else:
            group = str(scale)
        kept.keep(line, md5, label, group, extra=(("fitzpatrick_scale", str(scale)),))
    recoded = {RECODE_UNKNOWN_AS_DARK: touched} if unknown == "as-dark" and touched else {}
    group_by = "fitzpatrick_scale " + ("(1-3 light, 4-6 dark)" if grouping == "binary" else "(1..6)")
    return kept.result(
        len(rows),
        format="fitzpatrick17k",
        label_column=label_column,
        group_by=group_by,
        unknown_policy={"policy": unknown, "rows": touched},
        recoded=recoded,
    )


def from_isic2019(ground_truth: str | os.PathLike[str], metadata: str | os.PathLike[str], *, attribute: str = "sex",
                  age_threshold: float = DEFAULT_AGE_THRESHOLD, image_ext: str = DEFAULT_IMAGE_EXT,
                  image_prefix: str = "") -> AdapterResult:
    """ISIC 2019: one-hot ground truth joined on `image` with the metadata; group by sex or age band.

    A ground-truth row without a metadata row is dropped and counted; metadata rows without a ground-truth row
    are counted (report key `metadata_without_ground_truth`) and warned about (AdapterWarning), since a
    ground-truth table covering part of the metadata silently shrinks the dataset. `lesion_id` is kept as an
    extra column.
    """
    by = _ByAttribute.checked(attribute, age_threshold, sex_column="sex", age_column="age_approx")
    gt_path, meta_path = Path(ground_truth), Path(metadata)
    kept = _Kept(gt_path, _normalise_ext(image_ext), image_prefix)
    gt_rows = _read_table(gt_path, ("image", *ISIC2019_CLASSES), "isic2019 ground-truth CSV")
    meta_rows = _read_table(meta_path, ("image", "age_approx", "lesion_id", "sex"), "isic2019 metadata CSV")
    meta: dict[str, tuple[int, dict[str, str]]] = {}
    for line, row in meta_rows:
        image = _require(meta_path, line, row, "image")
        if image in meta:
            raise FairdeployError(
                f"{meta_path}: row {line}: image {image!r} already appears in row {meta[image][0]}"
            )
        meta[image] = (line, row)
    for line, row in gt_rows:
        image = _require(gt_path, line, row, "image")
        hot: list[str] = []
        for cls in ISIC2019_CLASSES:
            raw = row.get(cls, "")
            try:
                value = float(raw)
            except ValueError:
                value = math.nan
            if value not in (0.0, 1.0):
                raise FairdeployError(f"{gt_path}: row {line}: column {cls!r} value {raw!r} is not 0 or 1")
            if value == 1.0:
                hot.append(cls)
        if len(hot) != 1:
            raise FairdeployError(
                f"{gt_path}: row {line}: image {image!r} has {len(hot)} classes set to 1 "
                f"({', '.join(hot) or 'none'}); exactly one of {', '.join(ISIC2019_CLASSES)} must be 1"
            )
        if image not in meta:
            kept.drop(DROP_NOT_IN_METADATA)
            continue
        meta_line, info = meta[image]
        kept.keep_lesion(by, meta_path, meta_line, info, image, hot[0])
    gt_images = {row.get("image", "") for _, row in gt_rows}
    uncovered = [image for image in meta if image not in gt_images]
    if uncovered:
        warnings.warn(
            f"{gt_path}: the ground truth covers {len(meta) - len(uncovered)} of the {len(meta)} rows of "
            f"{meta_path}; {len(uncovered)} metadata rows have no ground-truth row and are left out "
            f"(e.g. {uncovered[0]!r})", AdapterWarning, stacklevel=2)
    return kept.result(
        len(gt_rows),
        format="isic2019",
        ground_truth=str(gt_path),
        metadata=str(meta_path),
        metadata_rows=len(meta),
        metadata_without_ground_truth=len(uncovered),
        label_column="one-hot " + "/".join(ISIC2019_CLASSES),
        group_by=by.description(),
    )


def from_ham10000(metadata: str | os.PathLike[str], *, attribute: str = "sex",
                  age_threshold: float = DEFAULT_AGE_THRESHOLD, image_ext: str = DEFAULT_IMAGE_EXT,
                  image_prefix: str = "") -> AdapterResult:
    """HAM10000: label `dx`, image `<prefix>/<image_id><ext>`, group by sex or age band; keeps `lesion_id`."""
    by = _ByAttribute.checked(attribute, age_threshold, sex_column="sex", age_column="age")
    p = Path(metadata)
    kept = _Kept(p, _normalise_ext(image_ext), image_prefix)
    rows = _read_table(p, ("lesion_id", "image_id", "dx", "age", "sex"), "ham10000 metadata CSV")
    for line, row in rows:
        image_id = _require(p, line, row, "image_id")
        label = _require(p, line, row, "dx")
        kept.keep_lesion(by, p, line, row, image_id, label)
    return kept.result(len(rows), format="ham10000", label_column="dx", group_by=by.description())


def from_csv(
    path: str | os.PathLike[str],
    *,
    image_column: str,
    label_column: str,
    group_column: str,
    split_column: str | None = None,
    id_column: str | None = None,
    image_prefix: str = "",
) -> AdapterResult:
    """Any CSV with user-named columns; rows with a blank group are dropped and counted.

    With `split_column` the splits are taken from it (values train/val/test); `id_column` is kept as an
    extra column of the same name (for grouped splits).
    """
    p = Path(path)
    named = {"image": image_column, "label": label_column, "group": group_column}
    if split_column:
        named["split"] = split_column
    if id_column:
        named["id"] = id_column
    for role, column in named.items():
        if not column or not column.strip():
            raise FairdeployError(f"the {role} column name is empty")
    required = list(dict.fromkeys(c.strip() for c in named.values()))
    rows = _read_table(p, required, "CSV")
    kept = _Kept(p, "", image_prefix)
    for line, row in rows:
        image = _require(p, line, row, image_column.strip())
        label = _require(p, line, row, label_column.strip())
        group = row.get(group_column.strip(), "")
        split = ""
        if split_column:
            split = _require(p, line, row, split_column.strip()).lower()
            if split not in SPLITS:
                raise FairdeployError(
                    f"{p}: row {line}: {split_column.strip()} {row[split_column.strip()]!r} is not one of "
                    f"{', '.join(SPLITS)}"
                )
        if not group:
            kept.drop(DROP_MISSING_GROUP)
            continue
        extra = ((id_column.strip(), row.get(id_column.strip(), "")),) if id_column else ()
        kept.keep(line, image, label, group, split, extra)
    info: dict[str, Any] = {
        "format": "csv",
        "label_column": label_column.strip(),
        "group_by": group_column.strip(),
    }
    if split_column:
        info["splits"] = f"from column {split_column.strip()!r}"
    return kept.result(len(rows), **info)


# ------------------------------------------------------------------------------------------------ prepare

# Which formats each optional setting of `prepare` applies to; a setting given for another format is an error.
_APPLIES_TO: dict[str, tuple[str, ...]] = {
    "ground_truth": ("isic2019",),
    "attribute": ("isic2019", "ham10000"),
    "age_threshold": ("isic2019", "ham10000"),
    "label_column": ("fitzpatrick17k", "csv"),
    "grouping": ("fitzpatrick17k",),
    "unknown": ("fitzpatrick17k",),
    "image_column": ("csv",),
    "group_column": ("csv",),
    "split_column": ("csv",),
    "id_column": ("csv",),
    "image_ext": ("fitzpatrick17k", "isic2019", "ham10000"),
}


def prepare(
    fmt: str,
    metadata: str | os.PathLike[str],
    *,
    ground_truth: str | os.PathLike[str] | None = None,
    attribute: str | None = None,
    age_threshold: float | None = None,
    label_column: str | None = None,
    grouping: str | None = None,
    unknown: str | None = None,
    image_column: str | None = None,
    group_column: str | None = None,
    split_column: str | None = None,
    id_column: str | None = None,
    image_ext: str | None = None,
    image_prefix: str = "",
    fractions: Sequence[float] = DEFAULT_FRACTIONS,
    seed: int = 0,
) -> AdapterResult:
    """Run one adapter and assign splits (grouped by lesion id where the format has one).

    Settings left as None take the adapter's default; a setting that the format does not use is an error.
    Splits come from `split_column` for the csv format when given, otherwise from `assign_splits`.
    """
    _choice(fmt, FORMATS, "format")
    given = {
        "ground_truth": ground_truth,
        "attribute": attribute,
        "age_threshold": age_threshold,
        "label_column": label_column,
        "grouping": grouping,
        "unknown": unknown,
        "image_column": image_column,
        "group_column": group_column,
        "split_column": split_column,
        "id_column": id_column,
        "image_ext": image_ext,
    }
    for name, value in given.items():
        if value is not None and fmt not in _APPLIES_TO[name]:
            raise FairdeployError(
                f"{name.replace('_', '-')} does not apply to format {fmt!r}; "
                f"it is used by {', '.join(_APPLIES_TO[name])}"
            )
    if age_threshold is not None and attribute != "age":
        raise FairdeployError(
            f"age-threshold only applies with attribute 'age' (attribute is {attribute or 'sex'!r})"
        )
    ext = DEFAULT_IMAGE_EXT if image_ext is None else image_ext
    attr = attribute or "sex"
    threshold = DEFAULT_AGE_THRESHOLD if age_threshold is None else age_threshold
    id_for_split: str | None
    if fmt == "fitzpatrick17k":
        result = from_fitzpatrick17k(
            metadata,
            label_column=label_column or "label",
            grouping=grouping or "binary",
            unknown=unknown or "drop",
            image_ext=ext,
            image_prefix=image_prefix,
        )
        id_for_split = None
    elif fmt == "isic2019":
        if ground_truth is None:
            raise FairdeployError("format 'isic2019' needs the ground-truth CSV (image,MEL,NV,...,UNK)")
        result = from_isic2019(
            ground_truth,
            metadata,
            attribute=attr,
            age_threshold=threshold,
            image_ext=ext,
            image_prefix=image_prefix,
        )
        id_for_split = "lesion_id"
    elif fmt == "ham10000":
        result = from_ham10000(
            metadata, attribute=attr, age_threshold=threshold, image_ext=ext, image_prefix=image_prefix
        )
        id_for_split = "lesion_id"
    else:
        if not (image_column and label_column and group_column):
            missing = [n for n, v in (("image-column", image_column), ("label-column", label_column),
                                      ("group-column", group_column)) if not v]
            raise FairdeployError(f"format 'csv' needs {', '.join(missing)} (the names of those columns)")
        result = from_csv(
            metadata,
            image_column=image_column,
            label_column=label_column,
            group_column=group_column,
            split_column=split_column,
            id_column=id_column,
            image_prefix=image_prefix,
        )
        if split_column:
            return result
        id_for_split = id_column.strip() if id_column else None
    records = assign_splits(result.records, fractions=fractions, seed=seed, id_column=id_for_split)
    fr = ", ".join(f"{s} {f:g}" for s, f in zip(SPLITS, fractions))
    how = f"assigned with seed {seed} ({fr}), stratified by label x group"
    if id_for_split:
        how += f", all images of one {id_for_split} in one split"
    return AdapterResult(records=tuple(records), report={**result.report, "splits": how})


__all__ = [
    "ATTRIBUTES",
    "FITZPATRICK_LABEL_COLUMNS",
    "FORMATS",
    "GROUPINGS",
    "ISIC2019_CLASSES",
    "UNKNOWN_POLICIES",
    "AdapterResult",
    "from_csv",
    "from_fitzpatrick17k",
    "from_ham10000",
    "from_isic2019",
    "prepare",
]
