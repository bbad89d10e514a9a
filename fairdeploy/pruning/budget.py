"""compress_checkpoint: prune a checkpoint to a MAC / parameter budget in rounds of global channel removal and
recovery fine-tuning, with a fairness-blind control run under the identical schedule, data order and seed.

Selection uses the validation split only; the test split is never read. prune.json holds every round of both
runs, the selection and the candidate-vs-control comparison with paired bootstrap intervals.
"""

from __future__ import annotations

import copy
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import Subset

from fairdeploy.data.loading import Encoding, eval_transform, split_dataset
from fairdeploy.data.manifest import Manifest
from fairdeploy.device import resolve_device, seed_everything
from fairdeploy.distributed import barrier, main_scratch, world
from fairdeploy.errors import FairdeployError
from fairdeploy.io import atomic_dir, sha256_file, write_json
from fairdeploy.metrics import METRIC_DEFINITIONS, MetricsReport, compute_metrics
from fairdeploy.models.checkpoint import (
    WEIGHTS_FILE,
    ModelSpec,
    load_checkpoint,
    resolve_checkpoint,
    save_checkpoint,
)
from fairdeploy.models.registry import classifier_head_name
from fairdeploy.models.size import ModelSize, model_size
from fairdeploy.progress import Progress, no_progress
from fairdeploy.pruning.criteria import BLIND, CRITERIA, ScoreData, prepare_importance
from fairdeploy.pruning.curvature import DEFAULT_ESTIMATOR
from fairdeploy.pruning.removal import BUDGET_METRICS, DEFAULT_MAX_LAYER_RATIO, budget_value, remove_to_budget
from fairdeploy.pruning.roles import GroupRoles, decide_roles
from fairdeploy.pruning.run import PRUNE_FILE
from fairdeploy.pruning.saliency import DEFAULT_BETA
from fairdeploy.pruning.scoresets import (
    DEFAULT_SCORE_BATCH_SIZE,
    DEFAULT_SCORE_SAMPLES,
    balanced_batch_order,
    group_score_sets,
    stratified_sample,
)
from fairdeploy.pruning.selection import Guard
from fairdeploy.pruning.snnl import DEFAULT_SNNL_BATCH_SIZE, DEFAULT_SNNL_BATCHES, DEFAULT_SNNL_TEMPERATURE
from fairdeploy.pruning.structured import DEFAULT_ROUND_TO, dependency_graph
from fairdeploy.training.finetune import finetune_model
from fairdeploy.training.loop import FitConfig, evaluate_model
from fairdeploy.training.predict import DEFAULT_EVAL_BATCH_SIZE, Predictions, predict
from fairdeploy.training.train import spec_datasets

CONTROLS = ("magnitude", "taylor", "finetune-only", "none")
# A budget run's recovery fine-tuning LR (per round, with distillation), deliberately not FINETUNE_LR
# (training/finetune.py): 1e-3 undid the minority group's accuracy even without pruning (RESULTS.md).
BUDGET_FINETUNE_LR = 3e-4


@dataclass(frozen=True)
class BudgetConfig:
    """A budget run: criterion, budget, schedule, recovery fine-tuning, control and guard."""

    criterion: str = "group-taylor"
    # the control run: None = the fairness-blind twin (magnitude), or fine-tuning alone when the criterion is itself
    # fairness-blind; "none" runs no control (and no fairness claim is made)
    control: str | None = None
    metric: str = "macs"  # macs or params
    target: float = 0.5  # fraction of the input model's `metric` to keep (0.5 = 2x fewer MACs)
    rounds: int = 3  # budget reached geometrically: round r keeps target ** (r / rounds)
    round_to: int = DEFAULT_ROUND_TO
    max_layer_ratio: float = DEFAULT_MAX_LAYER_RATIO  # share of a layer's channels one round may remove
    score_samples: int = DEFAULT_SCORE_SAMPLES  # per group (class-stratified); the blind sample: as many in all
    score_batch_size: int = DEFAULT_SCORE_BATCH_SIZE
    beta: float = DEFAULT_BETA  # fairprune
    curvature: str = DEFAULT_ESTIMATOR  # fairprune
    temperature: float = DEFAULT_SNNL_TEMPERATURE  # snnl
    snnl_batches: int = DEFAULT_SNNL_BATCHES
    snnl_batch_size: int = DEFAULT_SNNL_BATCH_SIZE
    # recovery fine-tuning per round (distilling from the input model)
    finetune: FitConfig = field(default_factory=lambda: FitConfig(epochs=1, lr=BUDGET_FINETUNE_LR, distill=0.5))
    max_group_drop: float = Guard.max_group_drop  # guard: no group may lose more validation accuracy than this
    max_f1_drop: float = 0.05
    privileged: str | None = None
    bootstrap: int = 500
    batch_size: int = DEFAULT_EVAL_BATCH_SIZE  # evaluation
    keep_rounds: bool = True  # every round's checkpoints under OUT/rounds
    seed: int = 0

    def __post_init__(self) -> None:
        if self.control is None:
            object.__setattr__(self, "control", "finetune-only" if self.criterion in BLIND else "magnitude")

    def validate(self) -> None:
        if self.criterion not in CRITERIA:
            raise FairdeployError(f"unknown criterion {self.criterion!r}; choose one of {', '.join(CRITERIA)}")
        if self.control not in CONTROLS:
            raise FairdeployError(f"unknown control {self.control!r}; choose one of {', '.join(CONTROLS)}")
        if self.control == self.criterion:
            raise FairdeployError(f"the control {self.control!r} is the criterion itself; choose another control")
        if self.metric not in BUDGET_METRICS:
            raise FairdeployError(f"unknown budget metric {self.metric!r}; choose one of {', '.join(BUDGET_METRICS)}")
        if not 0.0 < self.target < 1.0:
            raise FairdeployError(f"the budget must keep a fraction in (0, 1) of the {self.metric}, got {self.target}")
        if self.rounds < 1:
            raise FairdeployError(f"rounds must be >= 1, got {self.rounds}")
        if self.round_to < 1:
            raise FairdeployError(f"round_to must be >= 1, got {self.round_to}")
        if not 0.0 < self.max_layer_ratio < 1.0:
            raise FairdeployError(f"max layer ratio must be in (0, 1), got {self.max_layer_ratio}")
        for name in ("score_samples", "score_batch_size", "snnl_batches", "bootstrap", "batch_size"):
            if getattr(self, name) < 1:
                raise FairdeployError(f"{name.replace('_', ' ')} must be >= 1, got {getattr(self, name)}")
        if not 0.0 <= self.max_group_drop <= 1.0 or not 0.0 <= self.max_f1_drop <= 1.0:
            raise FairdeployError(f"guard tolerances must be in [0, 1], got max group drop {self.max_group_drop}, "
                                  f"max F1 drop {self.max_f1_drop}")
        self.finetune.validate()

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class BudgetResult:
    out_dir: Path
    record: BudgetRecord  # what prune.json holds


def _flag(key: str) -> str:
    return "--" + key.replace("_", "-")


def budget_from(speedup: float | None = None, target_macs: float | None = None, target_params: float | None = None,
                label: Callable[[str], str] = _flag) -> tuple[str, float]:
    """(metric, fraction kept) from exactly one of --speedup S (MACs / S), --target-macs F, --target-params F;
    `label` says how the user wrote a key (a flag, or a pipeline table's key)."""
    given = {k: v for k, v in (("speedup", speedup), ("target_macs", target_macs),
                               ("target_params", target_params)) if v is not None}
    if len(given) != 1:
        raise FairdeployError("give exactly one budget: --target-macs F, --target-params F or --speedup S "
                              f"(got {', '.join(label(k) for k in given) or 'none'})")
    if speedup is not None:
        if speedup <= 1.0:
            raise FairdeployError(f"{label('speedup')} must be > 1, got {speedup}")
        return "macs", 1.0 / speedup
    return ("macs", float(target_macs)) if target_macs is not None else ("params", float(target_params))  # type: ignore[arg-type]


# ---- records ------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class PointMetrics:
    """A model's validation figures in a budget run: overall accuracy and macro-F1, each group's accuracy (and
    the worst), each group's image count, the fairness gaps."""

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
    """One model of a budget run against the input model on validation, and the guard's verdict."""

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
    """A round's recovery fine-tuning: best epoch, epochs run, each epoch's data-order hash, mean throughput."""

    best_epoch: int
    epochs: int
    data_order: tuple[Any, ...]
    train_samples_per_s: float

    def to_dict(self) -> dict[str, Any]:
        return {"best_epoch": self.best_epoch, "epochs": self.epochs, "data_order": list(self.data_order),
                "train_samples_per_s": self.train_samples_per_s}


@dataclass(frozen=True)
class BudgetRound:
    """One round of a run: the removal (None for fine-tuning alone), the fine-tuned model, the fine-tuning."""

    round: int
    pruning: RoundPruning | None
    finetuned: BudgetPoint
    finetune: RoundFinetune
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        return {"round": self.round, **({} if self.pruning is None else self.pruning.to_dict()),
                "finetuned": self.finetuned.to_dict(), "finetune": self.finetune.to_dict(), "seconds": self.seconds}


@dataclass(frozen=True)
class RunRecord:
    """A run (candidate or control): its rounds and the model selected among them."""

    criterion: str  # a criterion, or "finetune-only"
    rounds: tuple[BudgetRound, ...]
    selected: str  # "r<round>-pruned" or "r<round>-finetuned"
    point: BudgetPoint  # the selected model's
    guard_passed: bool
    model: str | None = None  # the folder of OUT its checkpoint was written to (the control's)

    def to_dict(self) -> dict[str, Any]:
        return {"criterion": self.criterion, "rounds": [r.to_dict() for r in self.rounds], "selected": self.selected,
                "selected_val": self.point.val.to_dict(), "selected_size": self.point.size.to_dict(),
                "guard_passed": self.guard_passed, **({} if self.model is None else {"model": self.model})}


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
class BudgetSelection:
    """The candidate's selected model (OUT's checkpoint) and its size against the input model's."""

    model: str  # rounds/candidate-<name>
    guard_passed: bool
    size: ModelSize
    macs_fraction: float
    params_fraction: float
    note: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Difference:
    """Candidate minus control of one quantity, with its 95 % percentile interval."""

    difference: float
    ci95: tuple[float, float]

    def to_dict(self) -> dict[str, Any]:
        return {"difference": self.difference, "ci95": list(self.ci95)}


@dataclass(frozen=True)
class PairedComparison:
    """Candidate minus control on the same validation images (paired_comparison)."""

    worst_group_accuracy: Difference
    eodd: Difference
    f1_macro: Difference

    def to_dict(self) -> dict[str, Any]:
        return {"worst_group_accuracy": self.worst_group_accuracy.to_dict(), "eodd": self.eodd.to_dict(),
                "f1_macro": self.f1_macro.to_dict()}


@dataclass(frozen=True)
class BudgetRecord:
    """What a budget run's prune.json holds (to_dict() is the file)."""

    config: BudgetConfig
    budget: Budget
    source: str  # the input checkpoint
    source_sha256: str  # of its weights
    arch: str
    input_val: PointMetrics
    groups: GroupRoles
    manifest: str
    score_samples_per_group: int
    val_images: int
    device: str
    runs: dict[str, RunRecord]  # candidate, then control
    selected: BudgetSelection
    comparison: PairedComparison | None  # None: no control run
    verdict: str
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        cfg = self.config
        control_definition = CRITERIA.get(cfg.control, "fine-tuning alone under the same schedule, no pruning"
                                          if cfg.control == "finetune-only" else "no control run")
        comparison = {"verdict": self.verdict} if self.comparison is None else {
            "split": "val", "candidate_minus_control": self.comparison.to_dict(), "verdict": self.verdict}
        return {
            "kind": "budget",
            "criterion": cfg.criterion,
            "criterion_definition": CRITERIA[cfg.criterion],
            "criterion_is_fairness_aware": cfg.criterion not in BLIND,
            "control": cfg.control,
            "control_definition": control_definition,
            "params": cfg.to_dict(),
            "budget": self.budget.to_dict(),
            "input": {"checkpoint": self.source, "sha256": self.source_sha256, "arch": self.arch,
                      "val": self.input_val.to_dict()},
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


def _point(report: MetricsReport, size: ModelSize, base: MetricsReport, cfg: BudgetConfig) -> BudgetPoint:
    acc = {g: m.accuracy for g, m in report.groups}
    base_acc = {g: m.accuracy for g, m in base.groups}
    delta = {g: acc[g] - base_acc[g] for g in acc if g in base_acc}
    f1_drop = base.overall_f1_macro - report.overall_f1_macro
    reasons = [f"group {g} lost {-d:.4f} accuracy (> {cfg.max_group_drop})" for g, d in delta.items()
               if -d > cfg.max_group_drop + 1e-12]
    if f1_drop > cfg.max_f1_drop + 1e-12:
        reasons.append(f"macro-F1 fell {f1_drop:.4f} (> {cfg.max_f1_drop})")
    shortfall = sum(max(0.0, -d - cfg.max_group_drop) for d in delta.values()) + max(0.0, f1_drop - cfg.max_f1_drop)
    return BudgetPoint(
        val=PointMetrics.from_report(report),
        group_accuracy_change=delta, size=size, ineligible_because=tuple(reasons), shortfall=shortfall,
    )


def paired_comparison(a: Predictions, b: Predictions, group_names: tuple[str, ...], num_classes: int,
                      n_boot: int, seed: int) -> PairedComparison:
    """Candidate `a` minus control `b` on the same images: worst-group accuracy, Eodd and macro-F1 differences
    with 95 % percentile intervals from one shared within-group resampling of the images."""
    if not (np.array_equal(a.labels, b.labels) and np.array_equal(a.groups, b.groups)):
        raise FairdeployError("paired comparison needs predictions of the same images in the same order")
    names = np.asarray(group_names)[a.groups]
    order = [g for g in group_names if g in set(names.tolist())]

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
    """One line: did the criterion beat the control (a 95 % interval of the difference that excludes 0)?"""
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
    ci = (f"worst-group accuracy {wga.difference:+.4f} [{wga.ci95[0]:+.4f}, {wga.ci95[1]:+.4f}], "
          f"Eodd {eodd.difference:+.4f} [{eodd.ci95[0]:+.4f}, {eodd.ci95[1]:+.4f}]")
    if better and not worse:
        return f"{criterion} beat the {control} control on validation: {', '.join(better)}; {ci}"
    if better and worse:
        return f"{criterion} vs the {control} control on validation: mixed, {', '.join(better)} but {', '.join(worse)}; {ci}"
    if worse and not better:
        return f"{criterion} did worse than the {control} control on validation: {', '.join(worse)}; {ci}"
    return f"{criterion} vs the {control} control: no difference shown on validation (95 % intervals include 0); {ci}"


# ---- one run (candidate or control) ------------------------------------------------------------------------

@dataclass
class _Ctx:
    spec: ModelSpec
    teacher: nn.Module
    train_ds: Any
    val_ds: Any
    scores: ScoreData
    base_report: MetricsReport
    head: str
    device: torch.device
    cfg: BudgetConfig
    scratch: Path
    progress: Progress


@dataclass
class _Run:
    name: str
    criterion: str  # a criterion, or "finetune-only"
    rounds: list[BudgetRound] = field(default_factory=list)
    candidates: list[tuple[str, nn.Module, BudgetPoint]] = field(default_factory=list)


def _evaluate(model: nn.Module, ctx: _Ctx) -> MetricsReport:
    return evaluate_model(model, ctx.val_ds, ctx.spec, ctx.device, ctx.cfg.batch_size, progress=ctx.progress)


def _run(run: _Run, model: nn.Module, ctx: _Ctx) -> _Run:
    cfg = ctx.cfg
    seed_everything(cfg.seed)  # candidate and control start from the same random state
    base_value = budget_value(model_size(model, ctx.spec.image_size, ctx.device), cfg.metric)
    for r in range(1, cfg.rounds + 1):
        t0 = time.perf_counter()
        pruning = None
        if run.criterion != "finetune-only":
            target = base_value * cfg.target ** (r / cfg.rounds)
            dg = dependency_graph(model, ctx.spec.image_size, ctx.device)
            modules = dict(model.named_modules())
            table, notes = prepare_importance(run.criterion, model, dg, [modules[ctx.head]], ctx.scores, ctx.device)
            t_score = time.perf_counter() - t0
            removal = remove_to_budget(model, table, target, cfg.metric, ctx.head, ctx.spec.image_size,
                                       cfg.round_to, cfg.max_layer_ratio, ctx.device)
            size = removal.size
            pruning = RoundPruning(target=target, channel_ratio=removal.ratio,
                                   channels_removed=removal.channels_removed, removed=removal.removed,
                                   criterion_notes=notes, score_seconds=t_score,
                                   pruned=_point(_evaluate(model, ctx), size, ctx.base_report, cfg))
            run.candidates.append((f"r{r}-pruned", copy.deepcopy(model).cpu(), pruning.pruned))
        else:
            size = model_size(model, ctx.spec.image_size, ctx.device)
        model, fit = finetune_model(model, ctx.spec, ctx.train_ds, ctx.val_ds, cfg.finetune,
                                    ctx.scratch / f"{run.name}-r{r}", ctx.device, None, ctx.progress,
                                    task=f"{run.name} round {r} finetune", teacher=ctx.teacher)
        finetuned = _point(_evaluate(model, ctx), size, ctx.base_report, cfg)
        finetune = RoundFinetune(best_epoch=fit.best_epoch, epochs=len(fit.history),
                                 data_order=tuple(h["data_order"] for h in fit.history),
                                 train_samples_per_s=float(np.mean([h["train_samples_per_s"] for h in fit.history])))
        run.rounds.append(BudgetRound(round=r, pruning=pruning, finetuned=finetuned, finetune=finetune,
                                      seconds=time.perf_counter() - t0))
        run.candidates.append((f"r{r}-finetuned", copy.deepcopy(model).cpu(), finetuned))
        ctx.progress(f"{run.name}: round {r}/{cfg.rounds} worst-group {finetuned.val.worst_group_accuracy:.4f}",
                     r, cfg.rounds)
    return run


def _select(run: _Run, budget_value_max: float, metric: str) -> tuple[str, nn.Module, BudgetPoint, bool]:
    """Among the run's models that meet the budget, the best worst-group validation accuracy the guard accepts;
    when none passes, the one closest to passing (smallest summed shortfall beyond the tolerances), flagged."""
    within = [(n, m, p) for n, m, p in run.candidates if budget_value(p.size, metric) <= budget_value_max]
    if not within:
        raise FairdeployError("no model of the run meets the budget")
    ok = [c for c in within if c[2].eligible]
    if ok:
        name, model, point = max(ok, key=lambda c: (c[2].val.worst_group_accuracy, c[2].val.f1_macro))
    else:  # closest to passing: the smallest total shortfall, so a levelled-down model is not preferred
        name, model, point = min(within, key=lambda c: (c[2].shortfall, -c[2].val.worst_group_accuracy))
    return name, model, point, bool(ok)


# ---- the library call --------------------------------------------------------------------------------------

def compress_checkpoint(
    model_dir: str | os.PathLike[str],
    manifest: Manifest,
    out_dir: str | os.PathLike[str],
    cfg: BudgetConfig = BudgetConfig(),
    device: str = "auto",
    progress: Progress = no_progress,
) -> BudgetResult:
    """Compress a checkpoint to the budget with `cfg.criterion` and (unless "none") the control; write
    OUT/model.* (the selected candidate), OUT/control/model.* (the control's selected model), OUT/rounds/* and
    OUT/prune.json. Nothing is written unless the run succeeds."""
    cfg.validate()
    cfg = replace(cfg, finetune=replace(cfg.finetune, seed=cfg.seed))  # one seed: scores, data order, fine-tuning
    t_start = time.perf_counter()
    dev = resolve_device(device)
    src = resolve_checkpoint(model_dir)
    teacher, spec = load_checkpoint(src, dev)
    if spec.sparsity:
        raise FairdeployError(f"{src}: budget runs start from a dense checkpoint (this one has {spec.sparsity.get('kind')} "
                              "masks); use the checkpoint before weight-level pruning")
    head = classifier_head_name(spec.arch)
    enc = Encoding(spec.classes, spec.groups)
    train_ds, val_ds = spec_datasets(manifest, spec)
    score_ds = split_dataset(manifest, "train", enc, eval_transform(spec.image_size, spec.mean, spec.std))
    base_report = evaluate_model(teacher, val_ds, spec, dev, cfg.batch_size, progress=progress)
    roles = decide_roles(base_report, cfg.privileged)
    present = sorted(set(score_ds.groups))
    if len(present) < 2:
        raise FairdeployError("a budget run needs at least two groups in the train split to score with")
    ids = group_score_sets(score_ds.labels, score_ds.groups, present, cfg.score_samples, cfg.seed)
    blind_n = sum(len(v) for v in ids.values())
    blind = stratified_sample(score_ds.labels, blind_n, np.random.default_rng(cfg.seed))
    order, bs = balanced_batch_order(score_ds.groups, present, cfg.snnl_batch_size, cfg.snnl_batches, cfg.seed)
    scores = ScoreData(blind=Subset(score_ds, blind),
                       per_group={spec.groups[g]: Subset(score_ds, v) for g, v in ids.items()},
                       unprivileged=roles.unprivileged, privileged=roles.privileged,
                       snnl_batches=Subset(score_ds, order), snnl_batch_size=bs, batch_size=cfg.score_batch_size,
                       beta=cfg.beta, curvature=cfg.curvature, temperature=cfg.temperature, seed=cfg.seed)
    base_size = model_size(teacher, spec.image_size, dev)
    budget = Budget(cfg.metric, cfg.target, budget_value(base_size, cfg.metric) * cfg.target, base_size)
    out = Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    with main_scratch(out) as scratch:  # under torchrun only rank 0 writes (scratch and output)
        ctx = _Ctx(spec=spec, teacher=teacher, train_ds=train_ds, val_ds=val_ds, scores=scores,
                   base_report=base_report, head=head, device=dev, cfg=cfg, scratch=scratch,
                   progress=progress)
        runs = [_run(_Run("candidate", cfg.criterion), copy.deepcopy(teacher), ctx)]
        if cfg.control != "none":
            runs.append(_run(_Run("control", cfg.control), copy.deepcopy(teacher), ctx))
        selected: dict[str, tuple[str, nn.Module, BudgetPoint, bool]] = {}
        run_records: dict[str, RunRecord] = {}
        for run in runs:
            budget_cap = budget.max if run.criterion != "finetune-only" else float("inf")
            selected[run.name] = _select(run, budget_cap, cfg.metric)
            name, _m, point, guard_ok = selected[run.name]
            run_records[run.name] = RunRecord(criterion=run.criterion, rounds=tuple(run.rounds), selected=name,
                                              point=point, guard_passed=guard_ok,
                                              model="control" if run.name == "control" else None)
        cand = selected["candidate"]
        selection = BudgetSelection(
            model=f"rounds/candidate-{cand[0]}", guard_passed=cand[3], size=cand[2].size,
            macs_fraction=cand[2].size.macs / base_size.macs, params_fraction=cand[2].size.params / base_size.params,
            note=("best worst-group validation accuracy among the models at the budget that the guard accepts"
                  if cand[3] else
                  "no model at the budget passed the guard (every group within "
                  f"{cfg.max_group_drop} accuracy of the input model, macro-F1 within "
                  f"{cfg.max_f1_drop}); the output is the best one anyway, flagged"
                  + ("; every round's checkpoint is under rounds/" if cfg.keep_rounds else "")))
        comparison = None
        if "control" in selected:
            pa = predict(selected["candidate"][1].to(dev), val_ds, dev, cfg.batch_size)
            pb = predict(selected["control"][1].to(dev), val_ds, dev, cfg.batch_size)
            comparison = paired_comparison(pa, pb, spec.groups, spec.num_classes, cfg.bootstrap, cfg.seed)
        record = BudgetRecord(
            config=cfg, budget=budget, source=str(src), source_sha256=sha256_file(src / WEIGHTS_FILE),
            arch=spec.arch, input_val=PointMetrics.from_report(base_report), groups=roles,
            manifest=manifest.source, score_samples_per_group=len(ids[present[0]]), val_images=len(val_ds),
            device=str(dev), runs=run_records, selected=selection, comparison=comparison,
            verdict=("no control was run: no fairness claim about the criterion is made" if comparison is None
                     else verdict(cfg.criterion, cfg.control, comparison)),
        )
        if world().is_main:
            staged = scratch / "final"
            history = {"stage": "prune", "kind": "budget", "criterion": cfg.criterion, "control": cfg.control,
                       "budget": budget.to_dict(), "source": str(src), "source_sha256": record.source_sha256,
                       "manifest": manifest.source, "selected": cand[0]}
            out_spec = replace(spec, sparsity=None).with_history(history)
            save_checkpoint(cand[1], out_spec, staged)
            if "control" in selected:
                ctrl = selected["control"]
                save_checkpoint(ctrl[1], replace(spec, sparsity=None).with_history({**history, "run": "control",
                                                                                     "selected": ctrl[0]}),
                                staged / "control")
            if cfg.keep_rounds:
                for run in runs:
                    for name, m, _p in run.candidates:
                        save_checkpoint(m, out_spec, staged / "rounds" / f"{run.name}-{name}")
            record = replace(record, seconds=time.perf_counter() - t_start)
            write_json(staged / PRUNE_FILE, record.to_dict())
            with atomic_dir(out, owner=PRUNE_FILE) as tmp:
                for f in staged.iterdir():
                    shutil.move(str(f), tmp / f.name)
        barrier()
    return BudgetResult(out_dir=out, record=record)

