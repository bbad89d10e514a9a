"""run_export: the one library call behind `fairdeploy export` (ONNX files, checks, export.json, engines)."""

from __future__ import annotations

import os
import platform
import shutil
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

import fairdeploy
from fairdeploy.artifact.metadata import (
    CALIBRATION_FILE,
    EXPORT_FILE,
    PRECISIONS,
    engine_filename,
    onnx_filename,
    sidecar_filename,
)
from fairdeploy.artifact.sidecar import EngineSidecar, write_sidecar
from fairdeploy.data.loading import Encoding, eval_transform, split_dataset
from fairdeploy.data.manifest import Manifest, read_manifest
from fairdeploy.errors import FairdeployError, MissingDependencyError
from fairdeploy.export.calibration import (
    CalibrationRecipe,
    CalibrationSet,
    calibration_batches,
    draw_calibration_set,
    even_batch_size,
    write_calibration_json,
)
from fairdeploy.export.fp16 import convert_fp16
from fairdeploy.export.int8 import QdqSummary, group_aware_int8, qdq_summary, quantize_int8
from fairdeploy.export.mixed_precision import EvalSet, MixedPrecisionPlan
from fairdeploy.export.onnx_export import OnnxExportResult, SelfCheck, export_model_onnx, random_check_inputs
from fairdeploy.export.profiles import ExportOptions, resolve_export_options
from fairdeploy.export.quant_target import check_engine_target
from fairdeploy.files.hashing import sha256_file
from fairdeploy.files.json_files import write_json
from fairdeploy.metrics import MetricsReport
from fairdeploy.models.checkpoint import (
    ModelSpec,
    checkpoint_hash,
    load_checkpoint,
    read_spec,
    resolve_checkpoint,
)
from fairdeploy.progress import Progress, no_progress
from fairdeploy.runtime.base import ArtifactInfo, ImageBatch, array_batches, runner_logits
from fairdeploy.runtime.ort_runner import OrtRunner
from fairdeploy.runtime.torch_runner import module_logits, spec_info
from fairdeploy.validation.compare import Comparison, LabelledImages, compare

MIXED_PRECISION_SPLIT = "val"  # group-aware mixed precision measures layers here: never the test split
SELF_CHECK_SAMPLES = 64  # real images run at every check batch size against PyTorch
CHECK_BATCH = 32  # the batches every precision and PyTorch are run in over the check images


@dataclass(frozen=True)
class CheckData:
    """The images every precision is compared on: real (a manifest split) or seeded random tensors."""

    inputs: np.ndarray
    labels: np.ndarray | None
    groups: np.ndarray | None  # indices into spec.groups
    source: str


@dataclass(frozen=True)
class CheckpointRecord:
    """The checkpoint an export came from: its path, weights hash and model spec."""

    path: str
    sha256: str
    spec: ModelSpec

    def to_dict(self) -> dict[str, Any]:
        s = self.spec
        return {"path": self.path, "sha256": self.sha256, "arch": s.arch, "classes": list(s.classes),
                "groups": list(s.groups), "image_size": s.image_size, "mean": list(s.mean), "std": list(s.std),
                "sparsity": s.sparsity}


@dataclass(frozen=True)
class CheckRecord:
    """The images every ONNX file was checked on (CheckData.source: a manifest split or "random")."""

    source: str
    n: int

    def to_dict(self) -> dict[str, Any]:
        return {"source": self.source, "n": self.n, "reference": "PyTorch FP32 on the CPU"}


def _headline(c: Comparison) -> dict[str, float | int]:
    """export.json's figures of a comparison: n, max |Δlogit| and top-1 agreement, overall."""
    return {"n": c.n, "max_abs_logit_diff": c.logit_diff.max_abs, "top1_agreement": c.agreement.overall}


@dataclass(frozen=True)
class OnnxCheck:
    """One ONNX file's logits against PyTorch (per group, and its metrics when the check images have labels) and
    against the FP32 ONNX: the comparison `fairdeploy validate` makes (validation.compare.compare)."""

    vs_pytorch: Comparison
    vs_fp32_onnx: Comparison | None = None  # None for the FP32 file itself

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"vs_pytorch": _headline(self.vs_pytorch)}
        if self.vs_fp32_onnx is not None:
            out["vs_fp32_onnx"] = _headline(self.vs_fp32_onnx)
        out["top1_agreement_per_group"] = self.vs_pytorch.agreement.groups
        metrics = self.vs_pytorch.metrics  # None: random check images (no labels)
        if metrics is not None:
            out["accuracy"] = metrics.overall_accuracy
            out["accuracy_per_group"] = {g: m.accuracy for g, m in metrics.groups}
        return out


@dataclass(frozen=True)
class Int8Record:
    """How the INT8 file was quantized: the target runtime, Q/DQ placement, the group-aware plan, what the graph
    holds, the set."""

    target: str  # quant_target.TARGETS: the runtime its types are for
    placement: str
    qdq: QdqSummary
    calibration_sha256: str
    mixed_precision: MixedPrecisionPlan | None = None  # None: mixed precision off

    def to_dict(self) -> dict[str, Any]:
        mixed = {} if self.mixed_precision is None else {"mixed_precision": self.mixed_precision.to_dict()}
        return {"target": self.target, "placement": self.placement, **mixed, "qdq": self.qdq.to_dict(),
                "calibration_sha256": self.calibration_sha256}


@dataclass(frozen=True)
class OnnxFile:
    """One ONNX file of an export: its name, precision and hash, how it was made, and its check."""

    path: str  # the file name in the export folder
    precision: str
    sha256: str
    check: OnnxCheck
    export: OnnxExportResult | None = None  # the FP32 graph: opset, nodes, self-check at each batch size, zeros
    int8: Int8Record | None = None

    def to_dict(self) -> dict[str, Any]:
        head = (self.export.to_dict() if self.export is not None
                else {"path": self.path, "precision": self.precision, "sha256": self.sha256})
        return {**head, **(self.int8.to_dict() if self.int8 is not None else {}), **self.check.to_dict()}


@dataclass(frozen=True)
class CalibrationRecord:
    """The INT8 calibration set in brief (calibration.json lists its images)."""

    file: str
    sha256: str
    n: int
    recipe: CalibrationRecipe
    counts: tuple[tuple[str, str, int], ...]  # (group, class, n) in cell order

    def to_dict(self) -> dict[str, Any]:
        return {"file": self.file, "sha256": self.sha256, "n": self.n, "recipe": self.recipe.to_dict(),
                "counts": [{"group": g, "class": c, "n": n} for g, c, n in self.counts]}


@dataclass(frozen=True)
class EngineRecord:
    """One TensorRT engine built: its file, its sidecar's file and contents, and the build time."""

    file: str
    sidecar_file: str
    seconds: float
    sidecar: EngineSidecar

    def to_dict(self) -> dict[str, Any]:
        return {"file": self.file, "sidecar": self.sidecar_file, "seconds": self.seconds, **self.sidecar.to_dict()}


@dataclass(frozen=True)
class ExportSummary:
    """What export.json holds; to_dict() is the file."""

    created: str
    checkpoint: CheckpointRecord
    options: ExportOptions
    check_data: CheckRecord
    onnx: dict[str, OnnxFile]  # by precision, fp32 first
    calibration: CalibrationRecord | None
    engines: dict[str, EngineRecord]  # by precision
    versions: dict[str, str]  # package -> version

    def to_dict(self) -> dict[str, Any]:
        return {
            "created": self.created,
            "checkpoint": self.checkpoint.to_dict(),
            "options": self.options.to_dict(),
            "check_data": self.check_data.to_dict(),
            "onnx": {p: f.to_dict() for p, f in self.onnx.items()},
            "calibration": None if self.calibration is None else self.calibration.to_dict(),
            "engines": {p: e.to_dict() for p, e in self.engines.items()},
            "versions": dict(self.versions),
        }


@dataclass(frozen=True)
class ExportResult:
    out_dir: Path
    onnx: dict[str, Path]
    engines: dict[str, Path]
    calibration: Path | None
    export_json: Path
    summary: ExportSummary


def _writable_dir(path: Path) -> Path:
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise FairdeployError(f"cannot create output directory {path}: {exc.strerror or exc}") from exc
    if not path.is_dir() or not os.access(path, os.W_OK | os.X_OK):
        raise FairdeployError(f"output directory {path} is not writable")
    return path


def load_check_data(manifest: Manifest | None, spec: ModelSpec, split: str, seed: int) -> CheckData:
    """eval_transform'd images of one split (every runtime's preprocessing), or random tensors."""
    if manifest is None:
        return CheckData(random_check_inputs(spec, seed=seed), None, None, "random")
    ds = split_dataset(manifest, split, Encoding(spec.classes, spec.groups),
                       eval_transform(spec.image_size, spec.mean, spec.std))
    xs = []
    for i in range(len(ds)):
        x, _, _, ok, _ = ds[i]
        if not ok:
            raise FairdeployError(f"image {ds.path(i)} could not be read (not a valid image file)")
        xs.append(x.numpy())
    return CheckData(np.stack(xs).astype(np.float32), np.asarray(ds.labels), np.asarray(ds.groups),
                     f"{manifest.source}:{split}")


def _batches(check: CheckData) -> Iterator[ImageBatch]:
    """The check images in the batches PyTorch and every ONNX file are run in."""
    return array_batches(check.inputs, CHECK_BATCH, check.labels, check.groups)


def _torch_logits(model: torch.nn.Module, info: ArtifactInfo, check: CheckData) -> np.ndarray:
    """PyTorch's logits on the check images: the checkpoint's TorchRunner (the one `validate` runs), on the CPU,
    over the model already loaded."""
    return module_logits(model, info, _batches(check))


def _onnx_logits(path: Path, check: CheckData) -> np.ndarray:
    """One ONNX file's logits on the check images, from a CPU OrtRunner."""
    return runner_logits(OrtRunner(path), _batches(check))


@dataclass(frozen=True)
class _Reference:
    """PyTorch's logits on the check images and, when they have labels, the images and PyTorch's metrics."""

    logits: np.ndarray
    images: LabelledImages | None
    metrics: MetricsReport | None

    @classmethod
    def of(cls, logits: np.ndarray, check: CheckData, spec: ModelSpec) -> _Reference:
        if check.labels is None or check.groups is None:
            return cls(logits, None, None)
        images = LabelledImages.from_indices(check.labels, check.groups, spec.groups, spec.classes)
        return cls(logits, images, images.metrics(logits.argmax(1)))

    def check(self, logits: np.ndarray, fp32_logits: np.ndarray | None) -> OnnxCheck:
        """One ONNX file's logits compared with PyTorch's (per group present) and with the FP32 file's."""
        return OnnxCheck(vs_pytorch=compare(self.logits, logits, self.images, self.metrics),
                         vs_fp32_onnx=None if fp32_logits is None else compare(fp32_logits, logits))


def _versions() -> dict[str, str]:
    import onnx
    import onnxruntime
    import onnxslim

    return {"fairdeploy": fairdeploy.__version__, "python": platform.python_version(), "torch": torch.__version__,
            "onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__, "onnxslim": onnxslim.__version__}


def remove_stale(out: Path, keep: list[str]) -> list[str]:
    """Delete artifacts of an earlier export in `out` that this one does not rewrite: other precisions'
    ONNX files, an old calibration.json and every engine + sidecar (they were built from the old ONNX)."""
    stale = [onnx_filename(p) for p in PRECISIONS] + [CALIBRATION_FILE, EXPORT_FILE]
    stale += [n for p in PRECISIONS for n in (engine_filename(p), sidecar_filename(p))]
    removed = []
    for name in stale:
        if name not in keep and (out / name).is_file():
            (out / name).unlink()
            removed.append(name)
    return removed


def run_export(
    checkpoint: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    options: ExportOptions | None = None,
    data: str | os.PathLike[str] | None = None,
    calib_data: str | os.PathLike[str] | None = None,
    images_root: str | os.PathLike[str] | None = None,
    check_split: str = "val",  # the split a user still chooses on; test only when asked (--check-split test)
    seed: int = 0,
    progress: Progress = no_progress,
    trt_module: Any | None = None,
    allow_outside_root: bool = False,
) -> ExportResult:
    """Export a checkpoint to out_dir: model.fp32.onnx (+ fp16 / int8), calibration.json, export.json,
    and with options.tensorrt.build_engines the engines and their sidecars.

    Everything that can be checked before writing is checked first (options, checkpoint, manifests,
    calibration balance). The ONNX files are built in a staging folder and moved in only when all of
    them passed their checks. When TensorRT is missing, the ONNX files stay and MissingDependencyError
    says how to install it.
    """
    options = (options or resolve_export_options()).validate()  # no options: the default recipe file's
    ckpt = resolve_checkpoint(checkpoint)
    spec = read_spec(ckpt)  # the calibration size is checked against the data before any model is loaded
    early_trt = _tensorrt_if_importable(options, trt_module)
    if early_trt is not None:
        plan_engines(options, spec, early_trt)  # TensorRT's refusals (DLA, implicit INT8, ...) before any work
    ckpt_sha = checkpoint_hash(ckpt)
    check_manifest = (read_manifest(data, images_root, allow_outside_root=allow_outside_root)
                      if data is not None else None)
    cal: CalibrationSet | None = None
    if "int8" in options.precisions:
        source = calib_data if calib_data is not None else data
        if source is None:
            raise FairdeployError("--precision int8 needs a calibration manifest: give --calib-data MANIFEST (or --data)")
        cal_manifest = (read_manifest(source, images_root, allow_outside_root=allow_outside_root)
                        if source != data or check_manifest is None else check_manifest)
        recipe = options.calibration
        cal = draw_calibration_set(cal_manifest, spec, recipe)
        if recipe.mixed_precision == "group-aware":
            mixed_manifest = check_manifest if check_manifest is not None else cal_manifest
            if not any(r.split == MIXED_PRECISION_SPLIT for r in mixed_manifest.records):
                raise FairdeployError(f"{mixed_manifest.source}: group-aware mixed precision measures each layer on "
                                      f"the {MIXED_PRECISION_SPLIT!r} split, which has no images")
    model, spec = load_checkpoint(ckpt, "cpu")
    check = load_check_data(check_manifest, spec, check_split, seed)
    out = _writable_dir(Path(out_dir))  # created only once every input has been checked
    reference = _Reference.of(_torch_logits(model, spec_info(spec, str(ckpt), ckpt_sha), check), check, spec)
    steps = len(options.precisions) + 1
    progress("export ONNX", 0, steps)

    stage = Path(tempfile.mkdtemp(prefix=".export.", suffix=".tmp", dir=out))
    try:
        fp32 = export_model_onnx(
            model, spec, stage / onnx_filename("fp32"), ckpt_sha, options.onnx.opset,
            SelfCheck(check.inputs[:SELF_CHECK_SAMPLES], check.source, options.onnx.check_batch_sizes,
                      options.onnx.fp32_atol, seed),
            simplify=options.onnx.simplify,
        )
        progress("export ONNX", 1, steps)
        fp32_logits = _onnx_logits(fp32.path, check)
        onnx_files = {"fp32": OnnxFile(fp32.path.name, "fp32", fp32.sha256, reference.check(fp32_logits, None),
                                       export=fp32)}
        for i, precision in enumerate(p for p in options.precisions if p != "fp32"):
            path = stage / onnx_filename(precision)
            int8: Int8Record | None = None
            if precision == "fp16":
                convert_fp16(fp32.path, path)
            else:
                assert cal is not None
                plan = None
                if cal.recipe.mixed_precision == "group-aware":
                    val = load_check_data(mixed_manifest, spec, MIXED_PRECISION_SPLIT, seed)
                    assert val.labels is not None and val.groups is not None
                    model, plan = group_aware_int8(fp32.path, cal, EvalSet(
                        val.inputs, val.labels, val.groups, tuple(spec.groups), spec.num_classes, val.source))
                    quantize_int8(fp32.path, path, cal, model=model)
                else:
                    quantize_int8(fp32.path, path, cal)
                write_calibration_json(stage / CALIBRATION_FILE, cal)
                import onnx

                int8 = Int8Record(target=cal.recipe.target, placement=cal.recipe.qdq_placement,
                                  qdq=qdq_summary(onnx.load(str(path))),
                                  calibration_sha256=cal.sha256, mixed_precision=plan)
            onnx_files[precision] = OnnxFile(path.name, precision, sha256_file(path),
                                             reference.check(_onnx_logits(path, check), fp32_logits), int8=int8)
            progress("export ONNX", i + 2, steps)
        summary = ExportSummary(
            created=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            checkpoint=CheckpointRecord(str(ckpt), ckpt_sha, spec),
            options=options,
            check_data=CheckRecord(check.source, len(check.inputs)),
            onnx=onnx_files,
            calibration=None if cal is None else CalibrationRecord(CALIBRATION_FILE, cal.sha256, len(cal),
                                                                   cal.recipe, cal.counts),
            engines={},
            versions=_versions(),
        )
        write_json(stage / EXPORT_FILE, summary.to_dict())
        # Commit: every file renamed into place (export.json last, so it never describes missing files).
        names = [onnx_filename(p) for p in options.precisions] + ([CALIBRATION_FILE] if cal is not None else [])
        remove_stale(out, keep=names)
        for name in [*names, EXPORT_FILE]:
            os.replace(stage / name, out / name)
    finally:
        shutil.rmtree(stage, ignore_errors=True)

    onnx_paths = {p: out / onnx_filename(p) for p in options.precisions}
    if options.tensorrt.build_engines:
        summary = build_engines(out, onnx_paths, spec, options, cal, trt_module, progress, summary)
    return ExportResult(out_dir=out, onnx=onnx_paths, engines={p: out / e.file for p, e in summary.engines.items()},
                        calibration=out / CALIBRATION_FILE if cal is not None else None,
                        export_json=out / EXPORT_FILE, summary=summary)


def _tensorrt_if_importable(options: ExportOptions, trt_module: Any | None) -> Any | None:
    """The tensorrt module when engines are to be built and it imports; None otherwise (then the ONNX files are
    written and build_engines says how to install it)."""
    if not options.tensorrt.build_engines:
        return None
    if trt_module is not None:
        return trt_module
    from fairdeploy.export.tensorrt_build import import_tensorrt

    try:
        return import_tensorrt()
    except MissingDependencyError:
        return None


def plan_engines(options: ExportOptions, spec: ModelSpec, trt: Any) -> list:
    """One BuildPlan per engine asked for, for the installed TensorRT (plan_build: every refusal, one line)."""
    from fairdeploy.export.tensorrt_build import plan_build

    return [plan_build(str(trt.__version__), p, options.tensorrt, spec.image_size, calibration=options.calibration)
            for p in options.engine_precisions]


def build_engines(out: Path, onnx_paths: dict[str, Path], spec: ModelSpec, options: ExportOptions,
                  cal: CalibrationSet | None, trt_module: Any | None,
                  progress: Progress, summary: ExportSummary) -> ExportSummary:
    """One engine + sidecar per precision; export.json is rewritten with each engine's entry as it is built.
    Returns `summary` with the engines."""
    from fairdeploy.export.tensorrt_build import build_engine, gpu_identity, import_tensorrt

    try:
        trt = trt_module if trt_module is not None else import_tensorrt()
    except MissingDependencyError as exc:
        raise MissingDependencyError(f"ONNX files written to {out}, no engine built: {exc}") from exc
    version = str(trt.__version__)
    plans = plan_engines(options, spec, trt)  # refusals first
    for plan in plans:
        if plan.onnx_precision == "int8":  # built from the Q/DQ graph (the implicit calibrator reads the fp32 one)
            check_engine_target(options.calibration.target, f"ONNX files written to {out}, no engine built")
    gpu_name, capability = gpu_identity()
    for plan in plans:
        onnx_path = onnx_paths[plan.onnx_precision]
        batches, batch_size = None, None
        if plan.implicit_calibrator and cal is not None:
            batch_size = even_batch_size(len(cal), max(options.tensorrt.min_batch, min(options.tensorrt.opt_batch,
                                                                                  options.tensorrt.max_batch)))
            batches = list(calibration_batches(cal, batch_size))
        cache = None
        if plan.timing_cache:
            cache = Path(plan.timing_cache) if Path(plan.timing_cache).is_absolute() else out / plan.timing_cache
        built = build_engine(onnx_path, out / engine_filename(plan.precision), plan, trt, progress,
                             calibration_batches=batches, calibration_batch_size=batch_size, timing_cache_path=cache,
                             calibration_sha256=cal.sha256 if cal is not None else None)
        sidecar = EngineSidecar(
            engine_file=built.path.name, engine_sha256=sha256_file(built.path), tensorrt_version=version,
            gpu_name=gpu_name, compute_capability=capability, precision=plan.precision,
            onnx_file=onnx_path.name, onnx_sha256=sha256_file(onnx_path),
            calibration_sha256=cal.sha256 if (cal is not None and plan.precision == "int8") else None,
            classes=tuple(spec.classes), groups=tuple(spec.groups), image_size=spec.image_size,
            min_batch=plan.min_shape[0], opt_batch=plan.opt_shape[0], max_batch=plan.max_shape[0],
            dla_core=plan.dla_core, quantization=plan.quantization,
            sparse_weights="SPARSE_WEIGHTS" in plan.builder_flags, build_settings=plan.to_dict(),
        )
        write_sidecar(out / sidecar_filename(plan.precision), sidecar)
        record = EngineRecord(built.path.name, sidecar_filename(plan.precision), built.seconds, sidecar)
        summary = replace(summary, engines={**summary.engines, plan.precision: record})
        write_json(out / EXPORT_FILE, summary.to_dict())
    return summary
