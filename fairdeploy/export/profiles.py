"""Export options: target profiles (TOML: ./export, else the package's; see fairdeploy.resources) merged with
command-line flags."""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fairdeploy.artifact.metadata import PRECISIONS
from fairdeploy.errors import FairdeployError
from fairdeploy.export.calibration import CALIB_METHODS, read_toml
from fairdeploy.export.mixed_precision import check_mixed_precision
from fairdeploy.export.onnx_export import DEFAULT_OPSET, check_opset
from fairdeploy.export.qdq_placement import check_placement
from fairdeploy.resources import PROFILES, find_toml, search_folders, toml_names

if TYPE_CHECKING:  # a pathlib.Path is one too
    from importlib.resources.abc import Traversable

MIB = 1 << 20


@dataclass(frozen=True)
class TrtOptions:
    """TensorRT builder settings (see export/README.md for each)."""

    enabled: bool = False
    min_batch: int = 1
    opt_batch: int = 8
    max_batch: int = 32
    workspace_mib: int = 2048
    optimization_level: int = 3  # builder_optimization_level, 0..5 (TensorRT's default is 3)
    timing_cache: str | None = "timing.cache"  # relative paths are inside the export directory
    sparse_weights: bool = False  # BuilderFlag.SPARSE_WEIGHTS for 2:4 models
    dla_core: int | None = None  # Jetson AGX Orin: 0 or 1; None (-1 in a profile or flag) = GPU only
    gpu_fallback: bool = True  # with DLA: layers DLA cannot run go to the GPU
    implicit_int8: bool = False  # TensorRT 10.x only: IInt8EntropyCalibrator2 on the fp32 ONNX

    def validate(self, where: str) -> TrtOptions:
        if not 1 <= self.min_batch <= self.opt_batch <= self.max_batch:
            raise FairdeployError(
                f"{where}: batch sizes must satisfy 1 <= min <= opt <= max, got "
                f"min {self.min_batch}, opt {self.opt_batch}, max {self.max_batch}"
            )
        if self.workspace_mib < 1:
            raise FairdeployError(f"{where}: workspace must be at least 1 MiB, got {self.workspace_mib}")
        if not 0 <= self.optimization_level <= 5:
            raise FairdeployError(f"{where}: builder optimisation level must be 0..5, got {self.optimization_level}")
        if self.dla_core is not None and self.dla_core < 0:
            raise FairdeployError(f"{where}: DLA core must be 0 or more, got {self.dla_core}")
        if self.dla_core is not None and self.min_batch != self.max_batch:
            # TensorRT's DLA restrictions: "DLA does not support dynamic dimensions, so the profile's
            # min, max, and opt values must be equal for wildcard dimensions."
            raise FairdeployError(
                f"{where}: DLA needs a static batch (min = opt = max), got {self.min_batch}/{self.opt_batch}/"
                f"{self.max_batch}; set --min-batch/--opt-batch/--max-batch to one value"
            )
        return self


@dataclass(frozen=True)
class ExportOptions:
    """Everything `fairdeploy export` does, after a profile and the flags are merged.

    `precisions` are the ONNX files written: fp32 is always added (fp16 and int8 derive from it, and it is
    every self-check's reference). `engine_precisions` are the TensorRT engines built: only the precisions
    asked for (None = those given in `precisions`), so `--precision int8` builds no fp32 engine.
    """

    precisions: tuple[str, ...] = ("fp32",)
    engine_precisions: tuple[str, ...] | None = None
    opset: int = DEFAULT_OPSET
    simplify: bool = True
    check_batch_sizes: tuple[int, ...] = (1, 8)
    fp32_atol: float = 1e-3
    calib_recipe: str | None = None  # name in calibration/ or a .toml path; None = default
    calib_size: int | None = None  # None = the recipe's
    calib_method: str | None = None
    calib_split: str | None = None
    int8_placement: str | None = None  # Q/DQ placement (qdq_placement.PLACEMENTS); None = the recipe's
    int8_mixed: str | None = None  # mixed precision (mixed_precision.MIXED_PRECISION_MODES); None = the recipe's
    trt: TrtOptions = field(default_factory=TrtOptions)
    profile: str | None = None  # the profile file applied, if any
    description: str = ""

    def __post_init__(self) -> None:
        given = tuple(self.precisions)
        engines = tuple(self.engine_precisions) if self.engine_precisions else given

        def ordered(xs: Iterable[str]) -> tuple[str, ...]:  # canonical order; unknown names kept for validate()
            xs = tuple(xs)
            return tuple(p for p in PRECISIONS if p in xs) + tuple(dict.fromkeys(p for p in xs if p not in PRECISIONS))

        object.__setattr__(self, "engine_precisions", ordered(engines) or ("fp32",))
        object.__setattr__(self, "precisions", ordered((*given, *engines, "fp32")))

    def validate(self) -> ExportOptions:
        where = f"profile {self.profile}" if self.profile else "export options"
        for p in (*self.precisions, *(self.engine_precisions or ())):
            if p not in PRECISIONS:
                raise FairdeployError(f"{where}: unknown precision {p!r}; choose one of {', '.join(PRECISIONS)}")
        check_opset(self.opset)
        if not self.check_batch_sizes or any(b < 1 for b in self.check_batch_sizes):
            raise FairdeployError(f"{where}: check batch sizes must be positive, got {list(self.check_batch_sizes)}")
        if self.calib_method is not None and self.calib_method not in CALIB_METHODS:
            raise FairdeployError(
                f"{where}: calibration method {self.calib_method!r} is not one of {', '.join(CALIB_METHODS)}"
            )
        if self.int8_placement is not None:
            check_placement(self.int8_placement, where)
        if self.int8_mixed is not None:
            check_mixed_precision(self.int8_mixed, where)
        if self.calib_size is not None and self.calib_size < 1:
            raise FairdeployError(f"{where}: calibration size must be positive, got {self.calib_size}")
        self.trt.validate(where)
        if self.trt.enabled and self.trt.implicit_int8 and "int8" not in (self.engine_precisions or ()):
            raise FairdeployError(f"{where}: the implicit INT8 calibrator builds the int8 engine; add --precision int8")
        return self

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def parse_precisions(values: Iterable[str]) -> tuple[str, ...]:
    """'fp16,int8' and repeated values -> the precisions asked for, in canonical order (nothing asked: fp32).
    ExportOptions adds the fp32 ONNX the others derive from; engines are built only for these."""
    wanted: set[str] = set()
    for value in values:
        for p in str(value).split(","):
            p = p.strip().lower()
            if not p:
                continue
            if p not in PRECISIONS:
                raise FairdeployError(f"unknown precision {p!r}; choose one of {', '.join(PRECISIONS)}")
            wanted.add(p)
    return tuple(p for p in PRECISIONS if p in wanted) or ("fp32",)


# Profile TOML: section -> key -> the flat option name used by flags.
_SECTIONS: dict[str, dict[str, str]] = {
    "export": {"precision": "precision", "opset": "opset", "simplify": "simplify",
               "check_batch_sizes": "check_batch_sizes", "fp32_atol": "fp32_atol"},
    "calibration": {"recipe": "calib_recipe", "size": "calib_size", "method": "calib_method",
                    "split": "calib_split", "placement": "int8_placement", "mixed_precision": "int8_mixed"},
    "tensorrt": {"enabled": "trt", "min_batch": "min_batch", "opt_batch": "opt_batch", "max_batch": "max_batch",
                 "workspace_mib": "workspace_mib", "optimization_level": "optimization_level",
                 "timing_cache": "timing_cache", "sparse_weights": "sparse_weights", "dla_core": "dla_core",
                 "gpu_fallback": "gpu_fallback", "implicit_int8": "implicit_int8"},
}
FLAG_NAMES = tuple(name for section in _SECTIONS.values() for name in section.values())
_TRT_FIELDS = {f.name for f in fields(TrtOptions)}


def default_profile_dirs(explicit: Path | None = None) -> list[Traversable]:
    """Where profile names are looked up (see fairdeploy.resources): `explicit`, ./export, the package's."""
    return search_folders(PROFILES, explicit)


def list_profiles(dirs: Sequence[Traversable] | None = None) -> list[str]:
    return toml_names(list(dirs) if dirs is not None else default_profile_dirs())


def load_profile(name: str | os.PathLike[str], dirs: Sequence[Traversable] | None = None
                 ) -> tuple[Traversable, dict[str, Any]]:
    """A profile by name or path, flattened to option names; unknown sections or keys are errors."""
    path = find_toml(name, list(dirs) if dirs is not None else default_profile_dirs(), "profile")
    data = read_toml(path)
    flat: dict[str, Any] = {}
    for section, table in data.items():
        if section == "description":
            flat["description"] = str(table)
            continue
        if section not in _SECTIONS:
            raise FairdeployError(
                f"{path}: unknown section [{section}]; valid: description, {', '.join(f'[{s}]' for s in _SECTIONS)}"
            )
        if not isinstance(table, dict):
            raise FairdeployError(f"{path}: [{section}] must be a table")
        for key, value in table.items():
            if key not in _SECTIONS[section]:
                raise FairdeployError(
                    f"{path}: unknown key {key!r} in [{section}]; valid: {', '.join(_SECTIONS[section])}"
                )
            flat[_SECTIONS[section][key]] = value
    return path, flat


def _typed(name: str, value: Any, source: str) -> Any:
    """Check a profile or flag value's type; TOML gives ints, bools, strings, lists."""
    bools = {"simplify", "trt", "sparse_weights", "gpu_fallback", "implicit_int8"}
    ints = {"opset", "calib_size", "min_batch", "opt_batch", "max_batch", "workspace_mib", "optimization_level",
            "dla_core"}
    if name in bools and not isinstance(value, bool):
        raise FairdeployError(f"{source}: {name} must be true or false, got {value!r}")
    if name in ints and (isinstance(value, bool) or not isinstance(value, int)):
        raise FairdeployError(f"{source}: {name} must be an integer, got {value!r}")
    if name == "dla_core" and value == -1:
        return None  # -1 = no DLA (GPU only): lets a flag switch off a profile's DLA core
    if name == "fp32_atol" and (isinstance(value, bool) or not isinstance(value, (int, float))):
        raise FairdeployError(f"{source}: fp32_atol must be a number, got {value!r}")
    if name == "check_batch_sizes":
        if not isinstance(value, (list, tuple)) or not all(isinstance(v, int) and not isinstance(v, bool) for v in value):
            raise FairdeployError(f"{source}: check_batch_sizes must be a list of integers, got {value!r}")
        return tuple(value)
    if name == "precision":
        return parse_precisions([value] if isinstance(value, str) else value)
    if name == "timing_cache" and isinstance(value, str) and value.lower() in ("", "none", "off"):
        return None
    return value


def merge_options(profile: Mapping[str, Any] | None, flags: Mapping[str, Any], profile_path: str | None = None
                  ) -> ExportOptions:
    """Defaults <- profile <- flags (a flag given as None was not given). Returns validated options."""
    unknown = [k for k in flags if k not in FLAG_NAMES]
    if unknown:
        raise FairdeployError(f"unknown export option {unknown[0]!r}; valid: {', '.join(FLAG_NAMES)}")
    merged: dict[str, Any] = {}
    for source, values in ((profile_path or "profile", profile or {}), ("command line", flags)):
        for name, value in values.items():
            if value is None or name == "description":
                continue
            merged[name] = _typed(name, value, source)
    top: dict[str, Any] = {}
    trt: dict[str, Any] = {}
    for name, value in merged.items():
        if name == "trt":
            trt["enabled"] = value
        elif name in _TRT_FIELDS:
            trt[name] = value
        elif name == "precision":
            top["precisions"] = value
        else:
            top[name] = value
    opts = ExportOptions(**top, trt=replace(TrtOptions(), **trt), profile=profile_path,
                         description=str((profile or {}).get("description", "")))
    return opts.validate()


def resolve_options(profile: str | os.PathLike[str] | None, flags: Mapping[str, Any],
                    dirs: Sequence[Traversable] | None = None) -> ExportOptions:
    """Load `profile` (name or path; None = no profile) and merge the flags over it."""
    if profile is None:
        return merge_options(None, flags)
    path, values = load_profile(profile, dirs)
    return merge_options(values, flags, str(path))
