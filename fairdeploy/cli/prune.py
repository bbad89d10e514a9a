"""`fairdeploy prune` (FairPrune / SNNL steps) and `fairdeploy finetune` (masks held)."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.table import Table
from typer.core import TyperCommand

from fairdeploy.cli.config import load_config
from fairdeploy.cli.console import console, err_console
from fairdeploy.cli.interrupts import on_interrupt
from fairdeploy.cli.jobs import checkpoint_job
from fairdeploy.cli.option_blocks import Job, option_blocks
from fairdeploy.cli.options import (
    BatchSizeOpt,
    DataOpt,
    ModelOpt,
    OutDirOpt,
    config_option,
    configure,
    optional_option,
)
from fairdeploy.cli.tables import fmt_number
from fairdeploy.cli.train import FIT_FIELDS, FIT_HELP, describe_kept_run
from fairdeploy.errors import FairdeployError
from fairdeploy.pruning.run import PruneConfig
from fairdeploy.pruning.selection import Guard
from fairdeploy.training.constrained import ConstrainedRecovery
from fairdeploy.training.finetune import FINETUNE_CONFIG
from fairdeploy.training.loop import FitConfig

if TYPE_CHECKING:
    from fairdeploy.pruning.run import PruneRecord


def _steps_table(record: PruneRecord) -> Table:
    target = record.config.stop.target
    groups = list(record.steps[0].val.group_accuracy)
    table = Table(title=f"{record.config.method} steps on validation (selected: step {record.selected_step})")
    for col in ("step", "removed", *[f"acc {g}" for g in groups], "macro-F1", target, f"FATE {target}", "guard"):
        table.add_column(col, justify="left" if col in ("removed", "guard") else "right")
    for s in record.steps:
        removed = s.removed
        what = ""
        if removed:
            what = {"weight": lambda r: f"{r['weights_pruned']} weights",
                    "2:4": lambda r: f"2:4 on {len(r['layers'])} layers",
                    "channel": lambda r: f"{r['channels_removed']} channels"}[removed["kind"]](removed)
        deltas = [f"{s.val.group_accuracy[g]:.4f} ({s.group_accuracy_change[g]:+.4f})" for g in groups]
        guard = "ok" if s.eligible else "; ".join(s.ineligible_because)
        if s.levelling_down:
            guard = f"[red]levelling down[/red] {guard}"
        mark = "*" if s.step == record.selected_step else ""
        table.add_row(f"{s.step}{mark}", what, *deltas, fmt_number(s.val.f1_macro),
                      fmt_number(s.val.fairness.get(target)), fmt_number(s.fate.get(target)), guard)
    return table


# `prune`: FairPrune / SNNL steps toward a fairness target. Each option's --help shows the default of its field in
# PruneConfig (the option itself is None: not given, the field keeps it); every other setting is a key of --config.
prune_option = config_option(PruneConfig)
MethodOpt = Annotated[str | None, prune_option("fairprune or snnl.", "method")]
GranularityOpt = Annotated[str | None, prune_option("FairPrune: weight, channel or 2:4.", "fairprune.granularity")]
RatioOpt = Annotated[float | None, prune_option(
    "FairPrune: fraction of the still-unpruned weights (channels) cut per step, in (0, 1).", "fairprune.ratio")]
PerRoundOpt = Annotated[int | None, prune_option("SNNL: channels removed per step.", "snnl.channels_per_round", min=1)]
StepsOpt = Annotated[int | None, prune_option("Maximum prune steps.", "stop.steps", min=1)]
TargetOpt = Annotated[str | None, prune_option(
    "Validation gap watched by the stop rule and FATE: eodd, eopp0 or eopp1.", "stop.target")]
SelectOpt = Annotated[str | None, prune_option(
    "Best step: fate (on --target vs the input model), gap, f1, or last (the most pruned step the guard accepts).",
    "guard.select")]
MaxGroupDropOpt = Annotated[float | None, prune_option(
    "Guard: never select a step that costs the unprivileged group more validation accuracy than this.",
    "guard.max_group_drop")]
PrivilegedOpt = Annotated[str | None, prune_option(
    "Privileged group (none: the one with the higher validation accuracy).", "privileged")]
FinetuneEpochsOpt = Annotated[int | None, prune_option(
    "Fine-tune this many epochs after every step, with `fairdeploy finetune`'s other settings (0 or none: no "
    "fine-tuning).", "finetune", min=0)]
ConfigOpt = Annotated[Path | None, prune_option(
    "TOML file of PruneConfig's other settings (`fairdeploy config show prune` prints every key with its value); "
    "options given here win (default: none).")]

# Each option's field(s) in PruneConfig (fairdeploy.cli.options.configure); --finetune-epochs sets the fine-tuning.
PRUNE_FIELDS: dict[str, str | tuple[str, ...]] = {
    "method": "method", "granularity": "fairprune.granularity", "ratio": "fairprune.ratio",
    "channels_per_round": "snnl.channels_per_round", "steps": "stop.steps", "target": "stop.target",
    "select": "guard.select", "max_group_drop": "guard.max_group_drop", "privileged": "privileged",
    "workers": "workers", "seed": "seed",
}
FINETUNE_JOB_FIELDS: dict[str, str | tuple[str, ...]] = {"workers": "workers", "seed": "seed"}  # reach fine-tuning too
# Options only one method uses: given with the other one, they are refused.
METHOD_OPTIONS = {"fairprune": ("granularity", "ratio"), "snnl": ("channels_per_round",)}

# Options that left `prune`: compression to a budget is `fairdeploy compress`; the rarely used settings are keys of
# --config (the TOML table each one is in).
COMPRESS_FLAGS = {flag: f"`fairdeploy compress {flag}`" for flag in (
    "--criterion", "--control", "--speedup", "--target-macs", "--rounds", "--distill")} | {
    "--target-params": '`fairdeploy compress --config FILE` with metric = "params" and target = F',
    "--group-weight": "`fairdeploy compress --config FILE`, [finetune] group_weight",
    "--keep-rounds": "`fairdeploy compress` keeps them by default (keep_rounds in its --config FILE)",
    "--no-keep-rounds": "`fairdeploy compress --config FILE` with keep_rounds = false",
}
CONFIG_KEYS = {
    "--curvature": "[fairprune] curvature", "--beta": "[fairprune] beta", "--first-order": "[fairprune] first_order",
    "--scope": "[fairprune] scope", "--include-head": "[fairprune] include_head",
    "--score-samples": "[fairprune] score_samples", "--score-split": "[fairprune] / [snnl] score_split",
    "--mc-samples": "[fairprune] mc_samples", "--probes": "[fairprune] probes",
    "--round-to": "[fairprune] / [snnl] round_to", "--layers": "[snnl] layers", "--temperature": "[snnl] temperature",
    "--snnl-compat": "[snnl] compat", "--max-channels": "[snnl] max_channels", "--snnl-batches": "[snnl] batches",
    "--patience": "[stop] patience", "--target-value": "[stop] target_value", "--max-f1-drop": "[guard] max_f1_drop",
    "--guard": "[guard] protect_unprivileged", "--no-guard": "[guard] protect_unprivileged = false",
    "--finetune-lr": "[finetune] lr", "--balance": "[finetune] balance",
    "--batch-size": "batch_size (evaluation; [finetune] batch_size for fine-tuning)",
}


def check_moved_options(args: list[str]) -> None:
    """One line for an option that left `prune`: where it went."""
    for arg in args:
        flag = arg.split("=", 1)[0]
        if flag in COMPRESS_FLAGS:
            raise FairdeployError(f"{flag}: compression to a MAC budget or a per-group tolerance is "
                                  f"{COMPRESS_FLAGS[flag]}; `fairdeploy prune` runs FairPrune / SNNL steps")
        if flag in CONFIG_KEYS:
            raise FairdeployError(f"{flag} is a setting of `fairdeploy prune --config FILE`: {CONFIG_KEYS[flag]} "
                                  "(`fairdeploy config show prune` prints every key with its value)")


class PruneCommand(TyperCommand):
    """`prune` answers an option that moved to `fairdeploy compress` or to --config with one line, not a usage
    error about an unknown option."""

    def parse_args(self, ctx: Any, args: list[str]) -> list[str]:  # ctx: Typer's click Context
        check_moved_options(args)
        return super().parse_args(ctx, args)


def _refuse_contradictions(options: dict[str, Any], base: PruneConfig) -> None:
    """Options the chosen method does not use, and --ratio with 2:4 (reached in one step), are refused."""
    def flags(names: tuple[str, ...]) -> list[str]:
        return ["--" + n.replace("_", "-") for n in names if options.get(n) is not None]

    method = options.get("method") or base.method
    for owner, names in METHOD_OPTIONS.items():
        given = flags(names)
        if method in METHOD_OPTIONS and method != owner and given:
            label = {"fairprune": "FairPrune", "snnl": "SNNL"}[owner]
            label = (f"{'an' if owner == 'snnl' else 'a'} {label} option" if len(given) == 1 else f"{label} options")
            where = ("" if options.get("method") is not None else
                     " (the default)" if base.method == PruneConfig().method else " (from --config)")
            raise FairdeployError(f"{', '.join(given)} {'is' if len(given) == 1 else 'are'} {label}, not used with "
                                  f"--method {method}{where}")
    granularity = options.get("granularity") or base.fairprune.granularity
    if granularity == "2:4" and options.get("ratio") is not None:
        raise FairdeployError("--ratio is not used with --granularity 2:4 (2:4 sparsity is reached in one step)")


def prune_config(options: dict[str, Any], path: Path | None) -> PruneConfig:
    """PruneConfig: its defaults, then --config FILE, then the options given (None: not given), checked. A problem
    that only the file's values cause is reported with the file's name."""
    def built(base: PruneConfig) -> PruneConfig:
        _refuse_contradictions(options, base)
        finetune = base.finetune
        epochs = options.get("finetune_epochs")
        if epochs is not None:  # as `fairdeploy finetune` fine-tunes (its other settings, or the file's), N epochs
            finetune = replace(finetune or FINETUNE_CONFIG, epochs=epochs) if epochs > 0 else None
        if finetune is not None:
            finetune = configure(FitConfig, FINETUNE_JOB_FIELDS, options, base=finetune)
        return configure(PruneConfig, PRUNE_FIELDS, options, base=replace(base, finetune=finetune))

    base = load_config("prune", path)  # PruneConfig: its defaults, or the file (what `config show prune` prints)
    try:
        return built(base)
    except FairdeployError as exc:
        if path is None:
            raise
        try:
            built(PruneConfig())
        except FairdeployError:
            raise exc from None
        raise FairdeployError(f"{path}: {exc}") from None


@option_blocks
def prune(
    model: ModelOpt,
    data: DataOpt,
    out: OutDirOpt,
    method: MethodOpt = None,
    granularity: GranularityOpt = None,
    ratio: RatioOpt = None,
    channels_per_round: PerRoundOpt = None,
    steps: StepsOpt = None,
    target: TargetOpt = None,
    select: SelectOpt = None,
    max_group_drop: MaxGroupDropOpt = None,
    privileged: PrivilegedOpt = None,
    finetune_epochs: FinetuneEpochsOpt = None,
    config: ConfigOpt = None,
    job: Job = Job(),
) -> None:
    """Prune a checkpoint for fairness in FairPrune or SNNL steps, each judged on validation, and keep the best step
    the guard accepts. Writes OUT/model.* and OUT/prune.json. (Compression to a MAC budget: `fairdeploy compress`.)"""
    from fairdeploy.pruning import prune_checkpoint

    options = {**locals(), "workers": job.workers, "seed": job.seed}  # every option by its parameter name
    cfg = prune_config(options, config)
    result = checkpoint_job("prune", prune_checkpoint, model, data, out, cfg, job)
    if result is None:  # another torchrun process reports
        return
    rec = result.record
    console.print(f"groups: unprivileged {rec.groups.unprivileged}, privileged {rec.groups.privileged} "
                  f"({rec.groups.reason})", highlight=False, soft_wrap=True)
    console.print(_steps_table(rec))
    before, after = rec.steps[0].size, rec.size_after
    console.print(f"params {before.params:,} -> {after.params:,} (non-zero {after.nonzero_params:,}), "
                  f"MACs {before.macs:,} -> {after.macs:,}; stopped: {rec.stopped_because}",
                  highlight=False, soft_wrap=True)
    if rec.selected_step == 0:
        err_console.print(f"[yellow]warning:[/yellow] {rec.selection_note}", highlight=False, soft_wrap=True)
    console.print(f"checkpoint: {result.out_dir} (prune.json beside it)", highlight=False, soft_wrap=True)


finetune_option = config_option(FINETUNE_CONFIG)  # `fairdeploy finetune`'s defaults (a FitConfig), shown in --help
recovery_option = config_option(ConstrainedRecovery)  # constrained recovery's defaults
# `finetune`: FitConfig's options as `train` has them, and constrained recovery's (with --constrained)
FINETUNE_FIELDS: dict[str, str | tuple[str, ...]] = {
    **FIT_FIELDS, "max_group_drop": "constrained.max_group_drop", "dual_lr": "constrained.dual_lr"}


@option_blocks
def finetune(
    model: ModelOpt,
    data: DataOpt,
    out: OutDirOpt,
    epochs: Annotated[int | None, finetune_option(FIT_HELP["epochs"], "epochs", min=1)] = None,
    lr: Annotated[float | None, finetune_option(FIT_HELP["lr"], "lr")] = None,
    weight_decay: Annotated[float | None, finetune_option(FIT_HELP["weight_decay"], "weight_decay")] = None,
    optimizer: Annotated[str | None, finetune_option(FIT_HELP["optimizer"], "optimizer")] = None,
    balance: Annotated[str | None, finetune_option(FIT_HELP["balance"], "balance")] = None,
    select: Annotated[str | None, finetune_option(FIT_HELP["select"], "select")] = None,
    amp: Annotated[bool | None, finetune_option(FIT_HELP["amp"], "amp", "--amp/--no-amp")] = None,
    constrained: Annotated[bool, typer.Option("--constrained", help="Constrained recovery: one Lagrange multiplier "
                                              "per group keeps every group's training accuracy within "
                                              "--max-group-drop of the --reference model.")] = False,
    max_group_drop: Annotated[float | None, config_option(Guard)(
        "With --constrained: the most accuracy a group may lose against the reference, in [0, 1] (the guard's "
        "tolerance).", "max_group_drop")] = None,
    dual_lr: Annotated[float | None, recovery_option("With --constrained: step of the multipliers' dual ascent per "
                                                     "batch, > 0.", "dual_lr")] = None,
    reference: Annotated[Path | None, typer.Option("--reference", help="With --constrained: the dense reference "
                                                   "checkpoint (default: --model itself, the model you start "
                                                   "from).")] = None,
    batch_size: optional_option(BatchSizeOpt, str(FINETUNE_CONFIG.batch_size)) = None,  # type: ignore[valid-type]
    job: Job = Job(),
) -> None:
    """Fine-tune a (pruned) checkpoint; weight and 2:4 masks stay applied. The checkpoint is OUT/best.

    Options left unset keep fairdeploy.training.finetune.FINETUNE_CONFIG's values (and, with --constrained,
    fairdeploy.training.constrained.ConstrainedRecovery's)."""
    from functools import partial

    from fairdeploy.training.finetune import finetune_checkpoint

    given = [flag for flag, v in (("--max-group-drop", max_group_drop), ("--dual-lr", dual_lr),
                                  ("--reference", reference)) if v is not None]
    if given and not constrained:
        raise FairdeployError(f"{', '.join(given)} set constrained recovery: add --constrained")
    options = {"epochs": epochs, "lr": lr, "weight_decay": weight_decay, "optimizer": optimizer, "balance": balance,
               "select": select, "amp": amp, "batch_size": batch_size, "workers": job.workers, "seed": job.seed,
               "max_group_drop": max_group_drop, "dual_lr": dual_lr}
    base = replace(FINETUNE_CONFIG, constrained=ConstrainedRecovery()) if constrained else FINETUNE_CONFIG
    cfg = configure(FitConfig, FINETUNE_FIELDS, options, base=base)
    on_interrupt(lambda: describe_kept_run(out))
    result = checkpoint_job("finetune", partial(finetune_checkpoint, reference=reference), model, data, out, cfg, job)
    if result is None:
        return
    best = result.fit.history[[h["epoch"] for h in result.fit.history].index(result.fit.best_epoch)]
    console.print(
        f"best epoch {result.fit.best_epoch}: val accuracy {best['val_accuracy']:.4f}, "
        f"macro-F1 {best['val_f1_macro']:.4f}, Eodd {fmt_number(best['val_eodd'])}, per group "
        + ", ".join(f"{g} {a:.4f}" for g, a in best["val_group_accuracy"].items()),
        highlight=False, soft_wrap=True,
    )
    if result.sparsity is not None:
        console.print(f"masks held: sparsity {result.sparsity:.4f}", highlight=False)
    if constrained:
        end = result.fit.history[-1]["constraint"]
        console.print(f"constrained recovery (max group drop {end['max_group_drop']:g} against "
                      f"{reference or model}): multipliers after the last epoch "
                      + ", ".join(f"{g} {v:.3g}" for g, v in end["multipliers"].items()), highlight=False,
                      soft_wrap=True)
    console.print(f"checkpoint: {result.best_dir}", highlight=False, soft_wrap=True)
