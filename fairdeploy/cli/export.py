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
    optional_option,
)
from fairdeploy.cli.outputs import OUT_POLICIES
from fairdeploy.cli.progress_display import RichProgress
from fairdeploy.files.outputs import claim_output

PrecisionOpt = Annotated[
    list[str] | None,
    typer.Option("--precision", "-p", help="fp32, fp16, int8; repeat or comma-separate (fp32 is always written)."),
]
TrtOpt = Annotated[bool | None, typer.Option("--trt/--no-trt", help="Also build TensorRT engines (needs TensorRT).")]
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


def _check_split_default() -> str:
    """run_export's check_split (defined there once): the split the export self-check uses unless asked."""
    import inspect

    from fairdeploy.export.exporter import run_export

    return inspect.signature(run_export).parameters["check_split"].default


CheckSplitOpt = Annotated[str | None, typer.Option("--check-split", help="Split of --data the exports are checked "
                                                   f"on (default: {_check_split_default()}; test only when asked, "
                                                   "while you still choose on validation).")]
CalibDataOpt = Annotated[
    Path | None, typer.Option("--calib-data", help="Manifest the INT8 calibration set is drawn from (default --data).")
]
CalibSizeOpt = Annotated[int | None, typer.Option("--calib-size", help="Calibration images, balanced over group x class.")]
CalibMethodOpt = Annotated[str | None, typer.Option("--calib-method", help="minmax, entropy or percentile.")]
CalibSplitOpt = Annotated[str | None, typer.Option("--calib-split", help="Manifest split to calibrate on (train or val).")]
Int8TargetOpt = Annotated[
    str | None,
    typer.Option("--int8-target", help="Runtime the INT8 graph is for: tensorrt (symmetric S8S8, GPU and Jetson) or "
                 "ort-cpu (U8S8 for ONNX Runtime's CPU provider) (default: the profile's or recipe's)."),
]
Int8PlacementOpt = Annotated[
    str | None,
    typer.Option("--int8-placement", help="Q/DQ placement: tensorrt (NVIDIA's guide), ort-default or ort-cpu "
                 "(default: the target's)."),
]
Int8MixedOpt = Annotated[
    str | None,
    typer.Option("--int8-mixed", help="off, or group-aware: keep the layers that fail a group in FP32, measured on "
                 "the val split of --data (default: the recipe's)."),
]
CalibRecipeOpt = Annotated[
    str | None, typer.Option("--calib-recipe", help="Recipe name in calibration/ or a .toml path (default: default).")
]
CalibRecipesDirOpt = Annotated[
    Path | None,
    typer.Option("--recipes-dir", envvar="FAIRDEPLOY_CALIBRATION",
                 help="Folder of calibration recipes, searched before ./calibration and the built-in recipes."),
]
CalibSeedOpt = Annotated[int | None, typer.Option("--calib-seed", help="Seed of the calibration draw (default: the recipe's).")]
OpsetOpt = Annotated[int | None, typer.Option("--opset", help="ONNX opset, 17..20 (default 17).")]
SimplifyOpt = Annotated[bool | None, typer.Option("--simplify/--no-simplify", help="Simplify the graph with onnxslim.")]
MinBatchOpt = Annotated[int | None, typer.Option("--min-batch", help="TensorRT profile: smallest batch.")]
OptBatchOpt = Annotated[int | None, typer.Option("--opt-batch", help="TensorRT profile: batch to tune for.")]
MaxBatchOpt = Annotated[int | None, typer.Option("--max-batch", help="TensorRT profile: largest batch.")]
WorkspaceOpt = Annotated[int | None, typer.Option("--workspace-mib", help="TensorRT workspace memory pool limit (MiB).")]
OptLevelOpt = Annotated[int | None, typer.Option("--opt-level", help="TensorRT builder optimisation level, 0..5.")]
TimingCacheOpt = Annotated[
    str | None, typer.Option("--timing-cache", help="TensorRT timing cache file (relative: in --out), or none.")
]
SparseOpt = Annotated[
    bool | None, typer.Option("--sparse-weights/--no-sparse-weights", help="TensorRT SPARSE_WEIGHTS (2:4 models).")
]
DlaOpt = Annotated[int | None, typer.Option("--dla-core", help="Jetson DLA core (0 or 1); -1 for GPU only.")]
FallbackOpt = Annotated[
    bool | None, typer.Option("--gpu-fallback/--no-gpu-fallback", help="With DLA: run unsupported layers on the GPU.")
]
ImplicitOpt = Annotated[
    bool | None,
    typer.Option("--trt-implicit-int8/--no-trt-implicit-int8",
                 help="TensorRT 10.x only: INT8 engine from the fp32 ONNX with the implicit entropy calibrator."),
]


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
    seed: optional_option(SeedOpt, "run_export's") = None,  # type: ignore[valid-type]
    overwrite: OverwriteOpt = False,
) -> None:
    """Export a checkpoint to ONNX (fp32 + fp16/int8), check it against PyTorch, optionally build engines."""
    from fairdeploy.export.calibration import default_recipe_dirs
    from fairdeploy.export.exporter import run_export
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
        result = run_export(model, out, options, data=data, calib_data=calib_data, images_root=images_root,
                            progress=progress, allow_outside_root=allow_outside_root, **given)
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
