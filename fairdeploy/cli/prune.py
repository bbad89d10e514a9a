"""`fairdeploy prune` (FairPrune / SNNL) and `fairdeploy finetune` (masks held)."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.table import Table

from fairdeploy.cli.common import (
    BatchSizeOpt,
    DataOpt,
    Job,
    ModelOpt,
    OutDirOpt,
    checkpoint_job,
    configure,
    console,
    err_console,
    on_interrupt,
    option_blocks,
    unset,
)
from fairdeploy.cli.tables import fmt_number
from fairdeploy.cli.train import FIT_FIELDS, describe_kept_run
from fairdeploy.errors import FairdeployError

if TYPE_CHECKING:
    from fairdeploy.models.size import ModelSize
    from fairdeploy.pruning.budget import BudgetRecord, PointMetrics
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


def _opt(help_text: str, *names: str, default: str | None = None, **kw: Any) -> Any:
    """An option; `default` names the dataclass whose field holds its default (the option itself defaults to None)."""
    return typer.Option(*names, help=help_text if default is None else f"{help_text.rstrip('.')} (default: {default}'s).",
                        **kw)


# Defaults live on the dataclasses (FairPruneConfig, SnnlConfig, StopRule, Guard, PruneConfig, BudgetConfig); an
# option left unset keeps the field's default (STEP_FIELDS, BUDGET_FIELDS).
FP, SN, STOP, GUARD, BUDGET = "FairPruneConfig", "SnnlConfig", "StopRule", "Guard", "BudgetConfig"
MethodOpt = Annotated[str | None, _opt("fairprune or snnl.", default="PruneConfig")]
GranularityOpt = Annotated[str | None, _opt("FairPrune: weight, channel or 2:4.", default=FP)]
CurvatureOpt = Annotated[str | None, _opt("FairPrune curvature: fisher (MC), empirical or hutchinson.", default=FP)]
BetaOpt = Annotated[float | None, _opt("FairPrune: weight of the privileged group's curvature, in (0, 1].",
                                       default=f"{FP}'s, in a budget run {BUDGET}")]
RatioOpt = Annotated[float | None, _opt("FairPrune: fraction of the still-unpruned weights (channels) cut per step, "
                                        "in (0, 1).", default=FP)]
FirstOrderOpt = Annotated[bool, _opt("FairPrune: add each group's gradient term.", "--first-order")]
ScopeOpt = Annotated[str | None, _opt("FairPrune weight ranking: layer (each layer loses --ratio) or global.",
                                      default=FP)]
IncludeHeadOpt = Annotated[bool, _opt("FairPrune weight/2:4: prune the classifier head too.", "--include-head")]
ScoreSamplesOpt = Annotated[int | None, _opt("FairPrune: images per group in the score sets (class-stratified).",
                                             default=f"{FP}'s, in a budget run {BUDGET}", min=1)]
ScoreSplitOpt = Annotated[str | None, _opt("Split the scores are computed on: train or val.", default=f"{FP}'s / {SN}")]
McSamplesOpt = Annotated[int | None, _opt("Fisher: softmax draws per image.", default=FP, min=1)]
ProbesOpt = Annotated[int | None, _opt("Hutchinson: Rademacher probes per batch.", default=FP, min=1)]
RoundToOpt = Annotated[int | None, _opt("Channel pruning: keep channel counts multiples of this.",
                                        default=f"{FP}'s / {SN}'s / {BUDGET}", min=1)]
LayersOpt = Annotated[str | None, _opt("SNNL: 'last' or comma-separated conv layer names.", default=SN)]
TemperatureOpt = Annotated[float | None, _opt("SNNL temperature T.", default=f"{SN}'s, in a budget run {BUDGET}")]
CompatOpt = Annotated[bool, _opt("SNNL: the published code's self-pair numerator.", "--snnl-compat")]
PerRoundOpt = Annotated[int | None, _opt("SNNL: channels removed per round.", default=SN)]
MaxChannelsOpt = Annotated[int | None, _opt("SNNL: stop after removing this many channels in total.")]
SnnlBatchesOpt = Annotated[int | None, _opt("SNNL: group-balanced batches averaged per round.", default=SN, min=1)]
StepsOpt = Annotated[int | None, _opt("Maximum prune steps (rounds).", default=STOP, min=1)]
TargetOpt = Annotated[str | None, _opt("Validation gap watched by the stop rule and FATE: eodd, eopp0 or eopp1.",
                                       default=STOP)]
PatienceOpt = Annotated[int | None, _opt("Stop after this many steps without a lower gap.", default=STOP, min=1)]
TargetValueOpt = Annotated[float | None, _opt("Stop once the gap is at or below this.")]
SelectOpt = Annotated[str | None, _opt("Best step: fate (on --target vs the input model), gap, f1, or last (the most "
                                       "pruned step the guard accepts).", default=GUARD)]
MaxF1DropOpt = Annotated[float | None, _opt("Guard: never select a step losing more macro-F1 than this.",
                                            default=GUARD)]
GuardOpt = Annotated[bool | None, _opt("Never select a step that lowers the unprivileged group's accuracy.",
                                       "--guard/--no-guard", default=GUARD)]
PrivilegedOpt = Annotated[str | None, _opt("Privileged group name (default: higher validation accuracy).")]
FinetuneEpochsOpt = Annotated[int | None, _opt("Fine-tuning epochs after every step or round (0: none; default: "
                                              "none for FairPrune/SNNL steps, BudgetConfig's per budget round).",
                                              min=0)]
FinetuneLrOpt = Annotated[float | None, _opt("Fine-tuning learning rate (default: FairPrune/SNNL steps use "
                                             "fairdeploy.training.finetune.FINETUNE_LR, budget rounds "
                                             "fairdeploy.pruning.budget.BUDGET_FINETUNE_LR).")]
BalanceOpt = Annotated[str | None, _opt("Fine-tuning sampling: none, class, group or group-class.",
                                        default="FitConfig")]
CriterionOpt = Annotated[str | None, _opt(
    "Budget run: importance criterion magnitude, taylor (fairness-blind), fairprune, snnl or group-taylor "
    "(fairness-aware); removes channels with Torch-Pruning's global pruner until the budget is met.")]
TargetMacsOpt = Annotated[float | None, _opt("Budget run: keep this fraction of the input model's MACs (0.5 = 2x fewer).")]
TargetParamsOpt = Annotated[float | None, _opt("Budget run: keep this fraction of the input model's parameters.")]
SpeedupOpt = Annotated[float | None, _opt("Budget run: MACs divided by this (2 = --target-macs 0.5).")]
RoundsOpt = Annotated[int | None, _opt("Budget run: rounds of removal + fine-tuning to reach the budget.",
                                       default=BUDGET, min=1)]
ControlOpt = Annotated[str | None, _opt("Budget run: control run under the same schedule and seed: magnitude, taylor, "
                                        "finetune-only or none (default: BudgetConfig's choice for the criterion).")]
DistillOpt = Annotated[float | None, _opt("Budget run: weight of distillation from the input model in the "
                                          "fine-tuning loss, in [0, 1] (0: off).", default=BUDGET)]
GroupWeightOpt = Annotated[str | None, _opt("Fine-tuning loss weights: none or balanced (each group weighs the same).",
                                            default="FitConfig")]
MaxGroupDropOpt = Annotated[float | None, _opt("Guard: never select a model that costs any group (FairPrune/SNNL "
                                               "steps: the unprivileged group) more validation accuracy than this.",
                                               default=f"{GUARD}'s / {BUDGET}")]
KeepRoundsOpt = Annotated[bool | None, _opt("Budget run: keep every round's checkpoint under OUT/rounds.",
                                            "--keep-rounds/--no-keep-rounds", default=BUDGET)]


# Each option's field(s) in the configuration `prune` builds (dotted paths; fairdeploy.cli.common.configure).
STEP_FIELDS: dict[str, str | tuple[str, ...]] = {  # PruneConfig: FairPrune / SNNL steps
    "method": "method", "granularity": "fairprune.granularity", "curvature": "fairprune.curvature",
    "beta": "fairprune.beta", "ratio": "fairprune.ratio", "first_order": "fairprune.first_order",
    "scope": "fairprune.scope", "include_head": "fairprune.include_head", "score_samples": "fairprune.score_samples",
    "score_split": ("fairprune.score_split", "snnl.score_split"), "mc_samples": "fairprune.mc_samples",
    "probes": "fairprune.probes", "round_to": ("fairprune.round_to", "snnl.round_to"), "layers": "snnl.layers",
    "temperature": "snnl.temperature", "snnl_compat": "snnl.compat", "channels_per_round": "snnl.channels_per_round",
    "max_channels": "snnl.max_channels", "snnl_batches": "snnl.batches", "steps": "stop.steps",
    "target": "stop.target", "patience": "stop.patience", "target_value": "stop.target_value",
    "select": "guard.select", "max_f1_drop": "guard.max_f1_drop", "guard": "guard.protect_unprivileged",
    "max_group_drop": "guard.max_group_drop", "privileged": "privileged", "batch_size": "batch_size",
    "workers": "workers", "seed": "seed",
}
STEP_FINETUNE_FIELDS: dict[str, str | tuple[str, ...]] = {  # the FitConfig of fine-tuning after every step
    "finetune_epochs": "epochs", "finetune_lr": "lr", "balance": "balance", "batch_size": "batch_size",
    "workers": "workers", "seed": "seed",
}
BUDGET_FIELDS: dict[str, str | tuple[str, ...]] = {  # BudgetConfig: a budget run (metric and target: the budget)
    "criterion": "criterion", "control": "control", "rounds": "rounds", "round_to": "round_to",
    "score_samples": "score_samples", "beta": "beta", "temperature": "temperature", "privileged": "privileged",
    "max_group_drop": "max_group_drop", "keep_rounds": "keep_rounds", "finetune_epochs": "finetune.epochs",
    "finetune_lr": "finetune.lr", "distill": "finetune.distill", "group_weight": "finetune.group_weight",
    "balance": "finetune.balance", "batch_size": ("batch_size", "finetune.batch_size"),
    "workers": "finetune.workers", "seed": ("seed", "finetune.seed"),
}


@option_blocks
def prune(
    model: ModelOpt,
    data: DataOpt,
    out: OutDirOpt,
    method: MethodOpt = None,
    granularity: GranularityOpt = None,
    curvature: CurvatureOpt = None,
    beta: BetaOpt = None,
    ratio: RatioOpt = None,
    first_order: FirstOrderOpt = False,
    scope: ScopeOpt = None,
    include_head: IncludeHeadOpt = False,
    score_samples: ScoreSamplesOpt = None,
    score_split: ScoreSplitOpt = None,
    mc_samples: McSamplesOpt = None,
    probes: ProbesOpt = None,
    round_to: RoundToOpt = None,
    layers: LayersOpt = None,
    temperature: TemperatureOpt = None,
    snnl_compat: CompatOpt = False,
    channels_per_round: PerRoundOpt = None,
    max_channels: MaxChannelsOpt = None,
    snnl_batches: SnnlBatchesOpt = None,
    steps: StepsOpt = None,
    target: TargetOpt = None,
    patience: PatienceOpt = None,
    target_value: TargetValueOpt = None,
    select: SelectOpt = None,
    max_f1_drop: MaxF1DropOpt = None,
    guard: GuardOpt = None,
    privileged: PrivilegedOpt = None,
    finetune_epochs: FinetuneEpochsOpt = None,
    finetune_lr: FinetuneLrOpt = None,
    balance: BalanceOpt = None,
    criterion: CriterionOpt = None,
    target_macs: TargetMacsOpt = None,
    target_params: TargetParamsOpt = None,
    speedup: SpeedupOpt = None,
    rounds: RoundsOpt = None,
    control: ControlOpt = None,
    distill: DistillOpt = None,
    group_weight: GroupWeightOpt = None,
    max_group_drop: MaxGroupDropOpt = None,
    keep_rounds: KeepRoundsOpt = None,
    batch_size: unset(BatchSizeOpt, "PruneConfig's, in a budget run BudgetConfig's") = None,  # type: ignore[valid-type]
    job: Job = Job(),
) -> None:
    """Prune a checkpoint: to a MAC/parameter budget with a criterion and its control (--criterion, --target-macs,
    --speedup), or FairPrune / SNNL steps (--method). Writes OUT/model.*, OUT/prune.json (and OUT/control, OUT/rounds)."""
    options = {**locals(), "workers": job.workers, "seed": job.seed}  # every option by its parameter name
    for flag in ("first_order", "include_head", "snnl_compat"):
        options[flag] = options[flag] or None  # a switch: given (True) or not
    from fairdeploy.pruning import PruneConfig, prune_checkpoint
    from fairdeploy.training.finetune import FINETUNE_CONFIG
    from fairdeploy.training.loop import FitConfig

    if criterion is not None or any(v is not None for v in (target_macs, target_params, speedup)):
        _budget_run(model, data, out, job, options)
        return
    # fine-tuning after every step only with --finetune-epochs N > 0 (as `fairdeploy finetune`, lr FINETUNE_LR)
    finetune = configure(FitConfig, STEP_FINETUNE_FIELDS, options, base=FINETUNE_CONFIG) if finetune_epochs else None
    cfg = configure(PruneConfig, STEP_FIELDS, options, base=PruneConfig(finetune=finetune))
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


def _budget_run(model: Any, data: Any, out: Any, job: Job, options: dict[str, Any]) -> None:
    """`fairdeploy prune --criterion C --target-macs F`: options left unset keep BudgetConfig's defaults."""
    from fairdeploy.pruning.budget import BudgetConfig, budget_from, compress_checkpoint

    budget = {k: options[k] for k in ("speedup", "target_macs", "target_params")}
    metric, fraction = budget_from(**budget)
    if options["finetune_epochs"] == 0:
        raise FairdeployError("budget runs fine-tune after every round: --finetune-epochs must be >= 1")
    criterion = options["criterion"]
    # the base holds the criterion, so that BudgetConfig picks the control that fits it when --control is unset
    base = BudgetConfig(metric=metric) if criterion is None else BudgetConfig(criterion=criterion, metric=metric)
    given = next(k for k, v in budget.items() if v is not None)
    cfg = configure(BudgetConfig, {**BUDGET_FIELDS, "budget": "target"}, {**options, "budget": fraction}, base=base,
                    flags={"budget": "--" + given.replace("_", "-")})
    result = checkpoint_job("prune", compress_checkpoint, model, data, out, cfg, job)
    if result is None:
        return
    rec = result.record
    console.print(_budget_table(rec))
    sel = rec.selected
    console.print(f"selected {sel.model}: MACs x{sel.macs_fraction:.3f}, params x{sel.params_fraction:.3f} "
                  f"of the input model ({rec.budget.metric} budget x{rec.budget.fraction:g})",
                  highlight=False, soft_wrap=True)
    console.print(rec.verdict, highlight=False, soft_wrap=True)
    if not sel.guard_passed:
        err_console.print(f"[yellow]warning:[/yellow] {sel.note}", highlight=False, soft_wrap=True)
    console.print(f"checkpoint: {result.out_dir} (prune.json beside it; control: {result.out_dir}/control)",
                  highlight=False, soft_wrap=True)


def _budget_table(record: BudgetRecord) -> Table:
    """Input model, then every round of candidate and control (after pruning, after fine-tuning), on validation."""
    cfg = record.config
    groups = list(record.input_val.group_accuracy)
    table = Table(title=f"{cfg.criterion} vs {cfg.control} control on validation "
                        f"(budget: {record.budget.metric} x{record.budget.fraction:g})")
    for col in ("run", "model", "MACs", *[f"acc {g}" for g in groups], "worst group", "macro-F1", "Eodd", "guard"):
        table.add_column(col, justify="left" if col in ("run", "model", "guard") else "right")

    def row(run: str, name: str, v: PointMetrics, size: ModelSize, guard: str, mark: str = "") -> None:
        table.add_row(run, name + mark, f"{size.macs / 1e6:.1f} M",
                      *[fmt_number(v.group_accuracy.get(g)) for g in groups], fmt_number(v.worst_group_accuracy),
                      fmt_number(v.f1_macro), fmt_number(v.fairness.get("eodd")), guard)

    row("input", "dense", record.input_val, record.budget.input, "ok")
    for run_name, run in record.runs.items():
        for r in run.rounds:
            stages = {"pruned": r.pruning.pruned} if r.pruning is not None else {}
            for stage, p in {**stages, "finetuned": r.finetuned}.items():
                name = f"r{r.round}-{stage}"
                row(run_name, name, p.val, p.size, "ok" if p.eligible else "; ".join(p.ineligible_because),
                    " *" if name == run.selected else "")
    return table


FT = "FINETUNE_CONFIG"  # fairdeploy.training.finetune: `fairdeploy finetune`'s defaults (a FitConfig)
CR = "ConstrainedRecovery"  # fairdeploy.training.constrained: constrained recovery's defaults
# `finetune`: FitConfig's options as `train` has them, and constrained recovery's (with --constrained)
FINETUNE_FIELDS: dict[str, str | tuple[str, ...]] = {
    **FIT_FIELDS, "max_group_drop": "constrained.max_group_drop", "dual_lr": "constrained.dual_lr"}


@option_blocks
def finetune(
    model: ModelOpt,
    data: DataOpt,
    out: OutDirOpt,
    epochs: Annotated[int | None, _opt("Training epochs.", default=FT, min=1)] = None,
    lr: Annotated[float | None, _opt("Peak learning rate of the cosine schedule.", default=FT)] = None,
    weight_decay: Annotated[float | None, _opt("AdamW/SGD weight decay.", default=FT)] = None,
    optimizer: Annotated[str | None, _opt("adamw or sgd.", default=FT)] = None,
    balance: Annotated[str | None, _opt("Sampling: none, class, group or group-class.", default=FT)] = None,
    select: Annotated[str | None, _opt("Validation metric that picks the best epoch: f1_macro, accuracy, "
                                       "worst_group_accuracy.", default=FT)] = None,
    amp: Annotated[bool | None, _opt("Mixed precision on CUDA.", "--amp/--no-amp", default=FT)] = None,
    constrained: Annotated[bool, _opt("Constrained recovery: one Lagrange multiplier per group keeps every group's "
                                      "training accuracy within --max-group-drop of the --reference model.",
                                      "--constrained")] = False,
    max_group_drop: Annotated[float | None, _opt(
        "With --constrained: the most accuracy a group may lose against the reference, in [0, 1] (default: the "
        "guard's, fairdeploy.pruning.selection.Guard.max_group_drop).")] = None,
    dual_lr: Annotated[float | None, _opt("With --constrained: step of the multipliers' dual ascent per batch, > 0.",
                                          default=CR)] = None,
    reference: Annotated[Path | None, _opt("With --constrained: the dense reference checkpoint (default: --model "
                                           "itself, the model you start from).", "--reference")] = None,
    batch_size: unset(BatchSizeOpt, f"{FT}'s") = None,  # type: ignore[valid-type]
    job: Job = Job(),
) -> None:
    """Fine-tune a (pruned) checkpoint; weight and 2:4 masks stay applied. The checkpoint is OUT/best.

    Options left unset keep fairdeploy.training.finetune.FINETUNE_CONFIG's values (and, with --constrained,
    fairdeploy.training.constrained.ConstrainedRecovery's)."""
    from functools import partial

    from fairdeploy.training.constrained import ConstrainedRecovery
    from fairdeploy.training.finetune import FINETUNE_CONFIG, finetune_checkpoint
    from fairdeploy.training.loop import FitConfig

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
