"""An artifact's speed against the FP32 artifact timed on the same runtime: the comparison `fairdeploy validate`
records (validation.json: latency_vs_fp32, warnings) and the report reads back (no torch, no runtime imported)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any, Protocol


class Timing(Protocol):
    """One batch size's latency (validation.latency.LatencyStats is one)."""

    batch_size: int
    p50_ms: float
    p95_ms: float


def runtime_name(runtime: Mapping[str, Any]) -> str:
    """What ran an artifact, as a comparable name: backend, device and the providers ONNX Runtime ran
    ("onnxruntime on cpu (CPUExecutionProvider)", "tensorrt on cuda:0"); from a runner's describe()."""
    name = f"{runtime.get('backend', '?')} on {runtime.get('device', '?')}"
    active = runtime.get("providers_active")
    return f"{name} ({', '.join(active)})" if active else name


@dataclass(frozen=True)
class TimedArtifact:
    """One runner of a validation as the speed comparison sees it."""

    label: str
    precision: str
    runtime: str  # runtime_name
    source_sha256: str | None  # the model it was exported from
    latency: Sequence[Timing]


@dataclass(frozen=True)
class BatchSpeed:
    """Median per-call time of an artifact and of the FP32 artifact at one batch size."""

    batch_size: int
    p50_ms: float
    fp32_p50_ms: float
    fp32_p95_ms: float

    @property
    def speed(self) -> float:
        """Its speed as a multiple of FP32's: FP32 p50 / its p50 (0.5 = half as fast)."""
        return self.fp32_p50_ms / self.p50_ms if self.p50_ms > 0 else float("inf")

    @property
    def slower(self) -> bool:
        """Its median call takes longer than 95 % of the FP32 artifact's calls: slower beyond FP32's own spread."""
        return self.p50_ms > self.fp32_p95_ms

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "speed": self.speed, "slower": self.slower}


@dataclass(frozen=True)
class SpeedVsFp32:
    """An artifact's latency against the FP32 artifact timed on the same runtime, in the same run."""

    fp32: str  # label of the FP32 artifact
    runtime: str
    batches: tuple[BatchSpeed, ...]

    @property
    def slower(self) -> bool:
        return any(b.slower for b in self.batches)

    def describe(self, fp32_name: str | None = None) -> str:
        """'slower than model.fp32.onnx on onnxruntime on cpu (...): 0.43x its speed at batch 1 (5.88 vs 2.51 ms
        median), ...'; the batch sizes where it is slower, or all of them when it is not."""
        shown = [b for b in self.batches if b.slower] or list(self.batches)
        parts = ", ".join(f"{b.speed:.2f}x its speed at batch {b.batch_size} ({b.p50_ms:.2f} vs {b.fp32_p50_ms:.2f} ms "
                          "median)" for b in shown)
        how = "slower than" if self.slower else "not slower than"
        return f"{how} {fp32_name or self.fp32} on {self.runtime}: {parts}"

    def to_dict(self) -> dict[str, Any]:
        return {"fp32": self.fp32, "runtime": self.runtime, "slower": self.slower,
                "batches": [b.to_dict() for b in self.batches]}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> SpeedVsFp32:
        """Read back what to_dict wrote (validation.json, a report's stages.json)."""
        return cls(str(d["fp32"]), str(d["runtime"]), tuple(
            BatchSpeed(int(b["batch_size"]), float(b["p50_ms"]), float(b["fp32_p50_ms"]), float(b["fp32_p95_ms"]))
            for b in d["batches"]))


def speed_vs_fp32(artifacts: Sequence[TimedArtifact]) -> dict[str, SpeedVsFp32]:
    """For every timed artifact that is not FP32, its latency against an FP32 artifact timed on the same runtime
    (the one exported from the same model when there are several, else the first), at each batch size both were
    timed at; by label. An artifact without such an FP32 artifact is left out."""
    out: dict[str, SpeedVsFp32] = {}
    for a in artifacts:
        if a.precision == "fp32" or not a.latency:
            continue
        peers = [f for f in artifacts if f is not a and f.precision == "fp32" and f.runtime == a.runtime and f.latency]
        same_model = [f for f in peers if a.source_sha256 is not None and f.source_sha256 == a.source_sha256]
        if not peers:
            continue
        fp32 = (same_model or peers)[0]
        theirs = {s.batch_size: s for s in fp32.latency}
        batches = tuple(BatchSpeed(s.batch_size, s.p50_ms, theirs[s.batch_size].p50_ms, theirs[s.batch_size].p95_ms)
                        for s in a.latency if s.batch_size in theirs)
        if batches:
            out[a.label] = SpeedVsFp32(fp32.label, a.runtime, batches)
    return out
