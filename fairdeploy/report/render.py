"""build_report: report.md (with PNGs beside it) and a self-contained report.html (PNGs embedded)."""

from __future__ import annotations

import base64
import html
import os
import re
from dataclasses import dataclass, replace
from pathlib import Path

from fairdeploy.files.atomic import atomic_dir, atomic_path
from fairdeploy.metrics import METRIC_DEFINITIONS
from fairdeploy.report import plots, summary
from fairdeploy.report.stages import RunStages, StageRecord, load_stages
from fairdeploy.units import BYTES_PER_MB


@dataclass(frozen=True)
class ReportPaths:
    markdown: Path
    html: Path
    figures: tuple[Path, ...]


def _fixed(value: float | None, digits: int = 4) -> str:
    """`value` with `digits` decimals; n/a when it is undefined."""
    return "n/a" if value is None else f"{value:.{digits}f}"


def stage_table(run: RunStages) -> tuple[list[str], list[list[str]]]:
    groups: list[str] = []
    for s in run.stages:
        for g in s.metrics["groups"]:
            if g not in groups:
                groups.append(g)
    head = ["stage", "runtime", "precision", "accuracy", "macro-F1", *[f"acc[{g}]" for g in groups],
            "Eodd", "Eopp0", "Eopp1", "DP", "agreement", "MACs M", "size MB", "p50 ms (b=1)", "gate"]
    rows = []
    for s in run.stages:
        m = s.metrics
        gate = "" if s.gate_passed is None else ("pass" if summary.passes(s) else "FAIL: " + "; ".join(summary.failures(s)))
        rows.append([
            s.name, s.kind, s.precision, _fixed(m["overall"]["accuracy"]), _fixed(m["overall"]["f1_macro"]),
            *[_fixed(m["groups"].get(g, {}).get("accuracy")) for g in groups],
            *[_fixed(m["fairness"].get(k)) for k in ("eodd", "eopp0", "eopp1", "dp")],
            _fixed(s.agreement), _fixed(s.macs / 1e6, 1) if s.macs else "",
            _fixed(s.size_bytes / BYTES_PER_MB, 2) if s.size_bytes else "",
            _fixed((s.latency or {}).get("batch1_p50_ms"), 2) if s.latency else "", gate,
        ])
    return head, rows


CONTROL_SUFFIX = "-control"


def control_legend(run: RunStages) -> str | None:
    """One sentence saying which stages are fairness-blind controls, when the run has any."""
    names = {s.name for s in run.stages}
    pairs = [n for n in names if n.endswith(CONTROL_SUFFIX) and n.removesuffix(CONTROL_SUFFIX) in names]
    if not pairs:
        return None
    shown = ", ".join(f"`{n}` controls `{n.removesuffix(CONTROL_SUFFIX)}`" for n in sorted(pairs))
    return (f"Stages named `NAME{CONTROL_SUFFIX}` (and their artifacts) are the control of compression run `NAME`: a "
            f"fairness-blind criterion (or fine-tuning alone, or plain recovery), searching to the same tolerance or "
            f"pruning to the same budget, with the same rounds, fine-tuning, "
            f"data order and seed ({shown}). "
            "Compare each pair row by row; the notes give the paired comparison on validation.")


def _figures(run: RunStages) -> list[tuple[str, str, bytes]]:
    stages, split = list(run.stages), run.split
    panels, unchanged = plots.confusion_panels(run)
    classes = stages[0].metrics.get("class_names", []) if stages else []
    confusion_title = "Confusion-matrix change per group against each stage's reference"
    if unchanged:
        confusion_title += f" (no change, not drawn: {', '.join(unchanged)})"
    figs: list[tuple[str, str, bytes | None]] = [
        ("pareto.png", f"Worst-group accuracy against MACs and latency, one point per artifact ({split} split)",
         plots.pareto(stages, split)),
        ("accuracy_by_group.png", f"Per-group accuracy per stage, with 95% intervals ({split} split)",
         plots.group_bars(stages, "accuracy", "accuracy", split)),
        ("fairness.png", f"Fairness gaps per stage, with 95% intervals ({split} split)",
         plots.fairness_bars(stages, split)),
        ("f1_by_group.png", f"Per-group macro-F1 per stage ({split} split)",
         plots.group_bars(stages, "f1_macro", "macro-F1", split)),
        ("tradeoff.png", f"Accuracy against Eodd per stage ({split} split)", plots.tradeoff(stages, split)),
        ("frontier.png", "Compression frontier: worst-group accuracy, Eodd and macro-F1 against the MACs kept, every "
         "round of each compression run and of its control (validation split; hollow markers: the guard rejected "
         "the round)", plots.frontier(run.trajectories)),
        ("trajectory.png", "Pruning steps: accuracy and Eodd (validation split)", plots.trajectories(run.trajectories)),
        ("confusion_delta.png", confusion_title, plots.confusion_deltas(panels, classes)),
        ("size_latency.png", "Artifact file size and latency per stage", plots.size_latency(stages)),
    ]
    return [(n, t, b) for n, t, b in figs if b is not None]


_MD_SPECIAL = re.compile(r"([\\`*_\[\]|~#!])")


def md_escape(text: str) -> str:
    """Text from the user (stage and group names, candidate labels) as inert markdown: HTML special characters
    become entities, markdown punctuation is backslash-escaped (a table's `|` too), line breaks become spaces."""
    text = html.escape(" ".join(str(text).splitlines()), quote=False)
    return _MD_SPECIAL.sub(r"\\\1", text)


def _code_span(text: str) -> str:
    """A name shown inside `backticks`: HTML is not interpreted there; only a backtick or line break could end it."""
    return " ".join(str(text).splitlines()).replace("`", "'")


def _escaped(run: RunStages, esc) -> RunStages:  # type: ignore[no-untyped-def]
    """The run with every user-given name (stage, reference, groups, gate failures) passed through `esc`."""
    def stage(s: StageRecord) -> StageRecord:
        metrics = {**s.metrics, "groups": {esc(g): v for g, v in s.metrics.get("groups", {}).items()}}
        return replace(s, name=esc(s.name), reference=None if s.reference is None else esc(s.reference),
                       metrics=metrics, gate_failures=tuple(esc(f) for f in s.gate_failures),
                       guard_failure=None if s.guard_failure is None else esc(s.guard_failure))

    return replace(run, stages=tuple(stage(s) for s in run.stages))


def _md_table(head: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(head) + " |", "|" + "---|" * len(head), *("| " + " | ".join(r) + " |" for r in rows)]


def _sections(run: RunStages, esc) -> list[tuple[str, str, tuple[list[str], list[list[str]]]]]:  # type: ignore[no-untyped-def]
    """The tables after the answer: (title, sentence under it, (head, rows)); names passed through `esc`."""
    return [
        ("Artifacts", "Gate, size, latency, the worst group with its size, and Eodd of every stage.",
         summary.artifact_table(run, esc)),
        ("Per-group accuracy", "Accuracy of each group with its 95% percentile bootstrap interval (resampling "
         "within each group); n is the number of images of the group in the split.", summary.group_table(run, esc)),
        ("Fairness against the reference", "Each gap of a stage minus that of the model it was validated against "
         "(a pruned model: minus the first stage). The interval of the difference is paired: both models scored on "
         "the same resamples of the same images. Where it contains 0 the change is not distinguishable from "
         "resampling noise. A pruned model has no paired interval (its predictions are not kept beside the first "
         "stage's): there, overlapping intervals of the two gaps are read as not distinguishable.",
         summary.fairness_table(run, esc)),
    ]


def _markdown(run: RunStages, figs: list[tuple[str, str, bytes]], fig_dir: str) -> str:
    head, rows = stage_table(_escaped(run, md_escape))
    intro = (f"Metrics on the `{_code_span(run.split)}` split; every stage runs the same images through the same "
             "preprocessing.")
    lines = [f"# {md_escape(run.title)}", "", intro, "", "## Answer", ""]
    lines += [f"- {line}" for line in summary.headline(run, md_escape)]
    for note in run.notes:
        lines += ["", f"> {md_escape(note)}"]
    for title, sentence, (h, r) in _sections(run, md_escape):
        lines += ["", f"## {title}", "", sentence, "", *_md_table(h, r)]
    lines += ["", "## All metrics", "", *_md_table(head, rows)]
    legend = control_legend(_escaped(run, _code_span))
    if legend:
        lines += ["", legend]
    for name, title, _ in figs:
        lines += ["", f"## {md_escape(title)}", "", f"![{md_escape(title)}]({fig_dir}/{name})"]
    lines += ["", "## Metric definitions", ""]
    lines += [f"- **{k}**: {v}" for k, v in METRIC_DEFINITIONS.items()]
    return "\n".join(lines) + "\n"


def _html_table(head: list[str], rows: list[list[str]]) -> list[str]:
    e = html.escape
    return ["<table><tr>" + "".join(f"<th>{e(h)}</th>" for h in head) + "</tr>",
            *("<tr>" + "".join(f"<td>{e(c)}</td>" for c in r) + "</tr>" for r in rows), "</table>"]


def _html(run: RunStages, figs: list[tuple[str, str, bytes]]) -> str:
    head, rows = stage_table(run)
    e = html.escape
    answer = summary.headline(run)
    passed = summary.best_passing(run) is not None
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'>", GENERATOR,
        f"<title>{e(run.title)}</title>",
        "<style>body{font-family:sans-serif;max-width:1200px;margin:2em auto;padding:0 1em}"
        "table{border-collapse:collapse;font-size:13px;margin-bottom:1em}"
        "td,th{border:1px solid #ccc;padding:3px 6px;text-align:right}td{white-space:nowrap}td:last-child{white-space:normal}"
        "td:first-child,th:first-child{text-align:left}img{max-width:100%}"
        ".answer{border-left:6px solid;padding:.4em 1em;margin:1em 0}.pass{border-color:#2a7;background:#eef9f2}"
        ".fail{border-color:#c33;background:#fbeeee}.answer p{margin:.4em 0}</style></head><body>",
        f"<h1>{e(run.title)}</h1>",
        f"<p>Metrics on the <code>{e(run.split)}</code> split; every stage runs the same images through the same "
        "preprocessing.</p>",
        f"<div class='answer {'pass' if passed else 'fail'}'><h2>Answer</h2>",
        *(f"<p>{'<b>' + e(line) + '</b>' if i == 0 else e(line)}</p>" for i, line in enumerate(answer)),
        "</div>",
    ]
    parts += [f"<blockquote>{e(n)}</blockquote>" for n in run.notes]
    for title, sentence, (h, r) in _sections(run, lambda t: t):
        parts += [f"<h2>{e(title)}</h2>", f"<p>{e(sentence)}</p>", *_html_table(h, r)]
    parts += ["<h2>All metrics</h2>", *_html_table(head, rows)]
    legend = control_legend(run)
    if legend:
        parts += [f"<p>{e(legend).replace('`', '')}</p>"]
    for _, title, png in figs:
        b64 = base64.b64encode(png).decode("ascii")
        parts += [f"<h2>{e(title)}</h2>", f"<img alt='{e(title)}' src='data:image/png;base64,{b64}'>"]
    parts += ["<h2>Metric definitions</h2><ul>"]
    parts += [f"<li><b>{e(k)}</b>: {e(v)}</li>" for k, v in METRIC_DEFINITIONS.items()]
    parts += ["</ul></body></html>"]
    return "\n".join(parts) + "\n"


REPORT_FILES = ("report.md", "report.html", "report_files")
GENERATOR = "<meta name='generator' content='fairdeploy report'>"


def _only_figures(folder: Path) -> bool:
    """report_files/ holds nothing but the PNG figures a report wrote (so it may be replaced)."""
    return all(p.is_file() and p.suffix == ".png" for p in folder.iterdir())


def report_owns(out: Path) -> bool:
    """`out` holds none of the report's file names, or holds them as an earlier report wrote them (its HTML
    carries the generator tag): the report may write there without replacing anything of someone else's."""
    present = [n for n in REPORT_FILES if (out / n).exists() or (out / n).is_symlink()]
    if not present:
        return True
    html = out / "report.html"
    try:
        with open(html, encoding="utf-8", errors="replace") as f:
            head = f.read(4096)
    except OSError:
        return False
    figures = out / "report_files"
    return GENERATOR in head and (not figures.is_dir() or _only_figures(figures))


def build_report(run_dir: str | os.PathLike[str], out_dir: str | os.PathLike[str] | None = None) -> ReportPaths:
    """Write report.md, report_files/*.png and report.html into out_dir (default: the run dir)."""
    run = load_stages(run_dir)
    out = Path(out_dir) if out_dir is not None else Path(run_dir)
    figs = _figures(run)
    fig_dir = out / "report_files"
    with atomic_dir(fig_dir, owner=_only_figures) as tmp:
        for name, _, png in figs:
            (tmp / name).write_bytes(png)
    with atomic_path(out / "report.md") as tmp:
        tmp.write_text(_markdown(run, figs, "report_files"))
    with atomic_path(out / "report.html") as tmp:
        tmp.write_text(_html(run, figs))
    return ReportPaths(out / "report.md", out / "report.html", tuple(fig_dir / n for n, _, _ in figs))
