"""Where Q/DQ pairs sit in an INT8 ONNX graph: TensorRT's placement, as a pass over ONNX Runtime's Q/DQ output.

ONNX Runtime's `quantize_static` (QDQ format) quantizes the inputs *and outputs* of every quantized op, and a
quantized tensor's DequantizeLinear feeds *every* consumer of that tensor, quantized or not. NVIDIA's
explicit-quantization guide places Q/DQ differently, and TensorRT fuses better with its placement:

* on the inputs of weighted ops (Conv, Gemm, MatMul): the activation input and the weight (per channel);
* on a residual Add, only on the shortcut input, so the Add fuses into the convolution that produces the
  other input (which stays float between that conv and the Add);
* on the input of a pooling op (MaxPool, AveragePool, GlobalAveragePool) or a Flatten next to an INT8 weighted
  op, directly or through data-movement ops (Flatten, Reshape, ...), so it runs in INT8 between INT8 layers;
* nowhere else: no Q/DQ on the input of HardSwish, HardSigmoid, Mul, ... (ops TensorRT runs in higher
  precision) and none on a conv output whose consumers are all such ops.

NVIDIA's Model Optimizer (modelopt.onnx.quantization, int8.py / partitioning.py / ort_utils.py) is the reference
for the pooling rule: its find_quantizable_nodes quantizes a pooling op's input when the op has a quantized
consumer or producer, through copy ops (`_has_quantizable_consumer` / `_has_quantizable_producer`), with ORT's
ForceQuantizeNoInputCheck and no output quantization. Two departures, on purpose:
* Flatten: ModelOpt quantizes every Flatten it does not partition; here Flatten follows the pooling rule, so a
  Flatten whose neighbours are kept FP32 (mixed precision) gets no lone Q/DQ pair. On an all-INT8 graph the two
  agree (resnet18's Flatten feeds the INT8 Gemm).
* Unquantized ops stay FP32; ModelOpt converts them to FP16 by default (high_precision_dtype="fp16"). The Q/DQ
  graph is also what ONNX Runtime's CPU provider runs for `validate` and the per-group gate (where FP16 is slower
  and adds casts), and the gate and mixed precision compare INT8 with FP32: FP16 elsewhere would make a layer
  "kept FP32" not FP32. A TensorRT engine from this graph therefore runs its unquantized ops in FP32 (TF32 off).

`place_qdq` takes ORT's graph (quantized with `ort_settings(placement)`) and rewires every consumer that
should read the float tensor back to the tensor before the Q/DQ pair, then drops the pairs nobody reads.
The same pass leaves chosen weighted layers in FP32 (mixed precision): their inputs are rewired to the float
tensor and their weights replaced by the FP32 model's.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass
from typing import Any

from fairdeploy.errors import FairdeployError

PLACEMENTS = ("tensorrt", "ort-default", "ort-cpu")
WEIGHTED_OPS = ("Conv", "Gemm", "MatMul")
# The op types handed to ORT: the weighted ops and Add (whose inputs ORT calibrates, so a shortcut has a scale).
QUANTIZED_OP_TYPES = (*WEIGHTED_OPS, "Add")
POOLING_OPS = ("MaxPool", "AveragePool", "GlobalAveragePool")
# Data-movement ops the neighbour rule looks through (ModelOpt's copy ops that torchvision graphs contain).
COPY_OPS = ("Flatten", "Reshape", "Transpose", "Squeeze", "Unsqueeze")
# Quantized at their input when next to an INT8 weighted op (place_qdq; ModelOpt's pooling rule).
NEIGHBOUR_QUANTIZED_OPS = (*POOLING_OPS, "Flatten")
# The "tensorrt" placement's op types for ORT: pooling and Flatten too (place_qdq keeps what the rule says).
TENSORRT_OP_TYPES = (*QUANTIZED_OP_TYPES, *NEIGHBOUR_QUANTIZED_OPS)


def check_placement(placement: str, where: str = "INT8 options") -> str:
    if placement not in PLACEMENTS:
        raise FairdeployError(f"{where}: Q/DQ placement {placement!r} is not one of {', '.join(PLACEMENTS)}")
    return placement


def ort_settings(placement: str) -> tuple[list[str], dict[str, Any]]:
    """(op_types_to_quantize, extra_options) for onnxruntime.quantization.quantize_static: where the Q/DQ pairs go
    (the types and symmetry are the quantization target's, quant_target).

    "tensorrt" also keeps ORT from quantizing the outputs of the quantized ops; place_qdq then removes what
    TensorRT does not want. "ort-default" is ORT's own placement over the weighted ops and Add, unchanged.
    "ort-cpu" is ORT's own placement over every op type ORT quantizes (its default when no op type is given:
    pooling, Mul, Flatten, ... too), so its CPU provider fuses whole chains into QLinear* kernels."""
    extra: dict[str, Any] = {}
    if check_placement(placement) == "tensorrt":
        # As ModelOpt configures ORT: no output quantization, and pooling / Flatten inputs quantized even where
        # the producer is not (ORT's default quantizes such "direct 8-bit" ops only after a quantized input).
        extra["OpTypesToExcludeOutputQuantization"] = list(TENSORRT_OP_TYPES)
        extra["ForceQuantizeNoInputCheck"] = True
        return list(TENSORRT_OP_TYPES), extra
    if placement == "ort-cpu":
        from onnxruntime.quantization.registry import QDQRegistry, QLinearOpsRegistry

        return sorted({*QLinearOpsRegistry, *QDQRegistry}), extra
    return list(QUANTIZED_OP_TYPES), extra


@dataclass(frozen=True)
class ResidualAdd:
    """A residual Add: `fused` is the input TensorRT fuses the Add into (a weighted op's output read only by
    this Add, the deeper one when both are), `shortcut` the other input (the one that gets Q/DQ)."""

    node: str
    fused_input: int  # index into the Add's inputs
    fused_into: str  # the weighted node producing that input
    shortcut_input: int


class _Graph:
    """Producer / consumer maps of a graph, with activation Q/DQ pairs seen through (DQ output -> float)."""

    def __init__(self, model: Any):
        g = model.graph
        self.model = model
        self.inits = {i.name: i for i in g.initializer}
        self.producer = {o: n for n in g.node for o in n.output}
        self.consumers: dict[str, list[tuple[Any, int]]] = {}
        for n in g.node:
            for i, name in enumerate(n.input):
                self.consumers.setdefault(name, []).append((n, i))
        self.outputs = {o.name for o in g.output}

    def float_source(self, tensor: str) -> str:
        """The tensor before an activation Q -> DQ pair (itself when it is not a DQ output)."""
        dq = self.producer.get(tensor)
        if dq is not None and dq.op_type == "DequantizeLinear":
            q = self.producer.get(dq.input[0])
            if q is not None and q.op_type == "QuantizeLinear":
                return q.input[0]
        return tensor

    def is_activation_dq(self, tensor: str) -> bool:
        return self.float_source(tensor) != tensor

    def is_constant(self, tensor: str) -> bool:
        if tensor in self.inits:
            return True
        p = self.producer.get(tensor)
        if p is None:
            return False
        if p.op_type == "Constant":
            return True
        return p.op_type == "DequantizeLinear" and p.input[0] in self.inits  # a quantized weight

    def float_consumers(self, tensor: str) -> list[tuple[Any, int]]:
        """Consumers of `tensor` directly or through its activation Q/DQ pair(s)."""
        out = list(self.consumers.get(tensor, []))
        for q, _ in self.consumers.get(tensor, []):
            if q.op_type != "QuantizeLinear":
                continue
            for dq, _ in self.consumers.get(q.output[0], []):
                if dq.op_type == "DequantizeLinear":
                    out.extend(self.consumers.get(dq.output[0], []))
        return [(n, i) for n, i in out if n.op_type not in ("QuantizeLinear", "DequantizeLinear")]

    def depths(self) -> dict[str, int]:
        """Longest path (in non-Q/DQ nodes) from a graph input to each node, by node name."""
        depth: dict[str, int] = {}
        for n in self.model.graph.node:  # ONNX nodes are topologically sorted
            d = 0
            for name in n.input:
                p = self.producer.get(name)
                if p is not None:
                    d = max(d, depth.get(p.name, 0))
            depth[n.name] = d + (0 if n.op_type in ("QuantizeLinear", "DequantizeLinear") else 1)
        return depth


def weighted_nodes(model: Any) -> list[str]:
    """Names of the weighted ops whose second input is a constant (a weight), in graph order."""
    g = _Graph(model)
    return [n.name for n in model.graph.node
            if n.op_type in WEIGHTED_OPS and len(n.input) > 1 and g.is_constant(n.input[1])]


def residual_adds(model: Any) -> list[ResidualAdd]:
    """Every Add of two activations of which at least one is a weighted op's output read only by the Add."""
    g = _Graph(model)
    weighted = set(weighted_nodes(model))
    depth = g.depths()
    found = []
    for n in model.graph.node:
        if n.op_type != "Add" or len(n.input) != 2 or any(g.is_constant(t) for t in n.input):
            continue
        candidates = []
        for i, t in enumerate(n.input):
            src = g.float_source(t)
            p = g.producer.get(src)
            if p is None or p.name not in weighted or src in g.outputs:
                continue
            if [c.name for c, _ in g.float_consumers(src)] == [n.name]:
                candidates.append((depth[p.name], -i, i, p.name))
        if candidates:
            _, _, fused, into = max(candidates)
            found.append(ResidualAdd(node=n.name, fused_input=fused, fused_into=into, shortcut_input=1 - fused))
    return found


def neighbour_quantized(model: Any, int8: Collection[str]) -> set[str]:
    """The pooling ops and Flattens (NEIGHBOUR_QUANTIZED_OPS) whose input TensorRT's placement quantizes: those
    that feed an INT8 weighted op or are fed by one, directly or through COPY_OPS (a graph output's producer
    excluded, as ModelOpt's skipped output layers). `int8`: the weighted nodes left INT8."""
    return _neighbour_quantized(_Graph(model), int8)


def _neighbour_quantized(g: _Graph, int8: Collection[str]) -> set[str]:
    """neighbour_quantized on the graph's maps `g` (place_qdq's, built before it rewires anything)."""
    int8 = set(int8)

    def feeds_int8(node: Any) -> bool:
        for c, _ in g.float_consumers(node.output[0]):
            if c.name in int8 or (c.op_type in COPY_OPS and feeds_int8(c)):
                return True
        return False

    def fed_by_int8(node: Any) -> bool:
        p = g.producer.get(g.float_source(node.input[0]))
        while p is not None and p.op_type in (*COPY_OPS, "Cast"):
            p = g.producer.get(g.float_source(p.input[0]))
        return p is not None and p.name in int8

    return {n.name for n in g.model.graph.node if n.op_type in NEIGHBOUR_QUANTIZED_OPS
            and g.float_source(n.output[0]) not in g.outputs and (feeds_int8(n) or fed_by_int8(n))}


def adds_fused_into(model: Any, layers: Collection[str]) -> list[str]:
    """The residual Adds that fuse into one of `layers` (they follow their conv's precision)."""
    wanted = set(layers)
    return [a.node for a in residual_adds(model) if a.fused_into in wanted]


def place_qdq(model: Any, fp32_model: Any, keep_fp32: Collection[str] = ()) -> Any:
    """TensorRT's Q/DQ placement on ORT's Q/DQ `model` (modified in place and returned).

    Kept: the Q/DQ of each weighted op's activation inputs and weight, of each residual Add's shortcut input and
    of the input of each pooling op / Flatten next to an INT8 weighted op (neighbour_quantized); every other
    consumer of a Q/DQ pair is rewired to the float tensor. Layers named in `keep_fp32` (weighted nodes) become
    FP32: float activation input, the FP32 model's weight, their residual Add unquantized, and they no longer
    count as INT8 neighbours. Q/DQ nodes and initializers nobody reads any more are removed."""
    g = _Graph(model)
    weighted = weighted_nodes(model)
    unknown = sorted(set(keep_fp32) - set(weighted))
    if unknown:
        raise FairdeployError(f"cannot keep {unknown[0]!r} in FP32: not a weighted layer of the graph "
                              f"(weighted layers: {', '.join(weighted[:5])}{', ...' if len(weighted) > 5 else ''})")
    int8 = set(weighted) - set(keep_fp32)
    shortcut = {(a.node, a.shortcut_input) for a in residual_adds(model) if a.fused_into in int8}
    inputs_kept = shortcut | {(name, 0) for name in _neighbour_quantized(g, int8)}  # (node, input index)
    fp32_nodes = {n.name: n for n in fp32_model.graph.node}
    fp32_inits = {i.name: i for i in fp32_model.graph.initializer}
    for n in model.graph.node:
        if n.op_type in ("QuantizeLinear", "DequantizeLinear"):
            continue
        for i, t in enumerate(n.input):
            if g.is_activation_dq(t):
                keep = (n.name in int8 and not g.is_constant(t)) or (n.name, i) in inputs_kept
                if not keep:
                    n.input[i] = g.float_source(t)
            elif n.name in keep_fp32 and i > 0 and g.is_constant(t) and t not in g.inits:
                original = fp32_nodes.get(n.name)
                if original is None or len(original.input) <= i or original.input[i] not in fp32_inits:
                    raise FairdeployError(f"{n.name}: its FP32 weight is not in the FP32 model")
                name = original.input[i]
                if name not in g.inits:
                    model.graph.initializer.append(fp32_inits[name])
                    g.inits[name] = fp32_inits[name]
                n.input[i] = name
    _drop_unread(model)
    return model


def _drop_unread(model: Any) -> None:
    """Remove Q/DQ/Constant nodes whose outputs nobody reads, then initializers nobody reads."""
    g = model.graph
    while True:
        read = {t for n in g.node for t in n.input} | {o.name for o in g.output}
        dead = [n for n in g.node if n.op_type in ("QuantizeLinear", "DequantizeLinear", "Constant")
                and not any(o in read for o in n.output)]
        if not dead:
            break
        for n in dead:
            g.node.remove(n)
    read = {t for n in g.node for t in n.input} | {o.name for o in g.output}
    for init in [i for i in g.initializer if i.name not in read]:
        g.initializer.remove(init)
