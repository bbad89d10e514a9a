"""Turn a validation.json (from `fairdeploy validate`) into report stages: the reference, then each candidate."""

from __future__ import annotations

import os
from typing import Any

from fairdeploy.errors import FairdeployError
from fairdeploy.report.stages import RunStages, StageRecord

_KIND = {"checkpoint": "pytorch", "onnx": "onnx", "engine": "tensorrt"}


def _latency(entries: list[dict[str, Any]]) -> dict[str, float] | None:
    out: dict[str, float] = {}
    for e in entries:
        b = int(e["batch_size"])
        out[f"batch{b}_p50_ms"] = float(e["p50_ms"])
        out[f"batch{b}_p95_ms"] = float(e["p95_ms"])
        out[f"batch{b}_throughput_ips"] = float(e["throughput_ips"])
    return out or None


def _stage(run: dict[str, Any], name: str, candidate: dict[str, Any] | None, ref_name: str,
           size: dict[str, Any] | None, names: dict[str, str] | None = None) -> StageRecord:
    """One stage; `size` (the reference checkpoint's params / MACs) applies to the reference and to a candidate
    exported from it; `names` maps validation labels to stage names."""
    art = run["artifact"]
    same_model = candidate is None or candidate.get("source_matches_reference") is True
    return StageRecord(
        name=name,
        kind=_KIND.get(art.get("kind", ""), art.get("kind", "")),
        metrics=run["metrics"],
        precision=art.get("precision", "fp32"),
        artifact=art.get("path", ""),
        reference=None if candidate is None else ref_name,
        size_bytes=art.get("size_bytes"),
        params=size.get("params") if size and same_model else None,
        macs=size.get("macs") if size and same_model else None,
        latency=_latency(run.get("latency", [])),
        agreement=None if candidate is None else candidate["agreement"]["overall"],
        max_abs_logit_diff=None if candidate is None else candidate["logit_diff"]["max_abs"],
        gate_passed=None if candidate is None else bool(candidate["passed"]),
        gate_failures=() if candidate is None else tuple(  # the stage's name says whose failure it is
            f.removeprefix(f"{candidate.get('label')}: ") for f in candidate.get("failures", ())),
        delta_intervals=None if candidate is None else candidate.get("deltas", {}).get("intervals"),
        latency_vs_fp32=_vs_fp32(None if candidate is None else candidate.get("latency_vs_fp32"), names or {}),
    )


def _vs_fp32(record: dict[str, Any] | None, names: dict[str, str]) -> dict[str, Any] | None:
    """validation's latency_vs_fp32 with the FP32 artifact named as its stage is."""
    if not record:
        return None
    return {**record, "fp32": names.get(record["fp32"], record["fp32"])}


def short_labels(labels: list[str]) -> list[str]:
    """Candidate labels that are artifact paths, shown relative to the folder they share ("model.int8.onnx",
    or "export-a/model.onnx" beside "export-b/model.onnx"); labels left as they are when any is not a path."""
    if not labels or not all(os.sep in label for label in labels):
        return labels
    try:
        common = os.path.commonpath([os.path.dirname(label) for label in labels])
    except ValueError:  # absolute and relative paths mixed
        return labels
    return [os.path.relpath(label, common) if common else label for label in labels]


def stages_from_validation(d: dict[str, Any], source: str = "validation.json", prefix: str = "") -> RunStages:
    """Reference first (named `prefix` or 'reference'), then candidates named by their labels."""
    try:
        ref_name = prefix or "reference"
        size = d.get("model_size")
        stages = [_stage(d["reference"], ref_name, None, ref_name, size)]
        shown = short_labels([str(c["label"]) for c in d["candidates"]])
        names = {"reference": ref_name}
        for c, short in zip(d["candidates"], shown):
            if prefix:  # inside a pipeline: "<model>/<runtime>-<precision>", e.g. "fairprune/onnx-int8"
                art = c["artifact"]
                names[str(c["label"])] = f"{prefix}/{_KIND.get(art['kind'], art['kind'])}-{art['precision']}"
            else:
                names[str(c["label"])] = short
        for c in d["candidates"]:
            stages.append(_stage(c, names[str(c["label"])], c, ref_name, size, names))
    except (KeyError, TypeError) as exc:
        raise FairdeployError(f"{source}: not a fairdeploy validation file (missing {exc})") from exc
    notes = tuple(f"Fairness figures are degenerate, the gate does not pass on them: {reason}"
                  for reason in d.get("degenerate", ()))
    return RunStages(tuple(stages), split=d.get("config", {}).get("split", "test"),
                     title=f"fairdeploy validation report ({'passed' if d.get('passed') else 'FAILED'})",
                     notes=notes)
