"""stages.json: the ordered list of model stages (vanilla -> pruned -> exported) a report is made from."""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from fairdeploy.errors import FairdeployError
from fairdeploy.files.json_files import read_json, write_json

STAGES_FILE = "stages.json"


@dataclass(frozen=True)
class StageRecord:
    """One model artifact at one stage, with its metrics on the report's split."""

    name: str  # e.g. "vanilla", "fairprune", "fairprune/onnx-int8"
    kind: str  # "pytorch" | "onnx" | "tensorrt"
    metrics: dict[str, Any]  # MetricsReport.to_dict()
    precision: str = "fp32"
    artifact: str = ""
    reference: str | None = None  # the stage this one was validated against
    size_bytes: int | None = None
    params: int | None = None
    macs: int | None = None
    latency: dict[str, float] | None = None  # p50/p95 ms and throughput (see validation)
    agreement: float | None = None  # top-1 agreement with the reference
    max_abs_logit_diff: float | None = None
    gate_passed: bool | None = None
    gate_failures: tuple[str, ...] = ()
    delta_intervals: dict[str, list[float]] | None = None  # paired CIs of (this - reference), validation deltas
    guard_failure: str | None = None  # why the model this artifact comes from failed its pruning guard
    # validation's latency_vs_fp32: its median latency against the FP32 artifact timed on the same runtime
    # ({"fp32": that artifact's stage name, "runtime", "slower", "batches": [{batch_size, p50_ms, fp32_p50_ms, ...}]})
    latency_vs_fp32: dict[str, Any] | None = None


@dataclass(frozen=True)
class Trajectory:
    """Validation accuracy / Eodd across the steps of one pruning run."""

    name: str
    points: tuple[dict[str, float], ...]  # each: {"step", "accuracy", "f1_macro", "eodd"}


@dataclass(frozen=True)
class RunStages:
    stages: tuple[StageRecord, ...]
    trajectories: tuple[Trajectory, ...] = ()
    split: str = "test"
    title: str = "fairdeploy report"
    notes: tuple[str, ...] = field(default=())


def write_stages(path: str | os.PathLike[str], run: RunStages) -> None:
    write_json(path, asdict(run))


def load_stages(run_dir: str | os.PathLike[str]) -> RunStages:
    """Read RUN_DIR/stages.json, or build stages from RUN_DIR/validation.json when there is no stages.json."""
    d = Path(run_dir)
    if not d.is_dir():
        raise FairdeployError(f"run directory {d} not found")
    if (d / STAGES_FILE).is_file():
        raw = read_json(d / STAGES_FILE)
        try:
            stages = tuple(StageRecord(**{**s, "gate_failures": tuple(s.get("gate_failures", ()))}) for s in raw["stages"])
            trajectories = tuple(Trajectory(t["name"], tuple(t["points"])) for t in raw.get("trajectories", ()))
        except (KeyError, TypeError) as exc:
            raise FairdeployError(f"{d / STAGES_FILE}: malformed stages file ({exc})") from exc
        return RunStages(stages, trajectories, raw.get("split", "test"), raw.get("title", "fairdeploy report"),
                         tuple(raw.get("notes", ())))
    if (d / "validation.json").is_file():
        from fairdeploy.report.from_validation import stages_from_validation

        return stages_from_validation(read_json(d / "validation.json"), source=str(d / "validation.json"))
    raise FairdeployError(f"{d}: neither {STAGES_FILE} (from `fairdeploy pipeline`) nor validation.json "
                          f"(from `fairdeploy validate`) found")
