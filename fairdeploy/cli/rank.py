"""`fairdeploy rank`: rank several runs' checkpoints on validation with paired intervals, and recommend one."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.table import Table
from rich.text import Text

from fairdeploy.cli.console import console
from fairdeploy.cli.option_blocks import Images, option_blocks
from fairdeploy.cli.options import (
    DataOpt,
    DeviceOpt,
    OverwriteOpt,
    config_option,
    configure,
    default_of,
    shown_default,
)
from fairdeploy.cli.outputs import OUT_POLICIES
from fairdeploy.cli.progress_display import RichProgress
from fairdeploy.cli.tables import fmt_number
from fairdeploy.files.json_files import write_json
from fairdeploy.files.outputs import claim_output
from fairdeploy.pruning.choose import RankConfig

if TYPE_CHECKING:
    from fairdeploy.pruning.choose import Ranking

# Each option's field of RankConfig (fairdeploy.cli.options.configure); unset options keep the field's default.
FIELDS: dict[str, str | tuple[str, ...]] = {"max_group_drop": "max_group_drop", "seed": "seed"}


def _rank_default(field: str) -> str:
    """RankConfig's default of `field`, as --help shows it (the value lives on the field only)."""
    return shown_default(default_of(RankConfig, field))


rank_option = config_option(RankConfig)  # each option's help ends with its default, read from RankConfig's field


ModelsOpt = Annotated[list[Path], typer.Option(
    "--model", "-m", help="A run's checkpoint folder (model.safetensors + model.json, or a train run's folder with "
                          "best/); give two or more.")]
ReferenceOpt = Annotated[Path | None, typer.Option(
    "--reference", help="The model the runs started from (usually the dense one): each model must keep every group "
                        "within --max-group-drop of its validation accuracy and macro-F1 within "
                        f"{_rank_default('max_f1_drop')} (the guard). Default: no guard.")]
MaxGroupDropOpt = Annotated[float | None, rank_option(
    "The guard: no group may lose more validation accuracy than this against --reference.", "max_group_drop",
    "--max-group-drop")]
BootstrapSeedOpt = Annotated[int | None, rank_option("Random seed of the paired bootstrap.", "seed", "--seed")]
OutOpt = Annotated[Path | None, typer.Option("--out", "-o", help="Write the ranking JSON here.")]


@option_blocks
def rank(
    data: DataOpt,
    model: ModelsOpt,
    reference: ReferenceOpt = None,
    max_group_drop: MaxGroupDropOpt = None,
    out: OutOpt = None,
    overwrite: OverwriteOpt = False,
    device: DeviceOpt = "auto",
    seed: BootstrapSeedOpt = None,
    images: Images = Images(),
) -> None:
    """Rank runs' checkpoints on the validation split (never test): worst-group accuracy first (ties: macro-F1,
    then fewer MACs). Every other model is compared with the best by a paired bootstrap (95 % interval) on the
    same images; the recommendation is the model with the fewest MACs that passes the guard (with --reference),
    predicts more than one class and is not shown worse than the best on worst-group accuracy."""
    from fairdeploy.pruning.choose import rank_models

    cfg = configure(RankConfig, FIELDS, {"max_group_drop": max_group_drop, "seed": seed})
    claim = contextlib.nullcontext() if out is None else claim_output(
        out, OUT_POLICIES["rank"], overwrite=overwrite,
        inputs={"--model": model, "--reference": reference, "--data": data, "--images-root": images.images_root})
    with claim:
        manifest = images.read(data)
        with RichProgress() as progress:
            ranking = rank_models(model, manifest, reference, cfg, device, progress)
        console.print(ranking_table(ranking))
        for m in ranking.models:
            console.print(m.verdict, highlight=False, soft_wrap=True, markup=False)
        if out is not None:
            write_json(out, ranking.to_dict())
            console.print(f"ranking: {out}", highlight=False, soft_wrap=True, markup=False)
        console.print(ranking.recommendation, highlight=False, soft_wrap=True, markup=False)


def ranking_table(ranking: Ranking) -> Table:
    """One row per model in rank order: size, each group's validation accuracy, worst group, macro-F1, Eodd, the
    guard and the verdict against the best."""
    groups = list(ranking.models[0].val.group_accuracy)
    guard = f" (vs {ranking.reference}, max group drop {ranking.config.max_group_drop:g})" if ranking.reference else ""
    table = Table(title=f"Runs on validation ({ranking.val_images} images), best first{guard}")
    columns = ("#", "model", "MACs", "params", *[f"acc {g}" for g in groups], "worst group", "macro-F1", "Eodd",
               "guard", "verdict")
    for col in columns:
        table.add_column(col, justify="left" if col in ("model", "guard", "verdict") else "right")
    for i, m in enumerate(ranking.models, 1):
        if m.guard is None:
            guard_cell = "-"
        else:
            guard_cell = "ok" if m.guard.passed else "; ".join(m.guard.failed_because)
        if m.vs_best is None:
            verdict = "best"
        else:
            verdict = f"{m.vs_best.worst_group_accuracy.text()} {'worse' if m.shown_worse else 'not shown worse'}"
        if m.degenerate:
            verdict += f"; {m.degenerate}"
        if m.name == ranking.recommended:
            verdict += "; recommended"
        table.add_row(str(i), Text(m.name), f"{m.size.macs / 1e6:.1f} M", f"{m.size.params / 1e6:.2f} M",
                      *[fmt_number(m.val.group_accuracy.get(g)) for g in groups],
                      fmt_number(m.val.worst_group_accuracy), fmt_number(m.val.f1_macro),
                      fmt_number(m.val.fairness.get("eodd")), Text(guard_cell), Text(verdict))
    return table
