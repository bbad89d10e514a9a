"""Group-aware mixed precision: which layers of an INT8 graph stay FP32 so that every group passes the gate.

Sensitivity of a layer = the graph with *only that layer INT8* (every other weighted layer FP32, Q/DQ placed
as for TensorRT), compared with the FP32 graph on validation images, per group: top-1 agreement with FP32,
accuracy and its drop, mean |Δlogit|. Layers are ranked by harm to the worst group (lowest agreement, then
largest accuracy drop, then largest mean |Δlogit|), and the most harmful are kept in FP32 one at a time until
the all-but-those INT8 graph passes the validation gate (validation.tolerances: overall and per-group accuracy
drop, Eodd drift) against the FP32 graph on the same images.
"""

from __future__ import annotations

import copy
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from fairdeploy.errors import FairdeployError
from fairdeploy.export.qdq_placement import place_qdq, weighted_nodes
from fairdeploy.validation.tolerances import CheckResult, Tolerances, check_tolerances

if TYPE_CHECKING:
    from fairdeploy.metrics.fairness import MetricsReport
    from fairdeploy.validation.compare import AgreementStats

MIXED_PRECISION_MODES = ("off", "group-aware")
DEFAULT_MIXED_PRECISION = "off"
GRAPH_BATCH_SIZE = 64  # images per ONNX Runtime run in graph_logits (the sensitivity and gate passes)
SENSITIVITY_MEASURE = ("only this layer INT8, every other weighted layer FP32; compared with the FP32 graph "
                       "on the validation images, per group")


def check_mixed_precision(mode: str, where: str = "INT8 options") -> str:
    if mode not in MIXED_PRECISION_MODES:
        raise FairdeployError(f"{where}: mixed precision {mode!r} is not one of {', '.join(MIXED_PRECISION_MODES)}")
    return mode


@dataclass(frozen=True)
class EvalSet:
    """Validation images with labels and group indices (into group_names)."""

    inputs: np.ndarray
    labels: np.ndarray
    groups: np.ndarray
    group_names: tuple[str, ...]
    num_classes: int
    source: str = ""


@dataclass(frozen=True)
class Evaluation:
    """One graph against the FP32 graph on an EvalSet: per-group numbers and the gate's checks."""

    agreement: float
    agreement_per_group: dict[str, float]
    accuracy: float
    accuracy_per_group: dict[str, float]
    accuracy_drop_per_group: dict[str, float]  # FP32 accuracy minus this graph's
    mean_abs_logit_diff_per_group: dict[str, float]
    checks: tuple[CheckResult, ...] = field(repr=False)

    @property
    def passed(self) -> bool:
        return all(c.passed for c in self.checks)

    @property
    def harm(self) -> tuple[float, float, float]:
        """Worst group's disagreement, accuracy drop and mean |Δlogit|, compared in that order."""
        return (max(1.0 - a for a in self.agreement_per_group.values()),
                max(self.accuracy_drop_per_group.values()),
                max(self.mean_abs_logit_diff_per_group.values()))

    def failing(self) -> list[str]:
        return [c.describe() for c in self.checks if not c.passed]

    def to_dict(self) -> dict[str, Any]:
        return {"agreement": self.agreement, "agreement_per_group": self.agreement_per_group,
                "accuracy": self.accuracy, "accuracy_per_group": self.accuracy_per_group,
                "accuracy_drop_per_group": self.accuracy_drop_per_group,
                "mean_abs_logit_diff_per_group": self.mean_abs_logit_diff_per_group,
                "gate_passed": self.passed, "gate_failures": self.failing()}


@dataclass(frozen=True)
class LayerSensitivity:
    layer: str
    op_type: str
    evaluation: Evaluation

    def to_dict(self) -> dict[str, Any]:
        return {"layer": self.layer, "op_type": self.op_type, "harm": list(self.evaluation.harm),
                **self.evaluation.to_dict()}


@dataclass(frozen=True)
class MixedPrecisionPlan:
    """What group-aware mixed precision decided, and the numbers it decided on (for export.json)."""

    kept_fp32: tuple[str, ...]
    vanilla: Evaluation  # every weighted layer INT8
    final: Evaluation  # kept_fp32 in FP32
    sensitivity: tuple[LayerSensitivity, ...]  # most harmful first
    steps: tuple[tuple[str, Evaluation], ...]  # (layer kept FP32, the graph's evaluation after keeping it)
    tolerances: Tolerances
    data_source: str

    def to_dict(self) -> dict[str, Any]:
        by_layer = {s.layer: s for s in self.sensitivity}
        return {
            "mode": "group-aware",
            "measure": SENSITIVITY_MEASURE,
            "data": self.data_source,
            "tolerances": self.tolerances.to_dict(),
            "kept_fp32": [
                {"layer": layer, "rank": [s.layer for s in self.sensitivity].index(layer) + 1,
                 "why": f"gate failed before it was kept: {'; '.join(before.failing())}",
                 "sensitivity": by_layer[layer].to_dict(), "after": after.to_dict()}
                for (layer, after), before in zip(self.steps, (self.vanilla, *(e for _, e in self.steps)))
            ],
            "vanilla_int8": self.vanilla.to_dict(),
            "final": self.final.to_dict(),
            "sensitivity": [s.to_dict() for s in self.sensitivity],
        }


def graph_logits(model: Any, inputs: np.ndarray, batch_size: int = GRAPH_BATCH_SIZE,
                 threads: int = 0) -> np.ndarray:
    """Logits of an in-memory ONNX graph (N, 3, H, H inputs; (N, K) logits, K static in the graph) run by the
    runtime's CPU OrtRunner."""
    import onnx

    from fairdeploy.runtime.base import array_batches, runner_logits
    from fairdeploy.runtime.ort_runner import OrtRunner, graph_info

    dims = model.graph.output[0].type.tensor_type.shape.dim
    num_classes = dims[1].dim_value if len(dims) == 2 else 0
    if not num_classes:
        raise FairdeployError(f"graph output {model.graph.output[0].name!r} has no fixed class count")
    with tempfile.TemporaryDirectory(prefix=".mixed.") as work:
        path = Path(work) / "graph.onnx"
        onnx.save(model, str(path))
        runner = OrtRunner(path, threads=threads, info=graph_info(path, inputs.shape[-1], num_classes))
        return runner_logits(runner, array_batches(inputs, batch_size))


@dataclass(frozen=True)
class ReferenceParts:
    """What `evaluate` needs of the FP32 reference on an EvalSet, computed once (`reference_parts`) and shared by
    every evaluation against it."""

    names: np.ndarray  # each sample's group name
    order: tuple[str, ...]  # the groups present, in group_names order
    pred: np.ndarray
    correct: AgreementStats  # the reference's predictions against the labels (its accuracy)
    metrics: MetricsReport  # of the reference's predictions


def reference_parts(reference: np.ndarray, data: EvalSet) -> ReferenceParts:
    """The FP32 `reference` logits' groups, predictions, accuracy and metrics on `data`."""
    from fairdeploy.metrics import compute_metrics
    from fairdeploy.validation.compare import agreement_stats, named_groups

    names, order = named_groups(data.groups, data.group_names)
    ref_pred = reference.argmax(1)
    return ReferenceParts(names, order, ref_pred, agreement_stats(data.labels, ref_pred, names, order),
                          compute_metrics(data.labels, ref_pred, names, num_classes=data.num_classes,
                                          group_order=order))


def evaluate(logits: np.ndarray, reference: np.ndarray, data: EvalSet, tol: Tolerances,
             ref: ReferenceParts | None = None) -> Evaluation:
    """`logits` against the FP32 `reference` logits on `data`: per-group numbers and the gate's checks. `ref`:
    reference_parts(reference, data), when the caller evaluates several graphs against one reference."""
    from fairdeploy.metrics import compute_metrics
    from fairdeploy.validation.compare import agreement_stats, logit_diff_stats

    ref = ref if ref is not None else reference_parts(reference, data)
    names, order = ref.names, ref.order
    pred = logits.argmax(1)
    same = agreement_stats(ref.pred, pred, names, order)
    correct = agreement_stats(data.labels, pred, names, order)  # accuracy: top-1 agreement with the labels
    diff = logit_diff_stats(reference, logits, names, order)
    checks = check_tolerances(ref.metrics,
                              compute_metrics(data.labels, pred, names, num_classes=data.num_classes,
                                              group_order=order), same.overall, same.groups, tol)
    return Evaluation(
        agreement=same.overall, agreement_per_group=same.groups,
        accuracy=correct.overall, accuracy_per_group=correct.groups,
        accuracy_drop_per_group={g: ref.correct.groups[g] - correct.groups[g] for g in order},
        mean_abs_logit_diff_per_group={g: diff.groups[g].mean_abs for g in order}, checks=checks)


def with_fp32_layers(int8_model: Any, fp32_model: Any, layers: Sequence[str]) -> Any:
    """A copy of the (TensorRT-placed) INT8 graph with `layers` in FP32."""
    return place_qdq(copy.deepcopy(int8_model), fp32_model, layers)


def layer_sensitivity(int8_model: Any, fp32_model: Any, data: EvalSet, reference: np.ndarray,
                      tol: Tolerances, threads: int = 0,
                      ref: ReferenceParts | None = None) -> tuple[LayerSensitivity, ...]:
    """Each weighted layer's harm when it alone is INT8, most harmful first (ties: graph order). `ref`:
    reference_parts(reference, data), if the caller has it."""
    ref = ref if ref is not None else reference_parts(reference, data)
    layers = weighted_nodes(int8_model)
    ops = {n.name: n.op_type for n in int8_model.graph.node}
    out = []
    for layer in layers:
        only = with_fp32_layers(int8_model, fp32_model, [x for x in layers if x != layer])
        out.append(LayerSensitivity(layer, ops[layer],
                                    evaluate(graph_logits(only, data.inputs, threads=threads), reference, data, tol,
                                             ref)))
    order = sorted(range(len(out)), key=lambda i: (tuple(-h for h in out[i].evaluation.harm), i))
    return tuple(out[i] for i in order)


def plan_group_aware(int8_model: Any, fp32_model: Any, data: EvalSet, tol: Tolerances | None = None,
                     threads: int = 0) -> MixedPrecisionPlan:
    """Keep the most harmful layers (layer_sensitivity order) in FP32, one at a time, until the graph passes
    the gate against the FP32 graph on `data`. A graph that passes only with every layer in FP32 is an error."""
    tol = tol or Tolerances()
    if len(data.inputs) == 0:
        raise FairdeployError("group-aware mixed precision needs validation images; the split is empty")
    reference = graph_logits(fp32_model, data.inputs, threads=threads)
    ref = reference_parts(reference, data)  # once, for every evaluation against the FP32 graph below
    vanilla = evaluate(graph_logits(int8_model, data.inputs, threads=threads), reference, data, tol, ref)
    sensitivity = (layer_sensitivity(int8_model, fp32_model, data, reference, tol, threads, ref)
                   if not vanilla.passed else ())
    kept: list[str] = []
    steps: list[tuple[str, Evaluation]] = []
    current = vanilla
    for s in sensitivity:
        if current.passed:
            break
        kept.append(s.layer)
        current = evaluate(graph_logits(with_fp32_layers(int8_model, fp32_model, kept), data.inputs,
                                        threads=threads), reference, data, tol, ref)
        steps.append((s.layer, current))
    if not current.passed or (sensitivity and len(kept) == len(sensitivity)):
        raise FairdeployError(
            f"group-aware mixed precision: the INT8 graph passes the gate on {data.source or 'the validation set'} "
            f"only with every layer in FP32 ({'; '.join(vanilla.failing())}); export fp16 instead")
    return MixedPrecisionPlan(kept_fp32=tuple(kept), vanilla=vanilla, final=current, sensitivity=sensitivity,
                              steps=tuple(steps), tolerances=tol, data_source=data.source)
