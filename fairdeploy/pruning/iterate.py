"""The iterative prune loop shared by FairPrune and SNNL: prune a step, fine-tune, evaluate on validation,
record, keep the best eligible step, stop by the rule."""

from __future__ import annotations

import copy
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fairdeploy.data.loading import ImageDataset
from fairdeploy.metrics import MetricsReport
from fairdeploy.models.checkpoint import ModelSpec
from fairdeploy.models.size import model_size
from fairdeploy.models.sparsity import Masks, sparsity
from fairdeploy.progress import Progress, no_progress
from fairdeploy.pruning.selection import (
    Guard,
    StepFinetune,
    StepRecord,
    StepWork,
    StopRule,
    StopTracker,
    selection_value,
    step_record,
)
from fairdeploy.training.finetune import finetune_model
from fairdeploy.training.loop import FitConfig, evaluate_model


@dataclass
class StepOutput:
    """What one pruning step did: the (possibly rebuilt) model, its masks, a description of what was removed,
    and why nothing is left to prune after it (None: more steps can follow)."""

    model: nn.Module
    removed: dict[str, Any]
    masks: Masks = field(default_factory=dict)
    exhausted: str | None = None  # why no further step can prune anything, if so
    stats: dict[str, Any] = field(default_factory=dict)  # timings of the scoring (e.g. curvature samples/s)


StepFn = Callable[[nn.Module, Masks, int], StepOutput]


def step_progress(progress: Progress, step: int) -> Progress:
    """`progress` with each task named for step `step` ("curvature dark (step 2)")."""
    def named(task: str, completed: int, total: int) -> None:
        progress(f"{task} (step {step})", completed, total)

    return named


@dataclass(frozen=True)
class LoopContext:
    spec: ModelSpec
    train_ds: ImageDataset  # augmented, for fine-tuning
    val_ds: ImageDataset
    device: torch.device
    unprivileged: str
    stop: StopRule
    guard: Guard
    finetune: FitConfig | None
    scratch: Path
    batch_size: int  # evaluation (PruneConfig.batch_size)
    workers: int = 0
    progress: Progress = no_progress


@dataclass
class LoopResult:
    model: nn.Module  # the selected step's model (on the CPU)
    masks: Masks
    selected_step: int
    records: list[StepRecord]
    stopped_because: str
    selected_report: MetricsReport


def _evaluate(model: nn.Module, ctx: LoopContext) -> MetricsReport:
    return evaluate_model(model, ctx.val_ds, ctx.spec, ctx.device, ctx.batch_size, ctx.workers,
                          progress=ctx.progress)


def _snapshot(model: nn.Module) -> nn.Module:
    return copy.deepcopy(model).to("cpu")


def run_steps(model: nn.Module, masks: Masks, baseline: MetricsReport, step_fn: StepFn,
              ctx: LoopContext) -> LoopResult:
    """Iterate `step_fn` up to `ctx.stop.steps` times; validation only; the test split is never read."""
    target = ctx.stop.target
    record0 = step_record(0, baseline, baseline, ctx.unprivileged, ctx.guard, target,
                          size=model_size(model, ctx.spec.image_size, ctx.device),
                          sparsity=sparsity(masks) if masks else None, removed={}, seconds=0.0)
    records = [record0]
    best_step, best_value = 0, selection_value(record0, ctx.guard.select, target)
    best_model, best_masks, best_report = _snapshot(model), dict(masks), baseline
    tracker = StopTracker(ctx.stop, baseline.gap(target))
    stopped = f"ran the maximum of {ctx.stop.steps} step(s)"
    for step in range(1, ctx.stop.steps + 1):
        t0 = time.perf_counter()
        out = step_fn(model, masks, step)
        model, masks = out.model, out.masks
        t_prune = time.perf_counter() - t0
        finetune_info = None
        if ctx.finetune is not None:
            model, fit_result = finetune_model(model, ctx.spec, ctx.train_ds, ctx.val_ds, ctx.finetune,
                                               ctx.scratch / f"step{step}", ctx.device, masks, ctx.progress,
                                               task=f"finetune step {step}")
            finetune_info = StepFinetune(best_epoch=fit_result.best_epoch, best_score=fit_result.best_score,
                                         epochs=len(fit_result.history),
                                         train_samples_per_s=sum(h["train_samples_per_s"] for h in fit_result.history)
                                         / max(len(fit_result.history), 1))
        report = _evaluate(model, ctx)
        record = step_record(step, report, baseline, ctx.unprivileged, ctx.guard, target,
                             size=model_size(model, ctx.spec.image_size, ctx.device),
                             sparsity=sparsity(masks) if masks else None, removed=out.removed,
                             work=StepWork(finetune=finetune_info, prune_seconds=t_prune, scoring=out.stats),
                             seconds=time.perf_counter() - t0)
        records.append(record)
        value = selection_value(record, ctx.guard.select, target)
        if record.eligible and value > best_value:
            best_step, best_value = step, value
            best_model, best_masks, best_report = _snapshot(model), dict(masks), report
        reason = tracker.update(report.gap(target), record.eligible)
        if out.exhausted is not None and reason is None:
            reason = out.exhausted
        if reason is not None:
            stopped = reason
            break
    return LoopResult(model=best_model, masks=best_masks, selected_step=best_step, records=records,
                      stopped_because=stopped, selected_report=best_report)
