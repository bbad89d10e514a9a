"""compute_metrics: one frozen report of per-group and fairness metrics, the same shape every time."""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from fairdeploy.errors import FairdeployError

DEFAULT_CONFIDENCE = 0.95  # the central share of the bootstrap distribution an interval covers

METRIC_DEFINITIONS = {
    "rates": "one-vs-rest per class k inside group g: TPR=TP/(TP+FN), TNR=TN/(TN+FP), FPR=FP/(FP+TN); "
    "a 0/0 rate is 0 and counted in undefined_cells",
    "eopp0": "(1/K) * sum_k |TNR_k^a - TNR_k^b|",
    "eopp1": "(1/K) * sum_k |TPR_k^a - TPR_k^b|",
    "eodd": "(1/K) * sum_k |(TPR_k^a - TPR_k^b) + (FPR_k^a - FPR_k^b)| / 2",
    "dp": "sum_k |P(yhat=k|a) - P(yhat=k|b)|",
    "pairs": "with more than two groups each gap is the maximum over group pairs (worst_pair names it)",
    "K": "the number of classes of the dataset, not of the classes present in a split",
    "group_prf": "per group precision/recall/F1 macro-averaged over the classes in that group's "
    "y_true or y_pred (scikit-learn default labels, zero_division=0)",
    "avg_diff": "avg = mean over groups; diff = max - min over groups",
    "fate": "FATE = (F1_m - F1_b)/F1_b - (FC_m - FC_b)/FC_b with F1 = overall macro-F1 and FC one of "
    "eopp0/eopp1/eodd; higher is better",
}

FAIRNESS_KEYS = ("eopp0", "eopp1", "eodd", "dp")


@dataclass(frozen=True)
class GroupMetrics:
    """Metrics of one sensitive group."""

    n: int
    accuracy: float
    precision_macro: float
    recall_macro: float
    f1_macro: float
    tpr: tuple[float, ...]
    tnr: tuple[float, ...]
    fpr: tuple[float, ...]
    positive_rate: tuple[float, ...]  # P(yhat = k | g)
    confusion: tuple[tuple[int, ...], ...]  # rows: true class, columns: predicted class

    def to_dict(self) -> dict[str, Any]:
        return {
            "n": self.n,
            "accuracy": self.accuracy,
            "precision_macro": self.precision_macro,
            "recall_macro": self.recall_macro,
            "f1_macro": self.f1_macro,
            "tpr": list(self.tpr),
            "tnr": list(self.tnr),
            "fpr": list(self.fpr),
            "positive_rate": list(self.positive_rate),
            "confusion": [list(r) for r in self.confusion],
        }


@dataclass(frozen=True)
class MetricsReport:
    """The result of compute_metrics. `to_dict()` is what metrics.json holds."""

    n: int
    num_classes: int
    class_names: tuple[str, ...]
    overall_accuracy: float
    overall_f1_macro: float
    groups: tuple[tuple[str, GroupMetrics], ...]
    fairness: tuple[tuple[str, float | None], ...]
    worst_pair: tuple[tuple[str, tuple[str, str] | None], ...]
    undefined_cells: int
    intervals: tuple[tuple[str, tuple[float, float]], ...] = ()

    def group(self, name: str) -> GroupMetrics:
        for g, m in self.groups:
            if g == name:
                return m
        raise KeyError(name)

    @property
    def group_names(self) -> list[str]:
        return [g for g, _ in self.groups]

    def gap(self, name: str) -> float | None:
        return dict(self.fairness)[name]

    def summary(self) -> dict[str, dict[str, float]]:
        """Avg and Diff across groups of accuracy and macro P/R/F1."""
        out: dict[str, dict[str, float]] = {}
        for key in ("accuracy", "precision_macro", "recall_macro", "f1_macro"):
            vals = [getattr(m, key) for _, m in self.groups]
            out[key] = {"avg": float(np.mean(vals)), "diff": float(max(vals) - min(vals))}
        return out

    def to_dict(self) -> dict[str, Any]:
        return {
            "n": self.n,
            "num_classes": self.num_classes,
            "class_names": list(self.class_names),
            "overall": {"accuracy": self.overall_accuracy, "f1_macro": self.overall_f1_macro},
            "groups": {g: m.to_dict() for g, m in self.groups},
            "summary": self.summary(),
            "fairness": dict(self.fairness),
            "worst_pair": {k: (list(v) if v else None) for k, v in self.worst_pair},
            "undefined_cells": self.undefined_cells,
            "intervals": {k: list(v) for k, v in self.intervals},
            "definitions": METRIC_DEFINITIONS,
        }


def _safe_div(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    """num/den elementwise with 0/0 (or x/0) = 0, the published convention."""
    num = np.asarray(num, dtype=np.float64)
    den = np.asarray(den, dtype=np.float64)
    out = np.zeros(np.broadcast(num, den).shape, dtype=np.float64)
    np.divide(num, den, out=out, where=den > 0)
    return out


def rates_from_counts(
    tp: np.ndarray, pos: np.ndarray, predpos: np.ndarray, n: np.ndarray | int
) -> dict[str, np.ndarray]:
    """One-vs-rest rates from per-class counts (any leading batch shape, classes last)."""
    n = np.asarray(n, dtype=np.float64)[..., None] if np.ndim(n) else np.float64(n)
    fp = predpos - tp
    neg = n - pos
    tn = neg - fp
    return {
        "tpr": _safe_div(tp, pos),
        "tnr": _safe_div(tn, neg),
        "fpr": _safe_div(fp, neg),
        "positive_rate": _safe_div(predpos, n * np.ones_like(predpos, dtype=np.float64)),
        "accuracy": _safe_div(tp.sum(-1), np.asarray(n).squeeze(-1) if np.ndim(n) else n),
    }


def pair_gaps(ra: dict[str, np.ndarray], rb: dict[str, np.ndarray], num_classes: int) -> dict[str, np.ndarray]:
    """Eopp0, Eopp1, Eodd and DP between two groups' rates (classes on the last axis)."""
    return {
        "eopp0": np.abs(ra["tnr"] - rb["tnr"]).sum(-1) / num_classes,
        "eopp1": np.abs(ra["tpr"] - rb["tpr"]).sum(-1) / num_classes,
        "eodd": np.abs((ra["tpr"] - rb["tpr"]) + (ra["fpr"] - rb["fpr"])).sum(-1) / (2 * num_classes),
        "dp": np.abs(ra["positive_rate"] - rb["positive_rate"]).sum(-1),
    }


def _macro_prf(cm: np.ndarray) -> tuple[float, float, float]:
    """Macro precision/recall/F1 over the classes present in y_true or y_pred (zero_division=0)."""
    tp = np.diag(cm).astype(np.float64)
    pos = cm.sum(1).astype(np.float64)
    predpos = cm.sum(0).astype(np.float64)
    present = (pos + predpos) > 0
    if not present.any():
        return 0.0, 0.0, 0.0
    precision = _safe_div(tp, predpos)
    recall = _safe_div(tp, pos)
    f1 = _safe_div(2 * precision * recall, precision + recall)
    return (
        float(precision[present].mean()),
        float(recall[present].mean()),
        float(f1[present].mean()),
    )


def _as_int_array(values: Sequence[int] | np.ndarray, name: str, num_classes: int) -> np.ndarray:
    arr = np.asarray(values)
    if arr.ndim != 1:
        raise FairdeployError(f"{name} must be a 1-D array of class indices, got shape {arr.shape}")
    if arr.size and not np.issubdtype(arr.dtype, np.integer):
        if np.issubdtype(arr.dtype, np.floating) and np.all(arr == np.round(arr)):
            arr = arr.astype(np.int64)
        else:
            raise FairdeployError(f"{name} must hold integer class indices, got dtype {arr.dtype}")
    arr = arr.astype(np.int64)
    bad = (arr < 0) | (arr >= num_classes)
    if bad.any():
        raise FairdeployError(
            f"{name} holds class index {int(arr[bad][0])} outside 0..{num_classes - 1} (num_classes={num_classes})"
        )
    return arr


def compute_metrics(
    y_true: Sequence[int] | np.ndarray,
    y_pred: Sequence[int] | np.ndarray,
    groups: Sequence[str | int] | np.ndarray,
    num_classes: int,
    class_names: Sequence[str] | None = None,
    group_order: Sequence[str] | None = None,
    bootstrap: int = 0,
    seed: int = 0,
    confidence: float = DEFAULT_CONFIDENCE,
) -> MetricsReport:
    """Per-group and fairness metrics of integer predictions, as defined in METRIC_DEFINITIONS.

    `groups` may hold strings or ints; they are reported as strings. `group_order` fixes the order
    of the groups in the report (every listed group must have samples). With one group, the
    fairness gaps are None. `bootstrap` > 0 adds percentile intervals from resampling within groups.
    """
    if num_classes < 1:
        raise FairdeployError(f"num_classes must be >= 1, got {num_classes}")
    yt = _as_int_array(y_true, "y_true", num_classes)
    yp = _as_int_array(y_pred, "y_pred", num_classes)
    g = np.asarray([str(x) for x in np.asarray(groups).tolist()])
    if not (len(yt) == len(yp) == len(g)):
        raise FairdeployError(
            f"y_true, y_pred and groups must have the same length, got {len(yt)}, {len(yp)}, {len(g)}"
        )
    if len(yt) == 0:
        raise FairdeployError("cannot compute metrics on zero samples")
    names = tuple(class_names) if class_names is not None else tuple(str(k) for k in range(num_classes))
    if len(names) != num_classes:
        raise FairdeployError(f"{len(names)} class names given for num_classes={num_classes}")

    present = sorted(set(g.tolist()))
    order = list(group_order) if group_order is not None else present
    for name in order:
        if name not in present:
            raise FairdeployError(f"group {name!r} has no samples (groups present: {', '.join(present)})")
    extra = [p for p in present if p not in order]
    if extra:
        raise FairdeployError(f"group(s) {', '.join(extra)} not in the given group order {order}")

    K = num_classes
    per_group: list[tuple[str, GroupMetrics]] = []
    rates: dict[str, dict[str, np.ndarray]] = {}
    undefined = 0
    for name in order:
        mask = g == name
        cm = np.bincount(yt[mask] * K + yp[mask], minlength=K * K).reshape(K, K)
        tp = np.diag(cm)
        pos = cm.sum(1)
        predpos = cm.sum(0)
        n_g = int(mask.sum())
        r = rates_from_counts(tp, pos, predpos, n_g)
        rates[name] = r
        undefined += int((pos == 0).sum() + ((n_g - pos) == 0).sum())
        p, rc, f1 = _macro_prf(cm)
        per_group.append(
            (
                name,
                GroupMetrics(
                    n=n_g,
                    accuracy=float(tp.sum() / n_g),
                    precision_macro=p,
                    recall_macro=rc,
                    f1_macro=f1,
                    tpr=tuple(float(x) for x in r["tpr"]),
                    tnr=tuple(float(x) for x in r["tnr"]),
                    fpr=tuple(float(x) for x in r["fpr"]),
                    positive_rate=tuple(float(x) for x in r["positive_rate"]),
                    confusion=tuple(tuple(int(v) for v in row) for row in cm),
                ),
            )
        )

    fairness: dict[str, float | None] = {k: None for k in FAIRNESS_KEYS}
    worst: dict[str, tuple[str, str] | None] = {k: None for k in FAIRNESS_KEYS}
    for a, b in itertools.combinations(order, 2):
        gaps = pair_gaps(rates[a], rates[b], K)
        for k in FAIRNESS_KEYS:
            v = float(gaps[k])
            if fairness[k] is None or v > fairness[k]:  # type: ignore[operator]
                fairness[k] = v
                worst[k] = (a, b)

    cm_all = np.bincount(yt * K + yp, minlength=K * K).reshape(K, K)
    _, _, f1_all = _macro_prf(cm_all)

    intervals: tuple[tuple[str, tuple[float, float]], ...] = ()
    if bootstrap > 0 and len(order) >= 2:
        from fairdeploy.metrics.bootstrap import bootstrap_intervals

        intervals = tuple(
            bootstrap_intervals(yt, yp, g, order, K, n_boot=bootstrap, seed=seed, confidence=confidence).items()
        )

    return MetricsReport(
        n=len(yt),
        num_classes=K,
        class_names=names,
        overall_accuracy=float((yt == yp).mean()),
        overall_f1_macro=f1_all,
        groups=tuple(per_group),
        fairness=tuple(fairness.items()),
        worst_pair=tuple(worst.items()),
        undefined_cells=undefined,
        intervals=intervals,
    )


def fate(model: MetricsReport, baseline: MetricsReport) -> dict[str, float | None]:
    """FATE of `model` against `baseline` for each of Eopp0, Eopp1, Eodd (None where undefined)."""
    out: dict[str, float | None] = {}
    f1_b = baseline.overall_f1_macro
    for key in ("eopp0", "eopp1", "eodd"):
        fc_m, fc_b = model.gap(key), baseline.gap(key)
        if fc_m is None or fc_b is None or fc_b == 0 or f1_b == 0:
            out[key] = None
            continue
        out[key] = (model.overall_f1_macro - f1_b) / f1_b - (fc_m - fc_b) / fc_b
    return out
