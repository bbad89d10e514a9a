"""`fairdeploy compress`: compress a checkpoint to a MAC budget or as far as every group allows, beside a control."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

from rich.table import Table

from fairdeploy.cli.config import load_config
from fairdeploy.cli.console import console, err_console
from fairdeploy.cli.jobs import checkpoint_job
from fairdeploy.cli.option_blocks import Job, option_blocks
from fairdeploy.cli.options import DataOpt, ModelOpt, OutDirOpt, config_option, configure
from fairdeploy.cli.tables import fmt_number
from fairdeploy.errors import FairdeployError
from fairdeploy.pruning.budget import BudgetConfig

if TYPE_CHECKING:
    from fairdeploy.models.size import ModelSize
    from fairdeploy.pruning.compress_records import BudgetRecord, PointMetrics


budget_option = config_option(BudgetConfig)  # each option's help ends with its default, read from BudgetConfig's field


def _criteria() -> str:
    from fairdeploy.pruning.criteria import CRITERIA

    return ", ".join(CRITERIA)


CriterionOpt = Annotated[str | None, budget_option(f"Channel importance: {_criteria()}.", "criterion")]
ControlOpt = Annotated[str | None, budget_option(
    "Control run under the same schedule and seed: magnitude, taylor, plain-recovery (the criterion without the "
    "recovery constraint), finetune-only (budget runs) or none (default: magnitude for a fairness-aware criterion; "
    "for a blind one plain-recovery with --recovery constrained, else finetune-only with a budget, none without).")]
SpeedupOpt = Annotated[float | None, budget_option(
    "Budget: MACs divided by this (2 = keep half). Without a budget the run compresses as far as every group stays "
    "within --max-group-drop.")]
TargetMacsOpt = Annotated[float | None, budget_option("Budget: keep this fraction of the input model's MACs.")]
MaxGroupDropOpt = Annotated[float | None, budget_option(
    "Tolerance: no group may lose more validation accuracy than this against the input model (the guard; with "
    "--recovery constrained also the constraint's epsilon).", "max_group_drop")]
StepOpt = Annotated[float | None, budget_option(
    "Search: each round keeps this fraction of the previous round's MACs.", "step")]
RoundsOpt = Annotated[int | None, budget_option(
    "Budget: rounds of removal + fine-tuning to reach it.", "rounds", min=1)]
RecoveryOpt = Annotated[str | None, budget_option(
    "Recovery after every round: plain (distilled fine-tuning) or constrained (plus one Lagrange multiplier per "
    "group on its accuracy drop against the input model) (default: plain).")]
EpochsOpt = Annotated[int | None, budget_option("Fine-tuning epochs after every round.", "finetune.epochs", min=1)]
DistillOpt = Annotated[float | None, budget_option(
    "Weight of distillation from the input model in the fine-tuning loss, in [0, 1].", "finetune.distill")]
ConfigOpt = Annotated[Path | None, budget_option(
    "TOML file of the other settings (BudgetConfig's fields; `fairdeploy config show compress` prints them all); "
    "options given here win.")]

# Each option's field(s) in BudgetConfig (fairdeploy.cli.options.configure); the budget options set metric/target.
FIELDS: dict[str, str | tuple[str, ...]] = {
    "criterion": "criterion", "control": "control", "max_group_drop": "max_group_drop", "step": "step",
    "rounds": "rounds", "recovery": "finetune.constrained", "epochs": "finetune.epochs",
    "distill": "finetune.distill", "workers": "finetune.workers", "seed": ("seed", "finetune.seed"),
}
RECOVERIES = {"plain": False, "constrained": True}


@option_blocks
def compress(
    model: ModelOpt,
    data: DataOpt,
    out: OutDirOpt,
    criterion: CriterionOpt = None,
    control: ControlOpt = None,
    speedup: SpeedupOpt = None,
    target_macs: TargetMacsOpt = None,
    max_group_drop: MaxGroupDropOpt = None,
    step: StepOpt = None,
    rounds: RoundsOpt = None,
    recovery: RecoveryOpt = None,
    epochs: EpochsOpt = None,
    distill: DistillOpt = None,
    config: ConfigOpt = None,
    job: Job = Job(),
) -> None:
    """Compress a checkpoint by removing channels in rounds, each followed by recovery fine-tuning, beside a control
    run under the same schedule and seed. With a budget (--speedup / --target-macs) it prunes to it; without one it
    compresses as far as every group stays within --max-group-drop on validation and hands on the most compressed
    model that passed. Writes OUT/model.*, OUT/prune.json, OUT/control and OUT/rounds."""
    from fairdeploy.pruning.budget import budget_from, compress_checkpoint

    if recovery is not None and recovery not in RECOVERIES:
        raise FairdeployError(f"unknown --recovery {recovery!r}; choose one of {', '.join(RECOVERIES)}")
    base = load_config("compress", config)  # BudgetConfig: the same keys as a pipeline's compression [[prune]] table
    metric, fraction = budget_from(speedup=speedup, target_macs=target_macs)
    if fraction is not None:
        base = dataclasses.replace(base, metric=metric, target=fraction)
    options = {"criterion": criterion, "control": control, "max_group_drop": max_group_drop, "step": step,
               "rounds": rounds, "recovery": None if recovery is None else RECOVERIES[recovery], "epochs": epochs,
               "distill": distill, "workers": job.workers, "seed": job.seed}
    cfg = configure(type(base), FIELDS, options, base=base)
    result = checkpoint_job("prune", compress_checkpoint, model, data, out, cfg, job)
    if result is None:  # another torchrun process reports
        return
    rec = result.record
    console.print(rounds_table(rec))
    sel = rec.selected
    what = (f"budget {rec.budget.metric} x{rec.budget.fraction:g}" if rec.budget is not None else
            f"as far as every group stays within {cfg.max_group_drop:g}")
    console.print(f"selected {sel.model}: MACs x{sel.macs_fraction:.3f}, params x{sel.params_fraction:.3f} of the "
                  f"input model ({what}); candidate: {rec.runs['candidate'].stopped_because}",
                  highlight=False, soft_wrap=True)
    console.print(rec.verdict, highlight=False, soft_wrap=True)
    if not sel.guard_passed or sel.model == "input":
        err_console.print(f"[yellow]warning:[/yellow] {sel.note}", highlight=False, soft_wrap=True)
    control_dir = f"; control: {result.out_dir}/control" if "control" in rec.runs else ""
    console.print(f"checkpoint: {result.out_dir} (prune.json beside it{control_dir})", highlight=False,
                  soft_wrap=True)


def rounds_table(record: BudgetRecord) -> Table:
    """Input model, then every round of candidate and control (after pruning, after fine-tuning), on validation:
    the frontier as a table."""
    cfg = record.config
    groups = list(record.input_val.group_accuracy)
    what = (f"budget: {record.budget.metric} x{record.budget.fraction:g}" if record.budget is not None else
            f"tolerance: max group drop {cfg.max_group_drop:g}")
    against = "" if cfg.control_run == "none" else f" vs {cfg.control_run} control"
    table = Table(title=f"{cfg.criterion}{against} on validation ({what}{'' if against else '; no control run'})")
    for col in ("run", "model", "MACs", *[f"acc {g}" for g in groups], "worst group", "macro-F1", "Eodd", "guard"):
        table.add_column(col, justify="left" if col in ("run", "model", "guard") else "right")

    def row(run: str, name: str, v: PointMetrics, size: ModelSize, guard: str, mark: str = "") -> None:
        table.add_row(run, name + mark, f"x{size.macs / record.input_size.macs:.3f}",
                      *[fmt_number(v.group_accuracy.get(g)) for g in groups], fmt_number(v.worst_group_accuracy),
                      fmt_number(v.f1_macro), fmt_number(v.fairness.get("eodd")), guard)

    row("input", "dense", record.input_val, record.input_size, "ok")
    for run_name, run in record.runs.items():
        for r in run.rounds:
            stages = {"pruned": r.pruning.pruned} if r.pruning is not None else {}
            for stage, p in {**stages, "finetuned": r.finetuned}.items():
                name = f"r{r.round}-{stage}"
                guard = "ok" if p.eligible else "; ".join(p.ineligible_because)
                row(run_name, name + (" (forced)" if r.forced else ""), p.val, p.size, guard,
                    " *" if name == run.selected else "")
    return table
