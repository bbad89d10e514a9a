"""Rich tables of metric reports, shared by the commands that print them."""

from __future__ import annotations

from rich.table import Table

from fairdeploy.metrics import MetricsReport


def fmt_number(v: float | None, digits: int = 4) -> str:
    """A metric in a CLI table: fixed digits, `n/a` where it is undefined."""
    return "n/a" if v is None else f"{v:.{digits}f}"


def metrics_table(report: MetricsReport, title: str = "Per-group metrics") -> Table:
    table = Table(title=title)
    for col in ("group", "n", "accuracy", "precision", "recall", "F1"):
        table.add_column(col, justify="right" if col != "group" else "left")
    for name, m in report.groups:
        table.add_row(name, str(m.n), fmt_number(m.accuracy), fmt_number(m.precision_macro), fmt_number(m.recall_macro), fmt_number(m.f1_macro))
    table.add_row("[bold]overall[/bold]", str(report.n), fmt_number(report.overall_accuracy), "", "", fmt_number(report.overall_f1_macro))
    return table


def fairness_table(report: MetricsReport) -> Table:
    intervals = dict(report.intervals)
    table = Table(title=f"Fairness gaps (K={report.num_classes}; undefined (class, group) cells: {report.undefined_cells})")
    table.add_column("metric")
    table.add_column("value", justify="right")
    table.add_column("95% CI", justify="right")
    table.add_column("worst pair")
    worst = dict(report.worst_pair)
    for key, value in report.fairness:
        ci = intervals.get(key)
        pair = worst.get(key)
        table.add_row(key, fmt_number(value), f"[{ci[0]:.4f}, {ci[1]:.4f}]" if ci else "", " vs ".join(pair) if pair else "")
    acc_ci = intervals.get("accuracy_diff")
    table.add_row("accuracy diff", fmt_number(report.summary()["accuracy"]["diff"]),
                  f"[{acc_ci[0]:.4f}, {acc_ci[1]:.4f}]" if acc_ci else "", "")
    return table
