"""The report's answer first: which artifact passes every gate, its size and latency, per-group numbers with
confidence intervals and group sizes, and whether each fairness change against the reference is distinguishable."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from fairdeploy.report.stages import RunStages, StageRecord
from fairdeploy.speed import SpeedVsFp32
from fairdeploy.units import BYTES_PER_MB, megabytes

FAIRNESS_LABELS = {"eodd": "Eodd", "eopp0": "Eopp0", "eopp1": "Eopp1", "dp": "DP"}

Escape = Callable[[str], str]


def _same(text: str) -> str:
    return text


def interval(stage: StageRecord, key: str) -> tuple[float, float] | None:
    """The bootstrap interval compute_metrics stored under `key` ("eodd", "accuracy[g]", ...), if any."""
    ci = stage.metrics.get("intervals", {}).get(key)
    return None if ci is None else (float(ci[0]), float(ci[1]))


def group_sizes(stage: StageRecord) -> dict[str, int]:
    return {g: int(m["n"]) for g, m in stage.metrics["groups"].items()}


@dataclass(frozen=True)
class WorstGroup:
    name: str
    n: int
    accuracy: float
    ci: tuple[float, float] | None


def worst_group(stage: StageRecord) -> WorstGroup:
    """The group with the lowest accuracy (the first in the report's order on a tie)."""
    name, m = min(stage.metrics["groups"].items(), key=lambda item: item[1]["accuracy"])
    return WorstGroup(name, int(m["n"]), float(m["accuracy"]), interval(stage, f"accuracy[{name}]"))


def p50_ms(stage: StageRecord) -> tuple[float, int] | None:
    """Median latency at batch 1, else at the smallest measured batch: (ms, batch size)."""
    lat = stage.latency or {}
    batches = sorted(int(k[len("batch"):-len("_p50_ms")]) for k in lat if k.startswith("batch") and k.endswith("_p50_ms"))
    return None if not batches else (float(lat[f"batch{batches[0]}_p50_ms"]), batches[0])


def speed_vs_fp32(stage: StageRecord) -> SpeedVsFp32 | None:
    """Its latency against the FP32 artifact timed on the same runtime, when validation measured both."""
    return None if not stage.latency_vs_fp32 else SpeedVsFp32.from_dict(stage.latency_vs_fp32)


def slower_than_fp32(stage: StageRecord) -> bool:
    speed = speed_vs_fp32(stage)
    return speed is not None and speed.slower


def gated(run: RunStages) -> list[StageRecord]:
    """The artifacts a gate was applied to (every candidate of a validation)."""
    return [s for s in run.stages if s.gate_passed is not None]


def passes(s: StageRecord) -> bool:
    """Passes every gate: its validation gate, and the pruning guard of the model it comes from."""
    return bool(s.gate_passed) and s.guard_failure is None


def failures(s: StageRecord) -> tuple[str, ...]:
    return (*s.gate_failures, *((s.guard_failure,) if s.guard_failure else ()))


def _inf(v: float | None) -> float:
    return float("inf") if not v else float(v)


def _rank(s: StageRecord) -> tuple[float, bool, float, float, float]:
    """Highest worst-group accuracy first, then not slower than FP32 on its runtime, the smallest file, the fewest
    MACs, the lowest latency."""
    lat = p50_ms(s)
    return (-worst_group(s).accuracy, slower_than_fp32(s), _inf(s.size_bytes), _inf(s.macs),
            lat[0] if lat else float("inf"))


def best_passing(run: RunStages) -> StageRecord | None:
    """Of the artifacts that pass every gate, the one whose worst group does best (ties: one not slower than the
    FP32 artifact on its runtime, then the smallest file, the fewest MACs, the lowest latency); None when none
    passes."""
    passing = [s for s in gated(run) if passes(s)]
    return min(passing, key=_rank) if passing else None


def reference_of(run: RunStages, stage: StageRecord) -> StageRecord | None:
    """The stage `stage` is compared with: its validation reference, or (a model stage other than the first,
    e.g. a pruned model) the run's first stage."""
    by_name = {s.name: s for s in run.stages}
    if stage.reference is not None:
        return by_name.get(stage.reference)
    return None if stage is run.stages[0] else run.stages[0]


@dataclass(frozen=True)
class FairnessChange:
    """One fairness gap of a stage against its reference: values, intervals and the reading."""

    key: str
    reference: float
    candidate: float
    reference_ci: tuple[float, float] | None
    candidate_ci: tuple[float, float] | None
    delta_ci: tuple[float, float] | None  # paired interval of candidate - reference (validation only)
    degenerate: str | None = None  # which of the two predicts a single class (its gaps are 0 by construction)

    @property
    def delta(self) -> float:
        return self.candidate - self.reference

    @property
    def reading(self) -> str:
        """'not comparable' when either model predicts a single class (never 'fairer': its gaps are 0 because it
        tells no one apart); 'not distinguishable' when the paired interval of the difference contains 0 (or,
        without one, when the two intervals overlap); 'lower' / 'higher' when it excludes 0; 'no interval'
        without bootstrap."""
        if self.degenerate is not None:
            return f"not comparable: {self.degenerate} (a one-class model's gaps are 0 by construction)"
        if self.delta_ci is not None:
            lo, hi = self.delta_ci
            if lo <= 0 <= hi:
                return "not distinguishable (interval of the difference contains 0)"
            return "lower (fairer)" if hi < 0 else "higher (less fair)"
        if self.reference_ci is not None and self.candidate_ci is not None:
            (a, b), (c, d) = self.reference_ci, self.candidate_ci
            if a <= d and c <= b:
                return "not distinguishable (the two intervals overlap)"
            return "lower (fairer)" if self.delta < 0 else "higher (less fair)"
        return "no interval (bootstrap off)"

    @property
    def distinguishable(self) -> bool | None:
        r = self.reading
        return None if r.startswith(("no interval", "not comparable")) else not r.startswith("not distinguishable")


def predicts_one_class(stage: StageRecord) -> bool:
    """Every image of the stage's split got the same class (the per-group confusion matrices, rows true and
    columns predicted, have one non-empty column between them, of more than one: the rule of
    fairdeploy.validation.compare.single_class)."""
    columns = [np.asarray(m["confusion"]).sum(axis=0) for m in stage.metrics["groups"].values() if m.get("confusion")]
    if not columns:
        return False
    total = sum(columns)  # images predicted as each class
    return len(stage.metrics.get("class_names") or total) > 1 and np.count_nonzero(total) == 1


def degenerate_pair(stage: StageRecord, ref: StageRecord) -> str | None:
    """Which of a stage and its reference predicts a single class, in words without user-given names."""
    one, other = predicts_one_class(stage), predicts_one_class(ref)
    if one and other:
        return "both models predict a single class"
    if one or other:
        return f"the {'candidate' if one else 'reference'} predicts a single class"
    return None


def fairness_changes(run: RunStages, stage: StageRecord) -> list[FairnessChange]:
    ref = reference_of(run, stage)
    if ref is None:
        return []
    degenerate = degenerate_pair(stage, ref)
    out = []
    for key in FAIRNESS_LABELS:
        a, b = ref.metrics["fairness"].get(key), stage.metrics["fairness"].get(key)
        if a is None or b is None:
            continue
        d = (stage.delta_intervals or {}).get(key) if stage.reference == ref.name else None
        out.append(FairnessChange(key, float(a), float(b), interval(ref, key), interval(stage, key),
                                  None if d is None else (float(d[0]), float(d[1])), degenerate))
    return out


def fmt_ci(value: float | None, ci: tuple[float, float] | None, digits: int = 3, sign: bool = False) -> str:
    if value is None:
        return "n/a"
    f = f"{{:{'+' if sign else ''}.{digits}f}}"

    def show(v: float) -> str:
        return f.format(v + 0.0 if round(v, digits) != 0 else 0.0)  # no "-0.000"

    return show(value) + ("" if ci is None else f" [{show(ci[0])}, {show(ci[1])}]")


def _size_words(s: StageRecord, esc: Escape = _same) -> str:
    parts = []
    if s.size_bytes:
        parts.append(f"{megabytes(s.size_bytes)} file")
    if s.macs:
        parts.append(f"{s.macs / 1e6:.1f} M MACs per image")
    lat = p50_ms(s)
    if lat:
        parts.append(f"{lat[0]:.2f} ms median latency at batch {lat[1]}")
    words = ", ".join(parts) or "size and latency not recorded"
    speed = speed_vs_fp32(s)
    return f"{words}; {esc(speed.describe())}" if speed is not None and speed.slower else words


def _fairness_words(run: RunStages, s: StageRecord, esc: Escape) -> str:
    changes = {c.key: c for c in fairness_changes(run, s)}
    eodd = changes.get("eodd")
    if eodd is None:
        return ""
    ref = reference_of(run, s)
    assert ref is not None
    what = (f"Eodd {fmt_ci(eodd.candidate, eodd.candidate_ci)} against {fmt_ci(eodd.reference, eodd.reference_ci)} "
            f"for {esc(ref.name)} (difference {fmt_ci(eodd.delta, eodd.delta_ci, sign=True)}): {eodd.reading}")
    apart = [FAIRNESS_LABELS[c.key] for c in changes.values() if c.distinguishable]
    rest = (f"; of the four gaps, {', '.join(apart)} differ beyond the interval" if apart
            else "; no fairness gap differs beyond its interval" if any(c.distinguishable is False for c in changes.values())
            else "")
    return what + rest + "."


def _art_words(s: StageRecord, esc: Escape) -> str:
    wg = worst_group(s)
    return f"{esc(s.name)} ({_size_words(s, esc)}; worst group {esc(wg.name)} {fmt_ci(wg.accuracy, wg.ci)})"


def headline(run: RunStages, esc: Escape = _same) -> list[str]:
    """Sentences answering 'which artifact can I ship?': the passing artifact whose worst group does best, with
    its size, latency, worst group (n, accuracy with CI) and fairness against its reference; the smallest and the
    fastest passing ones where they differ; or that none passes and which gate each one fails. `esc` makes a
    user-given name (stage, group, failure text) safe for the output."""
    arts = gated(run)
    if not arts:
        return ["No artifact was gated: this run holds no candidate validated against a reference."]
    passing = [s for s in arts if passes(s)]
    if not passing:
        lines = [f"No artifact passes every gate ({len(arts)} checked)."]
        for s in arts:
            why = "; ".join(esc(f) for f in failures(s)) or "failed (no reason recorded)"
            lines.append(f"{esc(s.name)} fails: {why}")
        return lines
    best = best_passing(run)
    assert best is not None
    wg = worst_group(best)
    ties = [s for s in passing if s is not best and worst_group(s).accuracy == wg.accuracy]
    tied = len(ties)
    rule = ("the smallest file of them not slower than FP32 on its runtime"
            if any(slower_than_fp32(s) for s in ties) and not slower_than_fp32(best) else "the smallest file of them")
    how = f" (tied with {tied} other{'s' if tied > 1 else ''}; {rule})" if tied else ""
    lines = [
        f"{len(passing)} of {len(arts)} artifacts pass every gate. Of these, {esc(best.name)} does best on its "
        f"worst group{how}: {_size_words(best, esc)}.",
        f"Its worst group is {esc(wg.name)} (n = {wg.n}): accuracy {fmt_ci(wg.accuracy, wg.ci)}; overall accuracy "
        f"{best.metrics['overall']['accuracy']:.3f} on {best.metrics.get('n', sum(group_sizes(best).values()))} "
        f"images.",
    ]
    fair = _fairness_words(run, best, esc)
    if fair:
        lines.append(fair)
    smallest = min(passing, key=lambda s: (_inf(s.size_bytes), _rank(s)))
    if smallest is not best and smallest.size_bytes:
        lines.append(f"Smallest file that passes: {_art_words(smallest, esc)}.")
    timed = [s for s in passing if p50_ms(s)]
    fastest = min(timed, key=lambda s: (p50_ms(s)[0], _rank(s))) if timed else None  # type: ignore[index]
    if fastest is not None and fastest is not best and fastest is not smallest:
        lines.append(f"Fastest that passes: {_art_words(fastest, esc)}.")
    others = [s for s in passing if s not in (best, smallest, fastest)]
    if others:
        lines.append("Also passing: " + ", ".join(esc(s.name) for s in sorted(others, key=_rank)) + ".")
    slow = [s for s in others if slower_than_fp32(s)]
    if slow:
        lines.append("Slower than FP32 on the runtime it was timed on: " + "; ".join(
            f"{esc(s.name)}, {esc(speed.describe())}" for s in slow if (speed := speed_vs_fp32(s)) is not None) + ".")
    failing = [s for s in arts if not passes(s)]
    if failing:
        # artifacts that fail for the same reasons are named together, the reasons once
        by_reason: dict[str, list[str]] = {}
        for s in failing:
            by_reason.setdefault("; ".join(esc(f) for f in failures(s)) or "failed", []).append(esc(s.name))
        lines.append("Failing: " + "; ".join(f"{', '.join(names)} ({reason})" for reason, names in by_reason.items())
                     + ".")
    return lines


def artifact_table(run: RunStages, esc: Escape = _same) -> tuple[list[str], list[list[str]]]:
    """One row per stage: gate, size, MACs, latency, worst group with n and CI, Eodd with CI."""
    head = ["artifact", "gate", "size MB", "MACs M", "p50 ms (batch)", "worst group (n)", "worst-group acc [95% CI]",
            "Eodd [95% CI]"]
    rows = []
    for s in run.stages:
        gate = "reference" if s.gate_passed is None else ("pass" if passes(s) else "FAIL")
        gate += " (pruning guard failed)" if s.guard_failure else ""
        lat = p50_ms(s)
        wg = worst_group(s)
        rows.append([esc(s.name), gate, f"{s.size_bytes / BYTES_PER_MB:.2f}" if s.size_bytes else "",
                     f"{s.macs / 1e6:.1f}" if s.macs else "", f"{lat[0]:.2f} ({lat[1]})" if lat else "",
                     f"{esc(wg.name)} ({wg.n})", fmt_ci(wg.accuracy, wg.ci),
                     fmt_ci(s.metrics["fairness"].get("eodd"), interval(s, "eodd"))])
    return head, rows


def group_table(run: RunStages, esc: Escape = _same) -> tuple[list[str], list[list[str]]]:
    """Per-group accuracy with its 95% CI; the header names each group's size (the same images for every stage;
    a stage with other sizes shows them in its cells)."""
    groups: list[str] = []
    for s in run.stages:
        groups += [g for g in s.metrics["groups"] if g not in groups]
    first = group_sizes(run.stages[0]) if run.stages else {}
    head = ["stage", *[f"{esc(g)} (n = {first[g]})" if g in first else esc(g) for g in groups]]
    rows = []
    for s in run.stages:
        sizes = group_sizes(s)
        cells = []
        for g in groups:
            m = s.metrics["groups"].get(g)
            if m is None:
                cells.append("")
                continue
            cell = fmt_ci(float(m["accuracy"]), interval(s, f"accuracy[{g}]"))
            cells.append(cell if sizes[g] == first.get(g) else f"{cell} (n = {sizes[g]})")
        rows.append([esc(s.name), *cells])
    return head, rows


def fairness_table(run: RunStages, esc: Escape = _same) -> tuple[list[str], list[list[str]]]:
    """One row per stage with a reference: each gap's difference (stage minus reference) with its interval, and
    which differences are distinguishable (the others are within their intervals)."""
    head = ["stage", "against", *[f"{FAIRNESS_LABELS[k]} difference [95% CI]" for k in FAIRNESS_LABELS], "reading"]
    rows = []
    for s in run.stages:
        changes = {c.key: c for c in fairness_changes(run, s)}
        if not changes:
            continue
        ref = reference_of(run, s)
        assert ref is not None
        cells = [fmt_ci(changes[k].delta, changes[k].delta_ci, sign=True) if k in changes else "n/a"
                 for k in FAIRNESS_LABELS]
        apart = [f"{FAIRNESS_LABELS[c.key]} {c.reading}" for c in changes.values() if c.distinguishable]
        paired = any(c.delta_ci is not None for c in changes.values())
        if any(c.degenerate for c in changes.values()):
            reading = next(iter(changes.values())).reading
        elif apart:
            reading = "; ".join(apart)
        elif any(c.distinguishable is False for c in changes.values()):
            reading = ("not distinguishable: every interval of the difference contains 0" if paired
                       else "not distinguishable: the intervals of the two overlap (no paired interval)")
        else:
            reading = "no interval (bootstrap off)"
        rows.append([esc(s.name), esc(ref.name), *cells, reading])
    return head, rows
