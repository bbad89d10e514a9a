"""`fairdeploy export`: ONNX FP32/FP16/INT8 and TensorRT engines from a checkpoint, with a target profile."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from fairdeploy.cli.console import console
from fairdeploy.cli.options import (
    AllowOutsideRootOpt,
    ImagesRootOpt,
    ModelOpt,
    OutDirOpt,
    OverwriteOpt,
    SeedOpt,
    default_of,
    keyword_default,
    optional_option,
    shown_default,
)
from fairdeploy.cli.outputs import OUT_POLICIES
from fairdeploy.cli.progress_display import RichProgress
from fairdeploy.export import exporter
from fairdeploy.export.onnx_export import MAX_OPSET, MIN_OPSET
from fairdeploy.export.profiles import ExportOptions
from fairdeploy.export.quant_target import TARGETS
from fairdeploy.files.outputs import claim_output


# Every flag of ExportOptions defaults to None (not given: the profile's value, else the recipe's for a calibration
# key, else the dataclass field's); its --help shows that field's default, read from ExportOptions.
def layered(path: str, *, recipe: bool = False, value: str | None = None) -> str:
    """An ExportOptions flag's default as --help shows it: a profile (and for a [calibration] key the calibration
    recipe) comes first, else the field's own default, read from ExportOptions at `path` (`value`: shown instead)."""
    first = "the profile's or recipe's" if recipe else "the profile's"
    return f"(default: {first}, else {shown_default(default_of(ExportOptions, path)) if value is None else value})"


def _placement_default() -> str | None:
    """CalibrationRecipe's placement None, as --help shows it: each target's own (quant_target.TARGETS)."""
    if default_of(ExportOptions, "calibration.placement") is not None:
        return None  # a placement of its own: layered() shows it
    return "the --int8-target's own: " + ", ".join(f"{t.placement} for {name}" for name, t in TARGETS.items())


def _dla_default() -> str | None:
    """TrtOptions' dla_core None (no DLA, GPU only) as the flag value that asks for it, -1."""
    return "-1" if default_of(ExportOptions, "tensorrt.dla_core") is None else None


PrecisionOpt = Annotated[
    list[str] | None,
    typer.Option("--precision", "-p", help="fp32, fp16, int8; repeat or comma-separate; fp32 is always written "
                                           f"{layered('onnx.precision')}."),
]
TrtOpt = Annotated[bool | None, typer.Option(
    "--trt/--no-trt", help=f"Also build TensorRT engines; needs TensorRT {layered('tensorrt.enabled')}.")]
ProfileOpt = Annotated[
    str | None, typer.Option("--profile", help="Target profile: a name from export/ or a .toml path; flags override it.")
]
ProfilesDirOpt = Annotated[
    Path | None,
    typer.Option("--profiles-dir", envvar="FAIRDEPLOY_PROFILES",
                 help="Folder of profile TOML files, searched before ./export and the built-in profiles."),
]
CheckDataOpt = Annotated[
    Path | None,
    typer.Option("--data", "-d", help="Manifest whose --check-split images check every ONNX file (default: random tensors)."),
]
CheckSplitOpt = Annotated[str | None, typer.Option("--check-split", help="Split of --data the exports are checked "
                                                   f"on (default: {keyword_default(exporter.run_export, 'check_split')}; test "
                                                   "only when asked, while you still choose on validation).")]
CalibDataOpt = Annotated[
    Path | None, typer.Option("--calib-data", help="Manifest the INT8 calibration set is drawn from (default --data).")
]
CalibSizeOpt = Annotated[int | None, typer.Option(
    "--calib-size", help=f"Calibration images, balanced over group x class {layered('calibration.size', recipe=True)}.")]
CalibMethodOpt = Annotated[str | None, typer.Option(
    "--calib-method", help=f"minmax, entropy or percentile {layered('calibration.method', recipe=True)}.")]
CalibSplitOpt = Annotated[str | None, typer.Option(
    "--calib-split", help=f"Manifest split to calibrate on, train or val {layered('calibration.split', recipe=True)}.")]
Int8TargetOpt = Annotated[
    str | None,
    typer.Option("--int8-target", help="Runtime the INT8 graph is for: tensorrt, symmetric S8S8 for GPU and Jetson; or "
                 "ort-cpu, U8S8 for ONNX Runtime's CPU provider "
                 f"{layered('calibration.target', recipe=True)}."),
]
Int8PlacementOpt = Annotated[
    str | None,
    typer.Option("--int8-placement", help="Q/DQ placement: tensorrt (NVIDIA's guide), ort-default or ort-cpu "
                 f"{layered('calibration.placement', recipe=True, value=_placement_default())}."),
]
Int8MixedOpt = Annotated[
    str | None,
    typer.Option("--int8-mixed", help="off, or group-aware: keep the layers that fail a group in FP32, measured on "
                 f"the val split of --data {layered('calibration.mixed_precision', recipe=True)}."),
]
CalibRecipeOpt = Annotated[
    str | None, typer.Option("--calib-recipe", help="Recipe name in calibration/ or a .toml path "
                                                    f"{layered('calibration.recipe')}.")
]
CalibRecipesDirOpt = Annotated[
    Path | None,
    typer.Option("--recipes-dir", envvar="FAIRDEPLOY_CALIBRATION",
                 help="Folder of calibration recipes, searched before ./calibration and the built-in recipes."),
]
CalibSeedOpt = Annotated[int | None, typer.Option(
    "--calib-seed", help=f"Seed of the calibration draw {layered('calibration.seed', recipe=True)}.")]
OpsetOpt = Annotated[int | None, typer.Option(
    "--opset", help=f"ONNX opset, {MIN_OPSET}..{MAX_OPSET} {layered('onnx.opset')}.")]
SimplifyOpt = Annotated[bool | None, typer.Option(
    "--simplify/--no-simplify", help=f"Simplify the graph with onnxslim {layered('onnx.simplify')}.")]
MinBatchOpt = Annotated[int | None, typer.Option(
    "--min-batch", help=f"TensorRT profile: smallest batch {layered('tensorrt.min_batch')}.")]
OptBatchOpt = Annotated[int | None, typer.Option(
    "--opt-batch", help=f"TensorRT profile: batch to tune for {layered('tensorrt.opt_batch')}.")]
MaxBatchOpt = Annotated[int | None, typer.Option(
    "--max-batch", help=f"TensorRT profile: largest batch {layered('tensorrt.max_batch')}.")]
WorkspaceOpt = Annotated[int | None, typer.Option(
    "--workspace-mib", help=f"TensorRT workspace memory pool limit in MiB {layered('tensorrt.workspace_mib')}.")]
OptLevelOpt = Annotated[int | None, typer.Option(
    "--opt-level", help=f"TensorRT builder optimisation level, 0..5 {layered('tensorrt.optimization_level')}.")]
TimingCacheOpt = Annotated[str | None, typer.Option(
    "--timing-cache", help="TensorRT timing cache file, relative to --out, or none "
                           f"{layered('tensorrt.timing_cache')}.")]
SparseOpt = Annotated[bool | None, typer.Option(
    "--sparse-weights/--no-sparse-weights",
    help=f"TensorRT SPARSE_WEIGHTS, for 2:4 models {layered('tensorrt.sparse_weights')}.")]
DlaOpt = Annotated[int | None, typer.Option(
    "--dla-core", help=f"Jetson DLA core, 0 or 1; -1 for GPU only {layered('tensorrt.dla_core', value=_dla_default())}.")]
FallbackOpt = Annotated[bool | None, typer.Option(
    "--gpu-fallback/--no-gpu-fallback",
    help=f"With DLA: run unsupported layers on the GPU {layered('tensorrt.gpu_fallback')}.")]
ImplicitOpt = Annotated[
    bool | None,
    typer.Option("--trt-implicit-int8/--no-trt-implicit-int8",
                 help="TensorRT 10.x only: INT8 engine from the fp32 ONNX with the implicit entropy calibrator "
                      f"{layered('tensorrt.implicit_int8')}."),
]
ExportSeedOpt = optional_option(SeedOpt, str(keyword_default(exporter.run_export, "seed")))

def export(
    model: ModelOpt,
    out: OutDirOpt,
    precision: PrecisionOpt = None,
    trt: TrtOpt = None,
    profile: ProfileOpt = None,
    profiles_dir: ProfilesDirOpt = None,
    data: CheckDataOpt = None,
    check_split: CheckSplitOpt = None,
    calib_data: CalibDataOpt = None,
    calib_size: CalibSizeOpt = None,
    calib_method: CalibMethodOpt = None,
    calib_split: CalibSplitOpt = None,
    int8_target: Int8TargetOpt = None,
    int8_placement: Int8PlacementOpt = None,
    int8_mixed: Int8MixedOpt = None,
    calib_recipe: CalibRecipeOpt = None,
    recipes_dir: CalibRecipesDirOpt = None,
    calib_seed: CalibSeedOpt = None,
    opset: OpsetOpt = None,
    simplify: SimplifyOpt = None,
    min_batch: MinBatchOpt = None,
    opt_batch: OptBatchOpt = None,
    max_batch: MaxBatchOpt = None,
    workspace_mib: WorkspaceOpt = None,
    opt_level: OptLevelOpt = None,
    timing_cache: TimingCacheOpt = None,
    sparse_weights: SparseOpt = None,
    dla_core: DlaOpt = None,
    gpu_fallback: FallbackOpt = None,
    trt_implicit_int8: ImplicitOpt = None,
    images_root: ImagesRootOpt = None,
    allow_outside_root: AllowOutsideRootOpt = False,
    seed: ExportSeedOpt = None,  # type: ignore[valid-type]
    overwrite: OverwriteOpt = False,
) -> None:
    """Export a checkpoint to ONNX (fp32 + fp16/int8), check it against PyTorch, optionally build engines."""
    from fairdeploy.export.calibration import default_recipe_dirs
    from fairdeploy.export.profiles import default_profile_dirs, resolve_export_options
    from fairdeploy.schema import flag_layer

    # Each flag overrides one field of ExportOptions (None: not given; the defaults live on the dataclasses).
    flags = {
        "profile": ("--profile", profile),
        "onnx.precision": ("--precision", precision or None), "onnx.opset": ("--opset", opset),
        "onnx.simplify": ("--simplify", simplify),
        "calibration.recipe": ("--calib-recipe", calib_recipe), "calibration.size": ("--calib-size", calib_size),
        "calibration.method": ("--calib-method", calib_method), "calibration.split": ("--calib-split", calib_split),
        "calibration.seed": ("--calib-seed", calib_seed), "calibration.placement": ("--int8-placement", int8_placement),
        "calibration.mixed_precision": ("--int8-mixed", int8_mixed),
        "calibration.target": ("--int8-target", int8_target),
        "tensorrt.enabled": ("--trt", trt), "tensorrt.min_batch": ("--min-batch", min_batch),
        "tensorrt.opt_batch": ("--opt-batch", opt_batch), "tensorrt.max_batch": ("--max-batch", max_batch),
        "tensorrt.workspace_mib": ("--workspace-mib", workspace_mib),
        "tensorrt.optimization_level": ("--opt-level", opt_level),
        "tensorrt.timing_cache": ("--timing-cache", timing_cache),
        "tensorrt.sparse_weights": ("--sparse-weights", sparse_weights), "tensorrt.dla_core": ("--dla-core", dla_core),
        "tensorrt.gpu_fallback": ("--gpu-fallback", gpu_fallback),
        "tensorrt.implicit_int8": ("--trt-implicit-int8", trt_implicit_int8),
    }
    options = resolve_export_options([flag_layer(flags)], default_profile_dirs(profiles_dir),
                                     default_recipe_dirs(recipes_dir))
    inputs = {"--model": model, "--data": data, "--calib-data": calib_data, "--images-root": images_root,
              "--profile": Path(profile) if profile and profile.endswith(".toml") else None,
              "--profiles-dir": profiles_dir, "--recipes-dir": recipes_dir}
    with claim_output(out, OUT_POLICIES["export"], overwrite=overwrite, inputs=inputs), RichProgress() as progress:
        given = {k: v for k, v in (("check_split", check_split), ("seed", seed)) if v is not None}
        result = exporter.run_export(model, out, options, data=data, calib_data=calib_data,
                                     images_root=images_root, progress=progress,
                                     allow_outside_root=allow_outside_root, **given)
    summary = result.summary
    check = summary.check_data
    console.print(f"{summary.checkpoint.spec.arch} checked on {check.source} (n={check.n}) against PyTorch:",
                  highlight=False, soft_wrap=True)
    for info in summary.onnx.values():
        vs = info.check.vs_pytorch
        line = f"  {info.path}: max |Δlogit| {vs.logit_diff.max_abs:.3g}, top-1 agreement {vs.agreement.overall:.4f}"
        if vs.agreement.groups:
            line += " (" + ", ".join(f"{g} {a:.3f}" for g, a in vs.agreement.groups.items()) + ")"
        if vs.metrics is not None:
            line += f", accuracy {vs.metrics.overall_accuracy:.4f}"
        console.print(line, highlight=False, soft_wrap=True)
    cal = summary.calibration
    if cal is not None:
        cells = ", ".join(f"{g}/{c} {n}" for g, c, n in cal.counts)
        console.print(f"calibration: {cal.n} images ({cal.recipe.method}), {cells}; sha256 {cal.sha256[:16]}; "
                      f"int8 for target {cal.recipe.target} ({cal.recipe.qdq_placement} Q/DQ placement)",
                      highlight=False, soft_wrap=True)
        int8 = summary.onnx["int8"].int8 if "int8" in summary.onnx else None
        mixed = int8.mixed_precision if int8 is not None else None
        if mixed is not None:
            kept = list(mixed.kept_fp32)
            console.print(f"int8 ({cal.recipe.qdq_placement} Q/DQ placement), group-aware mixed precision on "
                          f"{mixed.data_source}: {len(kept)} layer(s) kept in FP32{': ' + ', '.join(kept) if kept else ''}",
                          highlight=False, soft_wrap=True)
    for p, path in result.engines.items():
        console.print(f"engine {p}: {path}", highlight=False, soft_wrap=True)
    console.print(f"wrote {result.out_dir}", highlight=False, soft_wrap=True)
