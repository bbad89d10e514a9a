"""Per-step validation records, the levelling-down guard, best-step selection and the stop rule."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

from fairdeploy.errors import FairdeployError
from fairdeploy.metrics import MetricsReport, fate
from fairdeploy.models.size import ModelSize

TARGETS = ("eodd", "eopp0", "eopp1")
SELECT_CHOICES = ("fate", "gap", "f1", "last")


@dataclass(frozen=True)
class StopRule:
    """How many steps at most, which validation gap is watched, and when to stop early."""

    steps: int = 5
    target: str = "eodd"
    patience: int = 2  # stop after this many steps without a new lowest gap
    target_value: float | None = None  # stop once the gap is at or below this

    def validate(self) -> None:
        if self.steps < 1:
            raise FairdeployError(f"steps must be >= 1, got {self.steps}")
        if self.target not in TARGETS:
            raise FairdeployError(f"unknown target {self.target!r}; choose one of {', '.join(TARGETS)}")
        if self.patience < 1:
            raise FairdeployError(f"patience must be >= 1, got {self.patience}")
        if self.target_value is not None and self.target_value < 0:
            raise FairdeployError(f"target value must be >= 0, got {self.target_value}")


@dataclass(frozen=True)
class Guard:
    """Steps that may be selected: by default none that lowers the unprivileged group's validation accuracy by
    more than `max_group_drop` (one image of a few hundred is noise, not levelling down) or costs more than
    `max_f1_drop` of overall macro-F1 against the input model."""

    protect_unprivileged: bool = True
    max_f1_drop: float = 0.02
    max_group_drop: float = 0.01
    # fate (on the target gap, against the input model), gap (lowest), f1 (highest), last (the most pruned
    # step that passes the guard: a fixed budget)
    select: str = "fate"

    def validate(self) -> None:
        if not 0.0 <= self.max_f1_drop <= 1.0:
            raise FairdeployError(f"max F1 drop must be in [0, 1], got {self.max_f1_drop}")
        if not 0.0 <= self.max_group_drop <= 1.0:
            raise FairdeployError(f"max group drop must be in [0, 1], got {self.max_group_drop}")
        if self.select not in SELECT_CHOICES:
            raise FairdeployError(f"unknown selection {self.select!r}; choose one of {', '.join(SELECT_CHOICES)}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class StepMetrics:
    """A step's validation figures: overall accuracy and macro-F1, each group's accuracy, the fairness gaps."""

    accuracy: float
    f1_macro: float
    group_accuracy: dict[str, float]
    fairness: dict[str, float | None]

    def to_dict(self) -> dict[str, Any]:
        return {"accuracy": self.accuracy, "f1_macro": self.f1_macro, "group_accuracy": dict(self.group_accuracy),
                "fairness": dict(self.fairness)}


@dataclass(frozen=True)
class StepFinetune:
    """The fine-tuning after a pruning step: best epoch and its score, epochs run, mean training throughput."""

    best_epoch: int
    best_score: float
    epochs: int
    train_samples_per_s: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class StepWork:
    """What a pruning step (step >= 1) did besides removing: its fine-tuning, pruning time, scoring timings."""

    finetune: StepFinetune | None  # None: no fine-tuning between steps
    prune_seconds: float
    scoring: dict[str, Any]  # the step function's timings of the scoring (e.g. curvature samples/s)

    def to_dict(self) -> dict[str, Any]:
        return {"finetune": None if self.finetune is None else self.finetune.to_dict(),
                "prune_seconds": self.prune_seconds, "scoring": self.scoring}


@dataclass(frozen=True)
class StepRecord:
    """One prune.json step: the model's size and what the step removed, its validation metrics, each group's
    accuracy change against the input model (step 0), FATE and the guard's verdict."""

    step: int
    size: ModelSize
    sparsity: dict[str, Any] | None
    removed: dict[str, Any]  # the step function's description ({} for step 0)
    seconds: float
    val: StepMetrics
    group_accuracy_change: dict[str, float]
    f1_macro_change: float
    fate: dict[str, float | None]
    groups_worse: tuple[str, ...]
    levelling_down: bool
    ineligible_because: tuple[str, ...]
    target_gap: float | None
    work: StepWork | None = None  # None: step 0, the input model

    @property
    def eligible(self) -> bool:
        return not self.ineligible_because

    @property
    def any_group_worse(self) -> bool:
        return bool(self.groups_worse)

    def to_dict(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "size": self.size.to_dict(),
            "sparsity": self.sparsity,
            "removed": self.removed,
            **({} if self.work is None else self.work.to_dict()),
            "seconds": self.seconds,
            "val": self.val.to_dict(),
            "group_accuracy_change": dict(self.group_accuracy_change),
            "f1_macro_change": self.f1_macro_change,
            "fate": dict(self.fate),
            "any_group_worse": self.any_group_worse,
            "groups_worse": list(self.groups_worse),
            "levelling_down": self.levelling_down,
            "eligible": self.eligible,
            "ineligible_because": list(self.ineligible_because),
            "target_gap": self.target_gap,
        }


def step_record(step: int, report: MetricsReport, baseline: MetricsReport, unprivileged: str, guard: Guard,
                target: str, *, size: ModelSize, removed: dict[str, Any], seconds: float,
                sparsity: dict[str, Any] | None = None, work: StepWork | None = None) -> StepRecord:
    """One step's record: `report` (validation) against the input model's `baseline`, judged by `guard`."""
    acc = {g: m.accuracy for g, m in report.groups}
    base_acc = {g: m.accuracy for g, m in baseline.groups}
    delta = {g: acc[g] - base_acc[g] for g in acc if g in base_acc}
    worse = sorted(g for g, d in delta.items() if d < 0)
    f1_drop = baseline.overall_f1_macro - report.overall_f1_macro
    reasons = []
    if guard.protect_unprivileged and -delta.get(unprivileged, 0.0) > guard.max_group_drop + 1e-12:
        reasons.append(f"unprivileged group {unprivileged} lost {-delta[unprivileged]:.4f} accuracy "
                       f"(> {guard.max_group_drop})")
    if f1_drop > guard.max_f1_drop + 1e-12:
        reasons.append(f"macro-F1 fell {f1_drop:.4f} (> {guard.max_f1_drop})")
    return StepRecord(
        step=step, size=size, sparsity=sparsity, removed=removed, seconds=seconds, work=work,
        val=StepMetrics(report.overall_accuracy, report.overall_f1_macro, acc, dict(report.fairness)),
        group_accuracy_change=delta,
        f1_macro_change=-f1_drop,
        fate=fate(report, baseline),
        groups_worse=tuple(worse),
        levelling_down=bool(worse) and len(worse) == len(delta),
        ineligible_because=tuple(reasons),
        target_gap=report.gap(target),
    )


def selection_value(record: StepRecord, select: str, target: str) -> float:
    """Higher is better."""
    if select == "fate":
        v = record.fate.get(target)
        return -math.inf if v is None else float(v)
    if select == "gap":
        g = record.val.fairness.get(target)
        return -math.inf if g is None else -float(g)
    if select == "last":
        return float(record.step)
    return float(record.val.f1_macro)


class StopTracker:
    """Counts steps without a new lowest target gap among steps the guard accepts (a gap that shrinks by
    levelling down is not progress); says when to stop."""

    def __init__(self, rule: StopRule, baseline_gap: float | None):
        self.rule = rule
        self.best = math.inf if baseline_gap is None else baseline_gap
        self.stale = 0

    def update(self, gap: float | None, eligible: bool = True) -> str | None:
        """Record one step's gap; return the reason to stop, or None to go on."""
        if eligible and gap is not None and gap < self.best - 1e-12:
            self.best, self.stale = gap, 0
        else:
            self.stale += 1
        if self.rule.target_value is not None and eligible and gap is not None and gap <= self.rule.target_value:
            return f"{self.rule.target} {gap:.4f} reached the target {self.rule.target_value}"
        if self.stale >= self.rule.patience:
            return (f"no step the guard accepts lowered {self.rule.target} for {self.stale} step(s) "
                    f"(patience {self.rule.patience})")
        return None
