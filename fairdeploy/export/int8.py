"""INT8 ONNX with explicit Q/DQ from a calibration set, for a quantization target (quant_target: TensorRT's
symmetric S8S8 or ONNX Runtime CPU's U8S8), per-channel weights."""

from __future__ import annotations

import contextlib
import dataclasses
import io
import logging
import os
import tempfile
import warnings
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fairdeploy.artifact.metadata import metadata_of_model, set_onnx_metadata
from fairdeploy.errors import FairdeployError
from fairdeploy.export.calibration import CalibrationRecipe, CalibrationSet, batch_reader_class, reader_class
from fairdeploy.export.entropy import entropy_ranges
from fairdeploy.export.mixed_precision import EvalSet, MixedPrecisionPlan, plan_group_aware, with_fp32_layers
from fairdeploy.export.qdq_placement import (
    adds_fused_into,
    check_placement,
    ort_settings,
    place_qdq,
)
from fairdeploy.export.quant_target import DEFAULT_TARGET, check_quantized_graph, target_of
from fairdeploy.files.atomic import atomic_path
from fairdeploy.validation.tolerances import Tolerances


@dataclass(frozen=True)
class QdqSummary:
    """What a Q/DQ graph contains, for checks: node counts, zero points, per-channel weight scales."""

    quantize_nodes: int
    dequantize_nodes: int
    zero_points: int
    nonzero_zero_points: tuple[str, ...]  # names of zero-point tensors that are not all 0
    zero_point_types: tuple[int, ...]  # ONNX data types of the zero points (3 = int8)
    per_channel_weights: int  # weight DequantizeLinear nodes with a 1-D scale
    per_tensor_weights: int
    activation_zero_point_types: tuple[int, ...] = ()  # ONNX data types of QuantizeLinear zero points (2 = uint8)
    nonzero_weight_zero_points: tuple[str, ...] = ()  # zero points of 8-bit weights that are not all 0

    @property
    def symmetric(self) -> bool:
        return not self.nonzero_zero_points and self.zero_point_types in ((), (3,))

    def to_dict(self) -> dict[str, object]:
        return {**dataclasses.asdict(self), "symmetric": self.symmetric}


def qdq_summary(model) -> QdqSummary:
    """Count Q/DQ nodes of an onnx.ModelProto and check every zero point (initializer or Constant)."""
    from onnx import numpy_helper

    consts = {i.name: i for i in model.graph.initializer}
    for n in model.graph.node:
        if n.op_type == "Constant" and n.attribute and n.attribute[0].name == "value":
            consts[n.output[0]] = n.attribute[0].t
    q = [n for n in model.graph.node if n.op_type == "QuantizeLinear"]
    dq = [n for n in model.graph.node if n.op_type == "DequantizeLinear"]
    zp_names = sorted({n.input[2] for n in q + dq if len(n.input) > 2 and n.input[2]})
    nonzero, types = [], set()
    for name in zp_names:
        if name not in consts:
            nonzero.append(name)  # a computed zero point cannot be verified: count it against symmetry
            continue
        types.add(consts[name].data_type)
        if np.any(numpy_helper.to_array(consts[name]) != 0):
            nonzero.append(name)
    per_channel = per_tensor = 0
    weight_nonzero = []
    for n in dq:
        if n.input[0] in consts:  # a weight (constant) being dequantized
            scale = consts.get(n.input[1])
            if scale is not None and len(scale.dims) == 1 and scale.dims[0] > 1:
                per_channel += 1
            else:
                per_tensor += 1
            zp = n.input[2] if len(n.input) > 2 else ""
            if consts[n.input[0]].data_type in (2, 3) and zp in nonzero:  # 8-bit weights, not int32 biases
                weight_nonzero.append(zp)
    activation_types = {consts[n.input[2]].data_type if n.input[2] in consts else 0
                        for n in q if len(n.input) > 2 and n.input[2]}
    return QdqSummary(
        quantize_nodes=len(q), dequantize_nodes=len(dq), zero_points=len(zp_names),
        nonzero_zero_points=tuple(nonzero), zero_point_types=tuple(sorted(types)),
        per_channel_weights=per_channel, per_tensor_weights=per_tensor,
        activation_zero_point_types=tuple(sorted(activation_types)),
        nonzero_weight_zero_points=tuple(sorted(set(weight_nonzero))),
    )


def _calibrate_method(name: str):
    from onnxruntime.quantization import CalibrationMethod

    return {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
            "percentile": CalibrationMethod.Percentile}[name]


@contextlib.contextmanager
def _quiet():
    """onnxruntime.quantization logs through the root logger and prints progress; keep the CLI clean."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        root.setLevel(level)


def array_reader(batches: Sequence[np.ndarray]):
    """An onnxruntime CalibrationDataReader over in-memory float32 batches (N, 3, H, W)."""
    return batch_reader_class()(lambda: batches)


def quantize_qdq(
    fp32_path: str | os.PathLike[str],
    reader: Any,
    method: str = CalibrationRecipe.method,
    percentile: float = CalibrationRecipe.percentile,
    placement: str | None = None,
    keep_fp32: Collection[str] = (),
    target: str = DEFAULT_TARGET,
    reduce_range: bool = False,
):
    """The Q/DQ onnx.ModelProto of an FP32 ONNX file, calibrated on `reader`'s batches (no metadata change).

    `target` (quant_target.TARGETS) decides the types: "tensorrt" signed int8 activations and weights, symmetric
    (every zero point 0), float biases (TensorRT folds them); "ort-cpu" U8 activations with their calibrated zero
    points, S8 weights with zero point 0 (7-bit with `reduce_range`), int32 biases. Weights are per output channel
    for both. `placement` decides where the Q/DQ pairs go (qdq_placement; None: the target's own); `keep_fp32`
    names weighted layers left in FP32 (ORT's nodes_to_exclude, then the placement pass)."""
    import onnx
    from onnxruntime.quantization import QuantFormat, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    kind = target_of(target)
    placement = check_placement(placement or kind.placement)
    if keep_fp32 and placement != "tensorrt":
        raise FairdeployError(f"layers kept in FP32 need the 'tensorrt' Q/DQ placement, not {placement!r}")
    if reduce_range and kind.name != "ort-cpu":
        raise FairdeployError(f"reduce_range (7-bit weights) is for target 'ort-cpu', not {kind.name!r}")
    src = Path(fp32_path)
    op_types, extra = ort_settings(placement)
    options = kind.quantize_static_options(reduce_range)
    extra = {**options.pop("extra_options"), **extra, "CalibPercentile": float(percentile)}
    with tempfile.TemporaryDirectory(prefix=".int8.") as work:
        pre = Path(work) / "pre.onnx"
        raw = Path(work) / "qdq.onnx"
        with _quiet():
            try:
                # Shape inference only: ORT's graph optimisations could fuse ops into contrib ops TensorRT lacks.
                quant_pre_process(str(src), str(pre), skip_optimization=True, skip_onnx_shape=False,
                                  skip_symbolic_shape=False)
                fp32_model = onnx.load(str(pre))
                exclude = [*keep_fp32, *adds_fused_into(fp32_model, keep_fp32)] if keep_fp32 else []
                if method == "entropy":
                    ranges = entropy_ranges(pre, op_types, reader)  # TensorRT's search (export/entropy.py)
                    extra["TensorQuantOverrides"] = {
                        name: [{"rmin": np.float32(lo), "rmax": np.float32(hi)}] for name, (lo, hi) in ranges.items()}
                quantize_static(
                    str(pre), str(raw), reader, quant_format=QuantFormat.QDQ, op_types_to_quantize=op_types,
                    calibrate_method=_calibrate_method("minmax" if method == "entropy" else method),
                    nodes_to_exclude=exclude, extra_options=extra, **options,
                )
            except FairdeployError:
                raise
            except Exception as exc:
                first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
                raise FairdeployError(f"INT8 quantization of {src.name} failed: {first}") from exc
        if getattr(reader, "batches_read", 1) == 0:
            raise FairdeployError("INT8 quantization read no calibration batch")
        model = onnx.load(str(raw))
    if placement == "tensorrt":
        model = place_qdq(model, fp32_model, keep_fp32)
    return model


def quantize_int8(
    fp32_path: str | os.PathLike[str],
    out_path: str | os.PathLike[str],
    cal: CalibrationSet,
    keep_fp32: Collection[str] = (),
    model: Any | None = None,
) -> Path:
    """Write a Q/DQ INT8 ONNX calibrated on `cal` (method, percentile, batch size, quantization target and Q/DQ
    placement from its recipe), with the layers in `keep_fp32` left in FP32. `model`: an already quantized
    ModelProto of this FP32 file to write instead (mixed precision builds it from the calibrated all-INT8 graph).

    Every target's graph runs on ONNX Runtime's CPU provider; the "tensorrt" one is what TensorRT 10.x and 11.x
    accept as explicit quantization, the "ort-cpu" one is what ORT's CPU kernels run fastest. The target is
    checked against the graph and written into its metadata (fairdeploy.quantization_target).
    """
    import onnx

    src, out = Path(fp32_path), Path(out_path)
    meta = metadata_of_model(onnx.load(str(src), load_external_data=False), str(src))
    if meta.precision != "fp32":
        raise FairdeployError(f"{src}: INT8 quantization needs the fp32 export, this one is {meta.precision}")
    if model is None:
        recipe = cal.recipe
        model = quantize_qdq(src, reader_class()(cal, recipe.batch_size), recipe.method, recipe.percentile,
                             recipe.qdq_placement, keep_fp32, recipe.target, recipe.reduce_range)
    set_onnx_metadata(model, dataclasses.replace(meta, precision="int8", calibration_sha256=cal.sha256,
                                                 quantization_target=cal.recipe.target))
    check_quantized_graph(model, cal.recipe.target, out.name)
    with atomic_path(out) as tmp:
        onnx.save(model, str(tmp))
    return out


def group_aware_int8(fp32_path: str | os.PathLike[str], cal: CalibrationSet, data: EvalSet,
                     tolerances: Tolerances | None = None, threads: int = 0) -> tuple[Any, MixedPrecisionPlan]:
    """The INT8 graph of `fp32_path` (TensorRT placement, calibrated on `cal`) with the layers that group-aware
    mixed precision keeps in FP32 (mixed_precision.plan_group_aware on `data`), and the plan."""
    import onnx

    recipe = cal.recipe
    if recipe.qdq_placement != "tensorrt" or recipe.target != "tensorrt":
        raise FairdeployError("group-aware mixed precision needs the 'tensorrt' target and Q/DQ placement, not "
                              f"{recipe.target!r} / {recipe.qdq_placement!r}")
    full = quantize_qdq(fp32_path, reader_class()(cal, recipe.batch_size), recipe.method, recipe.percentile)
    fp32 = onnx.load(str(fp32_path))
    plan = plan_group_aware(full, fp32, data, tolerances, threads)
    return with_fp32_layers(full, fp32, plan.kept_fp32), plan
