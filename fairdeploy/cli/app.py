"""The Typer application: every command is registered here, explicitly, from its module."""

from __future__ import annotations

import typer

from fairdeploy.cli import data as data_cmd
from fairdeploy.cli import prune as prune_cmd
from fairdeploy.cli import pipeline as pipeline_cmd
from fairdeploy.cli import export as export_cmd
from fairdeploy.cli import report as report_cmd
from fairdeploy.cli import train as train_cmd
from fairdeploy.cli import validate as validate_cmd

app = typer.Typer(
    name="fairdeploy",
    help="Fair, compact dermatology classifiers: prune for fairness, export, and re-validate on the runtime.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)

@app.callback()
def _global_options(
    threads: int | None = typer.Option(
        None, "--threads", min=1,
        help="Torch CPU threads for this command (default: torch's own choice; on a small shared machine one thread "
             "is often fastest)."),
) -> None:
    """Fair, compact dermatology classifiers: prune for fairness, export, and re-validate on the runtime."""
    if threads is not None:
        import torch

        torch.set_num_threads(threads)


app.add_typer(data_cmd.data_app, name="data")
app.command("train")(train_cmd.train)
app.command("evaluate")(train_cmd.evaluate)
app.command("validate")(validate_cmd.validate)
app.command("report")(report_cmd.report)
app.command("export")(export_cmd.export)
app.command("pipeline")(pipeline_cmd.pipeline)
app.command("demo")(pipeline_cmd.demo)
app.command("prune")(prune_cmd.prune)
app.command("finetune")(prune_cmd.finetune)
