"""INT8 calibration sets: recipe (TOML), a seeded group x class balanced draw, its hash, and batch readers."""

from __future__ import annotations

import functools
import json
import os
import random
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from fairdeploy.data.loading import eval_transform
from fairdeploy.data.manifest import SPLITS, Manifest
from fairdeploy.errors import FairdeployError
from fairdeploy.export.mixed_precision import DEFAULT_MIXED_PRECISION, check_mixed_precision
from fairdeploy.export.qdq_placement import check_placement
from fairdeploy.export.quant_target import DEFAULT_TARGET, check_target, target_of
from fairdeploy.files.hashing import sha256_bytes, sha256_file
from fairdeploy.files.json_files import write_json
from fairdeploy.models.checkpoint import ModelSpec
from fairdeploy.resources import CALIBRATION, find_toml, search_folders
from fairdeploy.schema import Layer, Provenance, build, read_toml, setting

if TYPE_CHECKING:  # a pathlib.Path is one too
    from importlib.resources.abc import Traversable

CALIB_METHODS = ("minmax", "entropy", "percentile")
DEFAULT_RECIPE = "default"


@dataclass(frozen=True)
class CalibrationRecipe:
    """How to draw a calibration set: the [calibration] table of a recipe file (calibration/default.toml says what
    each key means), of an export profile and of a pipeline's [export]; every default is written here, once.

    `recipe` names the recipe file whose values come first (in a profile, a pipeline or `--calib-recipe`); the
    other keys of the table override it."""

    recipe: str = DEFAULT_RECIPE
    split: str = "train"
    size: int = 512
    method: str = "minmax"
    percentile: float = 99.99
    seed: int = 0
    batch_size: int = 16
    target: str = DEFAULT_TARGET  # the runtime the INT8 graph is for: quant_target.TARGETS (tensorrt, ort-cpu)
    placement: str | None = None  # where Q/DQ pairs go: qdq_placement.PLACEMENTS; None: the target's own
    reduce_range: bool = False  # target ort-cpu: 7-bit weights (CPUs without VNNI, if the gate needs it)
    mixed_precision: str = DEFAULT_MIXED_PRECISION  # layers kept FP32: mixed_precision.MIXED_PRECISION_MODES
    source: str = setting("<built-in defaults>", internal=True)  # the recipe file read
    # Set when the options are resolved: True while the size is the recipe file's own (no --calib-size, no size in
    # a profile or pipeline table), and then a size the data cannot fill is lowered to the largest balanced set,
    # with a warning. A size asked for (or a recipe built in code) is strict.
    fit_size: bool = setting(False, internal=True)
    requested_size: int | None = setting(None, internal=True)  # the recipe's size before it was lowered to fit

    def validate(self, origin: Callable[[str], str] | None = None) -> CalibrationRecipe:
        def where(key: str) -> str:
            return origin(f"calibration.{key}") if origin is not None else f"calibration recipe {self.source}"

        if self.split not in SPLITS:
            raise FairdeployError(f"{where('split')}: split {self.split!r} is not one of {', '.join(SPLITS)}")
        if self.split == "test":
            raise FairdeployError(f"{where('split')}: split 'test' must stay unseen; calibrate on train or val")
        if not isinstance(self.size, int) or self.size < 1:
            raise FairdeployError(f"{where('size')}: size must be a positive integer, got {self.size!r}")
        if self.method not in CALIB_METHODS:
            raise FairdeployError(f"{where('method')}: method {self.method!r} is not one of {', '.join(CALIB_METHODS)}")
        if not 50.0 < float(self.percentile) <= 100.0:
            raise FairdeployError(f"{where('percentile')}: percentile must be in (50, 100], got {self.percentile!r}")
        if not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise FairdeployError(f"{where('batch_size')}: batch_size must be a positive integer, got {self.batch_size!r}")
        check_target(self.target, where("target"))
        if self.placement is not None:
            check_placement(self.placement, where("placement"))
        if self.reduce_range and self.target != "ort-cpu":
            raise FairdeployError(f"{where('reduce_range')}: reduce_range (7-bit weights) is for target 'ort-cpu', "
                                  f"not {self.target!r}")
        check_mixed_precision(self.mixed_precision, where("mixed_precision"))
        if self.mixed_precision != "off" and self.target != "tensorrt":
            raise FairdeployError(f"{where('mixed_precision')}: mixed_precision {self.mixed_precision!r} needs "
                                  "target 'tensorrt'")
        if self.mixed_precision != "off" and self.qdq_placement != "tensorrt":
            raise FairdeployError(f"{where('mixed_precision')}: mixed_precision {self.mixed_precision!r} needs "
                                  "placement 'tensorrt'")
        return self

    @property
    def qdq_placement(self) -> str:
        """The Q/DQ placement in effect: the one given, else the target's own."""
        return self.placement or target_of(self.target).placement

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "placement": self.qdq_placement}


def default_recipe_dirs(explicit: Path | None = None) -> list[Traversable]:
    """Where recipe names are looked up (see fairdeploy.resources): `explicit`, ./calibration, the package's."""
    return search_folders(CALIBRATION, explicit)


@dataclass(frozen=True)
class RecipeFile:
    """A recipe file: one [calibration] table."""

    calibration: CalibrationRecipe = field(default_factory=CalibrationRecipe)


def recipe_layer(name: str | os.PathLike[str] | None, dirs: Sequence[Traversable] | None = None) -> Layer:
    """The recipe file `name` (default: the default recipe) as the first layer of a [calibration] table: its keys
    are CalibrationRecipe's, under [calibration]; it cannot name another recipe."""
    path = find_toml(name or DEFAULT_RECIPE, list(dirs) if dirs is not None else default_recipe_dirs(),
                     "calibration recipe")
    data = read_toml(path)
    unknown = [k for k in data if k != "calibration"]
    if unknown:
        raise FairdeployError(f"{path}: unknown key {unknown[0]!r}; a recipe file has one table, [calibration]")
    table = data.get("calibration", {})
    if isinstance(table, dict) and "recipe" in table:
        raise FairdeployError(f"{path}: [calibration] recipe: a recipe file cannot name another recipe")
    return Layer(data, str(path))


def resolve_recipe(layers: Sequence[Layer], dirs: Sequence[Traversable] | None = None) -> tuple[Layer, ...]:
    """`layers` (each {"calibration": {...}, ...}) preceded by the recipe file the last of them names."""
    name = None
    for layer in layers:
        table = layer.values.get("calibration")
        if isinstance(table, dict) and table.get("recipe") is not None:
            name = table["recipe"]
    return (recipe_layer(name, dirs), *layers)


def finish_recipe(recipe: CalibrationRecipe, provenance: Provenance, recipe_source: str) -> CalibrationRecipe:
    """Record the recipe file read, and whether the size is still the recipe's own (see fit_size)."""
    return replace(recipe, source=recipe_source,
                   fit_size=not provenance.given("calibration.size") or
                   provenance.set_by["calibration.size"].source == recipe_source)


def load_recipe(name: str | os.PathLike[str] | None = None, dirs: Sequence[Traversable] | None = None,
                **overrides: Any) -> CalibrationRecipe:
    """Load a recipe by name (from `dirs`) or path; keyword overrides that are not None win."""
    layers = resolve_recipe([Layer({"calibration": {"recipe": name, **overrides}}, "the caller")], dirs)
    tree, provenance = build(RecipeFile, layers)
    return finish_recipe(tree.calibration, provenance, layers[0].source).validate(provenance)


@dataclass(frozen=True)
class CalibrationItem:
    image: str
    label: str
    group: str
    sha256: str


@dataclass(frozen=True)
class CalibrationSet:
    """The exact images that set the INT8 scales, and the hash that identifies them."""

    items: tuple[CalibrationItem, ...]
    root: Path
    manifest: str
    recipe: CalibrationRecipe
    image_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    counts: tuple[tuple[str, str, int], ...]  # (group, class, n) in cell order
    sha256: str

    def __len__(self) -> int:
        return len(self.items)

    def to_dict(self) -> dict[str, Any]:
        return {
            "sha256": self.sha256,
            "manifest": self.manifest,
            "root": str(self.root),
            "recipe": self.recipe.to_dict(),
            "preprocessing": {"image_size": self.image_size, "mean": list(self.mean), "std": list(self.std)},
            "counts": [{"group": g, "class": c, "n": n} for g, c, n in self.counts],
            "images": [asdict(i) for i in self.items],
        }


def set_hash(items: Sequence[CalibrationItem], image_size: int, mean: Sequence[float], std: Sequence[float]) -> str:
    """SHA-256 of the image list (path, label, group, file hash, in order) and the preprocessing."""
    payload = {
        "images": [[i.image, i.label, i.group, i.sha256] for i in items],
        "preprocessing": [int(image_size), [float(m) for m in mean], [float(s) for s in std]],
    }
    return sha256_bytes(json.dumps(payload, sort_keys=True, separators=(",", ":")).encode())


def cell_quotas(size: int, cells: Sequence[tuple[str, str]]) -> dict[tuple[str, str], int]:
    """size // cells images per cell; the first size % cells cells (in the given order) get one more."""
    base, extra = divmod(size, len(cells))
    return {cell: base + (1 if i < extra else 0) for i, cell in enumerate(cells)}


def largest_balanced_size(counts: Sequence[int], at_most: int) -> int:
    """The largest size <= at_most whose cell_quotas every cell can fill (counts in cell order), with at least
    one image in every cell; 0 when there is none."""
    n = len(counts)
    for size in range(min(at_most, min(counts) * n + n - 1), n - 1, -1):
        base, extra = divmod(size, n)
        if all(c >= base + (1 if i < extra else 0) for i, c in enumerate(counts)):
            return size
    return 0


def _cells_of(manifest: Manifest, spec: ModelSpec, split: str
              ) -> tuple[list[tuple[str, str]], dict[tuple[str, str], list[tuple[str, str, str]]]]:
    groups, classes = list(spec.groups), list(spec.classes)
    if not groups:
        raise FairdeployError(
            f"model {spec.arch} has no groups in model.json; a group-balanced calibration set needs them"
        )
    cells = [(g, c) for g in groups for c in classes]
    by_cell: dict[tuple[str, str], list[tuple[str, str, str]]] = {cell: [] for cell in cells}
    found = False
    for row, r in enumerate(manifest.records, start=2):
        if r.split != split:
            continue
        found = True
        if r.group not in groups:
            raise FairdeployError(f"{manifest.source}: row {row}: group {r.group!r} is not one of the model's "
                                  f"groups ({', '.join(groups)})")
        if r.label not in classes:
            raise FairdeployError(f"{manifest.source}: row {row}: label {r.label!r} is not one of the model's "
                                  f"classes ({', '.join(classes)})")
        by_cell[(r.group, r.label)].append((r.image, r.label, r.group))
    if not found:
        raise FairdeployError(f"{manifest.source}: split {split!r} is empty; calibration draws from it")
    return cells, by_cell


def fit_calibration_size(manifest: Manifest, spec: ModelSpec, recipe: CalibrationRecipe) -> CalibrationRecipe:
    """Check that recipe.size fits the data, from the manifest alone (no image is read, no model loaded).

    Fits: the recipe unchanged. Does not fit and the size came from a recipe file (fit_size): the recipe
    lowered to the largest group x class balanced size the split allows, with a warning. Otherwise (an
    explicit --calib-size, or a cell with no image at all): one FairdeployError naming the short cell."""
    recipe.validate()
    cells, by_cell = _cells_of(manifest, spec, recipe.split)
    quotas = cell_quotas(recipe.size, cells)
    short = [(cell, len(by_cell[cell]), quotas[cell]) for cell in cells if len(by_cell[cell]) < quotas[cell]]
    if not short:
        return recipe
    (g, c), have, need = min(short, key=lambda item: item[1])  # the smallest cell (the first of equals)
    smallest = min(len(v) for v in by_cell.values())
    fitted = largest_balanced_size([len(by_cell[cell]) for cell in cells], recipe.size)
    what = (f"{manifest.source}: too few {recipe.split} images of group {g!r}, class {c!r} for a balanced "
            f"calibration set: {have}, need {need} ({recipe.size} images over {len(cells)} group x class cells)")
    if recipe.fit_size and fitted > 0:
        warnings.warn(f"{what}; calibrating on {fitted} images instead, the largest balanced set this split "
                      f"allows (give --calib-size to choose)", stacklevel=2)
        return replace(recipe, size=fitted, requested_size=recipe.size)
    if fitted == 0:
        empty = next((cell for cell in cells if not by_cell[cell]), cells[0])
        raise FairdeployError(f"{manifest.source}: no {recipe.split} images of group {empty[0]!r}, class "
                              f"{empty[1]!r}; a group x class balanced calibration set needs at least one per cell")
    raise FairdeployError(
        f"{what}; use --calib-size {smallest * len(cells)} or less"
        + (f" ({len(short)} cells are short)" if len(short) > 1 else "")
    )


def draw_calibration_set(manifest: Manifest, spec: ModelSpec, recipe: CalibrationRecipe) -> CalibrationSet:
    """Draw recipe.size images from recipe.split, the same number per (group, class) cell of the model
    (a recipe-file size the data cannot fill is lowered first, see fit_calibration_size)."""
    recipe = fit_calibration_size(manifest, spec, recipe)
    cells, by_cell = _cells_of(manifest, spec, recipe.split)
    quotas = cell_quotas(recipe.size, cells)
    chosen: list[CalibrationItem] = []
    counts = []
    for cell in cells:
        rows = sorted(by_cell[cell])
        random.Random(f"{recipe.seed}:{cell[0]}:{cell[1]}").shuffle(rows)
        for image, label, group in rows[: quotas[cell]]:
            path = manifest.root / image
            if not path.is_file():
                raise FairdeployError(f"{manifest.source}: calibration image {path} not found")
            chosen.append(CalibrationItem(image=image, label=label, group=group, sha256=sha256_file(path)))
        counts.append((cell[0], cell[1], quotas[cell]))
    return CalibrationSet(
        items=tuple(chosen), root=manifest.root, manifest=manifest.source, recipe=recipe,
        image_size=spec.image_size, mean=tuple(spec.mean), std=tuple(spec.std), counts=tuple(counts),
        sha256=set_hash(chosen, spec.image_size, spec.mean, spec.std),
    )


def write_calibration_json(path: str | os.PathLike[str], cal: CalibrationSet) -> None:
    write_json(path, cal.to_dict())


def even_batch_size(n: int, at_most: int) -> int:
    """The largest batch size <= at_most that divides n: onnxruntime's histogram calibrators (entropy,
    percentile) stack per-batch outputs and fail on a short last batch, and dropping images would make
    the recorded set differ from the one used."""
    return max(b for b in range(1, max(1, min(n, at_most)) + 1) if n % b == 0)


def calibration_batches(cal: CalibrationSet, batch_size: int | None = None) -> Iterator[np.ndarray]:
    """The set as eval_transform'd float32 batches (N, 3, H, W), in the recorded order."""
    from fairdeploy.data.loading import UNREADABLE_IMAGE, open_rgb, why_unreadable

    transform = eval_transform(cal.image_size, cal.mean, cal.std)
    bs = batch_size or cal.recipe.batch_size
    for start in range(0, len(cal.items), bs):
        batch = []
        for item in cal.items[start : start + bs]:
            path = cal.root / item.image
            try:  # the loaders' decoder: a decompression bomb is refused here too
                batch.append(transform(open_rgb(path)).numpy())
            except UNREADABLE_IMAGE:
                raise FairdeployError(f"calibration image {path} could not be read ({why_unreadable(path)})") from None
        yield np.stack(batch).astype(np.float32)


@functools.cache
def batch_reader_class():
    """The onnxruntime CalibrationDataReader over a re-iterable batch source: `make_batches()` gives a fresh
    iterator of float32 (N, 3, H, W) arrays at each rewind (class built on first use)."""
    from onnxruntime.quantization import CalibrationDataReader

    from fairdeploy.artifact.metadata import INPUT_NAME

    class BatchReader(CalibrationDataReader):
        """Feeds batches to onnxruntime.quantization as {"input": batch} dicts; counts what it handed out."""

        def __init__(self, make_batches: Callable[[], Iterable[np.ndarray]]):
            self._make_batches = make_batches
            self.batches_read = 0
            self.rewind()

        def get_next(self) -> dict[str, np.ndarray] | None:
            batch = next(self._it, None)
            if batch is None:
                return None
            self.batches_read += 1
            return {INPUT_NAME: np.ascontiguousarray(batch, dtype=np.float32)}

        def rewind(self) -> None:
            self._it = iter(self._make_batches())

    return BatchReader


def reader_class():
    """The onnxruntime CalibrationDataReader over a CalibrationSet (class built on first use)."""

    class CalibrationSetReader(batch_reader_class()):
        def __init__(self, cal: CalibrationSet, batch_size: int | None = None):
            self.cal = cal
            self.batch_size = even_batch_size(len(cal), batch_size or cal.recipe.batch_size)
            super().__init__(lambda: calibration_batches(self.cal, self.batch_size))

    return CalibrationSetReader
