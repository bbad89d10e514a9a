"""`fairdeploy report RUN_DIR`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from fairdeploy.cli.console import console
from fairdeploy.cli.options import OverwriteOpt
from fairdeploy.cli.outputs import OUT_POLICIES
from fairdeploy.files.outputs import claim_output


def report(
    run_dir: Annotated[Path, typer.Argument(help="A pipeline run directory (stages.json) or a validate --out directory.")],
    out: Annotated[Path | None, typer.Option("--out", "-o", help="Where to write the report (default: RUN_DIR).")] = None,
    overwrite: OverwriteOpt = False,
) -> None:
    """Turn a run's JSON files into report.md and a self-contained report.html with plots."""
    from fairdeploy.report import build_report

    with claim_output(out if out is not None else run_dir, OUT_POLICIES["report"], overwrite=overwrite):
        paths = build_report(run_dir, out)
    console.print(f"report: {paths.html}")
    console.print(f"markdown: {paths.markdown} ({len(paths.figures)} figures)")
