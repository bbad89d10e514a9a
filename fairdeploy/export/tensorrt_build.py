"""TensorRT engine building for 10.x (>= 10.3) and 11.x: pure build decisions, then a thin builder.

Everything that decides (which network and builder flags for which TensorRT version and precision,
profile shapes, calibrator or not) is a plain function of a version string and options, tested with
fake versions. `build_engine` only carries out a BuildPlan against the `tensorrt` module, which is
imported lazily (or injected, so tests can check the plumbing with a recording fake; that never
builds an engine). API facts used, from NVIDIA's Python API docs and the 10.x -> 11.x migration guide:

- 10.x: NetworkDefinitionCreationFlag.EXPLICIT_BATCH is deprecated and ignored (never passed here);
  STRONGLY_TYPED exists; BuilderFlag.FP16/INT8 and IInt8EntropyCalibrator2 exist but are deprecated.
- 11.x: networks are always strongly typed (STRONGLY_TYPED is kept only for compatibility and
  ignored, so no flag is passed); BuilderFlag.FP16/INT8, IBuilderConfig.int8_calibrator and
  set_calibration_profile are removed; SPARSE_WEIGHTS, GPU_FALLBACK, timing caches,
  builder_optimization_level and IProgressMonitor remain.
- DLA (Jetson AGX Orin): which releases have it is the table DLA_SUPPORT below. On 10.x INT8 runs on DLA only
  through the implicit path (weakly typed network, INT8 and FP16 flags, IInt8EntropyCalibrator2: NvInfer.h calls
  it the calibrator DLA requires); on 11.4.1 strongly typed (the precision comes from the ONNX, as on the GPU).
  IBuilder.num_DLA_cores says how many DLA cores the machine has (0 on an ordinary GPU).
- BuilderFlag.TF32 is on by default in every release (10.3 ... 11.1: "Allow ... computations on tensors of type
  DataType.FLOAT to use TF32 ... Enabled by default"); IBuilderConfig.clear_flag clears it.
- Per-layer precision (ILayer.precision, set_output_type, OBEY_PRECISION_CONSTRAINTS) exists on 10.x only.
- IBuilderConfig.set_timing_cache(cache, ignore_mismatch) returns a bool: False for a cache from another
  TensorRT version or GPU; create_timing_cache returns None for bytes it cannot read.
- build_serialized_network returns None when the build fails; the reason goes to the logger (trt_env's
  tensorrt_logger keeps the errors for the message).
"""

from __future__ import annotations

import hashlib
import os
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fairdeploy.artifact.metadata import INPUT_NAME, check_precision
from fairdeploy.errors import FairdeployError
from fairdeploy.export.profiles import MIB, TrtOptions
from fairdeploy.files.atomic import atomic_path
from fairdeploy.progress import Progress, no_progress
from fairdeploy.trt_env import (  # noqa: F401 - exporter uses gpu_identity from here
    gpu_identity,
    import_tensorrt,
    one_line,
    tensorrt_logger,
    version_parts,
)

if TYPE_CHECKING:
    from fairdeploy.export.calibration import CalibrationRecipe

MIN_VERSION = (10, 3)
ANY = 10**6  # "every minor / patch release" in a DLA_SUPPORT row
# Builder flags cleared on every engine: FP32 tensors are computed in FP32, as in the ONNX that `validate` and the
# per-group gate checked under ONNX Runtime (TF32 rounds a conv's / matmul's FP32 inputs to 10-bit mantissas).
CLEARED_BUILDER_FLAGS = ("TF32",)


@dataclass(frozen=True)
class DlaRow:
    """One row of DLA_SUPPORT: the TensorRT releases first..last (inclusive) and where they have a DLA."""

    first: tuple[int, int, int]
    last: tuple[int, int, int]
    releases: str  # the row's name in messages
    platforms: tuple[str, ...]  # sys.platform values with a DLA in these releases ("win32": Windows on ARM)
    says: str

    def holds(self, version: tuple[int, int, int]) -> bool:
        return self.first <= version <= self.last


# DLA by TensorRT release, the one place fairdeploy keeps it. Source: NVIDIA, "Working with DLA" in the TensorRT
# 11.4.1 and 11.5.0 documentation (docs.nvidia.com/deeplearning/tensorrt/<version>/inference-library/
# work-with-dla.html: "TensorRT 10.7 was the last 10.x release that supported DLA. DLA was unavailable in TensorRT
# 11.0 through 11.3 ... TensorRT 11.4.0 supported DLA only on Windows on ARM"; 11.4.1: Jetson AGX Orin with JetPack
# 7.2.2 or later, Windows on ARM in beta, not Jetson Thor, not DriveOS; 11.5.0: "NVIDIA JetPack is not supported
# in TensorRT 11.5.0", Windows on ARM only), and the 11.4.0, 11.4.1 and 11.5.0 release notes.
# Not confirmed by any document read, so marked here: later patch releases of 11.4 (after 11.4.1) and of 11.5 are
# taken to be like 11.4.1 and 11.5.0; releases after 11.5 are not in the table (plan_build notes that, and the
# machine's num_DLA_cores decides); the JetPack version (>= 7.2.2 for 11.4.1) cannot be checked from here.
DLA_SUPPORT: tuple[DlaRow, ...] = (
    DlaRow((10, 0, 0), (10, 7, ANY), "10.0-10.7", ("linux",),
           "DLA on Jetson AGX Orin (JetPack 6 ships 10.3); INT8 only through the implicit calibrator"),
    DlaRow((10, 8, 0), (10, ANY, ANY), "10.8 and later 10.x", (), "no DLA: 10.7 was the last 10.x release with DLA"),
    DlaRow((11, 0, 0), (11, 3, ANY), "11.0-11.3", (), "no DLA"),
    DlaRow((11, 4, 0), (11, 4, 0), "11.4.0", ("win32",), "DLA only on Windows on ARM (beta)"),
    DlaRow((11, 4, 1), (11, 4, ANY), "11.4.1+", ("linux", "win32"),
           "DLA on Jetson AGX Orin with JetPack >= 7.2.2 (strongly typed), and Windows on ARM (beta)"),
    DlaRow((11, 5, 0), (11, 5, ANY), "11.5", ("win32",),
           "no JetPack support (Jetson stays on 11.4.1): DLA only on Windows on ARM (beta)"),
)
DLA_SOURCE = "NVIDIA's 'Working with DLA', TensorRT 11.4.1 / 11.5.0 documentation"


def dla_row(major: int, minor: int, patch: int) -> DlaRow | None:
    """The DLA_SUPPORT row of a release; None for a release newer than the table."""
    return next((row for row in DLA_SUPPORT if row.holds((major, minor, patch))), None)


@dataclass(frozen=True)
class TrtApi:
    """What the installed TensorRT's Python API offers, from its version alone."""

    version: str
    major: int
    minor: int
    patch: int
    explicit_batch_flag: bool  # exists (deprecated, ignored) on 10.x, gone on 11.x
    precision_flags: bool  # BuilderFlag.FP16 / INT8: 10.x only
    implicit_calibrator: bool  # IInt8EntropyCalibrator2, int8_calibrator: 10.x only
    always_strongly_typed: bool  # 11.x
    dla: bool  # the DLA exists in this release on this platform (see dla_refusal)


def dla_refusal(major: int, minor: int, patch: int, platform: str) -> str | None:
    """Why TensorRT major.minor.patch has no DLA on `platform` (sys.platform), naming its DLA_SUPPORT row; None
    when the row has a DLA there or the release is newer than the table."""
    row = dla_row(major, minor, patch)
    if row is None or platform in row.platforms:
        return None
    return (f"TensorRT {major}.{minor}.{patch} has no DLA on {platform} (DLA table row {row.releases}: {row.says}; "
            f"{DLA_SOURCE})")


def trt_api(version: str, platform: str | None = None) -> TrtApi:
    """Parse a TensorRT version string ('10.3.0.30', '11.0.0') and refuse versions before 10.3."""
    parts = version_parts(version)
    if len(parts) < 2:
        raise FairdeployError(f"unparseable TensorRT version {version!r}")
    major, minor = parts[0], parts[1]
    patch = parts[2] if len(parts) > 2 else 0
    if (major, minor) < MIN_VERSION:
        raise FairdeployError(
            f"TensorRT {version} is too old; fairdeploy needs {MIN_VERSION[0]}.{MIN_VERSION[1]} or newer "
            "(JetPack 6 ships 10.3)"
        )
    legacy = major == 10
    platform = sys.platform if platform is None else platform
    return TrtApi(version=str(version), major=major, minor=minor, patch=patch, explicit_batch_flag=legacy,
                  precision_flags=legacy, implicit_calibrator=legacy, always_strongly_typed=major >= 11,
                  dla=dla_refusal(major, minor, patch, platform) is None)


@dataclass(frozen=True)
class BuildPlan:
    """Every decision of one engine build, made without TensorRT."""

    tensorrt_version: str
    precision: str  # of the engine
    onnx_precision: str  # which model.<p>.onnx it is built from
    network_flags: tuple[str, ...]  # NetworkDefinitionCreationFlag names
    builder_flags: tuple[str, ...]  # BuilderFlag names set
    cleared_builder_flags: tuple[str, ...]  # BuilderFlag names cleared (TF32: on by default)
    implicit_calibrator: bool
    quantization: str | None  # "qdq", "implicit-calibrator" or None
    min_shape: tuple[int, int, int, int]
    opt_shape: tuple[int, int, int, int]
    max_shape: tuple[int, int, int, int]
    workspace_bytes: int
    optimization_level: int
    dla_core: int | None
    timing_cache: str | None
    notes: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in self.__dict__.items()}


def network_flags(api: TrtApi, implicit_calibrator: bool) -> tuple[str, ...]:
    """STRONGLY_TYPED on 10.x (precision comes from the ONNX graph) except for the implicit calibrator,
    which needs a weakly typed network; nothing on 11.x (always strongly typed). EXPLICIT_BATCH: never
    (ignored since 10.0, gone in 11.0)."""
    if api.always_strongly_typed or implicit_calibrator:
        return ()
    return ("STRONGLY_TYPED",)


def plan_build(version: str, precision: str, options: TrtOptions, image_size: int,
               platform: str | None = None, calibration: CalibrationRecipe | None = None) -> BuildPlan:
    """Decide how to build the `precision` engine with TensorRT `version` and the given options; `calibration`
    (the export's recipe) is what the int8 ONNX was made with. Every refusal is one line, before any work."""
    api = trt_api(version, platform)
    check_precision(precision)
    options.validate("TensorRT options")
    platform = sys.platform if platform is None else platform
    dla = options.dla_core is not None
    notes: list[str] = []
    if dla and not api.dla:
        raise FairdeployError(
            f"--dla-core {options.dla_core}: {dla_refusal(api.major, api.minor, api.patch, platform)}; DLA needs "
            "TensorRT 10.3-10.7 (JetPack 6) or 11.4.1 with JetPack >= 7.2.2 on Jetson AGX Orin; or build for the "
            "GPU with --dla-core -1"
        )
    if dla and dla_row(api.major, api.minor, api.patch) is None:
        notes.append(f"TensorRT {version} is newer than fairdeploy's DLA table ({DLA_SOURCE}); whether it has a DLA "
                     "here is left to the machine (builder.num_DLA_cores)")
    # INT8 on DLA with TensorRT 10.x: DLA does not take explicit Q/DQ, so the implicit calibrator is the
    # only INT8 path (weakly typed network, INT8 + FP16 flags, entropy calibrator on the fp32 ONNX).
    dla_implicit = dla and precision == "int8" and api.implicit_calibrator
    implicit = bool(precision == "int8" and (options.implicit_int8 or dla_implicit))
    if implicit and not api.implicit_calibrator:
        raise FairdeployError(
            f"TensorRT {version} has no implicit INT8 calibrator (removed in 11.0); drop --trt-implicit-int8 to "
            "build from the explicit Q/DQ model.int8.onnx"
        )
    why_implicit = "INT8 on DLA with TensorRT 10.x" if dla_implicit else "--trt-implicit-int8"
    if implicit and calibration is not None and calibration.mixed_precision != "off":
        # Refused, not honoured: the plan's FP32 layers were chosen (and the gate passed) on the Q/DQ graph, with
        # its INT8 layers and scales; the implicit engine picks its own INT8 layers and scales, so the same layers
        # kept FP32 there would not make the gate's result hold. On DLA an FP32 layer cannot run at all.
        raise FairdeployError(
            f"--int8-mixed {calibration.mixed_precision}: {why_implicit} builds the int8 engine from model.fp32.onnx "
            "with TensorRT's own calibrator, so the layers kept FP32 in model.int8.onnx (and its gate result) would "
            "not carry over; use --int8-mixed off, or build the Q/DQ engine (drop --trt-implicit-int8; on DLA: "
            "--dla-core -1 or TensorRT 11.4.1)"
        )
    builder: list[str] = []
    if implicit:
        builder.append("INT8")  # deprecated since 10.1 but present on 10.x; weakly typed network
        notes.append("implicit INT8 calibration (TensorRT 10.x only) from the fp32 ONNX and the balanced set")
        if calibration is not None and calibration.method != "entropy":
            notes.append(f"the engine's INT8 scales are TensorRT's entropy calibration; model.int8.onnx was "
                         f"calibrated with {calibration.method!r} (method 'entropy' gives it the same search)")
    if dla_implicit:
        builder.append("FP16")  # layers without an INT8 DLA kernel run FP16 on the DLA, not FP32 on the GPU
        notes.append("INT8 on DLA (TensorRT 10.x): explicit Q/DQ does not run on DLA, so the engine is calibrated "
                     "with IInt8EntropyCalibrator2 on a weakly typed network, INT8 + FP16 flags")
    if options.sparse_weights:
        builder.append("SPARSE_WEIGHTS")
    if options.dla_core is not None:
        if options.gpu_fallback:
            builder.append("GPU_FALLBACK")
        if precision == "fp32":
            if not options.gpu_fallback:
                raise FairdeployError("DLA runs only FP16 and INT8 layers; build fp16/int8 or allow --gpu-fallback")
            notes.append("DLA runs FP16/INT8 only: an fp32 engine falls back to the GPU entirely")
    notes.append("TF32 cleared: FP32 layers compute in FP32, as the ONNX checked under ONNX Runtime")
    s = int(image_size)
    return BuildPlan(
        tensorrt_version=str(version), precision=precision, onnx_precision="fp32" if implicit else precision,
        network_flags=network_flags(api, implicit), builder_flags=tuple(builder),
        cleared_builder_flags=CLEARED_BUILDER_FLAGS, implicit_calibrator=implicit,
        quantization="implicit-calibrator" if implicit else ("qdq" if precision == "int8" else None),
        min_shape=(options.min_batch, 3, s, s), opt_shape=(options.opt_batch, 3, s, s),
        max_shape=(options.max_batch, 3, s, s), workspace_bytes=int(options.workspace_mib) * MIB,
        optimization_level=int(options.optimization_level), dla_core=options.dla_core,
        timing_cache=options.timing_cache, notes=tuple(notes),
    )


def make_progress_monitor(trt: Any, progress: Progress):
    """An IProgressMonitor that forwards TensorRT's build phases to a Progress callback."""

    class _Monitor(trt.IProgressMonitor):
        def __init__(self) -> None:
            trt.IProgressMonitor.__init__(self)
            self._totals: dict[str, int] = {}

        def phase_start(self, phase_name: str, parent_phase: str | None, num_steps: int) -> None:
            self._totals[phase_name] = int(num_steps)
            progress(f"TensorRT {phase_name}", 0, int(num_steps))

        def step_complete(self, phase_name: str, step: int) -> bool:
            progress(f"TensorRT {phase_name}", int(step) + 1, self._totals.get(phase_name, int(step) + 1))
            return True  # False would cancel the build

        def phase_finish(self, phase_name: str) -> None:
            total = self._totals.get(phase_name, 1)
            progress(f"TensorRT {phase_name}", total, total)

    return _Monitor()


def calibration_cache_path(engine_path: str | os.PathLike[str], set_sha256: str) -> Path:
    """model.int8.engine -> model.int8.engine.calib-<first 16 hex of the set's hash>.cache: the scales
    TensorRT cached for one calibration set are never reused for another set."""
    p = Path(engine_path)
    return p.with_name(f"{p.name}.calib-{set_sha256[:16]}.cache")


def batches_sha256(batches: list, batch_size: int) -> str:
    """Hash of the calibration batches themselves, when the caller has no calibration-set hash."""
    import numpy as np

    h = hashlib.sha256(f"batch={int(batch_size)}".encode())
    for b in batches:
        a = np.ascontiguousarray(b, dtype=np.float32)
        h.update(repr(a.shape).encode())
        h.update(a.tobytes())
    return h.hexdigest()


def make_entropy_calibrator(trt: Any, batches: list, batch_size: int, cache_path: Path | None,
                            device: Any = None):
    """IInt8EntropyCalibrator2 over pre-built float32 batches (TensorRT 10.x only). Device memory is a
    torch tensor on `device` (None: the current CUDA device, the one the builder runs on; the recording
    fake reads the pointers as host memory, so tests pass "cpu"); TensorRT reads the pointer get_batch returns."""
    import numpy as np
    import torch

    target = torch.device(device) if device is not None else None

    class _Calibrator(trt.IInt8EntropyCalibrator2):
        def __init__(self) -> None:
            trt.IInt8EntropyCalibrator2.__init__(self)
            self._batches = iter(batches)
            self._device: torch.Tensor | None = None

        def get_batch_size(self) -> int:
            return batch_size

        def get_batch(self, names: list[str]) -> list[int] | None:
            batch = next(self._batches, None)
            if batch is None:
                return None
            dev = target if target is not None else torch.device("cuda", torch.cuda.current_device())
            self._device = torch.from_numpy(np.ascontiguousarray(batch, dtype=np.float32)).to(dev)
            return [int(self._device.data_ptr())]

        def read_calibration_cache(self) -> bytes | None:
            return cache_path.read_bytes() if cache_path is not None and cache_path.is_file() else None

        def write_calibration_cache(self, cache: Any) -> None:
            if cache_path is not None:
                with atomic_path(cache_path) as tmp:
                    tmp.write_bytes(bytes(cache))

    return _Calibrator()


@dataclass(frozen=True)
class EngineBuild:
    path: Path
    seconds: float
    plan: BuildPlan
    calibration_cache: Path | None = None  # implicit calibrator: the scales cached for this set
    timing_cache_note: str | None = None  # why the timing cache was not used or not saved, if so


def check_dla_cores(builder: Any, dla_core: int) -> None:
    """Refuse a DLA core the machine does not have (IBuilder.num_DLA_cores: 0 on an ordinary GPU)."""
    have = int(getattr(builder, "num_DLA_cores", 0) or 0)
    if have <= dla_core:
        where = "this machine has no DLA" if have == 0 else f"this machine has {have} DLA core(s), 0..{have - 1}"
        raise FairdeployError(f"--dla-core {dla_core}: {where}; build for the GPU with --dla-core -1")


def attach_timing_cache(config: Any, cache_file: Path | None) -> str | None:
    """Load `cache_file` into the builder config, or a fresh cache when it is absent, unreadable or from
    another TensorRT version or GPU (set_timing_cache returns False). Returns a note when it fell back."""
    if cache_file is None:
        return None
    note = None
    data = b""
    if cache_file.is_file():
        try:
            data = cache_file.read_bytes()
        except OSError as exc:
            note = f"timing cache {cache_file} could not be read ({exc.strerror or exc}); starting a fresh one"
    if data:
        try:
            cache = config.create_timing_cache(data)
        except (RuntimeError, TypeError, ValueError):
            cache = None
        # ignore_mismatch=False: a cache from another GPU or TensorRT version is refused, never used.
        if cache is not None and config.set_timing_cache(cache, False):
            return None
        note = (f"timing cache {cache_file.name} is from another TensorRT version or GPU (or damaged); "
                "starting a fresh one, which replaces it after the build")
    fresh = config.create_timing_cache(b"")
    if fresh is None or not config.set_timing_cache(fresh, False):
        return f"TensorRT refused a fresh timing cache; building without one ({cache_file.name} left as it is)"
    return note


def save_timing_cache(config: Any, cache_file: Path) -> str | None:
    """Write the builder's timing cache; a failure is a note, never an error (it only speeds up builds)."""
    try:
        cache = config.get_timing_cache()
        if cache is None:
            return None
        with atomic_path(cache_file) as tmp, open(tmp, "wb") as f:
            f.write(cache.serialize())
    except (OSError, RuntimeError, FairdeployError) as exc:
        return f"timing cache {cache_file} could not be saved ({getattr(exc, 'strerror', None) or exc})"
    return None


def build_engine(
    onnx_path: str | os.PathLike[str],
    engine_path: str | os.PathLike[str],
    plan: BuildPlan,
    trt: Any | None = None,
    progress: Progress = no_progress,
    calibration_batches: list | None = None,
    calibration_batch_size: int | None = None,
    timing_cache_path: str | os.PathLike[str] | None = None,
    calibration_sha256: str | None = None,
    calibration_device: Any = None,
) -> EngineBuild:
    """Carry out `plan`: parse the ONNX, configure the builder, build, save the timing cache (a failure there
    is a warning), then write the engine atomically as the last step, so nothing that can fail comes between
    the engine file and the sidecar the caller writes next. The implicit calibrator's batches go to
    `calibration_device` (None: the current CUDA device, which the builder uses)."""
    trt = trt if trt is not None else import_tensorrt("building a TensorRT engine")
    t0 = time.perf_counter()
    if plan.implicit_calibrator and (not calibration_batches or not calibration_batch_size):
        raise FairdeployError("the implicit INT8 calibrator needs the calibration set's batches")
    logger = tensorrt_logger(trt)  # keeps TensorRT's errors for the one-line messages below
    builder = trt.Builder(logger)
    if plan.dla_core is not None:
        check_dla_cores(builder, plan.dla_core)
    flags = 0
    for name in plan.network_flags:
        flags |= 1 << int(getattr(trt.NetworkDefinitionCreationFlag, name))
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = [str(parser.get_error(i)) for i in range(parser.num_errors)] + logger.errors
        raise FairdeployError(f"TensorRT cannot parse {Path(onnx_path).name}: "
                              f"{one_line(errors[0]) if errors else 'unknown error'}")

    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, plan.workspace_bytes)
    config.builder_optimization_level = plan.optimization_level
    for name in plan.builder_flags:
        config.set_flag(getattr(trt.BuilderFlag, name))
    for name in plan.cleared_builder_flags:
        config.clear_flag(getattr(trt.BuilderFlag, name))
    profile = builder.create_optimization_profile()
    profile.set_shape(INPUT_NAME, plan.min_shape, plan.opt_shape, plan.max_shape)
    config.add_optimization_profile(profile)
    if plan.dla_core is not None:
        config.default_device_type = trt.DeviceType.DLA
        config.DLA_core = plan.dla_core

    cache_file = Path(timing_cache_path) if timing_cache_path is not None else None
    notes = [attach_timing_cache(config, cache_file)]
    if hasattr(trt, "IProgressMonitor"):
        config.progress_monitor = make_progress_monitor(trt, progress)

    calib_cache: Path | None = None
    if plan.implicit_calibrator:
        assert calibration_batches and calibration_batch_size  # checked above
        # Calibration runs at one static shape; TensorRT reads it from the calibration profile.
        calib_profile = builder.create_optimization_profile()
        shape = (calibration_batch_size, *plan.opt_shape[1:])
        calib_profile.set_shape(INPUT_NAME, shape, shape, shape)
        key = calibration_sha256 or batches_sha256(calibration_batches, calibration_batch_size)
        calib_cache = calibration_cache_path(engine_path, key)
        config.int8_calibrator = make_entropy_calibrator(
            trt, calibration_batches, calibration_batch_size, calib_cache, calibration_device)
        if config.set_calibration_profile(calib_profile) is False:
            raise FairdeployError(f"TensorRT refused the calibration profile {shape} for {Path(onnx_path).name}")

    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        why = one_line(logger.errors[0]) if logger.errors else "no reason logged"
        more = f" (and {len(logger.errors) - 1} more errors)" if len(logger.errors) > 1 else ""
        raise FairdeployError(f"TensorRT could not build an engine from {Path(onnx_path).name}: {why}{more}")
    if cache_file is not None:
        notes.append(save_timing_cache(config, cache_file))
    for note in notes:
        if note:
            warnings.warn(note, stacklevel=2)
    out = Path(engine_path)
    with atomic_path(out) as tmp, open(tmp, "wb") as f:
        f.write(serialized)
    return EngineBuild(path=out, seconds=time.perf_counter() - t0, plan=plan,
                       calibration_cache=calib_cache if calib_cache is not None and calib_cache.is_file() else None,
                       timing_cache_note="; ".join(n for n in notes if n) or None)
