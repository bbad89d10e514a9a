"""`fairdeploy validate`: re-validate candidates against the reference, print one table, gate with exit 1."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich import box
from rich.markup import escape
from rich.table import Table

from fairdeploy.cli.console import console
from fairdeploy.cli.options import (
    AllowOutsideRootOpt,
    BatchSizeOpt,
    DataOpt,
    DeviceOpt,
    ImagesRootOpt,
    OutDirOpt,
    OverwriteOpt,
    SeedOpt,
    SplitOpt,
    WorkersOpt,
    check_split,
    config_option,
    default_of,
    optional_option,
    shown_default,
)
from fairdeploy.cli.outputs import OUT_POLICIES
from fairdeploy.cli.progress_display import RichProgress
from fairdeploy.data.manifest import read_manifest
from fairdeploy.errors import EXIT_GATE_FAILED
from fairdeploy.files.json_files import write_json
from fairdeploy.files.outputs import claim_output
from fairdeploy.runtime.base import BACKENDS
from fairdeploy.units import megabytes
from fairdeploy.validation import LatencyConfig, ValidationConfig

if TYPE_CHECKING:
    from fairdeploy.metrics import MetricsReport
    from fairdeploy.validation.compare import MetricDeltas
    from fairdeploy.validation.validate import ValidationResult


def _delta(value: float | None, delta: float | None, digits: int = 3) -> str:
    """The value, and under it the signed delta against the reference (coloured when non-zero)."""
    if value is None:
        return "n/a"
    if delta is None:
        return f"{value:.{digits}f}"
    colour = "dim" if abs(delta) < 0.5 * 10**-digits else ("green" if delta > 0 else "red")
    return f"{value:.{digits}f}\n[{colour}]{delta:+.{digits}f}[/{colour}]"


def _runtime(runtime: dict[str, Any]) -> str:
    if "providers_active" in runtime:
        active = ",".join(p.replace("ExecutionProvider", "") for p in runtime["providers_active"])
        return f"{runtime['backend']} ({active})" + (" [red]fallback[/red]" if runtime.get("fallback") else "")
    return f"{runtime.get('backend', '?')} ({runtime.get('device', '?')})"


def _short(label: str) -> str:
    """A path label's last two components (the table is narrow; validation.json keeps the full label)."""
    parts = Path(label).parts
    return str(Path(*parts[-2:])) if len(parts) > 2 else label


def comparison_table(result: ValidationResult) -> Table:
    """One column per runner (reference first), one row per quantity; candidates show their delta below."""
    ref, cands = result.reference, result.candidates
    groups = ref.metrics.group_names
    table = Table(title=f"Validation on {result.data.split} (n={result.data.n}); "
                        "second lines: candidate - reference", box=box.SIMPLE_HEAD,
                  caption=f"reference: {ref.artifact.path}", caption_justify="left")
    table.add_column("", no_wrap=True)
    table.add_column(f"reference\n{ref.label if ref.label != 'reference' else ''}".rstrip(), justify="right",
                     overflow="fold")
    for c in cands:
        table.add_column(_short(c.label), justify="right", overflow="fold")

    def metric_row(title: str, get: Callable[[MetricsReport], float | None],
                   delta: Callable[[MetricDeltas], float | None]) -> None:
        table.add_row(title, _delta(get(ref.metrics), None), *[_delta(get(c.run.metrics), delta(c.deltas))
                                                                for c in cands])

    runs = (ref, *(c.run for c in cands))
    table.add_row("runtime", *[_runtime(r.runtime) for r in runs])
    table.add_row("precision, size", *[f"{r.artifact.precision}, {megabytes(r.artifact.size_bytes)}" for r in runs])
    metric_row("accuracy", lambda m: m.overall_accuracy, lambda d: d.accuracy)
    for g in groups:
        metric_row(f"accuracy {g}", lambda m, g=g: m.group(g).accuracy, lambda d, g=g: d.groups[g].accuracy)
    metric_row("macro-F1", lambda m: m.overall_f1_macro, lambda d: d.f1_macro)
    metric_row("eodd", lambda m: m.gap("eodd"), lambda d: d.fairness["eodd"])
    table.add_row("agreement", "", *[f"{c.agreement.overall:.3f}" for c in cands])
    for g in groups:
        table.add_row(f"agreement {g}", "", *[f"{c.agreement.groups[g]:.3f}" for c in cands])
    table.add_row("max |Δlogit|", "", *[f"{c.logit_diff.max_abs:.1e}" for c in cands])
    for i, stats in enumerate(ref.latency):
        table.add_row(f"p50 ms, batch {stats.batch_size}", *[f"{r.latency[i].p50_ms:.2f}" for r in runs])
    table.add_row("gate", "", *["[green]pass[/green]" if c.passed else "[red]FAIL[/red]" for c in cands])
    return table


# Each option's --help shows its default, read from ValidationConfig's field (its tolerances: Tolerances') or
# LatencyConfig's; the options themselves are None: not given, the field keeps its default (validation_config).
validation_option = config_option(ValidationConfig)
latency_option = config_option(LatencyConfig)


def _shown(path: str) -> str:
    """ValidationConfig's default at the dotted field `path`, as --help shows it."""
    return shown_default(default_of(ValidationConfig, path))


_LATENCY_SWITCH = "--no-latency" if default_of(ValidationConfig, "latency") is None else "--latency"
LatencyOpt = Annotated[bool | None, typer.Option(
    "--latency/--no-latency", help=f"Measure p50/p95 latency and throughput (default: {_LATENCY_SWITCH}).")]
LatencyBatchOpt = Annotated[int | None, typer.Option(
    min=1, help="The larger batch size timed besides batch 1 (default: "
                f"{max(default_of(LatencyConfig, 'batch_sizes'))}).")]


def validate(
    reference: Annotated[Path, typer.Option("--reference", "-r", help="The PyTorch checkpoint directory the candidates came from.")],
    candidate: Annotated[list[Path], typer.Option("--candidate", "-c", help="Artifact to validate: checkpoint dir, .onnx or .engine (repeatable).")],
    data: DataOpt,
    out: OutDirOpt,
    split: optional_option(SplitOpt, _shown("split")) = None,  # type: ignore[valid-type]
    max_eodd_drift: Annotated[float | None, validation_option(
        "Largest allowed Eodd increase, candidate - reference.", "tolerances.max_eodd_drift")] = None,
    max_accuracy_drop: Annotated[float | None, validation_option(
        "Largest allowed drop of overall accuracy.", "tolerances.max_accuracy_drop")] = None,
    max_group_accuracy_drop: Annotated[float | None, validation_option(
        "Largest allowed accuracy drop in any one group.", "tolerances.max_group_accuracy_drop")] = None,
    min_agreement: Annotated[float | None, validation_option(
        "Smallest allowed top-1 agreement with the reference, overall; none: not checked.",
        "tolerances.min_agreement")] = None,
    min_group_agreement: Annotated[float | None, validation_option(
        "Smallest allowed top-1 agreement in each group; none: not checked.",
        "tolerances.min_group_agreement")] = None,
    backend: Annotated[str, typer.Option(help=f"Runtime for the candidates: {', '.join(BACKENDS)}.")] = "auto",
    allow_fallback: Annotated[bool, typer.Option("--allow-fallback", help="Accept ONNX Runtime falling back to another provider (recorded in validation.json).")] = False,
    allow_other_source: Annotated[bool, typer.Option("--allow-other-source", help="Let a candidate exported from another model than the reference pass the gate (by default it fails).")] = False,
    bootstrap: Annotated[int | None, validation_option(
        "Bootstrap resamples for the gaps' confidence intervals; 0 = none.", "bootstrap", min=0)] = None,
    latency: LatencyOpt = None,
    latency_batch: LatencyBatchOpt = None,
    latency_iterations: Annotated[int | None, latency_option(
        "Timed calls per batch size, after warm-up.", "iterations", min=1)] = None,
    latency_warmup: Annotated[int | None, latency_option(
        "Untimed warm-up calls per batch size.", "warmup", min=0)] = None,
    batch_size: optional_option(BatchSizeOpt, _shown("batch_size")) = None,  # type: ignore[valid-type]
    device: DeviceOpt = "auto",
    workers: optional_option(WorkersOpt, _shown("workers")) = None,  # type: ignore[valid-type]
    seed: optional_option(SeedOpt, _shown("seed")) = None,  # type: ignore[valid-type]
    images_root: ImagesRootOpt = None,
    allow_outside_root: AllowOutsideRootOpt = False,
    overwrite: OverwriteOpt = False,
) -> None:
    """Re-validate per-group accuracy and fairness of runtime artifacts against their PyTorch reference.

    Exit 0 when every tolerance holds, 1 when one fails (each named), when a candidate comes from another model
    (unless --allow-other-source) or when the fairness figures are degenerate (one predicted class, one group);
    2 on bad input.
    """
    from fairdeploy.validation import VALIDATION_FILE
    from fairdeploy.validation import validate as run_validation

    cfg = validation_config(split, max_eodd_drift=max_eodd_drift, max_accuracy_drop=max_accuracy_drop,
                            max_group_accuracy_drop=max_group_accuracy_drop, min_agreement=min_agreement,
                            min_group_agreement=min_group_agreement, latency=latency, latency_batch=latency_batch,
                            latency_iterations=latency_iterations, latency_warmup=latency_warmup,
                            batch_size=batch_size, workers=workers, bootstrap=bootstrap, seed=seed,
                            allow_other_source=allow_other_source)
    cfg.validate()  # options before the manifest or any model is loaded
    manifest = read_manifest(data, images_root, allow_outside_root=allow_outside_root)
    inputs = {"--reference": reference, "--candidate": list(candidate), "--data": data, "--images-root": images_root}
    with claim_output(out, OUT_POLICIES["validate"], overwrite=overwrite, inputs=inputs):
        with RichProgress() as progress:
            result = run_validation(reference, candidate, manifest, cfg, backend, device, allow_fallback, progress)
        path = out / VALIDATION_FILE
        write_json(path, result.to_dict())
    console.print(comparison_table(result))
    failures = result.failures()
    for line in failures:
        console.print(f"[bold red]FAIL[/bold red] {escape(line)}", highlight=False, soft_wrap=True)
    for cand in result.candidates:
        if cand.run.runtime.get("fallback"):
            console.print(f"[yellow]note[/yellow] {cand.label}: ONNX Runtime fell back "
                          f"(missing {', '.join(cand.run.runtime['providers_missing'])})", highlight=False)
    for line in result.warnings():
        console.print(f"[yellow]slower[/yellow] {escape(line)}", highlight=False, soft_wrap=True)
    for reason in result.degenerate:
        console.print(f"[yellow]degenerate[/yellow] {escape(reason)}", highlight=False, soft_wrap=True)
    console.print(f"validation: {path}", highlight=False, soft_wrap=True)
    if not result.passed:
        why = f"{len(failures)} failure(s)"
        if result.degenerate:
            why += "; the fairness figures are degenerate (" + "; ".join(result.degenerate) + ")"
        console.print(f"[bold red]gate failed[/bold red]: {escape(why)}", highlight=False, soft_wrap=True)
        raise typer.Exit(EXIT_GATE_FAILED)
    console.print("[bold green]gate passed[/bold green]: every tolerance holds")


def validation_config(split: str | None = None, *, max_eodd_drift: float | None = None,
                      max_accuracy_drop: float | None = None, max_group_accuracy_drop: float | None = None,
                      min_agreement: float | None = None, min_group_agreement: float | None = None,
                      latency: bool | None = None,
                      latency_batch: int | None = None, latency_iterations: int | None = None,
                      latency_warmup: int | None = None, **kw: Any) -> Any:
    """ValidationConfig from `validate`'s flags, as one layer over its defaults (fairdeploy.schema): a flag left
    None keeps the dataclass default (ValidationConfig, Tolerances, LatencyConfig), so no default is written here.
    --no-latency (False) switches latency off; --latency-batch B times batch sizes 1 and B."""
    from fairdeploy.schema import build, flag_layer

    def flag(name: str) -> str:
        return "--" + name.replace("_", "-")

    tolerances = {"max_eodd_drift": max_eodd_drift, "max_accuracy_drop": max_accuracy_drop,
                  "max_group_accuracy_drop": max_group_accuracy_drop, "min_agreement": min_agreement,
                  "min_group_agreement": min_group_agreement}
    flags = {"split": ("--split", None if split is None else check_split(split)),
             **{f"tolerances.{k}": (flag(k), v) for k, v in tolerances.items()},
             **{k: (flag(k), v) for k, v in kw.items()}}
    if latency is False:
        flags["latency"] = ("--no-latency", False)
    else:
        flags.update({"latency.batch_sizes": ("--latency-batch", None if latency_batch is None
                                              else sorted({1, latency_batch})),
                      "latency.warmup": ("--latency-warmup", latency_warmup),
                      "latency.iterations": ("--latency-iterations", latency_iterations)})
    return build(ValidationConfig, [flag_layer(flags)])[0]
