"""Candidate vs control on the same validation images: paired bootstrap differences and the one-line verdict."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from fairdeploy.errors import FairdeployError
from fairdeploy.metrics import compute_metrics
from fairdeploy.training.loop import named_present_groups
from fairdeploy.training.predict import Predictions


@dataclass(frozen=True)
class Difference:
    """Candidate minus control of one quantity, with its 95 % percentile interval."""

    difference: float
    ci95: tuple[float, float]

    def to_dict(self) -> dict[str, Any]:
        return {"difference": self.difference, "ci95": list(self.ci95)}

    def text(self, digits: int = 4) -> str:
        """`+0.0123 [-0.0050, +0.0300]`"""
        return (f"{self.difference:+.{digits}f} [{self.ci95[0]:+.{digits}f}, {self.ci95[1]:+.{digits}f}]")

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Difference:
        return cls(float(d["difference"]), (float(d["ci95"][0]), float(d["ci95"][1])))


@dataclass(frozen=True)
class PairedComparison:
    """Candidate minus control on the same validation images (paired_comparison)."""

    worst_group_accuracy: Difference
    eodd: Difference
    f1_macro: Difference

    def to_dict(self) -> dict[str, Any]:
        return {"worst_group_accuracy": self.worst_group_accuracy.to_dict(), "eodd": self.eodd.to_dict(),
                "f1_macro": self.f1_macro.to_dict()}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> PairedComparison:
        return cls(*(Difference.from_dict(d[k]) for k in ("worst_group_accuracy", "eodd", "f1_macro")))


def paired_comparison(a: Predictions, b: Predictions, group_names: tuple[str, ...], num_classes: int,
                      n_boot: int, seed: int) -> PairedComparison:
    """Candidate `a` minus control `b` on the same images: worst-group accuracy, Eodd and macro-F1 differences
    with 95 % percentile intervals from one shared within-group resampling of the images."""
    if not (np.array_equal(a.labels, b.labels) and np.array_equal(a.groups, b.groups)):
        raise FairdeployError("paired comparison needs predictions of the same images in the same order")
    names, order = named_present_groups(a.groups, group_names)

    def stats(pred: np.ndarray, idx: np.ndarray) -> np.ndarray:
        r = compute_metrics(a.labels[idx], pred[idx], names[idx], num_classes, group_order=order)
        return np.array([min(m.accuracy for _, m in r.groups), r.gap("eodd") or 0.0, r.overall_f1_macro])

    full = np.arange(len(a.labels))
    pa, pb = a.predicted, b.predicted
    point = stats(pa, full) - stats(pb, full)
    rng = np.random.default_rng(seed)
    members = [np.flatnonzero(names == g) for g in order]
    diffs = np.empty((n_boot, 3))
    for i in range(n_boot):
        idx = np.concatenate([rng.choice(m, len(m), replace=True) for m in members])
        diffs[i] = stats(pa, idx) - stats(pb, idx)
    lo, hi = np.percentile(diffs, [2.5, 97.5], axis=0)
    return PairedComparison(*(Difference(float(point[i]), (float(lo[i]), float(hi[i]))) for i in range(3)))


def verdict(criterion: str, control: str, comparison: PairedComparison) -> str:
    """One line: did the criterion beat the control (a 95 % interval of the difference that excludes 0)? Every
    verdict prints the intervals of the metrics it was decided on."""
    wga, eodd, f1 = comparison.worst_group_accuracy, comparison.eodd, comparison.f1_macro
    better, worse = [], []
    if wga.ci95[0] > 0:
        better.append(f"higher worst-group accuracy ({wga.difference:+.4f})")
    if eodd.ci95[1] < 0:
        if wga.difference < 0:  # a smaller gap bought with a worse worst group is levelling down, not a win
            worse.append(f"lower Eodd ({eodd.difference:+.4f}) only by levelling down (worst-group accuracy "
                         f"{wga.difference:+.4f})")
        else:
            better.append(f"lower Eodd ({eodd.difference:+.4f})")
    if f1.ci95[1] < 0:
        worse.append(f"lower macro-F1 ({f1.difference:+.4f})")
    if wga.ci95[1] < 0:
        worse.append(f"lower worst-group accuracy ({wga.difference:+.4f})")
    if eodd.ci95[0] > 0:
        worse.append(f"higher Eodd ({eodd.difference:+.4f})")
    ci = f"worst-group accuracy {wga.text()}, Eodd {eodd.text()}"
    if f1.ci95[1] < 0 or f1.ci95[0] > 0:
        ci += f", macro-F1 {f1.text()}"
    if better and not worse:
        return f"{criterion} beat the {control} control on validation: {', '.join(better)}; {ci}"
    if better and worse:
        return f"{criterion} vs the {control} control on validation: mixed, {', '.join(better)} but {', '.join(worse)}; {ci}"
    if worse and not better:
        return f"{criterion} did worse than the {control} control on validation: {', '.join(worse)}; {ci}"
    return f"{criterion} vs the {control} control: no difference shown on validation (95 % intervals include 0); {ci}"
