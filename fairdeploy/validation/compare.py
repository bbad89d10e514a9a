"""The one comparison of a candidate's logits with a reference's on the same images (`compare` -> Comparison:
top-1 agreement, |Δlogit|, and on labelled images the candidate's metrics, flips, confusion and metric deltas,
overall and per group), made of pure functions tested against brute-force loops. `validate` and export's
self-check both compare with it what runtime.run_runners returned; group-aware mixed precision uses its parts."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from fairdeploy.errors import FairdeployError
from fairdeploy.metrics import MetricsReport, bootstrap_difference_intervals, compute_metrics
from fairdeploy.metrics.fairness import FAIRNESS_KEYS


@dataclass(frozen=True)
class AgreementStats:
    """Share of samples whose top-1 class equals the reference's (or the label's), overall and per group."""

    overall: float
    groups: dict[str, float]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class AbsDiff:
    """Max and mean over samples and classes of |candidate logit - reference logit|."""

    max_abs: float
    mean_abs: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class LogitDiff:
    """|Δlogit| overall (max and mean over samples and classes) and per group."""

    max_abs: float
    mean_abs: float
    groups: dict[str, AbsDiff]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Transition:
    """How many of a group's samples the reference predicted as `source` and the candidate as `target`."""

    source: str
    target: str
    count: int

    def to_dict(self) -> dict[str, Any]:
        return {"from": self.source, "to": self.target, "count": self.count}


@dataclass(frozen=True)
class GroupFlips:
    """One group's samples whose top-1 class changed (of which broken: the reference was right and the
    candidate wrong; fixed: the reverse) and each reference->candidate class transition."""

    n: int
    changed: int
    broken: int
    fixed: int
    transitions: tuple[Transition, ...]

    def to_dict(self) -> dict[str, Any]:
        return {"n": self.n, "changed": self.changed, "broken": self.broken, "fixed": self.fixed,
                "transitions": [t.to_dict() for t in self.transitions]}


@dataclass(frozen=True)
class GroupDeltas:
    """Candidate minus reference of one group's accuracy and macro P/R/F1."""

    accuracy: float
    precision_macro: float
    recall_macro: float
    f1_macro: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class MetricDeltas:
    """Candidate minus reference of every scalar two MetricsReports share (VALIDATION_DEFINITIONS["deltas"])."""

    accuracy: float
    f1_macro: float
    groups: dict[str, GroupDeltas]
    summary: dict[str, dict[str, float]]  # as MetricsReport.summary(): metric -> {"avg", "diff"}
    fairness: dict[str, float | None]  # None where a gap is undefined
    intervals: dict[str, tuple[float, float]] | None = None  # paired bootstrap CIs (None: not computed)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "overall": {"accuracy": self.accuracy, "f1_macro": self.f1_macro},
            "groups": {g: d.to_dict() for g, d in self.groups.items()},
            "summary": {k: dict(v) for k, v in self.summary.items()},
            "fairness": dict(self.fairness),
        }
        if self.intervals is not None:
            out["intervals"] = {k: list(v) for k, v in self.intervals.items()}
        return out


def named_groups(index: np.ndarray, names: Sequence[str]) -> tuple[np.ndarray, tuple[str, ...]]:
    """Each sample's group name from its group index, and the groups present, in `names` order."""
    return np.asarray(names)[index], tuple(g for i, g in enumerate(names) if np.any(index == i))


def agreement_stats(ref_pred: np.ndarray, cand_pred: np.ndarray, groups: np.ndarray,
                    group_order: Sequence[str]) -> AgreementStats:
    same = ref_pred == cand_pred
    return AgreementStats(float(same.mean()), {g: float(same[groups == g].mean()) for g in group_order})


def flip_stats(y_true: np.ndarray, ref_pred: np.ndarray, cand_pred: np.ndarray, groups: np.ndarray,
               group_order: Sequence[str], classes: Sequence[str]) -> dict[str, GroupFlips]:
    """Per group: changed / broken / fixed counts and each reference->candidate class transition's count."""
    K = len(classes)
    out: dict[str, GroupFlips] = {}
    for g in group_order:
        m = groups == g
        t, r, c = y_true[m], ref_pred[m], cand_pred[m]
        changed = r != c
        trans = np.bincount(r[changed] * K + c[changed], minlength=K * K).reshape(K, K)
        out[g] = GroupFlips(
            n=int(m.sum()),
            changed=int(changed.sum()),
            broken=int(((r == t) & (c != t)).sum()),
            fixed=int(((r != t) & (c == t)).sum()),
            transitions=tuple(Transition(classes[a], classes[b], int(trans[a, b]))
                              for a in range(K) for b in range(K) if trans[a, b]),
        )
    return out


def logit_diff_stats(ref_logits: np.ndarray, cand_logits: np.ndarray, groups: np.ndarray,
                     group_order: Sequence[str]) -> LogitDiff:
    d = np.abs(cand_logits.astype(np.float64) - ref_logits.astype(np.float64))
    return LogitDiff(
        float(d.max()), float(d.mean()),
        {g: AbsDiff(float(d[groups == g].max()), float(d[groups == g].mean())) for g in group_order},
    )


def _change(reference: float | None, candidate: float | None) -> float | None:
    """Candidate minus reference; None when either is undefined."""
    return None if reference is None or candidate is None else candidate - reference


def metric_deltas(reference: MetricsReport, candidate: MetricsReport,
                  intervals: dict[str, tuple[float, float]] | None = None) -> MetricDeltas:
    """Candidate minus reference of every scalar the two reports share (`intervals`: their paired CIs)."""
    ref_sum, cand_sum = reference.summary(), candidate.summary()
    return MetricDeltas(
        accuracy=candidate.overall_accuracy - reference.overall_accuracy,
        f1_macro=candidate.overall_f1_macro - reference.overall_f1_macro,
        groups={
            g: GroupDeltas(*(getattr(candidate.group(g), key) - getattr(m, key)
                             for key in ("accuracy", "precision_macro", "recall_macro", "f1_macro")))
            for g, m in reference.groups
        },
        summary={key: {s: cand_sum[key][s] - ref_sum[key][s] for s in ("avg", "diff")} for key in ref_sum},
        fairness={k: _change(reference.gap(k), candidate.gap(k)) for k in FAIRNESS_KEYS},
        intervals=intervals,
    )


def confusion_deltas(reference: MetricsReport, candidate: MetricsReport) -> dict[str, list[list[int]]]:
    return {
        g: (np.asarray(candidate.group(g).confusion) - np.asarray(m.confusion)).astype(int).tolist()
        for g, m in reference.groups
    }


def single_class(pred: np.ndarray, classes: Sequence[str]) -> str | None:
    """'predicts a single class (c)' when every prediction is the same class (fairness gaps are then 0)."""
    values = np.unique(pred)
    return f"predicts a single class ({classes[int(values[0])]})" if len(values) == 1 and len(classes) > 1 else None


def single_group(groups: np.ndarray) -> str | None:
    """'only one group in the split (g)' when there is nothing to compare a group with."""
    values = np.unique(groups)
    return f"only one group in the split ({values[0]})" if len(values) == 1 else None


@dataclass(frozen=True, eq=False)
class LabelledImages:
    """What a comparison knows of the images besides the logits: each image's class index and group name, the
    groups in report order, and the class names."""

    labels: np.ndarray
    groups: np.ndarray
    group_order: tuple[str, ...]
    classes: tuple[str, ...]

    @classmethod
    def from_indices(cls, labels: np.ndarray, group_index: np.ndarray, group_names: Sequence[str],
                     classes: Sequence[str]) -> LabelledImages:
        """From group indices into `group_names`; the groups present, in that order (named_groups)."""
        names, order = named_groups(group_index, group_names)
        return cls(np.asarray(labels), names, order, tuple(classes))

    def metrics(self, pred: np.ndarray, bootstrap: int = 0, seed: int = 0) -> MetricsReport:
        """The metrics report of predictions `pred` on these images (`bootstrap` resamples for its intervals)."""
        return compute_metrics(self.labels, pred, self.groups, len(self.classes), self.classes,
                               group_order=self.group_order, bootstrap=bootstrap, seed=seed)


@dataclass(frozen=True)
class Comparison:
    """A candidate's logits against a reference's on the same images. On unlabelled images only the overall
    agreement and |Δlogit| (their per-group dicts empty, metrics and deltas None)."""

    n: int
    agreement: AgreementStats
    logit_diff: LogitDiff
    metrics: MetricsReport | None = None  # the candidate's own
    flips: dict[str, GroupFlips] = field(default_factory=dict)  # per group, in group order
    confusion_delta: dict[str, list[list[int]]] = field(default_factory=dict)  # per group: candidate - reference
    deltas: MetricDeltas | None = None


def compare(reference: np.ndarray, candidate: np.ndarray, images: LabelledImages | None = None,
            reference_metrics: MetricsReport | None = None, bootstrap: int = 0, seed: int = 0) -> Comparison:
    """Compare (N, K) candidate logits with the reference's on the same N images. With `images`: per group, and
    the candidate's metrics, flips, confusion delta and metric deltas against `reference_metrics` (computed here
    when not given), with paired bootstrap intervals of the deltas when `bootstrap` > 0 and two groups or more."""
    if reference.shape != candidate.shape:
        raise FairdeployError(f"logits shape {candidate.shape} differs from the reference's {reference.shape}")
    if len(reference) == 0:
        raise FairdeployError("no samples to compare")
    ref_pred, pred = reference.argmax(1), candidate.argmax(1)
    if images is None:
        one = np.zeros(len(reference), dtype=np.int64)
        return Comparison(len(reference), agreement_stats(ref_pred, pred, one, ()),
                          logit_diff_stats(reference, candidate, one, ()))
    groups, order = images.groups, images.group_order
    metrics = images.metrics(pred, bootstrap, seed)
    ref_metrics = reference_metrics if reference_metrics is not None else images.metrics(ref_pred, bootstrap, seed)
    intervals = None
    if bootstrap > 0 and len(order) >= 2:
        intervals = bootstrap_difference_intervals(images.labels, ref_pred, pred, groups, order, len(images.classes),
                                                   bootstrap, seed)
    return Comparison(
        n=len(reference),
        agreement=agreement_stats(ref_pred, pred, groups, order),
        logit_diff=logit_diff_stats(reference, candidate, groups, order),
        metrics=metrics,
        flips=flip_stats(images.labels, ref_pred, pred, groups, order, images.classes),
        confusion_delta=confusion_deltas(ref_metrics, metrics),
        deltas=metric_deltas(ref_metrics, metrics, intervals),
    )
