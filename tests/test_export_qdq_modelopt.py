"""Issue 19 §2: the TensorRT Q/DQ placement follows NVIDIA Model Optimizer's pooling rule (a pooling op's input is
quantized when an INT8 weighted op is its consumer or producer, through copy ops such as Flatten). Checked by
walking the quantized graphs of real torchvision resnet18 and mobilenet_v3_small (random init, real BatchNorm
statistics, fairdeploy's own FP32 export), against the ops this file names by hand for each architecture; with
layers kept FP32 the rule follows their precision; and the quantized resnet18 still agrees with FP32 within half
the error of a clipped-range control on the same machine (no number taken from one CPU)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx_graphs import clipped_control, random_init_graphs

from fairdeploy.export.int8 import array_reader, quantize_qdq
from fairdeploy.export.mixed_precision import graph_logits
from fairdeploy.export.qdq_placement import ort_settings

pytestmark = pytest.mark.numerics

# By hand, from torchvision's definitions: resnet18 has one MaxPool (stem, feeding layer1.0.conv1) and the head
# GlobalAveragePool -> Flatten -> Gemm; mobilenet_v3_small has a GlobalAveragePool in each of its 9 squeeze-excite
# blocks (feeding their fc1 conv) and the head GlobalAveragePool -> Flatten -> Gemm.
EXPECTED = {"resnet18": {"MaxPool": 1, "GlobalAveragePool": 1, "Flatten": 1},
            "mobilenet_v3_small": {"GlobalAveragePool": 10, "Flatten": 1}}


class Walk:
    """This file's own view of a graph: producers and consumers, Q -> DQ pairs seen as 'quantized'."""

    def __init__(self, model: onnx.ModelProto):
        self.nodes = list(model.graph.node)
        self.producer = {o: n for n in self.nodes for o in n.output}
        self.by_name = {n.name: n for n in self.nodes}

    def quantized(self, tensor: str) -> bool:  # Q -> DQ -> tensor
        p = self.producer.get(tensor)
        return (p is not None and p.op_type == "DequantizeLinear" and p.input[0] in self.producer
                and self.producer[p.input[0]].op_type == "QuantizeLinear")

    def quantized_input_ops(self) -> dict[str, int]:
        """Counts, per op type other than weighted ops, Add and Q/DQ, of nodes whose first input is quantized."""
        out: dict[str, int] = {}
        for n in self.nodes:
            if n.op_type not in ("Conv", "Gemm", "MatMul", "Add", "QuantizeLinear", "DequantizeLinear") and n.input \
                    and self.quantized(n.input[0]):
                out[n.op_type] = out.get(n.op_type, 0) + 1
        return out


@pytest.fixture(scope="module")
def graphs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, list[np.ndarray]]]:
    return random_init_graphs(EXPECTED, tmp_path_factory)


@pytest.fixture(scope="module")
def quantized(graphs) -> dict[str, onnx.ModelProto]:
    return {arch: quantize_qdq(path, array_reader(batches), "minmax", placement="tensorrt")
            for arch, (path, batches) in graphs.items()}


def test_ort_is_configured_as_modelopt_configures_it() -> None:
    op_types, extra = ort_settings("tensorrt")
    assert {"MaxPool", "GlobalAveragePool", "AveragePool", "Flatten"} <= set(op_types)
    assert extra["ForceQuantizeNoInputCheck"] is True
    assert set(op_types) <= set(extra["OpTypesToExcludeOutputQuantization"])  # inputs only, never outputs


@pytest.mark.parametrize("arch", list(EXPECTED))
def test_pooling_and_flatten_inputs_are_quantized(quantized, arch: str) -> None:
    """Exactly the hand-known pooling ops and Flattens read a Q/DQ pair; no HardSwish / HardSigmoid / Relu /
    Mul does (the counts are per op type, so any extra quantized reader fails the equality)."""
    assert Walk(quantized[arch]).quantized_input_ops() == EXPECTED[arch]


def test_the_rule_follows_layers_kept_fp32(graphs) -> None:
    """Keep the head Gemm FP32: its GlobalAveragePool and Flatten lose their Q/DQ (no INT8 neighbour left; ModelOpt
    would keep Flatten's, see qdq_placement's docstring). Keep layer1.0.conv1 FP32: the stem MaxPool loses its Q/DQ
    (its other reader, the residual Add, is no weighted op, and its producer is a Relu)."""
    path, batches = graphs["resnet18"]
    gemm = quantize_qdq(path, array_reader(batches), "minmax", keep_fp32=["/fc/Gemm"])
    assert Walk(gemm).quantized_input_ops() == {"MaxPool": 1}
    conv = quantize_qdq(path, array_reader(batches), "minmax", keep_fp32=["/layer1/layer1.0/conv1/Conv"])
    assert Walk(conv).quantized_input_ops() == {"GlobalAveragePool": 1, "Flatten": 1}


def test_quantized_resnet18_agrees_with_fp32(graphs, quantized) -> None:
    """max |Δlogit| / max |FP32 logit| on the calibration images within half that of the same graph with every
    activation scale clipped (onnx_graphs.clipped_control, the Q/DQ placement test's control: a broken
    calibration), computed on this machine's kernels."""
    path, batches = graphs["resnet18"]
    x = np.concatenate(batches)
    fp32 = graph_logits(onnx.load(str(path)), x, 16, threads=1)
    assert np.ptp(fp32, axis=0).max() > 0.5 * np.abs(fp32).max()  # the logits depend on the image

    def rel_error(model: onnx.ModelProto) -> float:
        return float(np.abs(graph_logits(model, x, 16, threads=1) - fp32).max() / np.abs(fp32).max())

    model = quantized["resnet18"]
    control = rel_error(clipped_control(model))
    assert control / 2 < 1.0, f"the clipped control ({control:.3f}) is no control"
    assert rel_error(model) < control / 2
