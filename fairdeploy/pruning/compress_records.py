"""What a compression run (to a budget or to a per-group tolerance) records in prune.json: every round of the
candidate and of its control, the model each run hands on, how far each got, and the paired comparison."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

from fairdeploy.metrics import METRIC_DEFINITIONS, MetricsReport
from fairdeploy.models.size import ModelSize
from fairdeploy.pruning.criteria import BLIND, CRITERIA
from fairdeploy.pruning.paired import PairedComparison
from fairdeploy.pruning.roles import GroupRoles

if TYPE_CHECKING:
    from fairdeploy.pruning.budget import BudgetConfig


CONTROL_DEFINITIONS = {
    "finetune-only": "fine-tuning alone under the same schedule, no pruning",
    "plain-recovery": "the same criterion and schedule, recovering with plain fine-tuning (no per-group constraint)",
    "none": "no control run",
}


@dataclass(frozen=True)
class PointMetrics:
    """A model's validation figures in a compression run: overall accuracy and macro-F1, each group's accuracy
    (and the worst), each group's image count, the fairness gaps."""

    accuracy: float
    f1_macro: float
    group_accuracy: dict[str, float]
    group_n: dict[str, int]
    fairness: dict[str, float | None]

    @property
    def worst_group_accuracy(self) -> float:
        return min(self.group_accuracy.values())

    @classmethod
    def from_report(cls, report: MetricsReport) -> PointMetrics:
        return cls(report.overall_accuracy, report.overall_f1_macro, {g: m.accuracy for g, m in report.groups},
                   {g: m.n for g, m in report.groups}, dict(report.fairness))

    def to_dict(self) -> dict[str, Any]:
        return {"accuracy": self.accuracy, "f1_macro": self.f1_macro, "group_accuracy": dict(self.group_accuracy),
                "worst_group_accuracy": self.worst_group_accuracy, "group_n": dict(self.group_n),
                "fairness": dict(self.fairness)}


@dataclass(frozen=True)
class BudgetPoint:
    """One model of a compression run against the input model on validation, and the guard's verdict."""

    val: PointMetrics
    group_accuracy_change: dict[str, float]
    size: ModelSize
    ineligible_because: tuple[str, ...]
    shortfall: float  # how far from passing the guard: summed accuracy/F1 losses beyond the tolerances

    @property
    def eligible(self) -> bool:
        return not self.ineligible_because

    def to_dict(self) -> dict[str, Any]:
        return {"shortfall": self.shortfall, "val": self.val.to_dict(),
                "group_accuracy_change": dict(self.group_accuracy_change), "size": self.size.to_dict(),
                "eligible": self.eligible, "ineligible_because": list(self.ineligible_because)}


@dataclass(frozen=True)
class RoundPruning:
    """What a round of a pruning run removed (a fine-tuning-only control has none)."""

    target: float  # the round's budget value (MACs or params)
    channel_ratio: float
    channels_removed: int
    removed: dict[str, Any]  # root layer -> removed channel indices
    criterion_notes: dict[str, object]
    score_seconds: float
    pruned: BudgetPoint  # before fine-tuning

    def to_dict(self) -> dict[str, Any]:
        return {"target": self.target, "channel_ratio": self.channel_ratio, "channels_removed": self.channels_removed,
                "removed": self.removed, "criterion_notes": self.criterion_notes,
                "score_seconds": self.score_seconds, "pruned": self.pruned.to_dict()}


@dataclass(frozen=True)
class RoundFinetune:
    """A round's recovery fine-tuning: best epoch, epochs run, each epoch's data-order hash, mean throughput, and
    (constrained recovery) each group's Lagrange multiplier at the end of the last epoch."""

    best_epoch: int
    epochs: int
    data_order: tuple[Any, ...]
    train_samples_per_s: float
    multipliers: dict[str, float] | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"best_epoch": self.best_epoch, "epochs": self.epochs, "data_order": list(self.data_order),
                "train_samples_per_s": self.train_samples_per_s,
                **({} if self.multipliers is None else {"multipliers": dict(self.multipliers)})}


@dataclass(frozen=True)
class BudgetRound:
    """One round of a run: the removal (None for fine-tuning alone), the fine-tuned model, the fine-tuning; a
    round of a tolerance search the control ran past its own stop, to meet the candidate's budget, is `forced`."""

    round: int
    pruning: RoundPruning | None
    finetuned: BudgetPoint
    finetune: RoundFinetune
    seconds: float
    forced: bool = False

    @property
    def passed(self) -> bool:
        """The guard accepted the round's model after pruning or after fine-tuning."""
        return self.finetuned.eligible or (self.pruning is not None and self.pruning.pruned.eligible)

    def to_dict(self) -> dict[str, Any]:
        return {"round": self.round, **({} if self.pruning is None else self.pruning.to_dict()),
                "finetuned": self.finetuned.to_dict(), "finetune": self.finetune.to_dict(), "seconds": self.seconds,
                "passed": self.passed, **({"forced": True} if self.forced else {})}


@dataclass(frozen=True)
class Reached:
    """How far a tolerance search compressed while every group stayed within the tolerance: its most compressed
    model the guard accepted ("input" when not even the first round passed)."""

    model: str  # "r<round>-pruned" / "r<round>-finetuned", or "input"
    round: int  # 0 for the input model
    macs_fraction: float
    params_fraction: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class RunRecord:
    """A run (candidate or control): its rounds, the model selected among them and, for a tolerance search, how
    far it reached and why it stopped."""

    criterion: str  # a criterion, or "finetune-only"
    rounds: tuple[BudgetRound, ...]
    selected: str  # "r<round>-pruned" or "r<round>-finetuned" (or "input": a search that reached nothing)
    point: BudgetPoint  # the selected model's
    guard_passed: bool
    model: str | None = None  # the folder of OUT its checkpoint was written to (the control's)
    reached: Reached | None = None  # tolerance search only
    stopped_because: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {"criterion": self.criterion, "rounds": [r.to_dict() for r in self.rounds], "selected": self.selected,
                "selected_val": self.point.val.to_dict(), "selected_size": self.point.size.to_dict(),
                "guard_passed": self.guard_passed, **({} if self.model is None else {"model": self.model}),
                **({} if self.reached is None else {"reached": self.reached.to_dict()}),
                "stopped_because": self.stopped_because}


@dataclass(frozen=True)
class Budget:
    """What a budget run must reach: `fraction` of the input model's `metric`, i.e. at most `max`."""

    metric: str
    fraction: float
    max: float
    input: ModelSize

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Tolerance:
    """What a tolerance search keeps: no group loses more than `max_group_drop` validation accuracy against the
    input model and macro-F1 falls at most `max_f1_drop`; the MACs (or params) kept shrink by `step` a round down to
    `min_fraction`, and a run stops after `patience` rounds in a row that fail."""

    metric: str
    max_group_drop: float
    max_f1_drop: float
    step: float
    min_fraction: float
    patience: int
    input: ModelSize

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class BudgetSelection:
    """The candidate's selected model (OUT's checkpoint) and its size against the input model's."""

    model: str  # rounds/candidate-<name>, or "input"
    guard_passed: bool
    size: ModelSize
    macs_fraction: float
    params_fraction: float
    note: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class ReachComparison:
    """Tolerance search, candidate vs control: the fraction of MACs each reached, the ratio of their MAC
    reductions (control's fraction / candidate's: > 1 = the candidate compressed further), and the control model
    the paired comparison used (the control's round at the candidate's budget)."""

    candidate: float
    control: float
    reduction_ratio: float
    at_candidate_budget: str | None  # the control's model at the candidate's round; None: the candidate reached nothing
    line: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class BudgetRecord:
    """What a compression run's prune.json holds (to_dict() is the file)."""

    config: BudgetConfig
    budget: Budget | None  # a budget run
    tolerance: Tolerance | None  # a tolerance search
    source: str  # the input checkpoint
    source_sha256: str  # of its weights
    arch: str
    input_val: PointMetrics
    input_size: ModelSize
    groups: GroupRoles
    manifest: str
    score_samples_per_group: int
    val_images: int
    device: str
    runs: dict[str, RunRecord]  # candidate, then control
    selected: BudgetSelection
    comparison: PairedComparison | None  # None: no control run (or nothing to compare at)
    verdict: str
    reach: ReachComparison | None = None  # a tolerance search with a control
    seconds: float = 0.0

    @property
    def mode(self) -> str:
        return "tolerance" if self.tolerance is not None else "budget"

    def to_dict(self) -> dict[str, Any]:
        cfg = self.config
        control = cfg.control_run
        control_definition = CRITERIA.get(control, CONTROL_DEFINITIONS.get(control, ""))
        comparison: dict[str, Any] = {"verdict": self.verdict}
        if self.comparison is not None:
            comparison = {"split": "val", "candidate_minus_control": self.comparison.to_dict(), **comparison}
        if self.reach is not None:
            comparison["reach"] = self.reach.to_dict()
        return {
            "kind": "budget",
            "mode": self.mode,
            "criterion": cfg.criterion,
            "criterion_definition": CRITERIA[cfg.criterion],
            "criterion_is_fairness_aware": cfg.criterion not in BLIND,
            "control": control,
            "control_definition": control_definition,
            "params": cfg.to_dict(),
            "budget": None if self.budget is None else self.budget.to_dict(),
            "tolerance": None if self.tolerance is None else self.tolerance.to_dict(),
            "input": {"checkpoint": self.source, "sha256": self.source_sha256, "arch": self.arch,
                      "val": self.input_val.to_dict(), "size": self.input_size.to_dict()},
            "groups": self.groups.to_dict(),
            "data": {"manifest": self.manifest, "score_split": "train",
                     "score_samples_per_group": self.score_samples_per_group, "val_images": self.val_images,
                     "test_split_used": False},
            "device": self.device,
            "runs": {name: r.to_dict() for name, r in self.runs.items()},
            "metric_definitions": METRIC_DEFINITIONS,
            "selected": self.selected.to_dict(),
            "comparison": comparison,
            "seconds": self.seconds,
        }
