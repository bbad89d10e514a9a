"""The Typer application: every command is registered here, explicitly, from its module."""

from __future__ import annotations

import typer

from fairdeploy.cli import data as data_cmd
from fairdeploy.cli import export as export_cmd
from fairdeploy.cli import pipeline as pipeline_cmd
from fairdeploy.cli import compress as compress_cmd
from fairdeploy.cli import config as config_cmd
from fairdeploy.cli import prune as prune_cmd
from fairdeploy.cli import rank as rank_cmd
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
    quiet: bool = typer.Option(False, "--quiet", "-q", help="Print only errors and the final result line."),
    verbose: bool = typer.Option(
        False, "--verbose", "-v", help="Print debug details, and full tracebacks with errors (also FAIRDEPLOY_DEBUG=1)."),
) -> None:
    """Fair, compact dermatology classifiers: prune for fairness, export, and re-validate on the runtime."""
    from fairdeploy.cli import console as cli_console
    from fairdeploy.cli import options
    from fairdeploy.errors import FairdeployError

    if quiet and verbose:
        raise FairdeployError("--quiet and --verbose exclude each other: give one")
    cli_console.output.quiet = quiet
    cli_console.output.verbose = verbose or cli_console.output.verbose
    if quiet and cli_console.quiet_capture is not None:
        cli_console.console.file = cli_console.quiet_capture  # fairdeploy.cli.main prints its last line
    options.threads_option = threads
    if threads is not None:
        import torch

        torch.set_num_threads(threads)
    if cli_console.output.verbose:
        import platform

        from fairdeploy import __version__

        cli_console.debug(f"fairdeploy {__version__}, python {platform.python_version()}, threads "
                          f"{threads if threads is not None else 'torch default'}, stdout "
                          f"{'a terminal' if cli_console.console.is_terminal else 'plain lines (not a terminal)'}")


app.add_typer(data_cmd.data_app, name="data")
app.add_typer(config_cmd.config_app, name="config")
app.command("train")(train_cmd.train)
app.command("evaluate")(train_cmd.evaluate)
app.command("validate")(validate_cmd.validate)
app.command("report")(report_cmd.report)
app.command("export")(export_cmd.export)
app.command("pipeline")(pipeline_cmd.pipeline)
app.command("demo")(pipeline_cmd.demo)
app.command("prune", cls=prune_cmd.PruneCommand)(prune_cmd.prune)
app.command("compress")(compress_cmd.compress)
app.command("finetune")(prune_cmd.finetune)
app.command("rank")(rank_cmd.rank)
