"""`fairdeploy train` and `fairdeploy evaluate`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from fairdeploy.cli.console import console
from fairdeploy.cli.interrupts import on_interrupt
from fairdeploy.cli.jobs import rank_job
from fairdeploy.cli.option_blocks import Job, option_blocks
from fairdeploy.cli.options import (
    DataOpt,
    ModelOpt,
    OutDirOpt,
    check_split,
    config_option,
    configure,
    default_of,
)
from fairdeploy.cli.outputs import OUT_POLICIES
from fairdeploy.cli.progress_display import RichProgress
from fairdeploy.cli.tables import fairness_table, metrics_table
from fairdeploy.files.json_files import write_json
from fairdeploy.files.outputs import claim_output
from fairdeploy.models.checkpoint import ModelSpec
from fairdeploy.models.size import checkpoint_size
from fairdeploy.training import train as training
from fairdeploy.training.loop import FitConfig

# `train` and `finetune`: each option sets the FitConfig field of its name (fairdeploy.cli.options.configure).
FIT_FIELDS: dict[str, str | tuple[str, ...]] = {name: name for name in (
    "epochs", "batch_size", "lr", "weight_decay", "optimizer", "balance", "select", "amp", "workers", "seed")}

# The help of the FitConfig options `train` and `finetune` share (each shows its own command's default).
FIT_HELP = {
    "epochs": "Training epochs.",
    "lr": "Peak learning rate of the cosine schedule.",
    "weight_decay": "AdamW/SGD weight decay.",
    "optimizer": "adamw or sgd.",
    "balance": "Sampling: none, class, group or group-class.",
    "select": "Validation metric that picks the best epoch: f1_macro, accuracy, worst_group_accuracy.",
    "amp": "Mixed precision on CUDA.",
}

# Each option's --help shows its default, read from where it is defined: FitConfig's field (`train`),
# ModelSpec's image_size, evaluate_checkpoint's keyword default (`evaluate`). The options themselves are None.
fit_option = config_option(FitConfig)
spec_option = config_option(ModelSpec)
evaluate_option = config_option(training.evaluate_checkpoint)


@option_blocks
def train(
    data: DataOpt,
    out: OutDirOpt,
    arch: Annotated[str, typer.Option("--arch", help="resnet18, resnet50, vgg11_bn, mobilenet_v3_small, efficientnet_b0, ...")] = "resnet18",
    epochs: Annotated[int | None, fit_option(FIT_HELP["epochs"], "epochs", min=1)] = None,
    batch_size: Annotated[int | None, fit_option("Batch size; under torchrun the global batch, split evenly over "
                                                 "the processes.", "batch_size", "--batch-size", min=1)] = None,
    lr: Annotated[float | None, fit_option(FIT_HELP["lr"], "lr")] = None,
    weight_decay: Annotated[float | None, fit_option(FIT_HELP["weight_decay"], "weight_decay")] = None,
    optimizer: Annotated[str | None, fit_option(FIT_HELP["optimizer"], "optimizer")] = None,
    image_size: Annotated[int | None, spec_option("Side of the square input image in pixels.", "image_size")] = None,
    balance: Annotated[str | None, fit_option(FIT_HELP["balance"], "balance")] = None,
    select: Annotated[str | None, fit_option(FIT_HELP["select"], "select")] = None,
    weights: Annotated[Path | None, typer.Option(help="Local weights file (.safetensors or state-dict .pt) to start from.")] = None,
    amp: Annotated[bool | None, fit_option(FIT_HELP["amp"], "amp", "--amp/--no-amp")] = None,
    resume: Annotated[bool, typer.Option(help="Continue from OUT/last if it exists.")] = False,
    job: Job = Job(),
    keep_optimizer_state: Annotated[bool, typer.Option(
        "--keep-optimizer-state", help="Keep OUT/last/optimizer.safetensors after the last epoch (by default it is "
                                       "removed then: it only serves --resume of an unfinished run).")] = False,
) -> None:
    """Train a torchvision classifier; the best epoch on validation is saved to OUT/best.

    Under `torchrun --nproc-per-node N -m fairdeploy train ...` it trains with DistributedDataParallel."""
    from fairdeploy.training.train import train_model

    options = {"epochs": epochs, "batch_size": batch_size, "lr": lr, "weight_decay": weight_decay,
               "optimizer": optimizer, "balance": balance, "select": select, "amp": amp, "workers": job.workers,
               "seed": job.seed}
    cfg = configure(FitConfig, FIT_FIELDS, options)
    if image_size is None:
        image_size = ModelSpec.image_size  # the one default input size
    check_train_options(arch, image_size, cfg.balance)  # before the manifest or any model is loaded (cfg: configure)
    manifest = job.images.read(data)
    on_interrupt(lambda: describe_kept_run(out), "--resume")
    inputs = {"--data": data, "--weights": weights}
    with rank_job("train", out, job, inputs, resume=resume) as (rank_device, progress, reports):
        result = train_model(manifest, arch, out, cfg, image_size, weights, rank_device, resume, progress,
                             keep_optimizer_state=keep_optimizer_state)
    if not reports:
        return
    best = result.history[[h["epoch"] for h in result.history].index(result.best_epoch)]
    console.print(
        f"best epoch {result.best_epoch}: val accuracy {best['val_accuracy']:.4f}, "
        f"macro-F1 {best['val_f1_macro']:.4f}, per group "
        + ", ".join(f"{g} {a:.4f}" for g, a in best["val_group_accuracy"].items())
    )
    console.print(f"checkpoint: {result.best_dir}")


def check_train_options(arch: str, image_size: int, balance: str) -> None:
    """Every train option that can be wrong on its own, checked before any data or model is loaded."""
    from fairdeploy.data.loading import BALANCE_CHOICES
    from fairdeploy.errors import FairdeployError
    from fairdeploy.models.registry import ARCHITECTURES

    if arch not in ARCHITECTURES:
        raise FairdeployError(f"unknown architecture {arch!r}; choose one of {', '.join(ARCHITECTURES)}")
    if image_size < 16:
        raise FairdeployError(f"--image-size must be at least 16, got {image_size}")
    if balance not in BALANCE_CHOICES:
        raise FairdeployError(f"unknown balance {balance!r}; choose one of {', '.join(BALANCE_CHOICES)}")


def describe_kept_run(out: Path) -> str:
    """What an interrupted train / finetune left in OUT (from OUT/trainer.json), for the Ctrl-C message."""
    import json

    try:
        state = json.loads((out / "trainer.json").read_text())
    except (OSError, ValueError):
        return f"no epoch had finished; nothing was kept in {out}"
    done = int(state["epoch"]) + (0 if state.get("epoch_numbering") == 1 else 1)
    best = int(state["best_epoch"]) + (0 if state.get("epoch_numbering") == 1 else 1)
    total = state.get("config", {}).get("epochs", "?")
    return (f"kept {done} of {total} epochs: {out / 'last'} and the best "
            f"so far, epoch {best}, in {out / 'best'}")


@option_blocks
def evaluate(
    model: ModelOpt,
    data: DataOpt,
    out: Annotated[Path | None, typer.Option("--out", "-o", help="Write the metrics JSON here.")] = None,
    split: Annotated[str | None, evaluate_option("Manifest split: train, val or test.", "split", "--split")] = None,
    bootstrap: Annotated[int | None, evaluate_option("Bootstrap resamples for confidence intervals; 0 = none.",
                                                     "bootstrap", min=0)] = None,
    batch_size: Annotated[int | None, evaluate_option("Batch size.", "batch_size", "--batch-size", min=1)] = None,
    job: Job = Job(),
) -> None:
    """Per-group accuracy, macro P/R/F1 and fairness gaps of a checkpoint on one split."""
    import contextlib

    claim = contextlib.nullcontext() if out is None else claim_output(
        out, OUT_POLICIES["evaluate"], overwrite=job.overwrite,
        inputs={"--model": model, "--data": data, "--images-root": job.images.images_root})
    if split is not None:
        check_split(split)  # before the manifest or the model is loaded
    with claim:
        manifest = job.images.read(data)
        with RichProgress() as progress:
            # an option not given keeps evaluate_checkpoint's default (written there once)
            given = {k: v for k, v in (("split", split), ("batch_size", batch_size), ("bootstrap", bootstrap),
                                       ("workers", job.workers), ("seed", job.seed)) if v is not None}
            report = training.evaluate_checkpoint(model, manifest, device=job.device, progress=progress, **given)
        size, image_size = checkpoint_size(model)
        shown = split or default_of(training.evaluate_checkpoint, "split")
        console.print(f"{model}: {size.params:,} parameters ({size.nonzero_params:,} non-zero), "
                      f"{size.macs / 1e6:.1f} M MACs per {image_size}x{image_size} image", highlight=False,
                      soft_wrap=True)
        console.print(metrics_table(report, title=f"{model} on {shown}"))
        console.print(fairness_table(report))
        if out is not None:
            write_json(out, {**report.to_dict(), "size": {**size.to_dict(), "image_size": image_size}})
            console.print(f"metrics: {out}")
