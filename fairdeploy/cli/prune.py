"""`fairdeploy prune` (FairPrune / SNNL) and `fairdeploy finetune` (masks held)."""

from __future__ import annotations

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
    console,
    err_console,
    on_interrupt,
    option_blocks,
)
from fairdeploy.cli.tables import fmt_number
from fairdeploy.cli.train import describe_kept_run
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


def _opt(help_text: str, *names: str, **kw: Any) -> Any:
    return typer.Option(*names, help=help_text, **kw)


MethodOpt = Annotated[str, _opt("fairprune or snnl.")]
GranularityOpt = Annotated[str, _opt("FairPrune: weight, channel or 2:4.")]
CurvatureOpt = Annotated[str, _opt("FairPrune curvature: fisher (MC), empirical or hutchinson.")]
BetaOpt = Annotated[float, _opt("FairPrune: weight of the privileged group's curvature, in (0, 1].")]
RatioOpt = Annotated[float, _opt("FairPrune: fraction of the still-unpruned weights (channels) cut per step, in (0, 1).")]
FirstOrderOpt = Annotated[bool, _opt("FairPrune: add each group's gradient term.", "--first-order")]
ScopeOpt = Annotated[str, _opt("FairPrune weight ranking: layer (each layer loses --ratio) or global.")]
IncludeHeadOpt = Annotated[bool, _opt("FairPrune weight/2:4: prune the classifier head too.", "--include-head")]
ScoreSamplesOpt = Annotated[int, _opt("FairPrune: images per group in the score sets (class-stratified).", min=1)]
ScoreSplitOpt = Annotated[str, _opt("Split the scores are computed on: train or val.")]
McSamplesOpt = Annotated[int, _opt("Fisher: softmax draws per image.", min=1)]
ProbesOpt = Annotated[int, _opt("Hutchinson: Rademacher probes per batch.", min=1)]
RoundToOpt = Annotated[int, _opt("Channel pruning: keep channel counts multiples of this.", min=1)]
LayersOpt = Annotated[str, _opt("SNNL: 'last' or comma-separated conv layer names.")]
TemperatureOpt = Annotated[float, _opt("SNNL temperature T.")]
CompatOpt = Annotated[bool, _opt("SNNL: the published code's self-pair numerator.", "--snnl-compat")]
PerRoundOpt = Annotated[int, _opt("SNNL: channels removed per round.")]
MaxChannelsOpt = Annotated[int | None, _opt("SNNL: stop after removing this many channels in total.")]
SnnlBatchesOpt = Annotated[int, _opt("SNNL: group-balanced batches averaged per round.", min=1)]
StepsOpt = Annotated[int, _opt("Maximum prune steps (rounds).", min=1)]
TargetOpt = Annotated[str, _opt("Validation gap watched by the stop rule and FATE: eodd, eopp0 or eopp1.")]
PatienceOpt = Annotated[int, _opt("Stop after this many steps without a lower gap.", min=1)]
TargetValueOpt = Annotated[float | None, _opt("Stop once the gap is at or below this.")]
SelectOpt = Annotated[str, _opt("Best step: fate (on --target vs the input model), gap, f1, or last (the most "
                                "pruned step the guard accepts).")]
MaxF1DropOpt = Annotated[float, _opt("Guard: never select a step losing more macro-F1 than this.")]
GuardOpt = Annotated[bool, _opt("Never select a step that lowers the unprivileged group's accuracy.",
                                "--guard/--no-guard")]
PrivilegedOpt = Annotated[str | None, _opt("Privileged group name (default: higher validation accuracy).")]
FinetuneEpochsOpt = Annotated[int | None, _opt("Fine-tuning epochs after every step or round (0: none; default: "
                                              "0 for FairPrune/SNNL steps, 1 per budget round).", min=0)]
FinetuneLrOpt = Annotated[float | None, _opt("Fine-tuning learning rate (default: FairPrune/SNNL steps use "
                                             "fairdeploy.training.finetune.FINETUNE_LR, budget rounds "
                                             "fairdeploy.pruning.budget.BUDGET_FINETUNE_LR).")]
BalanceOpt = Annotated[str, _opt("Fine-tuning sampling: none, class, group or group-class.")]
CriterionOpt = Annotated[str | None, _opt(
    "Budget run: importance criterion magnitude, taylor (fairness-blind), fairprune, snnl or group-taylor "
    "(fairness-aware); removes channels with Torch-Pruning's global pruner until the budget is met.")]
TargetMacsOpt = Annotated[float | None, _opt("Budget run: keep this fraction of the input model's MACs (0.5 = 2x fewer).")]
TargetParamsOpt = Annotated[float | None, _opt("Budget run: keep this fraction of the input model's parameters.")]
SpeedupOpt = Annotated[float | None, _opt("Budget run: MACs divided by this (2 = --target-macs 0.5).")]
RoundsOpt = Annotated[int | None, _opt("Budget run: rounds of removal + fine-tuning to reach the budget.", min=1)]
ControlOpt = Annotated[str | None, _opt("Budget run: control run under the same schedule and seed: magnitude, taylor, "
                                        "finetune-only or none.")]
DistillOpt = Annotated[float | None, _opt("Budget run: weight of distillation from the input model in the "
                                          "fine-tuning loss, in [0, 1] (0: off).")]
GroupWeightOpt = Annotated[str | None, _opt("Fine-tuning loss weights: none or balanced (each group weighs the same).")]
MaxGroupDropOpt = Annotated[float | None, _opt("Guard: never select a model that costs any group (FairPrune/SNNL "
                                               "steps: the unprivileged group) more validation accuracy than this.")]
KeepRoundsOpt = Annotated[bool, _opt("Budget run: keep every round's checkpoint under OUT/rounds.",
                                     "--keep-rounds/--no-keep-rounds")]
SelectEpochOpt = Annotated[str, _opt("Validation metric that picks the best epoch: f1_macro, accuracy, "
                                     "worst_group_accuracy.")]


@option_blocks
def prune(
    model: ModelOpt,
    data: DataOpt,
    out: OutDirOpt,
    method: MethodOpt = "fairprune",
    granularity: GranularityOpt = "weight",
    curvature: CurvatureOpt = "fisher",
    beta: BetaOpt = 0.5,
    ratio: RatioOpt = 0.005,
    first_order: FirstOrderOpt = False,
    scope: ScopeOpt = "layer",
    include_head: IncludeHeadOpt = False,
    score_samples: ScoreSamplesOpt = 64,
    score_split: ScoreSplitOpt = "train",
    mc_samples: McSamplesOpt = 1,
    probes: ProbesOpt = 1,
    round_to: RoundToOpt = 8,
    layers: LayersOpt = "last",
    temperature: TemperatureOpt = 1.0,
    snnl_compat: CompatOpt = False,
    channels_per_round: PerRoundOpt = 8,
    max_channels: MaxChannelsOpt = None,
    snnl_batches: SnnlBatchesOpt = 4,
    steps: StepsOpt = 5,
    target: TargetOpt = "eodd",
    patience: PatienceOpt = 2,
    target_value: TargetValueOpt = None,
    select: SelectOpt = "fate",
    max_f1_drop: MaxF1DropOpt = 0.02,
    guard: GuardOpt = True,
    privileged: PrivilegedOpt = None,
    finetune_epochs: FinetuneEpochsOpt = None,
    finetune_lr: FinetuneLrOpt = None,
    balance: BalanceOpt = "none",
    criterion: CriterionOpt = None,
    target_macs: TargetMacsOpt = None,
    target_params: TargetParamsOpt = None,
    speedup: SpeedupOpt = None,
    rounds: RoundsOpt = None,
    control: ControlOpt = None,
    distill: DistillOpt = None,
    group_weight: GroupWeightOpt = None,
    max_group_drop: MaxGroupDropOpt = None,
    keep_rounds: KeepRoundsOpt = True,
    batch_size: BatchSizeOpt = 64,
    job: Job = Job(),
) -> None:
    """Prune a checkpoint: to a MAC/parameter budget with a criterion and its control (--criterion, --target-macs,
    --speedup), or FairPrune / SNNL steps (--method). Writes OUT/model.*, OUT/prune.json (and OUT/control, OUT/rounds)."""
    from fairdeploy.pruning import FairPruneConfig, Guard, PruneConfig, SnnlConfig, StopRule, prune_checkpoint
    from fairdeploy.training.finetune import FINETUNE_LR
    from fairdeploy.training.loop import FitConfig

    if criterion is not None or any(v is not None for v in (target_macs, target_params, speedup)):
        _budget_run(model, data, out, job, batch_size, balance,
                    criterion=criterion, target_macs=target_macs, target_params=target_params, speedup=speedup,
                    rounds=rounds, control=control, distill=distill, group_weight=group_weight,
                    max_group_drop=max_group_drop, keep_rounds=keep_rounds, finetune_epochs=finetune_epochs,
                    finetune_lr=finetune_lr, score_samples=score_samples, round_to=round_to, beta=beta,
                    temperature=temperature, privileged=privileged)
        return
    finetune_epochs = 0 if finetune_epochs is None else finetune_epochs
    finetune_lr = FINETUNE_LR if finetune_lr is None else finetune_lr
    guard_opts = {} if max_group_drop is None else {"max_group_drop": max_group_drop}

    cfg = PruneConfig(
        method=method,
        fairprune=FairPruneConfig(granularity=granularity, curvature=curvature, beta=beta, ratio=ratio,
                                  first_order=first_order, scope=scope, include_head=include_head,
                                  score_samples=score_samples, score_split=score_split, mc_samples=mc_samples,
                                  probes=probes, round_to=round_to),
        snnl=SnnlConfig(layers=layers, temperature=temperature, compat=snnl_compat,
                        channels_per_round=channels_per_round, max_channels=max_channels, batches=snnl_batches,
                        score_split=score_split, round_to=round_to),
        stop=StopRule(steps=steps, target=target, patience=patience, target_value=target_value),
        guard=Guard(protect_unprivileged=guard, max_f1_drop=max_f1_drop, select=select, **guard_opts),
        privileged=privileged,
        finetune=FitConfig(epochs=finetune_epochs, batch_size=batch_size, lr=finetune_lr, balance=balance,
                           workers=job.workers, seed=job.seed) if finetune_epochs > 0 else None,
        batch_size=batch_size,
        workers=job.workers,
        seed=job.seed,
    )
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


def _budget_run(model: Any, data: Any, out: Any, job: Job, batch_size: int, balance: str, **opts: Any) -> None:
    """`fairdeploy prune --criterion C --target-macs F`: options left unset keep BudgetConfig's defaults."""
    from dataclasses import replace

    from fairdeploy.pruning.budget import BudgetConfig, budget_from, compress_checkpoint

    metric, fraction = budget_from(opts.pop("speedup"), opts.pop("target_macs"), opts.pop("target_params"))
    base = BudgetConfig()
    ft = {k: v for k, v in (("epochs", opts.pop("finetune_epochs")), ("lr", opts.pop("finetune_lr")),
                            ("distill", opts.pop("distill")), ("group_weight", opts.pop("group_weight")))
          if v is not None}
    if ft.get("epochs") == 0:
        raise FairdeployError("budget runs fine-tune after every round: --finetune-epochs must be >= 1")
    if balance != "none" or job.workers:
        ft.update(balance=balance, workers=job.workers)
    fit = replace(base.finetune, batch_size=batch_size, seed=job.seed, **ft)
    kw = {k: v for k, v in opts.items() if v is not None}
    kw.setdefault("control", None)  # None: BudgetConfig picks the control that fits the criterion
    cfg = replace(base, metric=metric, target=fraction, finetune=fit, batch_size=batch_size, seed=job.seed, **kw)
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


@option_blocks
def finetune(
    model: ModelOpt,
    data: DataOpt,
    out: OutDirOpt,
    epochs: Annotated[int, typer.Option(min=1)] = 5,
    lr: Annotated[float | None, _opt("Peak learning rate (cosine schedule; default: "
                                     "fairdeploy.training.finetune.FINETUNE_LR).")] = None,
    weight_decay: Annotated[float, typer.Option()] = 1e-4,
    optimizer: Annotated[str, _opt("adamw or sgd.")] = "adamw",
    balance: Annotated[str, _opt("Sampling: none, class, group or group-class.")] = "none",
    select: SelectEpochOpt = "f1_macro",
    amp: Annotated[bool, _opt("Mixed precision on CUDA.")] = True,
    batch_size: BatchSizeOpt = 64,
    job: Job = Job(),
) -> None:
    """Fine-tune a (pruned) checkpoint; weight and 2:4 masks stay applied. The checkpoint is OUT/best."""
    from fairdeploy.training.finetune import FINETUNE_LR, finetune_checkpoint
    from fairdeploy.training.loop import FitConfig

    cfg = FitConfig(epochs=epochs, batch_size=batch_size, lr=FINETUNE_LR if lr is None else lr, weight_decay=weight_decay, optimizer=optimizer,
                    balance=balance, select=select, amp=amp, workers=job.workers, seed=job.seed)
    on_interrupt(lambda: describe_kept_run(out))
    result = checkpoint_job("finetune", finetune_checkpoint, model, data, out, cfg, job)
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
    console.print(f"checkpoint: {result.best_dir}", highlight=False, soft_wrap=True)
