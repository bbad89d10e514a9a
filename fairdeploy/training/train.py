"""train_model and evaluate_checkpoint: the library calls behind `fairdeploy train` and `evaluate`."""

from __future__ import annotations

import os
from pathlib import Path

from fairdeploy.data.loading import Encoding, eval_transform, split_dataset, train_transform
from fairdeploy.data.manifest import Manifest
from fairdeploy.device import resolve_device, seed_everything
from fairdeploy.distributed import barrier, world
from fairdeploy.errors import FairdeployError
from fairdeploy.metrics import MetricsReport
from fairdeploy.metrics.bootstrap import DEFAULT_N_BOOT
from fairdeploy.models.checkpoint import IMAGENET_MEAN, IMAGENET_STD, ModelSpec, load_checkpoint, write_spec
from fairdeploy.models.registry import create_model
from fairdeploy.progress import Progress, no_progress
from fairdeploy.training.loop import FitConfig, FitResult, evaluate_model, fit, with_fit_history
from fairdeploy.training.predict import DEFAULT_EVAL_BATCH_SIZE


def spec_datasets(manifest: Manifest, spec: ModelSpec):
    """Train (augmented) and val (eval transform) datasets encoded with the spec's classes and groups."""
    enc = Encoding(spec.classes, spec.groups)
    train = split_dataset(manifest, "train", enc, train_transform(spec.image_size, spec.mean, spec.std))
    val = split_dataset(manifest, "val", enc, eval_transform(spec.image_size, spec.mean, spec.std))
    return train, val


def train_model(
    manifest: Manifest,
    arch: str,
    out_dir: str | os.PathLike[str],
    cfg: FitConfig = FitConfig(),
    image_size: int = ModelSpec.image_size,
    weights: str | os.PathLike[str] | None = None,
    device: str = "auto",
    resume: bool = False,
    progress: Progress = no_progress,
    keep_optimizer_state: bool = False,
) -> FitResult:
    """Train `arch` on the manifest's train split, select on val; the best checkpoint is out_dir/best.

    Under torchrun (an initialised process group) every rank calls this; the model starts from rank 0's
    initial weights and only rank 0 writes."""
    dev = resolve_device(device)
    seed_everything(cfg.seed)
    classes = tuple(manifest.classes)
    groups = tuple(manifest.groups)
    if len(classes) < 2:
        raise FairdeployError(f"{manifest.source}: need at least 2 classes to train, found {len(classes)}")
    if image_size < 16:
        raise FairdeployError(f"image size must be at least 16, got {image_size}")
    train_classes = {r.label for r in manifest.split("train")}
    missing = [c for c in classes if c not in train_classes]
    if missing:
        raise FairdeployError(f"{manifest.source}: class(es) {', '.join(missing)} have no training images")
    spec = ModelSpec(arch=arch, classes=classes, groups=groups, image_size=image_size,
                     mean=IMAGENET_MEAN, std=IMAGENET_STD)
    model = create_model(arch, len(classes), weights)
    train_ds, val_ds = spec_datasets(manifest, spec)
    result = fit(model, spec, train_ds, val_ds, cfg, Path(out_dir), dev, resume=resume, progress=progress,
                 keep_optimizer_state=keep_optimizer_state)
    if world().is_main:
        write_spec(result.best_dir, with_fit_history(spec, "train", cfg, result, manifest=manifest.source,
                                                     weights=str(weights) if weights else None))
    barrier()
    return result


def evaluate_checkpoint(
    model_dir: str | os.PathLike[str],
    manifest: Manifest,
    split: str = "test",
    device: str = "auto",
    batch_size: int = DEFAULT_EVAL_BATCH_SIZE,
    workers: int = 0,
    bootstrap: int = DEFAULT_N_BOOT,
    seed: int = 0,
    progress: Progress = no_progress,
) -> MetricsReport:
    """Per-group and fairness metrics of a checkpoint on one split of a manifest."""
    dev = resolve_device(device)
    model, spec = load_checkpoint(model_dir, dev)
    enc = Encoding(spec.classes, spec.groups)
    ds = split_dataset(manifest, split, enc, eval_transform(spec.image_size, spec.mean, spec.std))
    return evaluate_model(model, ds, spec, dev, batch_size, workers, bootstrap=bootstrap, seed=seed,
                          progress=progress)
