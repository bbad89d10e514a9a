"""INT8 quantization targets: the runtime an INT8 ONNX is made for decides its types, zero points and Q/DQ placement.

* ``tensorrt`` (TensorRT 10.x / 11.x explicit quantization, GPU and Jetson): signed INT8 activations and weights,
  symmetric (every zero point 0, as TensorRT requires), per-channel weights, float biases (TensorRT folds them);
  Q/DQ where NVIDIA's guide places them (qdq_placement, placement "tensorrt").
* ``ort-cpu`` (ONNX Runtime's CPU provider, a workstation without an NVIDIA GPU): U8 activations with the zero
  point the calibrated range implies (asymmetric), S8 per-channel weights with zero point 0, int32 biases, Q/DQ
  around every op ORT quantizes (placement "ort-cpu", ORT's own default): ORT fuses these into QLinearConv,
  QLinearAdd, QLinearGlobalAveragePool, QGemm, ... and runs the U8S8 kernels of MLAS (VNNI / AMX where the CPU
  has them). Measured with ORT 1.32 on an Intel Xeon with VNNI / AMX, one thread (benchmarks/int8.py --part
  targets, RESULTS.md §9): the TensorRT graph runs 0.13-0.69x the FP32 speed on ORT's CPU provider, this one
  1.4-1.5x on resnet18 at 32 px, 3-4x at 64 px, 1.0-1.1x on mobilenet_v3_small; QOperator format was no faster
  than QDQ (and needs ORT's contrib ops), ORT's placement over Conv/Gemm/MatMul/Add only and the TensorRT
  placement with U8 were slower.
* ``reduce_range`` (ort-cpu only) quantizes weights to 7 bits: on CPUs without VNNI (AVX2 only) MLAS's U8S8 kernel
  (vpmaddubsw) can saturate its 16-bit intermediate sums; 7-bit weights avoid that at some accuracy cost. Off by
  default: the per-group validation gate says whether a build needs it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from fairdeploy.errors import FairdeployError

if TYPE_CHECKING:
    from fairdeploy.export.int8 import QdqSummary

# ONNX TensorProto data types of zero points
ONNX_UINT8, ONNX_INT8 = 2, 3


@dataclass(frozen=True)
class QuantTarget:
    """What an INT8 graph for one runtime holds: activation type and symmetry, and its Q/DQ placement."""

    name: str
    runtime: str  # in words, for messages
    activation_type: str  # "int8" | "uint8"
    symmetric_activations: bool
    quantize_bias: bool  # int32 biases (ORT's QLinearConv) or float (TensorRT folds them)
    placement: str  # qdq_placement.PLACEMENTS: where this target's Q/DQ pairs go unless the recipe says otherwise

    def quantize_static_options(self, reduce_range: bool = False) -> dict[str, Any]:
        """Keyword arguments of onnxruntime.quantization.quantize_static for this target (placement aside)."""
        from onnxruntime.quantization import QuantType

        return {
            "activation_type": QuantType.QUInt8 if self.activation_type == "uint8" else QuantType.QInt8,
            "weight_type": QuantType.QInt8, "per_channel": True, "reduce_range": bool(reduce_range),
            "extra_options": {"ActivationSymmetric": self.symmetric_activations, "WeightSymmetric": True,
                              "QuantizeBias": self.quantize_bias},
        }

    def graph_problem(self, summary: QdqSummary) -> str | None:
        """Why a quantized graph (its qdq_summary) is not what this target runs; None when it is."""
        if summary.quantize_nodes == 0:
            return "no QuantizeLinear node"
        if summary.nonzero_weight_zero_points:
            return f"weight zero point {summary.nonzero_weight_zero_points[0]} is not 0"
        if summary.per_channel_weights == 0:
            return "no per-channel weight"
        want = ONNX_UINT8 if self.activation_type == "uint8" else ONNX_INT8
        if summary.activation_zero_point_types != (want,):
            return (f"activation zero points of ONNX types {list(summary.activation_zero_point_types)}, expected "
                    f"[{want}] ({self.activation_type})")
        if self.symmetric_activations and not summary.symmetric:
            return "not symmetric (a zero point is not 0)"
        return None


TARGETS: dict[str, QuantTarget] = {
    t.name: t for t in (
        QuantTarget("tensorrt", "TensorRT", "int8", symmetric_activations=True, quantize_bias=False,
                    placement="tensorrt"),
        QuantTarget("ort-cpu", "ONNX Runtime's CPU provider", "uint8", symmetric_activations=False,
                    quantize_bias=True, placement="ort-cpu"),
    )
}
DEFAULT_TARGET = "tensorrt"


def check_target(name: Any, where: str = "INT8 options") -> str:
    """`name` when it is a target; else one line naming the valid ones."""
    if name not in TARGETS:
        raise FairdeployError(f"{where}: quantization target {name!r} is not one of {', '.join(TARGETS)}")
    return name


def target_of(name: str) -> QuantTarget:
    return TARGETS[check_target(name)]


def check_quantized_graph(model: Any, target: str, name: str) -> QdqSummary:
    """The graph's qdq_summary, or one line saying how it differs from what `target` runs."""
    from fairdeploy.export.int8 import qdq_summary

    summary = qdq_summary(model)
    problem = target_of(target).graph_problem(summary)
    if problem is not None:
        raise FairdeployError(f"{name}: quantization for target {target!r} produced an unexpected graph: {problem}")
    return summary


def check_engine_target(target: str, where: str) -> None:
    """TensorRT builds an INT8 engine from model.int8.onnx only when its Q/DQ are TensorRT's (symmetric, zero
    point 0): one line otherwise."""
    if target != "tensorrt":
        raise FairdeployError(f"{where}: a TensorRT INT8 engine needs model.int8.onnx quantized for target "
                              f"'tensorrt' (symmetric, zero point 0), this export's target is {target!r}; export "
                              "the engine separately with --int8-target tensorrt")

