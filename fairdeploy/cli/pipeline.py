"""`fairdeploy pipeline CONFIG.toml` and `fairdeploy demo`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from fairdeploy.cli.console import console, err_console
from fairdeploy.cli.interrupts import on_interrupt
from fairdeploy.cli.options import AllowOutsideRootOpt, OverwriteOpt
from fairdeploy.cli.outputs import OUT_POLICIES
from fairdeploy.cli.progress_display import RichProgress
from fairdeploy.cli.tables import fmt_number
from fairdeploy.errors import EXIT_GATE_FAILED
from fairdeploy.files.outputs import claim_output


def gate_cell(stage) -> str:
    """The gate column: an artifact of a model that failed its pruning guard does not pass, whatever its
    runtime drift did (the report says the same)."""
    if stage.guard_failure:
        return "[red]FAIL (pruning guard)[/red]"
    if stage.gate_passed is None:
        return ""
    return "pass" if stage.gate_passed else "[red]FAIL[/red]"


def _print_result(result) -> None:
    t = Table(title="Stages")
    for c in ("stage", "status", "seconds"):
        t.add_column(c, justify="right" if c == "seconds" else "left")
    for o in result.outcomes:
        t.add_row(o.name, o.status, f"{o.seconds:.1f}")
    console.print(t)
    groups: list[str] = []
    for s in result.stages.stages:
        groups += [g for g in s.metrics["groups"] if g not in groups]
    m = Table(title=f"Models on the {result.stages.split} split (every artifact re-validated on its runtime)")
    for c in ("model", "runtime", "precision", "MACs", "accuracy", *[f"acc {g}" for g in groups], "Eodd", "agreement",
              "gate"):
        m.add_column(c, justify="left" if c in ("model", "runtime", "precision", "gate") else "right")
    for s in result.stages.stages:
        m.add_row(s.name, s.kind, s.precision, f"{s.macs / 1e6:.1f} M" if s.macs else "",
                  fmt_number(s.metrics["overall"]["accuracy"]),
                  *[fmt_number(s.metrics["groups"].get(g, {}).get("accuracy")) for g in groups],
                  fmt_number(s.metrics["fairness"].get("eodd")), fmt_number(s.agreement), gate_cell(s))
    console.print(m)
    for note in result.notes:
        console.print(f"[yellow]note:[/yellow] {note}")
    for failure in result.gate_failures:
        err_console.print(f"[red]gate:[/red] {failure}", highlight=False)
    console.print(f"report: {result.report_html}")


def _set_threads(cfg) -> None:
    """The TOML's `threads` sets torch's CPU threads, unless the global --threads was given."""
    from fairdeploy.cli import options
    from fairdeploy.cli.console import debug

    if cfg.threads is not None and options.threads_option is None:
        import torch

        torch.set_num_threads(cfg.threads)
        debug(f"torch threads {cfg.threads} (from {cfg.source})")


def _kept_stages(out: Path) -> str:
    """The finished stages an interrupted pipeline keeps (each stage folder's stage.json), for the Ctrl-C message."""
    done = sorted(d.name for d in out.iterdir() if (d / "stage.json").is_file()) if out.is_dir() else []
    if not done:
        return f"no stage had finished; nothing was kept in {out}"
    return (f"kept the finished stages {', '.join(done)} in {out}; running the same command again skips them "
            "and continues")


def pipeline(
    config: Annotated[Path, typer.Argument(help="Pipeline TOML (see fairdeploy/pipeline/demo.toml).")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Run directory (stages already done there are skipped).")],
    gate: Annotated[bool, typer.Option(help="Exit 1 when a validation tolerance fails.")] = True,
    allow_outside_root: AllowOutsideRootOpt = False,
    overwrite: OverwriteOpt = False,
) -> None:
    """Run prepare -> train -> prune -> finetune -> export -> validate -> report; resumes where it stopped."""
    from dataclasses import replace

    from fairdeploy.pipeline.config import load_pipeline_config
    from fairdeploy.pipeline.run import run_pipeline

    cfg = load_pipeline_config(config)
    if allow_outside_root:
        cfg = replace(cfg, allow_outside_root=True)
    _set_threads(cfg)
    on_interrupt(lambda: _kept_stages(out))
    with claim_output(out, OUT_POLICIES["pipeline"], overwrite=overwrite, inputs={"CONFIG": config}), \
            RichProgress() as progress:
        result = run_pipeline(cfg, out, progress)
    _print_result(result)
    if gate and result.gate_failures:
        raise typer.Exit(EXIT_GATE_FAILED)


def demo(
    out: Annotated[Path, typer.Option("--out", "-o", help="Run directory.")] = Path("demo-run"),
    n_images: Annotated[int | None, typer.Option(help="Override the number of synthetic images.")] = None,
    epochs: Annotated[int | None, typer.Option(help="Override the training epochs.")] = None,
    device: Annotated[str | None, typer.Option(help="auto, cpu, cuda or cuda:N.")] = None,
    overwrite: OverwriteOpt = False,
) -> None:
    """The pipeline on built-in synthetic data where one group is rarer and harder: 2x fewer MACs with a
    fairness-aware criterion beside its blind control, exported and re-validated (CPU, a few minutes)."""
    from dataclasses import replace

    from fairdeploy.pipeline.config import DEMO_CONFIG, load_pipeline_config
    from fairdeploy.pipeline.run import run_pipeline

    cfg = load_pipeline_config(DEMO_CONFIG).with_overrides(
        synth={"n_images": n_images} if n_images else None, model={"epochs": epochs} if epochs else None)
    if device:
        cfg = replace(cfg, device=device)
    on_interrupt(lambda: _kept_stages(out))
    with claim_output(out, OUT_POLICIES["pipeline"], overwrite=overwrite), RichProgress() as progress:
        result = run_pipeline(cfg, out, progress)
    _print_result(result)
    if result.gate_failures:
        console.print("[yellow]some artifacts exceeded the demo's drift tolerances (see above and the report)[/yellow]")
