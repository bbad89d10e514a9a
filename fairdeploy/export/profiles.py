"""Export options: one dataclass tree (ExportOptions) that is also the shape of a target profile (TOML: ./export,
else the package's; see fairdeploy.resources), of a pipeline's [export] table and of `fairdeploy export`'s flags.

A profile file and a pipeline's [export] table are the same nested TOML:

    description = "..."       # a profile's one-line summary
    profile = "name"          # pipeline / --profile only: the profile whose values come first
    [onnx]                    # OnnxOptions: precision, opset, simplify, check_batch_sizes, fp32_atol
    [calibration]             # CalibrationRecipe: recipe (the recipe file read first), size, method, split, ...
    [tensorrt]                # TrtOptions: enabled, min_batch, opt_batch, max_batch, ...

(in a pipeline file: [export], [export.onnx], [export.calibration], [export.tensorrt]). `resolve_export_options`
layers them: defaults <- calibration recipe file <- profile <- pipeline table or flags.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from fairdeploy.artifact.metadata import PRECISIONS
from fairdeploy.errors import FairdeployError
from fairdeploy.export.calibration import CalibrationRecipe, finish_recipe, resolve_recipe
from fairdeploy.export.onnx_export import DEFAULT_BATCH_SIZES, DEFAULT_FP32_ATOL, DEFAULT_OPSET, check_opset
from fairdeploy.export.quant_target import check_engine_target
from fairdeploy.resources import PROFILES, find_toml, search_folders, toml_names
from fairdeploy.schema import Layer, Provenance, build, check_type, read_toml, setting

if TYPE_CHECKING:  # a pathlib.Path is one too
    from importlib.resources.abc import Traversable

MIB = 1 << 20


def _no_dla(value: Any) -> Any:
    return None if value == -1 else value  # -1 = no DLA (GPU only): lets a flag switch off a profile's DLA core


def _no_cache(value: Any) -> Any:
    return None if isinstance(value, str) and value.lower() in ("", "none", "off") else value


@dataclass(frozen=True)
class TrtOptions:
    """[tensorrt]: TensorRT builder settings (see export/README.md for each)."""

    enabled: bool | Literal["auto"] = False  # "auto": build engines when the tensorrt package is importable
    min_batch: int = 1
    opt_batch: int = 8
    max_batch: int = 32
    workspace_mib: int = 2048
    optimization_level: int = 3  # builder_optimization_level, 0..5 (TensorRT's default is 3)
    timing_cache: str | None = setting("timing.cache", convert=_no_cache)  # relative: inside the export directory
    sparse_weights: bool = False  # BuilderFlag.SPARSE_WEIGHTS for 2:4 models
    dla_core: int | None = setting(None, convert=_no_dla)  # Jetson AGX Orin: 0 or 1; None (-1) = GPU only
    gpu_fallback: bool = True  # with DLA: layers DLA cannot run go to the GPU
    implicit_int8: bool = False  # TensorRT 10.x only: IInt8EntropyCalibrator2 on the fp32 ONNX

    @property
    def build_engines(self) -> bool:
        """Whether engines are built: `enabled`, with "auto" meaning "when TensorRT is importable"."""
        if self.enabled == "auto":
            import importlib.util

            return importlib.util.find_spec("tensorrt") is not None
        return bool(self.enabled)

    def validate(self, where: Any = None) -> TrtOptions:
        """`where`: a Provenance (names the flag or file a bad value came from) or a string for every message."""
        def at(*keys: str) -> str:  # the first of `keys` a layer set (a check over several fields)
            if isinstance(where, Provenance):
                return where(next((f"tensorrt.{k}" for k in keys if where.given(f"tensorrt.{k}")), f"tensorrt.{keys[0]}"))
            return where or "TensorRT options"

        if not 1 <= self.min_batch <= self.opt_batch <= self.max_batch:
            raise FairdeployError(
                f"{at('max_batch', 'opt_batch', 'min_batch')}: batch sizes must satisfy 1 <= min <= opt <= max, got "
                f"min {self.min_batch}, opt {self.opt_batch}, max {self.max_batch}"
            )
        if self.workspace_mib < 1:
            raise FairdeployError(f"{at('workspace_mib')}: workspace must be at least 1 MiB, got {self.workspace_mib}")
        if not 0 <= self.optimization_level <= 5:
            raise FairdeployError(f"{at('optimization_level')}: builder optimisation level must be 0..5, got "
                                  f"{self.optimization_level}")
        if self.dla_core is not None and self.dla_core < 0:
            raise FairdeployError(f"{at('dla_core')}: DLA core must be 0 or more, got {self.dla_core}")
        if self.dla_core is not None and self.min_batch != self.max_batch:
            # TensorRT's DLA restrictions: "DLA does not support dynamic dimensions, so the profile's
            # min, max, and opt values must be equal for wildcard dimensions."
            raise FairdeployError(
                f"{at('dla_core', 'max_batch', 'min_batch')}: DLA needs a static batch (min = opt = max), got {self.min_batch}/{self.opt_batch}/"
                f"{self.max_batch}; set --min-batch/--opt-batch/--max-batch to one value"
            )
        return self


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


def _precisions(value: Any) -> tuple[str, ...]:
    return parse_precisions([value] if isinstance(value, str) else value if isinstance(value, (list, tuple)) else [value])


def _ordered(xs: Iterable[str]) -> tuple[str, ...]:
    xs = tuple(xs)
    return tuple(p for p in PRECISIONS if p in xs)


@dataclass(frozen=True)
class OnnxOptions:
    """[onnx]: the ONNX files and their self-check against PyTorch."""

    # What was asked for: the TensorRT engines built. The fp32 ONNX is always written too (fp16 and int8 derive
    # from it, and it is every self-check's reference): ExportOptions.precisions.
    precision: tuple[str, ...] = setting(("fp32",), convert=_precisions)
    opset: int = DEFAULT_OPSET
    simplify: bool = True
    check_batch_sizes: tuple[int, ...] = DEFAULT_BATCH_SIZES  # the self-check runs each batch size
    fp32_atol: float = DEFAULT_FP32_ATOL  # fail when FP32 ONNX logits differ from PyTorch by more


@dataclass(frozen=True)
class ExportOptions:
    """Everything `fairdeploy export` does: the defaults, a profile, a pipeline table or flags, merged."""

    description: str = ""
    profile: str | None = None  # a profile name or .toml path whose values come first; after resolving: its path
    onnx: OnnxOptions = field(default_factory=OnnxOptions)
    calibration: CalibrationRecipe = field(default_factory=CalibrationRecipe)
    tensorrt: TrtOptions = field(default_factory=TrtOptions)

    @property
    def precisions(self) -> tuple[str, ...]:
        """The ONNX files written: the precisions asked for and fp32."""
        return _ordered((*self.onnx.precision, "fp32"))

    @property
    def engine_precisions(self) -> tuple[str, ...]:
        """The TensorRT engines built: only the precisions asked for (`--precision int8` builds no fp32 engine)."""
        return _ordered(self.onnx.precision) or ("fp32",)

    def validate(self, origin: Provenance | None = None) -> ExportOptions:
        """Range checks after the merge; `origin` names the flag or file a bad value came from."""
        def at(path: str) -> str:
            return origin(path) if origin is not None else f"export option {path}"

        check_opset(self.onnx.opset, at("onnx.opset"))
        if not self.onnx.check_batch_sizes or any(b < 1 for b in self.onnx.check_batch_sizes):
            raise FairdeployError(f"{at('onnx.check_batch_sizes')}: check batch sizes must be positive, got "
                                  f"{list(self.onnx.check_batch_sizes)}")
        self.calibration.validate(origin or (lambda path: f"export option {path}"))
        self.tensorrt.validate(origin or "TensorRT options")
        if self.tensorrt.enabled and self.tensorrt.implicit_int8 and "int8" not in self.engine_precisions:
            raise FairdeployError(f"{at('tensorrt.implicit_int8')}: the implicit INT8 calibrator builds the int8 "
                                  "engine; add --precision int8")
        explicit_int8 = not self.tensorrt.implicit_int8 and self.tensorrt.dla_core is None  # DLA on 10.x: implicit
        if self.tensorrt.enabled is True and "int8" in self.engine_precisions and explicit_int8:
            check_engine_target(self.calibration.target, at("calibration.target"))
        return self

    def to_dict(self) -> dict[str, Any]:
        """The tree as plain data, with the ONNX files and engines it leads to (for export.json's readers)."""
        return {**asdict(self), "precisions": self.precisions, "engine_precisions": self.engine_precisions}


def default_profile_dirs(explicit: Path | None = None) -> list[Traversable]:
    """Where profile names are looked up (see fairdeploy.resources): `explicit`, ./export, the package's."""
    return search_folders(PROFILES, explicit)


def list_profiles(dirs: Sequence[Traversable] | None = None) -> list[str]:
    return toml_names(list(dirs) if dirs is not None else default_profile_dirs())


def profile_layer(name: str | os.PathLike[str], dirs: Sequence[Traversable] | None = None) -> Layer:
    """A profile by name or path, as a layer of ExportOptions (keys are checked when the layers are built)."""
    path = find_toml(name, list(dirs) if dirs is not None else default_profile_dirs(), "profile")
    data = read_toml(path)
    if "profile" in data:
        raise FairdeployError(f"{path}: profile: a profile file cannot name another profile")
    return Layer(data, str(path))


def resolve_export_options(layers: Sequence[Layer] = (), profile_dirs: Sequence[Traversable] | None = None,
                           recipe_dirs: Sequence[Traversable] | None = None) -> ExportOptions:
    """Defaults <- the calibration recipe file <- the profile <- `layers` (a pipeline's [export] table, or the
    flags; a value None was not given). The profile and recipe are the last ones `layers` (or the profile) name.
    Returns checked options; an error names the key and the file or flag it came from."""
    layers = list(layers)
    named = next((lay for lay in reversed(layers) if lay.values.get("profile") is not None), None)
    profile = None if named is None else named.values["profile"]
    if named is not None:
        check_type(profile, str, named.label("profile"))
        try:
            layers.insert(0, profile_layer(profile, profile_dirs))
        except FairdeployError as exc:
            raise FairdeployError(f"{named.label('profile')}: {exc}") from None
    layers = list(resolve_recipe(layers, recipe_dirs))
    opts, provenance = build(ExportOptions, layers)
    return _finish(opts, provenance, layers, profile is not None).validate(provenance)


def _finish(opts: ExportOptions, provenance: Provenance, layers: list[Layer], has_profile: bool) -> ExportOptions:
    from dataclasses import replace

    recipe = finish_recipe(opts.calibration, provenance, layers[0].source)
    return replace(opts, calibration=recipe, profile=layers[1].source if has_profile else None)


def resolve_options(profile: str | os.PathLike[str] | None, flags: dict[str, Any] | None = None,
                    dirs: Sequence[Traversable] | None = None) -> ExportOptions:
    """`profile` (name or path; None = none) with `flags` (nested like ExportOptions) over it."""
    return resolve_export_options([Layer({"profile": None if profile is None else str(profile), **(flags or {})},
                                         "command line")], dirs)
