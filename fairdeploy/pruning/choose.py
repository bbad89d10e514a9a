"""Choosing across runs: rank checkpoints (what `train`, `finetune`, `prune` and `compress` write) on the validation
split of one manifest, with paired intervals, and recommend one.

The rule (also in README, "Choosing among runs"):

1. Every model predicts the validation split (the test split is never read). Per model: each group's accuracy, the
   worst-group accuracy, Eodd, macro-F1 (fairdeploy.metrics), MACs and parameters (fairdeploy.models.size).
2. Order: highest worst-group accuracy first; ties by higher macro-F1, then fewer MACs (then the order given).
3. The best model is the first in that order that does not predict a single class. Every other model is compared
   with it on the same images (fairdeploy.pruning.paired.paired_comparison: model minus best, paired bootstrap
   within groups, 95 % percentile intervals) and its verdict line prints the worst-group accuracy difference with
   its interval: "worse (interval below 0)" when the whole interval is below 0, else "not shown worse".
4. With a reference (usually the dense model the runs started from), each model also meets the guard of a
   compression run (fairdeploy.pruning.budget): no group loses more than `max_group_drop` validation accuracy
   against the reference and macro-F1 falls at most `max_f1_drop`; a model that fails it is listed with the group
   and the drop that failed it.
5. The recommendation is the model with the fewest MACs (ties: the earlier in the order) among those that pass the
   guard (when a reference is given), do not predict a single class, and whose worst-group accuracy is not shown
   worse than the best's. Its line says why: its MACs and the interval that made it eligible.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from fairdeploy.data.loading import Encoding, eval_transform, split_dataset
from fairdeploy.data.manifest import Manifest
from fairdeploy.device import resolve_device
from fairdeploy.errors import FairdeployError
from fairdeploy.metrics import MetricsReport, compute_metrics
from fairdeploy.metrics.bootstrap import DEFAULT_N_BOOT
from fairdeploy.models.checkpoint import ModelSpec, load_checkpoint, read_spec, resolve_checkpoint
from fairdeploy.models.size import ModelSize, model_size
from fairdeploy.progress import Progress, no_progress
from fairdeploy.pruning.budget import (
    BudgetConfig,
    guard_point,  # the compression runs' guard, not a twin of it
)
from fairdeploy.pruning.compress_records import PointMetrics
from fairdeploy.pruning.paired import Difference, PairedComparison, paired_comparison
from fairdeploy.pruning.selection import Guard
from fairdeploy.training.loop import named_present_groups
from fairdeploy.training.predict import DEFAULT_EVAL_BATCH_SIZE, Predictions, predict
from fairdeploy.validation.compare import single_class

SPLIT = "val"  # models are chosen on validation; the test split stays unseen


@dataclass(frozen=True)
class RankConfig:
    """The guard's tolerances against the reference, the paired bootstrap and the evaluation batch size."""

    max_group_drop: float = Guard.max_group_drop  # no group may lose more validation accuracy than this
    max_f1_drop: float = BudgetConfig.max_f1_drop  # macro-F1 may fall at most this much
    bootstrap: int = DEFAULT_N_BOOT  # resamples of the paired 95 % intervals
    batch_size: int = DEFAULT_EVAL_BATCH_SIZE
    seed: int = 0  # the bootstrap's

    def validate(self) -> None:
        if not 0.0 <= self.max_group_drop <= 1.0:
            raise FairdeployError(f"max group drop must be in [0, 1], got {self.max_group_drop}")
        if not 0.0 <= self.max_f1_drop <= 1.0:
            raise FairdeployError(f"max F1 drop must be in [0, 1], got {self.max_f1_drop}")
        for name in ("bootstrap", "batch_size"):
            if getattr(self, name) < 1:
                raise FairdeployError(f"{name.replace('_', ' ')} must be >= 1, got {getattr(self, name)}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class GuardCheck:
    """A model against the reference on validation: each group's accuracy change, the macro-F1 change, and what
    failed the guard (empty: passed)."""

    group_accuracy_change: dict[str, float]
    f1_macro_change: float
    failed_because: tuple[str, ...]

    @property
    def passed(self) -> bool:
        return not self.failed_because

    def to_dict(self) -> dict[str, Any]:
        return {"passed": self.passed, "group_accuracy_change": dict(self.group_accuracy_change),
                "f1_macro_change": self.f1_macro_change, "failed_because": list(self.failed_because)}


@dataclass(frozen=True)
class RankedModel:
    """One model: its validation figures, size, guard, and its comparison with the best model (None: the best)."""

    name: str  # as given
    path: str  # the checkpoint folder it resolved to
    arch: str
    image_size: int
    size: ModelSize
    val: PointMetrics
    degenerate: str | None  # "predicts a single class (c)": never recommended
    guard: GuardCheck | None  # None: no reference given
    vs_best: PairedComparison | None  # this model minus the best one on the same images
    verdict: str

    @property
    def shown_worse(self) -> bool:
        """Its worst-group accuracy is below the best's with a 95 % interval entirely below 0."""
        return self.vs_best is not None and self.vs_best.worst_group_accuracy.ci95[1] < 0

    @property
    def eligible(self) -> bool:
        return self.degenerate is None and (self.guard is None or self.guard.passed) and not self.shown_worse

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "path": self.path, "arch": self.arch, "image_size": self.image_size,
                "size": self.size.to_dict(), "val": self.val.to_dict(), "degenerate": self.degenerate,
                "guard": None if self.guard is None else self.guard.to_dict(),
                "vs_best": None if self.vs_best is None else self.vs_best.to_dict(),
                "shown_worse": self.shown_worse, "eligible": self.eligible, "verdict": self.verdict}


@dataclass(frozen=True)
class Ranking:
    """What `fairdeploy rank` prints and writes: the models in rank order, the best, the recommendation."""

    models: tuple[RankedModel, ...]  # in rank order
    best: str
    recommended: str | None  # None: no model is eligible
    recommendation: str  # the line that says why
    reference: str | None
    reference_val: PointMetrics | None
    config: RankConfig
    manifest: str
    val_images: int
    device: str

    def model(self, name: str) -> RankedModel:
        return next(m for m in self.models if m.name == name)

    def to_dict(self) -> dict[str, Any]:
        return {"split": SPLIT, "manifest": self.manifest, "val_images": self.val_images, "device": self.device,
                "config": self.config.to_dict(), "reference": self.reference,
                "reference_val": None if self.reference_val is None else self.reference_val.to_dict(),
                "order": [m.name for m in self.models], "best": self.best, "recommended": self.recommended,
                "recommendation": self.recommendation, "models": [m.to_dict() for m in self.models]}


# ---- the rule, on validation figures and predictions (no model needed) ----

def rank_order(models: Sequence[tuple[PointMetrics, ModelSize]]) -> list[int]:
    """Indices in rank order: worst-group accuracy (higher first), then macro-F1 (higher), then MACs (fewer), then
    the order given."""
    return sorted(range(len(models)), key=lambda i: (-models[i][0].worst_group_accuracy, -models[i][0].f1_macro,
                                                     models[i][1].macs, i))


def verdict_line(name: str, best: str, comparison: PairedComparison) -> str:
    """`B: worst-group accuracy -0.0210 [-0.0470, +0.0040] vs A — not shown worse`: the interval that decided."""
    wga = comparison.worst_group_accuracy
    if wga.ci95[1] < 0:
        outcome = "worse (interval below 0)"
    elif wga.ci95[0] > 0:
        outcome = "better (interval above 0)"
    else:
        outcome = "not shown worse"
    return f"{name}: worst-group accuracy {wga.text()} vs {best} — {outcome}"


def _macs(size: ModelSize) -> str:
    return f"{size.macs / 1e6:.1f} M MACs"


def recommendation_line(models: Sequence[RankedModel], best: RankedModel, guarded: bool) -> tuple[str | None, str]:
    """(the recommended model, the line that says why): the fewest MACs among the eligible models."""
    conditions = (("pass the guard, " if guarded else "") + "predict more than one class and are not shown worse "
                  f"than {best.name} on worst-group accuracy")
    eligible = [m for m in models if m.eligible]
    if not eligible:
        return None, (f"no recommendation: no model {'passes the guard, ' if guarded else ''}predicts more than one "
                      f"class and is not shown worse than {best.name} on worst-group accuracy")
    pick = min(eligible, key=lambda m: m.size.macs)  # min keeps the first of equal MACs: the earlier in rank order
    if pick is best:
        return pick.name, (f"recommended: {pick.name}: {_macs(pick.size)}, the fewest among the models that "
                           f"{conditions}; it is the best on worst-group accuracy "
                           f"({pick.val.worst_group_accuracy:.4f})")
    wga: Difference = pick.vs_best.worst_group_accuracy  # type: ignore[union-attr]
    return pick.name, (f"recommended: {pick.name}: {_macs(pick.size)} (x{pick.size.macs / best.size.macs:.3f} of "
                       f"{best.name}'s), the fewest among the models that {conditions}: worst-group accuracy "
                       f"{wga.text()} vs {best.name}, an interval not below 0")


def guard_check(report: MetricsReport, size: ModelSize, reference: MetricsReport, cfg: RankConfig) -> GuardCheck:
    """The compression runs' guard (fairdeploy.pruning.budget) of one model against the reference."""
    point = guard_point(report, size, reference,
                        BudgetConfig(max_group_drop=cfg.max_group_drop, max_f1_drop=cfg.max_f1_drop))
    return GuardCheck(dict(point.group_accuracy_change), report.overall_f1_macro - reference.overall_f1_macro,
                      point.ineligible_because)


def metrics_of(p: Predictions, spec: ModelSpec) -> MetricsReport:
    """Per-group metrics of predictions with the model's class and group names (as evaluate_model computes)."""
    names, present = named_present_groups(p.groups, spec.groups)
    return compute_metrics(p.labels, p.predicted, names, spec.num_classes, spec.classes, group_order=present)


def rank_predictions(names: Sequence[str], paths: Sequence[str], specs: Sequence[ModelSpec],
                     sizes: Sequence[ModelSize], preds: Sequence[Predictions], reference: Predictions | None,
                     cfg: RankConfig, *, reference_name: str | None = None, manifest: str = "",
                     device: str = "cpu") -> Ranking:
    """The ranking of models whose validation predictions (of the same images, in the same order) are given."""
    spec = specs[0]
    reports = [metrics_of(p, s) for p, s in zip(preds, specs, strict=True)]
    points = [PointMetrics.from_report(r) for r in reports]
    order = rank_order(list(zip(points, sizes, strict=True)))
    degenerate = [single_class(p.predicted, spec.classes) for p in preds]
    best = next((i for i in order if degenerate[i] is None), order[0])
    ref_report = None if reference is None else metrics_of(reference, spec)
    ranked: list[RankedModel] = []
    for i in order:
        guard = None if ref_report is None else guard_check(reports[i], sizes[i], ref_report, cfg)
        if i == best:
            comparison = None
            line = (f"{names[i]}: the best on worst-group accuracy ({points[i].worst_group_accuracy:.4f}, macro-F1 "
                    f"{points[i].f1_macro:.4f}); the others are compared with it")
        else:
            comparison = paired_comparison(preds[i], preds[best], spec.groups, spec.num_classes, cfg.bootstrap,
                                           cfg.seed)
            line = verdict_line(names[i], names[best], comparison)
        if degenerate[i] is not None:
            line += f"; {degenerate[i]}: never recommended"
        if guard is not None and not guard.passed:
            line += f"; fails the guard against {reference_name}: {'; '.join(guard.failed_because)}"
        ranked.append(RankedModel(name=names[i], path=paths[i], arch=specs[i].arch, image_size=specs[i].image_size,
                                  size=sizes[i], val=points[i], degenerate=degenerate[i], guard=guard,
                                  vs_best=comparison, verdict=line))
    best_model = next(m for m in ranked if m.name == names[best])
    recommended, why = recommendation_line(ranked, best_model, ref_report is not None)
    return Ranking(models=tuple(ranked), best=names[best], recommended=recommended, recommendation=why,
                   reference=reference_name, reference_val=None if ref_report is None else PointMetrics.from_report(
                       ref_report), config=cfg, manifest=manifest, val_images=len(preds[0].labels), device=device)


# ---- checkpoints in, ranking out ----

def _check_same_task(specs: dict[str, ModelSpec]) -> None:
    """Every model must have the classes and groups of the first (else the predictions are not comparable)."""
    (first, a), *others = specs.items()
    for name, b in others:
        for what, x, y in (("classes", a.classes, b.classes), ("groups", a.groups, b.groups)):
            if x != y:
                raise FairdeployError(f"models {first} and {name} have different {what}: {', '.join(x)} vs "
                                      f"{', '.join(y)}; rank compares models of one task")


def rank_models(models: Sequence[str | Path], manifest: Manifest, reference: str | Path | None = None,
                cfg: RankConfig = RankConfig(), device: str = "auto", progress: Progress = no_progress) -> Ranking:
    """Rank checkpoint folders on the manifest's validation split (see the module docstring for the rule); with a
    `reference` checkpoint each model also meets the guard against it. Every input is checked before any model
    is loaded."""
    cfg.validate()
    names = [str(m) for m in models]
    if len(names) < 2:
        raise FairdeployError(f"rank needs at least two models to choose from, got {len(names)}")
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise FairdeployError(f"model {twice[0]} is given twice; give each model once")
    dirs = {n: resolve_checkpoint(n) for n in names}
    ref_dir = None if reference is None else resolve_checkpoint(reference)
    specs = {n: read_spec(d) for n, d in dirs.items()}
    _check_same_task(specs if ref_dir is None else {**specs, f"{reference} (the reference)": read_spec(ref_dir)})
    if not any(r.split == SPLIT for r in manifest.records):
        raise FairdeployError(f"{manifest.source}: no {SPLIT} split; rank compares models on validation images "
                              "only (the test split is never read)")
    dev = resolve_device(device)
    datasets: dict[tuple[Any, ...], Any] = {}

    def predicted(d: Path, task: str) -> tuple[Predictions, ModelSize]:
        net, spec = load_checkpoint(d, dev)
        key = (spec.image_size, spec.mean, spec.std)
        if key not in datasets:  # the same images in manifest order; each input size transformed once
            datasets[key] = split_dataset(manifest, SPLIT, Encoding(spec.classes, spec.groups),
                                          eval_transform(spec.image_size, spec.mean, spec.std))
        p = predict(net, datasets[key], dev, cfg.batch_size, progress=progress, task=task)  # no_grad itself
        size = model_size(net, spec.image_size, dev)
        del net
        return p, size

    results = [predicted(dirs[n], f"predict {n}") for n in names]
    ref_pred = None
    if ref_dir is not None:  # a reference that is also ranked is predicted once
        same = [i for i, n in enumerate(names) if dirs[n].resolve() == ref_dir.resolve()]
        ref_pred = results[same[0]][0] if same else predicted(ref_dir, f"predict {reference} (reference)")[0]
    return rank_predictions(names, [str(dirs[n]) for n in names], [specs[n] for n in names],
                            [s for _, s in results], [p for p, _ in results], ref_pred, cfg,
                            reference_name=None if reference is None else str(reference), manifest=manifest.source,
                            device=str(dev))
