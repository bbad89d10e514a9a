"""Fine-tuning a pruned model with its weight / 2:4 masks held, between prune steps or as `fairdeploy finetune`."""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
from torch import nn

from fairdeploy.data.manifest import Manifest
from fairdeploy.device import resolve_device, seed_everything
from fairdeploy.distributed import broadcast_module, main_writes, world
from fairdeploy.errors import FairdeployError
from fairdeploy.files.atomic import atomic_dir
from fairdeploy.files.hashing import sha256_file
from fairdeploy.models.checkpoint import (
    WEIGHTS_FILE,
    ModelSpec,
    load_checkpoint,
    resolve_checkpoint,
    write_spec,
)
from fairdeploy.models.sparsity import Masks, mask_reapplier, masks_from_model, sparsity, spec_masks
from fairdeploy.progress import Progress, no_progress
from fairdeploy.training.loop import FitConfig, FitResult, fit
from fairdeploy.training.train import spec_datasets

# The learning rate of every fine-tuning of a pruned model (`fairdeploy finetune --lr`, `prune --finetune-lr`,
# the pipeline's finetune_lr / finetune_after_lr) unless one is given: the one place this default is written.
# Training from scratch uses FitConfig.lr; a budget run's distilling recovery rounds use BUDGET_FINETUNE_LR.
FINETUNE_LR = 1e-4
# `fairdeploy finetune`'s settings where no option is given (the rest are FitConfig's).
FINETUNE_CONFIG = FitConfig(epochs=5, lr=FINETUNE_LR)


@dataclass(frozen=True)
class FinetuneResult:
    out_dir: Path
    best_dir: Path
    fit: FitResult
    sparsity: float | None  # fraction of masked weights held at zero (None: no masks)


def finetune_model(model: nn.Module, spec: ModelSpec, train_ds, val_ds, cfg: FitConfig, scratch: Path,
                   device: torch.device, masks: Masks | None = None, progress: Progress = no_progress,
                   task: str = "finetune", teacher: nn.Module | None = None) -> tuple[nn.Module, FitResult]:
    """Run the training loop with the masks re-applied after every optimiser step (and distillation from
    `teacher` when cfg.distill > 0); return the best epoch's model (selected on validation) reloaded from its
    checkpoint (under torchrun rank 0 reloads it and sends its weights to the other ranks), and the fit result."""
    after = mask_reapplier(masks) if masks else None
    result = fit(model, spec, train_ds, val_ds, cfg, scratch, device, after_step=after, progress=progress, task=task,
                 teacher=teacher)
    if not world().active:
        best, _ = load_checkpoint(result.best_dir, device)
        return best, result
    best = load_checkpoint(result.best_dir, device)[0] if world().is_main else model
    broadcast_module(best)
    return best, result


def finetune_checkpoint(
    model_dir: str | os.PathLike[str],
    manifest: Manifest,
    out_dir: str | os.PathLike[str],
    cfg: FitConfig = FINETUNE_CONFIG,
    device: str = "auto",
    progress: Progress = no_progress,
    reference: str | os.PathLike[str] | None = None,
) -> FinetuneResult:
    """Fine-tune a (pruned) checkpoint on the train split, select on validation, hold its masks.

    With `cfg.constrained`: constrained recovery against the dense reference checkpoint `reference` (default: the
    input checkpoint itself: no group may lose more than ε against the model you started from); an ε left unset is
    the guard's tolerance (fairdeploy.pruning.selection.Guard.max_group_drop).

    Writes OUT/best (the checkpoint; `--model OUT` finds it), OUT/last and OUT/trainer.json, atomically:
    a failed run leaves no OUT behind.
    """
    if cfg.constrained is not None:
        from fairdeploy.pruning.selection import Guard  # here: fairdeploy.pruning imports this module

        cfg = replace(cfg, constrained=cfg.constrained.resolved(Guard.max_group_drop))
    elif reference is not None:
        raise FairdeployError("a reference model is the dense reference of constrained recovery: it needs "
                              "constrained recovery switched on (--constrained)")
    cfg.validate()
    dev = resolve_device(device)
    seed_everything(cfg.seed)
    src = resolve_checkpoint(model_dir)
    model, spec = load_checkpoint(src, dev)
    masks = spec_masks(model, spec)
    teacher = _reference_model(reference if reference is not None else src, spec, dev) if cfg.constrained else None
    train_ds, val_ds = spec_datasets(manifest, spec)
    out = Path(out_dir)
    # replaces only an earlier finetune output; under torchrun only rank 0 writes
    with main_writes(lambda: atomic_dir(out, owner="trainer.json"), out) as tmp:
        model, result = finetune_model(model, spec, train_ds, val_ds, cfg, tmp, dev, masks, progress,
                                       teacher=teacher)
        entry = {
            "stage": "finetune",
            "config": asdict(cfg),
            "best_epoch": result.best_epoch,
            "best_score": result.best_score,
            "source": str(src),
            "source_sha256": sha256_file(src / WEIGHTS_FILE),
            "manifest": manifest.source,
            "masks_held": sorted(masks),
        }
        if teacher is not None:
            ref = resolve_checkpoint(reference) if reference is not None else src
            entry["reference"] = {"path": str(ref), "sha256": sha256_file(ref / WEIGHTS_FILE)}
        if world().is_main:
            write_spec(result.best_dir, spec.with_history(entry))
    held = None
    if masks:  # the best epoch's model, as written to OUT/best
        held = sparsity(masks_from_model(model, spec.sparsity["layers"]))  # type: ignore[index]
    return FinetuneResult(out_dir=out, best_dir=out / "best", fit=replace(result, best_dir=out / "best"), sparsity=held)


def _reference_model(path: str | os.PathLike[str], spec: ModelSpec, device: torch.device) -> nn.Module:
    """The dense reference of constrained recovery: a checkpoint that reads the same inputs (image size,
    normalisation) and predicts the same classes for the same groups as the model being fine-tuned."""
    ref_dir = resolve_checkpoint(path)
    ref, ref_spec = load_checkpoint(ref_dir, device)
    for what in ("classes", "groups", "image_size", "mean", "std"):
        if getattr(ref_spec, what) != getattr(spec, what):
            raise FairdeployError(f"reference model {ref_dir}: {what} {getattr(ref_spec, what)}, the fine-tuned model "
                                  f"has {getattr(spec, what)}; use the dense model it was pruned from")
    return ref.eval()
