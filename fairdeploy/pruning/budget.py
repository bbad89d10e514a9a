"""compress_checkpoint: compress a checkpoint in rounds of global channel removal and recovery fine-tuning, either
to a MAC / parameter budget or as far as every group allows (a per-group tolerance on validation accuracy), with
a control run under the identical schedule, data order and seed.

Selection uses the validation split only; the test split is never read. prune.json holds every round of both
runs (the frontier of worst-group accuracy against MACs kept), the selection, how far each run reached and the
candidate-vs-control comparison with paired bootstrap intervals.
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
from fairdeploy.files.atomic import atomic_dir
from fairdeploy.files.hashing import sha256_file
from fairdeploy.files.json_files import write_json
from fairdeploy.metrics import MetricsReport
from fairdeploy.metrics.bootstrap import DEFAULT_N_BOOT
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
from fairdeploy.pruning.compress_records import (
    Budget,
    BudgetPoint,
    BudgetRecord,
    BudgetRound,
    BudgetSelection,
    PointMetrics,
    ReachComparison,
    Reached,
    RoundFinetune,
    RoundPruning,
    RunRecord,
    Tolerance,
)
from fairdeploy.pruning.criteria import BLIND, CRITERIA, ScoreData, prepare_importance
from fairdeploy.pruning.curvature import DEFAULT_ESTIMATOR
from fairdeploy.pruning.paired import paired_comparison, verdict
from fairdeploy.pruning.removal import (
    BUDGET_METRICS,
    DEFAULT_MAX_LAYER_RATIO,
    BudgetUnreachable,
    budget_value,
    remove_to_budget,
)
from fairdeploy.pruning.roles import decide_roles
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
from fairdeploy.training.predict import DEFAULT_EVAL_BATCH_SIZE, predict
from fairdeploy.training.train import spec_datasets

# The control run: a fairness-blind criterion under the same schedule, fine-tuning alone (budget runs), the same
# criterion with plain recovery (when the candidate recovers with the per-group constraint), or none.
CONTROLS = ("magnitude", "taylor", "finetune-only", "plain-recovery", "none")
# A compression run's recovery fine-tuning LR (per round, with distillation), deliberately not FINETUNE_LR
# (training/finetune.py): 1e-3 undid the minority group's accuracy even without pruning (RESULTS.md).
BUDGET_FINETUNE_LR = 3e-4


@dataclass(frozen=True)
class BudgetConfig:
    """A compression run: criterion, budget (or none: as far as the tolerance allows), schedule, recovery
    fine-tuning, control and guard."""

    criterion: str = "group-taylor"
    # the control run: None = the fairness-blind twin (magnitude) of a fairness-aware criterion; for a blind one,
    # the same criterion with plain recovery when the candidate recovers with the constraint, else fine-tuning
    # alone (budget run) or none (tolerance search: the blind search is itself the reference)
    control: str | None = None
    metric: str = "macs"  # macs or params
    # fraction of the input model's `metric` to keep (0.5 = 2x fewer); None: compress as far as the guard allows
    target: float | None = None
    rounds: int = 3  # budget run: the budget is reached geometrically, round r keeps target ** (r / rounds)
    step: float = 0.75  # tolerance search: each round keeps this fraction of the previous round's metric
    min_fraction: float = 0.05  # tolerance search: no round goes below this fraction of the input's metric
    patience: int = 1  # tolerance search: stop after this many rounds in a row fail the guard
    round_to: int = DEFAULT_ROUND_TO
    max_layer_ratio: float = DEFAULT_MAX_LAYER_RATIO  # share of a layer's channels one round may remove
    score_samples: int = DEFAULT_SCORE_SAMPLES  # per group (class-stratified); the blind sample: as many in all
    score_batch_size: int = DEFAULT_SCORE_BATCH_SIZE
    beta: float = DEFAULT_BETA  # fairprune
    curvature: str = DEFAULT_ESTIMATOR  # fairprune
    temperature: float = DEFAULT_SNNL_TEMPERATURE  # snnl
    snnl_batches: int = DEFAULT_SNNL_BATCHES
    snnl_batch_size: int = DEFAULT_SNNL_BATCH_SIZE
    # recovery fine-tuning per round (distilling from the input model); `finetune.constrained` = per-group
    # constrained recovery (its tolerance defaults to max_group_drop)
    finetune: FitConfig = field(default_factory=lambda: FitConfig(epochs=1, lr=BUDGET_FINETUNE_LR, distill=0.5))
    max_group_drop: float = Guard.max_group_drop  # guard: no group may lose more validation accuracy than this
    max_f1_drop: float = 0.05
    privileged: str | None = None
    bootstrap: int = DEFAULT_N_BOOT  # the paired comparison's 95 % intervals, as validate's and evaluate's
    batch_size: int = DEFAULT_EVAL_BATCH_SIZE  # evaluation
    keep_rounds: bool = True  # every round's checkpoints under OUT/rounds
    seed: int = 0

    @property
    def control_run(self) -> str:
        """The control that runs: `control`, or (None) the default for the criterion and recovery."""
        if self.control is not None:
            return self.control
        if self.criterion not in BLIND:
            return "magnitude"
        if self.finetune.constrained is not None:
            return "plain-recovery"
        return "finetune-only" if self.target is not None else "none"

    @property
    def is_search(self) -> bool:
        """No budget: compress as far as every group stays within the tolerance."""
        return self.target is None

    def validate(self) -> None:
        if self.criterion not in CRITERIA:
            raise FairdeployError(f"unknown criterion {self.criterion!r}; choose one of {', '.join(CRITERIA)}")
        control = self.control_run
        if control not in CONTROLS:
            raise FairdeployError(f"unknown control {control!r}; choose one of {', '.join(CONTROLS)}")
        if control == self.criterion:
            raise FairdeployError(f"the control {control!r} is the criterion itself; choose another control "
                                  "(plain-recovery: the same criterion without the recovery constraint)")
        if control == "plain-recovery" and self.finetune.constrained is None:
            raise FairdeployError("the plain-recovery control compares constrained with plain recovery: it needs "
                                  "constrained recovery (--recovery constrained)")
        if control == "finetune-only" and self.is_search:
            raise FairdeployError("fine-tuning alone does not compress, so it cannot search to a tolerance: give a "
                                  "budget, or choose the control magnitude, taylor, plain-recovery or none")
        if self.metric not in BUDGET_METRICS:
            raise FairdeployError(f"unknown budget metric {self.metric!r}; choose one of {', '.join(BUDGET_METRICS)}")
        if self.target is not None and not 0.0 < self.target < 1.0:
            raise FairdeployError(f"the budget must keep a fraction in (0, 1) of the {self.metric}, got {self.target}")
        if not 0.0 < self.step < 1.0:
            raise FairdeployError(f"the search step must keep a fraction in (0, 1) of the {self.metric} per round, "
                                  f"got {self.step}")
        if not 0.0 < self.min_fraction < 1.0:
            raise FairdeployError(f"the search floor must be a fraction in (0, 1), got {self.min_fraction}")
        for name in ("rounds", "patience", "round_to", "score_samples", "score_batch_size", "snnl_batches",
                     "bootstrap", "batch_size"):
            if getattr(self, name) < 1:
                raise FairdeployError(f"{name.replace('_', ' ')} must be >= 1, got {getattr(self, name)}")
        if not 0.0 < self.max_layer_ratio < 1.0:
            raise FairdeployError(f"max layer ratio must be in (0, 1), got {self.max_layer_ratio}")
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
                label: Callable[[str], str] = _flag) -> tuple[str, float | None]:
    """(metric, fraction kept) from at most one of --speedup S (MACs / S), --target-macs F, --target-params F;
    `label` says how the user wrote a key (a flag, or a pipeline table's key). With none given: ("macs", None)
    (a search to the tolerance)."""
    given = {k: v for k, v in (("speedup", speedup), ("target_macs", target_macs),
                               ("target_params", target_params)) if v is not None}
    if len(given) > 1:
        raise FairdeployError("give exactly one budget: --target-macs F, --target-params F or --speedup S "
                              f"(got {', '.join(label(k) for k in given) or 'none'})")
    if not given:
        return "macs", None
    if speedup is not None:
        if speedup <= 1.0:
            raise FairdeployError(f"{label('speedup')} must be > 1, got {speedup}")
        return "macs", 1.0 / speedup
    key, fraction = (("target_macs", target_macs) if target_macs is not None else ("target_params", target_params))
    if not 0.0 < float(fraction) < 1.0:  # type: ignore[arg-type]
        raise FairdeployError(f"{label(key)} must keep a fraction in (0, 1) of the model, got {fraction}")
    return key.removeprefix("target_"), float(fraction)  # type: ignore[arg-type]


def guard_point(report: MetricsReport, size: ModelSize, base: MetricsReport, cfg: BudgetConfig) -> BudgetPoint:
    """`report` (a model of `size`) against the input model's `base` under the guard of `cfg`: each group's accuracy
    change, why it is ineligible (a group lost more than max_group_drop, macro-F1 fell more than max_f1_drop) and
    the shortfall."""
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


# ---- one run (candidate or control) ------------------------------------------------------------------------

@dataclass
class _RunContext:
    """What every round of both runs shares: the input model (the teacher), its data and figures, the settings."""

    spec: ModelSpec
    teacher: nn.Module
    train_ds: Any
    val_ds: Any
    scores: ScoreData
    base_report: MetricsReport
    base_size: ModelSize
    head: str
    device: torch.device
    cfg: BudgetConfig
    scratch: Path
    progress: Progress


@dataclass(frozen=True)
class _RoundModel:
    """A model a run produced: its name (r<round>-pruned / r<round>-finetuned), weights (CPU copy), validation
    point, round and whether the round was forced (a control run past its own stop)."""

    name: str
    module: nn.Module
    point: BudgetPoint
    round: int
    forced: bool = False


@dataclass
class _RunState:
    """One run as it goes: its rounds, every model it produced, and why it stopped."""

    name: str
    criterion: str  # a criterion, or "finetune-only"
    finetune: FitConfig  # its recovery fine-tuning
    rounds: list[BudgetRound] = field(default_factory=list)
    candidates: list[_RoundModel] = field(default_factory=list)
    stopped_because: str = ""


def _evaluate(model: nn.Module, ctx: _RunContext) -> MetricsReport:
    return evaluate_model(model, ctx.val_ds, ctx.spec, ctx.device, ctx.cfg.batch_size, progress=ctx.progress)


def round_fraction(cfg: BudgetConfig, r: int) -> float:
    """The fraction of the input model's metric that round r (from 1) keeps: the budget approached geometrically
    over cfg.rounds, or cfg.step ** r in a tolerance search."""
    return cfg.target ** (r / cfg.rounds) if cfg.target is not None else cfg.step ** r


def _multipliers(history: tuple[dict[str, Any], ...]) -> dict[str, float] | None:
    """The Lagrange multipliers at the end of constrained recovery's last epoch (None: plain recovery)."""
    constraint = history[-1].get("constraint") if history else None
    return None if constraint is None else {str(k): float(v) for k, v in constraint["multipliers"].items()}


def _run_rounds(run: _RunState, model: nn.Module, ctx: _RunContext, min_rounds: int = 0) -> _RunState:
    """The run's rounds: a budget run does cfg.rounds; a tolerance search goes on until `patience` rounds in a row
    fail the guard (but at least `min_rounds`, the candidate's reach, so the control has a model at the candidate's
    budget), the floor, or a budget channel removal cannot reach."""
    cfg = ctx.cfg
    seed_everything(cfg.seed)  # candidate and control start from the same random state
    base_value = budget_value(ctx.base_size, cfg.metric)
    failing, r = 0, 0
    while True:
        r += 1
        if not cfg.is_search and r > cfg.rounds:
            run.stopped_because = f"the budget was reached in {cfg.rounds} round(s)"
            break
        fraction = round_fraction(cfg, r)
        if cfg.is_search and fraction < cfg.min_fraction - 1e-12 and r > min_rounds:
            run.stopped_because = (f"the next round would keep x{fraction:.3f} of the {cfg.metric}, below the "
                                   f"floor x{cfg.min_fraction:g}")
            break
        forced = cfg.is_search and failing >= cfg.patience  # only a control run past its stop gets here
        t0 = time.perf_counter()
        pruning = None
        if run.criterion != "finetune-only":
            dg = dependency_graph(model, ctx.spec.image_size, ctx.device)
            modules = dict(model.named_modules())
            table, notes = prepare_importance(run.criterion, model, dg, [modules[ctx.head]], ctx.scores, ctx.device)
            t_score = time.perf_counter() - t0
            target = base_value * fraction
            try:
                removal = remove_to_budget(model, table, target, cfg.metric, ctx.head, ctx.spec.image_size,
                                           cfg.round_to, cfg.max_layer_ratio, ctx.device)
            except BudgetUnreachable as exc:
                if not cfg.is_search:
                    raise
                run.stopped_because = f"round {r}: {exc}"
                break
            size = removal.size
            pruning = RoundPruning(target=target, channel_ratio=removal.ratio,
                                   channels_removed=removal.channels_removed, removed=removal.removed,
                                   criterion_notes=notes, score_seconds=t_score,
                                   pruned=guard_point(_evaluate(model, ctx), size, ctx.base_report, cfg))
            run.candidates.append(_RoundModel(f"r{r}-pruned", copy.deepcopy(model).cpu(), pruning.pruned, r, forced))
        else:
            size = model_size(model, ctx.spec.image_size, ctx.device)
        model, fit = finetune_model(model, ctx.spec, ctx.train_ds, ctx.val_ds, run.finetune,
                                    ctx.scratch / f"{run.name}-r{r}", ctx.device, None, ctx.progress,
                                    task=f"{run.name} round {r} finetune", teacher=ctx.teacher)
        finetuned = guard_point(_evaluate(model, ctx), size, ctx.base_report, cfg)
        finetune = RoundFinetune(best_epoch=fit.best_epoch, epochs=len(fit.history),
                                 data_order=tuple(h["data_order"] for h in fit.history),
                                 train_samples_per_s=float(np.mean([h["train_samples_per_s"] for h in fit.history])),
                                 multipliers=_multipliers(fit.history))
        done = BudgetRound(round=r, pruning=pruning, finetuned=finetuned, finetune=finetune,
                           seconds=time.perf_counter() - t0, forced=forced)
        run.rounds.append(done)
        run.candidates.append(_RoundModel(f"r{r}-finetuned", copy.deepcopy(model).cpu(), finetuned, r, forced))
        kept = budget_value(size, cfg.metric) / base_value
        worst = finetuned.val.worst_group_accuracy
        guard = "guard ok" if done.passed else "guard failed: " + "; ".join(finetuned.ineligible_because)
        ctx.progress(f"{run.name} ({run.criterion}) round {r}: x{kept:.3f} {cfg.metric}, worst-group accuracy "
                     f"{worst:.4f}, {guard}{' (forced: at the candidate budget)' if forced else ''}",
                     r, cfg.rounds if not cfg.is_search else r)
        if cfg.is_search:
            failing = 0 if done.passed else failing + 1
            if failing >= cfg.patience and r >= min_rounds:
                run.stopped_because = (f"round {r} (x{kept:.3f} {cfg.metric}) failed the guard: "
                                       + "; ".join(finetuned.ineligible_because)
                                       + (f" ({failing} failing rounds in a row)" if failing > 1 else ""))
                break
    return run


def _select(run: _RunState, budget_value_max: float, metric: str) -> tuple[str, nn.Module, BudgetPoint, bool]:
    """Budget run: among the run's models that meet the budget, the best worst-group validation accuracy the guard
    accepts; when none passes, the one closest to passing (smallest summed shortfall beyond the tolerances),
    flagged."""
    within = [c for c in run.candidates if budget_value(c.point.size, metric) <= budget_value_max]
    if not within:
        raise FairdeployError("no model of the run meets the budget")
    ok = [c for c in within if c.point.eligible]
    if ok:
        best = max(ok, key=lambda c: (c.point.val.worst_group_accuracy, c.point.val.f1_macro))
    else:  # closest to passing: the smallest total shortfall, so a levelled-down model is not preferred
        best = min(within, key=lambda c: (c.point.shortfall, -c.point.val.worst_group_accuracy))
    return best.name, best.module, best.point, bool(ok)


def reached_model(candidates: list[_RoundModel], metric: str) -> _RoundModel | None:
    """Tolerance search: the most compressed model the guard accepted (ties: better worst group, then macro-F1),
    not counting rounds forced past the run's own stop; None when no model passed."""
    ok = [c for c in candidates if c.point.eligible and not c.forced]
    if not ok:
        return None
    return min(ok, key=lambda c: (budget_value(c.point.size, metric), -c.point.val.worst_group_accuracy,
                                  -c.point.val.f1_macro))


def reach_line(cfg: BudgetConfig, candidate: Reached, control: Reached | None) -> str:
    """`compression reached at max group drop 0.02: fairprune x0.316 of the MACs (round 4), ...`"""
    def where(r: Reached) -> str:
        return "none (not even round 1 kept every group)" if r.round == 0 else \
            f"x{r.macs_fraction:.3f} of the MACs (round {r.round}, {r.model})"

    line = (f"compression reached at max group drop {cfg.max_group_drop:g} (macro-F1 drop {cfg.max_f1_drop:g}): "
            f"{cfg.criterion} {where(candidate)}")
    if control is not None:
        ratio = control.macs_fraction / candidate.macs_fraction
        line += (f"; {cfg.control_run} control {where(control)}; the candidate's MAC reduction is {ratio:.2f}x the "
                 "control's")
    return line


# ---- the library call --------------------------------------------------------------------------------------

def compress_checkpoint(
    model_dir: str | os.PathLike[str],
    manifest: Manifest,
    out_dir: str | os.PathLike[str],
    cfg: BudgetConfig = BudgetConfig(),
    device: str = "auto",
    progress: Progress = no_progress,
) -> BudgetResult:
    """Compress a checkpoint to the budget, or as far as the guard allows (cfg.target None), with `cfg.criterion`
    and (unless "none") the control; write OUT/model.* (the candidate's selected or reached model), OUT/control/
    model.* (the control's), OUT/rounds/* and OUT/prune.json. Nothing is written unless the run succeeds."""
    cfg.validate()
    ft = replace(cfg.finetune, seed=cfg.seed)  # one seed: scores, data order, fine-tuning
    if ft.constrained is not None:  # the constraint's ε, where unset: the guard's tolerance
        ft = replace(ft, constrained=ft.constrained.resolved(cfg.max_group_drop))
    cfg = replace(cfg, finetune=ft)
    t_start = time.perf_counter()
    dev = resolve_device(device)
    src = resolve_checkpoint(model_dir)
    teacher, spec = load_checkpoint(src, dev)
    if spec.sparsity:
        raise FairdeployError(f"{src}: compression runs start from a dense checkpoint (this one has "
                              f"{spec.sparsity.get('kind')} masks); use the checkpoint before weight-level pruning")
    head = classifier_head_name(spec.arch)
    enc = Encoding(spec.classes, spec.groups)
    train_ds, val_ds = spec_datasets(manifest, spec)
    score_ds = split_dataset(manifest, "train", enc, eval_transform(spec.image_size, spec.mean, spec.std))
    base_report = evaluate_model(teacher, val_ds, spec, dev, cfg.batch_size, progress=progress)
    roles = decide_roles(base_report, cfg.privileged)
    present = sorted(set(score_ds.groups))
    if len(present) < 2:
        raise FairdeployError("a compression run needs at least two groups in the train split to score with")
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
    base_value = budget_value(base_size, cfg.metric)
    budget = None if cfg.is_search else Budget(cfg.metric, cfg.target, base_value * cfg.target, base_size)
    tolerance = None if not cfg.is_search else Tolerance(cfg.metric, cfg.max_group_drop, cfg.max_f1_drop, cfg.step,
                                                         cfg.min_fraction, cfg.patience, base_size)
    input_point = guard_point(base_report, base_size, base_report, cfg)
    out = Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    with main_scratch(out) as scratch:  # under torchrun only rank 0 writes (scratch and output)
        ctx = _RunContext(spec=spec, teacher=teacher, train_ds=train_ds, val_ds=val_ds, scores=scores,
                   base_report=base_report, base_size=base_size, head=head, device=dev, cfg=cfg, scratch=scratch,
                   progress=progress)
        cand = _run_rounds(_RunState("candidate", cfg.criterion, cfg.finetune), copy.deepcopy(teacher), ctx)
        runs = [cand]
        cand_reached = reached_model(cand.candidates, cfg.metric) if cfg.is_search else None
        if cfg.control_run != "none":
            plain = cfg.control_run == "plain-recovery"
            control = _RunState("control", cfg.criterion if plain else cfg.control_run,
                           replace(cfg.finetune, constrained=None) if plain else cfg.finetune)
            runs.append(_run_rounds(control, copy.deepcopy(teacher), ctx,
                             min_rounds=cand_reached.round if cand_reached is not None else 0))
        selected: dict[str, tuple[str, nn.Module, BudgetPoint, bool]] = {}
        run_records: dict[str, RunRecord] = {}
        reached: dict[str, Reached] = {}
        for run in runs:
            if cfg.is_search:
                got = reached_model(run.candidates, cfg.metric)
                selected[run.name] = ((got.name, got.module, got.point, True) if got is not None else
                                      ("input", copy.deepcopy(teacher).cpu(), input_point, True))
                size = selected[run.name][2].size
                reached[run.name] = Reached(model=selected[run.name][0], round=0 if got is None else got.round,
                                            macs_fraction=size.macs / base_size.macs,
                                            params_fraction=size.params / base_size.params)
            else:
                budget_cap = budget.max if run.criterion != "finetune-only" else float("inf")  # type: ignore[union-attr]
                selected[run.name] = _select(run, budget_cap, cfg.metric)
            name, _m, point, guard_ok = selected[run.name]
            run_records[run.name] = RunRecord(criterion=run.criterion, rounds=tuple(run.rounds), selected=name,
                                              point=point, guard_passed=guard_ok,
                                              model="control" if run.name == "control" else None,
                                              reached=reached.get(run.name), stopped_because=run.stopped_because)
        chosen = selected["candidate"]
        selection = BudgetSelection(
            model="input" if chosen[0] == "input" else f"rounds/candidate-{chosen[0]}", guard_passed=chosen[3],
            size=chosen[2].size, macs_fraction=chosen[2].size.macs / base_size.macs,
            params_fraction=chosen[2].size.params / base_size.params, note=_selection_note(cfg, chosen))
        # the paired comparison: budget run, the two selected models; tolerance search, the control's model at the
        # candidate's budget (the same round and state), so both are compared at the same MACs
        comparison, reach, against = None, None, None
        if "control" in selected:
            if not cfg.is_search:
                against = selected["control"][1]
            elif chosen[0] != "input":
                at = [c for c in runs[1].candidates if c.name == chosen[0]]
                against = at[0].module if at else None
            if against is not None:
                pa = predict(chosen[1].to(dev), val_ds, dev, cfg.batch_size)
                pb = predict(against.to(dev), val_ds, dev, cfg.batch_size)
                comparison = paired_comparison(pa, pb, spec.groups, spec.num_classes, cfg.bootstrap, cfg.seed)
            if cfg.is_search:
                reach = ReachComparison(
                    candidate=reached["candidate"].macs_fraction, control=reached["control"].macs_fraction,
                    reduction_ratio=reached["control"].macs_fraction / reached["candidate"].macs_fraction,
                    at_candidate_budget=None if against is None else chosen[0],
                    line=reach_line(cfg, reached["candidate"], reached["control"]))
        record = BudgetRecord(
            config=cfg, budget=budget, tolerance=tolerance, source=str(src),
            source_sha256=sha256_file(src / WEIGHTS_FILE), arch=spec.arch, input_val=PointMetrics.from_report(base_report),
            input_size=base_size, groups=roles, manifest=manifest.source,
            score_samples_per_group=len(ids[present[0]]), val_images=len(val_ds), device=str(dev), runs=run_records,
            selected=selection, comparison=comparison, reach=reach,
            verdict=_verdict(cfg, comparison, chosen[0], reach),
        )
        if world().is_main:
            staged = scratch / "final"
            history = {"stage": "prune", "kind": "budget", "mode": record.mode, "criterion": cfg.criterion,
                       "control": cfg.control_run, "budget": None if budget is None else budget.to_dict(),
                       "tolerance": None if tolerance is None else tolerance.to_dict(), "source": str(src),
                       "source_sha256": record.source_sha256, "manifest": manifest.source, "selected": chosen[0]}
            out_spec = replace(spec, sparsity=None).with_history(history)
            save_checkpoint(chosen[1], out_spec, staged)
            if "control" in selected:
                ctrl = selected["control"]
                save_checkpoint(ctrl[1], replace(spec, sparsity=None).with_history({**history, "run": "control",
                                                                                     "selected": ctrl[0]}),
                                staged / "control")
            if cfg.keep_rounds:
                for run in runs:
                    for c in run.candidates:
                        save_checkpoint(c.module, out_spec, staged / "rounds" / f"{run.name}-{c.name}")
            record = replace(record, seconds=time.perf_counter() - t_start)
            write_json(staged / PRUNE_FILE, record.to_dict())
            with atomic_dir(out, owner=PRUNE_FILE) as tmp:
                for f in staged.iterdir():
                    shutil.move(str(f), tmp / f.name)
        barrier()
    return BudgetResult(out_dir=out, record=record)


def _selection_note(cfg: BudgetConfig, chosen: tuple[str, nn.Module, BudgetPoint, bool]) -> str:
    guard = (f"every group within {cfg.max_group_drop} validation accuracy of the input model, macro-F1 within "
             f"{cfg.max_f1_drop}")
    if cfg.is_search:
        if chosen[0] == "input":
            return (f"no compressed model kept the guard ({guard}), not even after round 1 (x{cfg.step:g} of the "
                    f"{cfg.metric}): the output is the input model, uncompressed")
        return f"the most compressed model the guard accepted ({guard})"
    if chosen[3]:
        return "best worst-group validation accuracy among the models at the budget that the guard accepts"
    return (f"no model at the budget passed the guard ({guard}); the output is the best one anyway, flagged"
            + ("; every round's checkpoint is under rounds/" if cfg.keep_rounds else ""))


def _verdict(cfg: BudgetConfig, comparison: Any, chosen: str, reach: ReachComparison | None) -> str:
    control = cfg.control_run
    if control == "none":
        return "no control was run: no fairness claim about the criterion is made"
    if comparison is None:
        head = f"{cfg.criterion} kept no compression within the tolerance: nothing to compare at its budget"
        return head if reach is None else f"{reach.line}. {head}"
    line = verdict(cfg.criterion, control, comparison)
    if reach is None:
        return line
    return f"{reach.line}. At the candidate's budget ({chosen}): {line}"
