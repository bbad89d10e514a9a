"""Matplotlib figures of a run's stages, returned as PNG bytes (Agg backend, no display needed).

Every figure shows one split: the stages' own split (test by default) or, for pruning trajectories, validation;
never both on the same axes. Bar axes start at 0; tick labels are wrapped and the figure widens with the bars."""

from __future__ import annotations

import io
import textwrap
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from fairdeploy.report.stages import RunStages, StageRecord, Trajectory
from fairdeploy.report.summary import FAIRNESS_LABELS, interval, p50_ms, passes, reference_of, worst_group
from fairdeploy.units import BYTES_PER_MB

FAIRNESS_KEYS = tuple(FAIRNESS_LABELS)
MAX_WIDTH_IN = 16.0


def _plt():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight", metadata={"Software": None})
    _plt().close(fig)
    return buf.getvalue()


def text(name: str) -> str:
    """A user-given name as literal matplotlib text (a `$` would start mathtext)."""
    return str(name).replace("$", r"\$")


def tick_label(name: str, width: int = 15) -> str:
    """A stage name on at most three short lines: broken after each '/', then wrapped at `width` characters;
    a longer one keeps its last three lines (the specific end of a path), the first marked with '…'."""
    parts = str(name).split("/")
    lines: list[str] = []
    for k, part in enumerate(parts):
        wrapped = textwrap.wrap(part, width, break_on_hyphens=True) or [""]
        if k < len(parts) - 1:
            wrapped[-1] += "/"
        lines += wrapped
    if len(lines) > 3:
        lines = ["…" + lines[-3], *lines[-2:]]
    return text("\n".join(lines))


def _stage_layout(stages: Sequence[StageRecord], min_slot_in: float) -> tuple[float, int]:
    """Figure width (inches) and tick-label rotation for one slot per stage: each slot as wide as its wrapped
    label (or `min_slot_in` for its bars), labels level; past MAX_WIDTH_IN, the labels stand upright instead."""
    chars = max((len(line) for s in stages for line in tick_label(s.name).split("\n")), default=1)
    slot = max(min_slot_in, 0.075 * chars + 0.25)  # ~0.07 in per character at 8 pt
    width = 2.5 + slot * len(stages)
    if width <= MAX_WIDTH_IN:
        return max(6.0, width), 0
    return MAX_WIDTH_IN, 90


def _set_stage_ticks(ax, x: np.ndarray, stages: Sequence[StageRecord], rotation: int) -> None:
    ax.set_xticks(x, [tick_label(s.name) for s in stages], fontsize=8, rotation=rotation, ha="center")


def _latency_label(stages: Sequence[StageRecord]) -> str:
    batches = {lat[1] for lat in map(p50_ms, stages) if lat}
    return f"median latency, batch {batches.pop()} (ms)" if len(batches) == 1 else "median latency, smallest batch (ms)"


def _groups(stages: Sequence[StageRecord]) -> list[str]:
    seen: dict[str, None] = {}
    for s in stages:
        for g in s.metrics["groups"]:
            seen.setdefault(g, None)
    return list(seen)


def _yerr(values: list[float], cis: list[tuple[float, float] | None]) -> np.ndarray | None:
    if not any(cis):
        return None
    err = np.zeros((2, len(values)))
    for i, (v, ci) in enumerate(zip(values, cis)):
        if ci is not None and not np.isnan(v):
            err[:, i] = (max(0.0, v - ci[0]), max(0.0, ci[1] - v))
    return err


def group_bars(stages: Sequence[StageRecord], key: str, ylabel: str, split: str = "test") -> bytes:
    """Grouped bars from 0 to 1: one cluster per stage, one bar per group (with its 95% CI for accuracy)."""
    plt = _plt()
    groups = _groups(stages)
    x = np.arange(len(stages))
    width = 0.8 / max(len(groups), 1)
    width_in, rotation = _stage_layout(stages, 0.25 * len(groups) + 0.3)
    fig, ax = plt.subplots(figsize=(width_in, 4.0))
    for i, g in enumerate(groups):
        vals = [float(s.metrics["groups"].get(g, {}).get(key, np.nan)) for s in stages]
        cis = [interval(s, f"accuracy[{g}]") if key == "accuracy" else None for s in stages]
        n = next((s.metrics["groups"][g]["n"] for s in stages if g in s.metrics["groups"]), None)
        ax.bar(x + (i - (len(groups) - 1) / 2) * width, vals, width, yerr=_yerr(vals, cis), capsize=2,
               label=text(f"{g} (n = {n})"))
    _set_stage_ticks(ax, x, stages, rotation)
    ax.set_ylabel(f"{ylabel} ({text(split)} split)")
    ax.set_ylim(0.0, 1.0)
    ax.legend(title="group", fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    ax.grid(axis="y", alpha=0.3)
    if key == "accuracy" and any(s.metrics.get("intervals") for s in stages):
        ax.set_title("error bars: 95% bootstrap interval", fontsize=8)
    return _png(fig)


def fairness_bars(stages: Sequence[StageRecord], split: str = "test") -> bytes:
    """The four gaps per stage as bars from 0 with their 95% bootstrap intervals."""
    plt = _plt()
    x = np.arange(len(stages))
    width = 0.8 / len(FAIRNESS_KEYS)
    width_in, rotation = _stage_layout(stages, 0.25 * len(FAIRNESS_KEYS) + 0.3)
    fig, ax = plt.subplots(figsize=(width_in, 4.0))
    for i, key in enumerate(FAIRNESS_KEYS):
        vals = [np.nan if s.metrics["fairness"].get(key) is None else float(s.metrics["fairness"][key]) for s in stages]
        ax.bar(x + (i - (len(FAIRNESS_KEYS) - 1) / 2) * width, vals, width,
               yerr=_yerr(vals, [interval(s, key) for s in stages]), capsize=2, label=FAIRNESS_LABELS[key])
    _set_stage_ticks(ax, x, stages, rotation)
    ax.set_ylabel(f"gap, lower is fairer ({text(split)} split)")
    ax.set_ylim(bottom=0.0)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    ax.grid(axis="y", alpha=0.3)
    ax.set_title("error bars: 95% bootstrap interval", fontsize=8)
    return _png(fig)


_LABEL_OFFSETS = ((6, 4), (6, -11), (-14, 4), (-14, -11))


def _number_points(ax, xs: Sequence[float], ys: Sequence[float], numbers: Sequence[int]) -> None:
    """Write each point's number beside it; points at the same place share one label ("1,2,4"), and labels of
    points at the same height take turns around their points (right-above, right-below, left-above, left-below)
    so that neighbours do not overprint."""
    at: dict[tuple[float, float], list[str]] = {}
    for x, y, n in zip(xs, ys, numbers):
        at.setdefault((round(float(x), 9), round(float(y), 9)), []).append(str(n))
    turn: dict[float, int] = {}
    for (x, y), ns in sorted(at.items()):
        k = turn.get(y, 0)
        turn[y] = k + 1
        ax.annotate(",".join(ns), (x, y), fontsize=8, xytext=_LABEL_OFFSETS[k % len(_LABEL_OFFSETS)],
                    textcoords="offset points")


@dataclass(frozen=True)
class ParetoPoint:
    name: str
    macs: int | None
    latency_ms: float | None  # median at batch 1 (or the smallest measured batch)
    worst_group_accuracy: float
    status: str  # "pass" | "fail" | "reference"


def pareto_points(stages: Sequence[StageRecord]) -> list[ParetoPoint]:
    """One point per artifact: its MACs, median latency and worst-group accuracy, and its gate status."""
    out = []
    for s in stages:
        lat = p50_ms(s)
        status = "reference" if s.gate_passed is None else ("pass" if passes(s) else "fail")
        out.append(ParetoPoint(s.name, s.macs or None, lat[0] if lat else None, worst_group(s).accuracy, status))
    return out


def pareto_front(points: Sequence[tuple[float, float]]) -> list[int]:
    """Indices of the points no other point beats: lower or equal cost and higher or equal accuracy, one strictly."""
    front = []
    for i, (c, a) in enumerate(points):
        if not any((c2 <= c and a2 >= a) and (c2 < c or a2 > a) for j, (c2, a2) in enumerate(points) if j != i):
            front.append(i)
    return front


_STATUS_STYLE = {"pass": dict(marker="o", s=70, edgecolors="black", linewidths=1.0),
                 "fail": dict(marker="X", s=70, edgecolors="black", linewidths=0.5),
                 "reference": dict(marker="s", s=55, edgecolors="black", linewidths=0.5)}


def pareto(stages: Sequence[StageRecord], split: str = "test") -> bytes | None:
    """Worst-group accuracy against MACs and against latency, one numbered point per artifact (the numbers are
    keyed in the legend); gate pass = circle, fail = cross, reference (no gate) = square; the dashed line joins
    the points no other beats."""
    points = pareto_points(stages)
    axes_spec = [(a, lbl) for a, lbl in (("macs", "MACs per image (millions)"),
                                          ("latency_ms", _latency_label(stages)))
                 if any(getattr(p, a) is not None for p in points)]
    if not axes_spec:
        return None
    plt = _plt()
    cmap = plt.get_cmap("tab10")
    fig, axes = plt.subplots(1, len(axes_spec), figsize=(5.0 * len(axes_spec) + 2.5, 4.4), squeeze=False)
    for ax, (attr, label) in zip(axes[0], axes_spec):
        shown = [(i, p) for i, p in enumerate(points) if getattr(p, attr) is not None]
        xs = [getattr(p, attr) / (1e6 if attr == "macs" else 1.0) for _, p in shown]
        ys = [p.worst_group_accuracy for _, p in shown]
        for (i, p), xv, yv in zip(shown, xs, ys):
            ax.scatter([xv], [yv], color=cmap(i % 10), zorder=3, label=text(f"{i + 1}: {p.name} ({p.status})"),
                       **_STATUS_STYLE[p.status])
        _number_points(ax, xs, ys, [i + 1 for i, _ in shown])
        front = sorted(pareto_front(list(zip(xs, ys))), key=lambda k: xs[k])
        if len(front) > 1:
            ax.plot([xs[k] for k in front], [ys[k] for k in front], "--", color="grey", lw=1, zorder=1)
        ax.set_xlabel(label)
        ax.set_ylabel(f"worst-group accuracy ({text(split)} split)")
        ax.set_xlim(left=0.0, right=max(xs) * 1.15 if max(xs) > 0 else 1.0)
        ax.grid(alpha=0.3)
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=8,
               title="artifact (gate)", title_fontsize=8)
    fig.tight_layout()
    return _png(fig)


def tradeoff(stages: Sequence[StageRecord], split: str = "test") -> bytes | None:
    """Overall accuracy against Eodd, one numbered point per stage, on the stages' split only."""
    pts = [(i, s) for i, s in enumerate(stages) if s.metrics["fairness"].get("eodd") is not None]
    if not pts:
        return None
    plt = _plt()
    cmap = plt.get_cmap("tab10")
    fig, ax = plt.subplots(figsize=(9.0, 4.6))
    for i, s in pts:
        e, a = s.metrics["fairness"]["eodd"], s.metrics["overall"]["accuracy"]
        ci = interval(s, "eodd")
        ax.errorbar([e], [a], xerr=None if ci is None else [[max(0.0, e - ci[0])], [max(0.0, ci[1] - e)]],
                    fmt="o", color=cmap(i % 10), capsize=2, label=text(f"{i + 1}: {s.name}"))
    _number_points(ax, [s.metrics["fairness"]["eodd"] for _, s in pts],
                   [s.metrics["overall"]["accuracy"] for _, s in pts], [i + 1 for i, _ in pts])
    ax.set_xlabel("Eodd, lower is fairer (bar: 95% bootstrap interval)")
    ax.set_ylabel(f"accuracy ({text(split)} split)")
    ax.set_xlim(left=0.0)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.0, 0.5))
    return _png(fig)


def is_frontier(t: Trajectory) -> bool:
    """A compression run's rounds (with the MACs each kept), drawn by `frontier`, not by `trajectories`."""
    return bool(t.points) and all("macs" in p for p in t.points)


def frontier(trajs: Sequence[Trajectory]) -> bytes | None:
    """The compression frontier on the validation split: worst-group accuracy, Eodd and macro-F1 against the
    fraction of the input model's MACs kept, one line per run (candidate and control), a filled marker where the
    guard accepted the round and a hollow one where it did not."""
    runs = [t for t in trajs if is_frontier(t) and len(t.points) > 1]
    if not runs:
        return None
    plt = _plt()
    fig, axes = plt.subplots(1, 3, figsize=(13.0, 3.8))
    panels = (("worst_group_accuracy", "worst-group accuracy"), ("eodd", "Eodd, lower is fairer"),
              ("f1_macro", "macro-F1"))
    for i, t in enumerate(runs):
        base = t.points[0]["macs"]
        x = [p["macs"] / base for p in t.points]
        color = f"C{i}"
        for ax, (key, _label) in zip(axes, panels):
            y = [p.get(key) if p.get(key) is not None else float("nan") for p in t.points]
            ax.plot(x, y, color=color, label=text(t.name))
            ok = [j for j, p in enumerate(t.points) if p.get("passed", True)]
            bad = [j for j, p in enumerate(t.points) if not p.get("passed", True)]
            ax.scatter([x[j] for j in ok], [y[j] for j in ok], color=color, zorder=3)
            ax.scatter([x[j] for j in bad], [y[j] for j in bad], facecolors="white", edgecolors=color, zorder=3)
    from matplotlib.ticker import FixedLocator, NullLocator

    xs = sorted({round(p["macs"] / t.points[0]["macs"], 2) for t in runs for p in t.points}, reverse=True)
    ticks = [x for i, x in enumerate(xs) if i == 0 or xs[i - 1] / x > 1.15]  # labels at least ~15 % apart
    for ax, (_key, label) in zip(axes, panels):
        ax.set_xscale("log")
        ax.invert_xaxis()  # compression grows to the right
        ax.xaxis.set_major_locator(FixedLocator(ticks))
        ax.xaxis.set_minor_locator(NullLocator())
        ax.set_xticklabels([f"x{x:g}" for x in ticks])
        ax.set_xlabel("MACs kept (fraction of the input model, log scale)")
        ax.set_ylabel(f"{label} (validation)")
        ax.grid(alpha=0.3, which="both")
    axes[1].set_ylim(bottom=0.0)
    axes[0].legend(fontsize=8, title="filled: guard passed", title_fontsize=8)
    fig.tight_layout()
    return _png(fig)


def trajectories(trajs: Sequence[Trajectory]) -> bytes | None:
    """Accuracy and Eodd per pruning step of each FairPrune / SNNL step run, on the validation split (the split
    pruning selects on); compression runs are drawn by `frontier`."""
    runs = [t for t in trajs if not is_frontier(t) and any(p.get("eodd") is not None for p in t.points)]
    if not runs:
        return None
    plt = _plt()
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11.0, 3.8))
    for t in runs:
        pts = [p for p in t.points if p.get("eodd") is not None]
        steps = [p["step"] for p in pts]
        a1.plot(steps, [p["accuracy"] for p in pts], marker="o", label=text(t.name))
        a2.plot(steps, [p["eodd"] for p in pts], marker="o", label=text(t.name))
    a1.set_ylabel("accuracy (validation split)")
    a2.set_ylabel("Eodd (validation split)")
    a2.set_ylim(bottom=0.0)
    for ax in (a1, a2):
        ax.set_xlabel("pruning step (0 = input model)")
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    return _png(fig)


@dataclass(frozen=True)
class ConfusionPanel:
    stage: str
    reference: str
    group: str
    delta: np.ndarray  # K x K, stage minus reference (rows true, columns predicted)


def confusion_panels(run_stages: RunStages) -> tuple[list[ConfusionPanel], list[str]]:
    """Per stage and group with samples, its confusion matrix minus its reference's, where it changed. A stage with
    no change in any group (e.g. an FP32 export) is left out and named in the second list."""
    panels: list[ConfusionPanel] = []
    unchanged: list[str] = []
    for s in run_stages.stages:
        ref = reference_of(run_stages, s)
        if ref is None:
            continue
        mine = []
        for g, m in ref.metrics["groups"].items():
            if int(m.get("n", 1)) == 0 or g not in s.metrics["groups"]:
                continue
            delta = np.asarray(s.metrics["groups"][g]["confusion"]) - np.asarray(m["confusion"])
            if delta.any():
                mine.append(ConfusionPanel(s.name, ref.name, g, delta))
        panels += mine
        if not mine:
            unchanged.append(s.name)
    return panels, unchanged


def confusion_deltas(panels: Sequence[ConfusionPanel], classes: Sequence[str]) -> bytes | None:
    """One row of panels per stage (its groups side by side), each panel's colour scale symmetric around 0."""
    if not panels:
        return None
    plt = _plt()
    rows = list(dict.fromkeys(p.stage for p in panels))
    cols = max(sum(1 for p in panels if p.stage == r) for r in rows)
    K = len(classes)
    side = max(2.4, 0.45 * K + 1.0)
    fig, axes = plt.subplots(len(rows), cols, figsize=(min(MAX_WIDTH_IN, side * cols + 0.5), side * len(rows) + 0.6),
                             squeeze=False)
    short = [c if len(c) <= 10 else c[:9] + "…" for c in classes]
    for i, r in enumerate(rows):
        mine = [p for p in panels if p.stage == r]
        for j in range(cols):
            ax = axes[i][j]
            if j >= len(mine):
                ax.axis("off")
                continue
            p = mine[j]
            m = max(1, int(np.abs(p.delta).max()))
            ax.imshow(p.delta, cmap="RdBu_r", vmin=-m, vmax=m)
            for (rr, cc), v in np.ndenumerate(p.delta):
                if v:
                    ax.text(cc, rr, f"{v:+d}", ha="center", va="center", fontsize=7,
                            color="white" if abs(v) > m / 2 else "black")
            ax.set_xticks(range(K), [text(c) for c in short], fontsize=7, rotation=45, ha="right")
            ax.set_yticks(range(K), [text(c) for c in short], fontsize=7)
            ax.set_title(text(f"{tick_label(p.stage, 28)}\nminus {p.reference} | {p.group}"), fontsize=7)
    fig.suptitle("confusion-matrix change (rows: true class, columns: predicted; blank cell = no change; "
                 "groups without change not drawn)", fontsize=8)
    fig.tight_layout()
    return _png(fig)


def size_latency(stages: Sequence[StageRecord]) -> bytes | None:
    """File size and median latency per artifact, bars from 0."""
    sized = [s for s in stages if s.size_bytes or s.latency]
    if not sized:
        return None
    plt = _plt()
    width_in, rotation = _stage_layout(sized, 0.6)
    fig, (a1, a2) = plt.subplots(2, 1, figsize=(width_in, 7.0))
    x = np.arange(len(sized))
    a1.bar(x, [(s.size_bytes or 0) / BYTES_PER_MB for s in sized])
    a1.set_ylabel("artifact file size (MB)")
    lat = [p50_ms(s) for s in sized]
    a2.bar(x, [np.nan if v is None else v[0] for v in lat])
    a2.set_ylabel(_latency_label(sized))
    for ax in (a1, a2):
        _set_stage_ticks(ax, x, sized, rotation)
        ax.set_ylim(bottom=0.0)
        ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    return _png(fig)
