"""validate(): the reference checkpoint and candidate runtimes over the same images -> a ValidationResult."""

from __future__ import annotations

import contextlib
import datetime as _dt
import os
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from fairdeploy.data.loading import Encoding, check_batch, eval_transform, make_loader, split_dataset
from fairdeploy.data.manifest import Manifest
from fairdeploy.errors import FairdeployError
from fairdeploy.files.hashing import sha256_if_file
from fairdeploy.metrics import METRIC_DEFINITIONS, MetricsReport
from fairdeploy.metrics.bootstrap import DEFAULT_N_BOOT
from fairdeploy.progress import Progress, no_progress
from fairdeploy.runtime.base import (
    ArtifactInfo,
    ImageBatch,
    InputSpec,
    Runner,
    RunResults,
    run_runners,
    runner_from_artifact,
)
from fairdeploy.runtime.torch_runner import TorchRunner
from fairdeploy.speed import SpeedVsFp32, TimedArtifact, runtime_name, speed_vs_fp32
from fairdeploy.validation.compare import (
    AgreementStats,
    GroupFlips,
    LabelledImages,
    LogitDiff,
    MetricDeltas,
    compare,
    single_class,
    single_group,
)
from fairdeploy.validation.fingerprint import environment_fingerprint
from fairdeploy.validation.latency import LatencyConfig, LatencyStats, measure_latency
from fairdeploy.validation.tolerances import CheckResult, Tolerances, check_tolerances

if TYPE_CHECKING:
    from fairdeploy.models.size import ModelSize

SCHEMA_VERSION = 1
VALIDATION_FILE = "validation.json"

# What each field of validation.json means (written into the file, so a report can quote it).
VALIDATION_DEFINITIONS = {
    "drift": "candidate minus reference, on the same images through the same eval_transform preprocessing",
    "deltas": "candidate minus reference of overall accuracy / macro-F1, each group's accuracy and macro "
    "P/R/F1, the avg/diff summaries, and each fairness gap (eopp0, eopp1, eodd, dp); None where a gap "
    "is undefined (one group); intervals: paired percentile bootstrap CIs of candidate minus reference "
    "(both scored on the same within-group resamples; an interval containing 0 = not distinguishable)",
    "model_size": "params and MACs of one image through the reference checkpoint (None when the reference is "
    "not a checkpoint); a candidate exported from it (source_matches_reference) has the same",
    "agreement": "share of samples whose top-1 class equals the reference's top-1 class, overall and per group",
    "flips": "per group: samples whose top-1 class changed (changed), of which the reference was right "
    "and the candidate wrong (broken) or the reverse (fixed), and the counts of each reference->candidate "
    "predicted-class transition",
    "confusion_delta": "per group: candidate confusion matrix minus the reference's (rows true class, "
    "columns predicted class)",
    "logit_diff": "max and mean over samples and classes of |candidate logit - reference logit|, overall "
    "and per group (FP16/INT8 candidates are expected to differ a little)",
    "latency": "wall time of one infer call (host array in, host logits out) after warm-up, each runner timed "
    "alone (re-opened after the accuracy pass, every other runner closed): p50/p95/mean/min "
    "in ms, throughput in images/s = batch_size * iterations / timed seconds; informative, never gated",
    "latency_vs_fp32": "a non-FP32 candidate's median latency against the FP32 artifact timed on the same runtime "
    "in this validation (the one from the same model when there are several), per batch size: speed = FP32 p50 / "
    "its p50; slower = its p50 above the FP32 artifact's p95 (beyond FP32's own call-to-call spread). A slower one "
    "is listed under warnings; never gated",
    "size_bytes": "artifact size on disk: the weights file of a checkpoint, the .onnx (+ external data), "
    "the engine",
    "source_matches_reference": "the artifact's recorded source checkpoint SHA-256 equals the reference's "
    "weights hash (None when either is unknown); False fails the gate unless config.allow_other_source",
    "degenerate": "reasons the fairness figures cannot be trusted (a runner that predicts a single class, a "
    "split with one group): the gate refuses to pass on them",
    "checks": "each enabled tolerance applied overall and per reference group; passed = within tolerance",
    "intervals": "metrics.intervals: percentile bootstrap CIs resampling within each group (compute_metrics)",
    "metrics": METRIC_DEFINITIONS,
}


@dataclass(frozen=True)
class ValidationConfig:
    """The split, batching, bootstrap, seed, tolerances and latency settings (None = no latency)."""

    split: str = "test"
    batch_size: int = 32
    workers: int = 0
    bootstrap: int = DEFAULT_N_BOOT
    seed: int = 0
    tolerances: Tolerances = field(default_factory=Tolerances)
    latency: LatencyConfig | None = field(default_factory=LatencyConfig)
    allow_other_source: bool = False  # a candidate exported from another model than the reference may pass

    def validate(self) -> None:
        if self.batch_size < 1:
            raise FairdeployError(f"batch size must be >= 1, got {self.batch_size}")
        if self.bootstrap < 0:
            raise FairdeployError(f"bootstrap must be >= 0, got {self.bootstrap}")
        self.tolerances.validate()
        if self.latency is not None:
            self.latency.validate()

    def to_dict(self) -> dict[str, Any]:
        return {
            "split": self.split,
            "batch_size": self.batch_size,
            "bootstrap": self.bootstrap,
            "seed": self.seed,
            "allow_other_source": self.allow_other_source,
            "latency": None if self.latency is None else {
                "batch_sizes": list(self.latency.batch_sizes),
                "warmup": self.latency.warmup,
                "iterations": self.latency.iterations,
            },
        }


@dataclass(frozen=True)
class DataSummary:
    """The images a validation ran on: the manifest (and its hash), the split, and its group and class counts."""

    manifest: str
    manifest_sha256: str | None  # None when the manifest is not a file
    split: str
    n: int
    group_counts: dict[str, int]
    class_counts: dict[str, int]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class RunOutput:
    """One runner's part of a validation: what it ran, its metrics and latency."""

    label: str
    artifact: ArtifactInfo
    runtime: dict[str, Any]
    input_spec: InputSpec
    metrics: MetricsReport
    latency: tuple[LatencyStats, ...]

    def to_dict(self) -> dict[str, Any]:
        return {
            "label": self.label,
            "artifact": self.artifact.to_dict(),
            "runtime": self.runtime,
            "input_spec": self.input_spec.to_dict(),
            "metrics": self.metrics.to_dict(),
            "latency": [s.to_dict() for s in self.latency],
        }


@dataclass(frozen=True)
class CandidateResult:
    """A candidate compared with the reference: deltas, agreement, flips, |Δlogit| and the gate's checks."""

    run: RunOutput
    source_matches_reference: bool | None
    deltas: MetricDeltas
    agreement: AgreementStats
    flips: dict[str, GroupFlips]  # per group, in the reference's group order
    confusion_delta: dict[str, list[list[int]]]  # per group: K x K, candidate minus reference
    logit_diff: LogitDiff
    checks: tuple[CheckResult, ...]
    other_source_allowed: bool = False
    reference_sha256: str | None = None
    degenerate: tuple[str, ...] = ()  # why this candidate's fairness figures (or the reference's) are degenerate
    speed_vs_fp32: SpeedVsFp32 | None = None  # against the FP32 artifact timed on the same runtime, if any

    @property
    def label(self) -> str:
        return self.run.label

    @property
    def source_refused(self) -> bool:
        """Exported from a different model than the reference, and the user did not allow it."""
        return self.source_matches_reference is False and not self.other_source_allowed

    @property
    def passed(self) -> bool:
        return all(c.passed for c in self.checks) and not self.source_refused and not self.degenerate

    def failures(self) -> list[str]:
        """One line per failing check, naming the candidate, the metric and the group; then a different
        source model and degenerate fairness figures, each naming the candidate."""
        lines = [f"{self.label}: {c.describe()}" for c in self.checks if not c.passed]
        if self.source_refused:
            src, ref = self.run.artifact.source_sha256 or "?", self.reference_sha256 or "?"
            lines.append(f"{self.label}: exported from a different model than the reference (source weights "
                         f"sha256 {src[:12]}, reference {ref[:12]}); pass --allow-other-source if this is on purpose")
        if self.degenerate:
            lines.append(f"{self.label}: fairness figures are degenerate ({'; '.join(self.degenerate)}); "
                         "the gate does not pass on them")
        return lines

    def to_dict(self) -> dict[str, Any]:
        return {
            **self.run.to_dict(),
            "source_matches_reference": self.source_matches_reference,
            "degenerate": list(self.degenerate),
            "deltas": self.deltas.to_dict(),
            "agreement": self.agreement.to_dict(),
            "flips": {g: f.to_dict() for g, f in self.flips.items()},
            "confusion_delta": self.confusion_delta,
            "logit_diff": self.logit_diff.to_dict(),
            "checks": [c.to_dict() for c in self.checks],
            "passed": self.passed,
            "failures": self.failures(),
            "latency_vs_fp32": None if self.speed_vs_fp32 is None else self.speed_vs_fp32.to_dict(),
        }


@dataclass(frozen=True)
class ValidationResult:
    """Everything validation.json holds; `passed` is the gate (every check of every candidate)."""

    reference: RunOutput
    candidates: tuple[CandidateResult, ...]
    data: DataSummary
    config: ValidationConfig
    options: dict[str, Any]
    fingerprint: dict[str, Any]
    created_utc: str
    degenerate: tuple[str, ...] = ()  # "<who>: <reason>" for the split, the reference and each candidate
    model_size: ModelSize | None = None  # the reference checkpoint's params / MACs

    @property
    def passed(self) -> bool:
        return all(c.passed for c in self.candidates) and not self.degenerate

    def failures(self) -> list[str]:
        return [line for c in self.candidates for line in c.failures()]

    def warnings(self) -> list[str]:
        """One line per candidate slower than the FP32 artifact on the runtime both were timed on (never gated)."""
        return [f"{c.label}: {c.speed_vs_fp32.describe()}" for c in self.candidates
                if c.speed_vs_fp32 is not None and c.speed_vs_fp32.slower]

    def candidate(self, label: str) -> CandidateResult:
        for c in self.candidates:
            if c.label == label:
                return c
        raise KeyError(label)

    def to_dict(self) -> dict[str, Any]:
        """validation.json (schema_version 1). Layout, top level:

        - passed (bool: the gate), failures (one line per failing check: "<candidate>: <check>"),
          warnings (one line per candidate slower than the FP32 artifact on its runtime; not gated),
          degenerate (why the fairness figures are degenerate: "<split|reference|candidate>: <reason>")
        - model_size: the reference checkpoint's params, nonzero_params, macs (null when not a checkpoint)
        - data: manifest, manifest_sha256, split, n, group_counts, class_counts
        - config: split, batch_size, bootstrap, seed, latency {batch_sizes, warmup, iterations} | null,
          backend, device, allow_fallback;  tolerances: the Tolerances fields (null = check off)
        - reference: label ("reference"), artifact (ArtifactInfo: path, kind, arch, classes, groups,
          image_size, mean, std, precision, source_sha256, size_bytes), runtime (backend, device,
          providers_*), input_spec {name, shape, dtype}, metrics (MetricsReport.to_dict, with
          intervals when bootstrap > 0), latency [LatencyStats per batch size]
        - candidates: list, in the order given; each has the reference's keys plus
          source_matches_reference, degenerate (reasons), deltas {overall, groups, summary, fairness,
          intervals (paired CIs of the differences, when bootstrap > 0 and two groups or more)}, agreement
          {overall, groups}, flips {group: {n, changed, broken, fixed, transitions [{from, to, count}]}},
          confusion_delta {group: K x K}, logit_diff {max_abs, mean_abs, groups}, checks [CheckResult
          + message], passed, failures, latency_vs_fp32 {fp32, runtime, slower, batches [{batch_size, p50_ms,
          fp32_p50_ms, fp32_p95_ms, speed, slower}]} | null
        - fingerprint: python, platform, packages, cpu, gpu, onnxruntime_available_providers, runners
          {runner name: describe()};  definitions: VALIDATION_DEFINITIONS (what each quantity means)
        """
        return {
            "schema_version": SCHEMA_VERSION,
            "kind": "fairdeploy.validation",
            "created_utc": self.created_utc,
            "passed": self.passed,
            "failures": self.failures(),
            "warnings": self.warnings(),
            "degenerate": list(self.degenerate),
            "model_size": None if self.model_size is None else self.model_size.to_dict(),
            "data": self.data.to_dict(),
            "config": {**self.config.to_dict(), **self.options},
            "tolerances": self.config.tolerances.to_dict(),
            "reference": self.reference.to_dict(),
            "candidates": [c.to_dict() for c in self.candidates],
            "fingerprint": self.fingerprint,
            "definitions": VALIDATION_DEFINITIONS,
        }


# ---- the library call ----


def check_compatible(reference: ArtifactInfo, candidate: ArtifactInfo, label: str) -> None:
    """A candidate must predict the reference's classes, in order, from the same preprocessed input."""
    if tuple(candidate.classes) != tuple(reference.classes):
        order = " (same classes, another order)" if sorted(candidate.classes) == sorted(reference.classes) else ""
        raise FairdeployError(
            f"candidate {label}: classes {', '.join(candidate.classes)} do not match the reference's "
            f"{', '.join(reference.classes)}{order}"
        )
    if candidate.image_size != reference.image_size:
        raise FairdeployError(
            f"candidate {label}: input size {candidate.image_size} does not match the reference's "
            f"{reference.image_size}"
        )
    for key in ("mean", "std"):  # empty = not recorded by the artifact (an engine without its ONNX beside it)
        a, b = getattr(candidate, key), getattr(reference, key)
        if a and b and (len(a) != len(b) or not np.allclose(a, b, rtol=0, atol=1e-6)):
            raise FairdeployError(
                f"candidate {label}: normalisation {key} {list(a)} does not match the reference's {list(b)}"
            )


def _is_path(item: Any) -> bool:
    return isinstance(item, (str, os.PathLike))


def _labels(items: Sequence[Any]) -> list[str]:
    out: list[str] = []
    for item in items:
        base = str(item) if _is_path(item) else str(item.name)
        label, k = base, 2
        while label in out:
            label, k = f"{base}#{k}", k + 1
        out.append(label)
    return out


_RUNNER_METHODS = ("activate", "deactivate", "__enter__", "__exit__", "infer", "input_spec", "describe")


def _runner(item: Any, backend: str, device: Any, allow_fallback: bool) -> Runner:
    if _is_path(item):
        return runner_from_artifact(item, backend, device, allow_fallback)
    if all(callable(getattr(type(item), m, None)) for m in _RUNNER_METHODS) and hasattr(item, "info"):
        return item
    raise TypeError(f"a candidate is an artifact path or a Runner, not {type(item).__name__}")


def _reference_runner(reference: Any, device: Any) -> Runner:
    if _is_path(reference) and not Path(reference).exists():
        raise FairdeployError(f"reference {reference} not found")
    if _is_path(reference) and not Path(reference).is_dir():
        raise FairdeployError(
            f"reference {reference} must be a PyTorch checkpoint directory (the model the candidates came from)"
        )
    return _runner(reference, "torch", device, False)


def _data_summary(manifest: Manifest, split: str, labels: np.ndarray, groups: np.ndarray,
                  classes: Sequence[str], group_order: Sequence[str]) -> DataSummary:
    src = Path(manifest.source)
    return DataSummary(
        manifest=manifest.source,
        manifest_sha256=sha256_if_file(src),
        split=split,
        n=len(labels),
        group_counts={g: int((groups == g).sum()) for g in group_order},
        class_counts={c: int((labels == k).sum()) for k, c in enumerate(classes)},
    )


@dataclass(frozen=True)
class _Measured:
    """What running every runner over the split produced: their logits (and the images' labels and groups), each
    runner's latency, the environment, and the reference checkpoint's size."""

    results: RunResults
    latency: list[tuple[LatencyStats, ...]]
    fingerprint: dict[str, Any]
    reference_size: ModelSize | None  # the reference checkpoint's params / MACs, counted while it was open


def _split_batches(dataset: Any, config: ValidationConfig, progress: Progress,
                   sample: list[np.ndarray]) -> Iterator[ImageBatch]:
    """The split decoded and preprocessed once, in loader batches (an unreadable image is named); the first
    images, up to the largest latency batch, are kept in `sample`; progress once every runner ran a batch."""
    keep = max(config.latency.batch_sizes) if config.latency is not None else 0
    kept = done = 0
    for x, y, g, ok, idx in make_loader(dataset, config.batch_size, workers=config.workers):
        check_batch(dataset, ok, idx)
        batch = ImageBatch(np.ascontiguousarray(x.numpy(), dtype=np.float32), y.numpy(), g.numpy())
        if kept < keep:
            sample.append(batch.images[: keep - kept])
            kept += len(sample[-1])
        yield batch
        done += len(batch.images)
        progress("validate: inference", done, len(dataset))


def _run_all(runners: Sequence[Runner], dataset: Any, config: ValidationConfig, progress: Progress) -> _Measured:
    """Activate every runner, feed each the same decoded and preprocessed batches (run_runners), close them all,
    then time each runner alone: re-opened in its own window with every other runner closed (open ONNX Runtime
    sessions slow each other down on a small CPU, so timing one beside the others would charge it for their
    threads)."""
    sample: list[np.ndarray] = []
    latency: list[tuple[LatencyStats, ...]] = [() for _ in runners]
    with contextlib.ExitStack() as stack:
        for r in runners:
            stack.enter_context(r)
        results = run_runners(runners, _split_batches(dataset, config, progress, sample))
        fingerprint = environment_fingerprint(runners)
        reference_size = runners[0].model_size() if isinstance(runners[0], TorchRunner) else None
    if config.latency is not None:
        images = np.concatenate(sample)
        for i, r in enumerate(runners):
            with r:
                latency[i] = measure_latency(r, images, config.latency)
            progress("validate: latency", i + 1, len(runners))
    return _Measured(results, latency, fingerprint, reference_size)


def validate(
    reference: str | os.PathLike[str] | Runner,
    candidates: Sequence[str | os.PathLike[str] | Runner],
    manifest: Manifest,
    config: ValidationConfig = ValidationConfig(),
    backend: str = "auto",
    device: Any = "auto",
    allow_fallback: bool = False,
    progress: Progress = no_progress,
) -> ValidationResult:
    """Run the reference and every candidate on one split, compare them, and apply the tolerances.

    `reference` is a PyTorch checkpoint directory (or any Runner); each candidate is an artifact path
    (checkpoint directory, .onnx, .engine, run by `backend`) or a Runner object. All runners see the
    very same float32 batches, decoded and preprocessed once with the reference's eval_transform.
    Nothing is printed; bad input raises FairdeployError before any inference runs.
    """
    config.validate()
    if not candidates:
        raise FairdeployError("no candidate to validate; give at least one --candidate")
    import torch

    from fairdeploy.device import resolve_device

    dev = device if isinstance(device, torch.device) else resolve_device(device)
    ref_runner = _reference_runner(reference, dev)
    ref_info = ref_runner.info
    labels = _labels(candidates)
    cand_runners = [_runner(c, backend, dev, allow_fallback) for c in candidates]
    for label, r in zip(labels, cand_runners):
        check_compatible(ref_info, r.info, label)

    # The split, encoded with the reference model's classes and groups; every group must be present.
    group_order = tuple(ref_info.groups) or tuple(sorted({r.group for r in manifest.split(config.split)}))
    present = {r.group for r in manifest.split(config.split)}
    absent = [g for g in group_order if g not in present]
    if absent:
        raise FairdeployError(
            f"{manifest.source}: split {config.split!r} has no images of group(s) {', '.join(absent)} "
            f"of the reference model (model groups: {', '.join(group_order)})"
        )
    dataset = split_dataset(manifest, config.split, Encoding(tuple(ref_info.classes), group_order),
                            eval_transform(ref_info.image_size, ref_info.mean, ref_info.std))
    runners: list[Runner] = [ref_runner, *cand_runners]
    run = _run_all(runners, dataset, config, progress)
    assert run.results.labels is not None and run.results.groups is not None  # split_dataset's batches carry them
    images = LabelledImages(run.results.labels, np.asarray(group_order)[run.results.groups], group_order,
                            tuple(ref_info.classes))
    y_true, group_names, latency = images.labels, images.groups, run.latency
    ref_run = run.results.runs[0]
    ref_pred = ref_run.logits.argmax(1)
    ref_report = images.metrics(ref_pred, config.bootstrap, config.seed)
    ref_out = RunOutput("reference", ref_info, ref_run.runtime, ref_run.input_spec, ref_report, latency[0])
    split_reason = single_group(group_names)
    ref_reason = single_class(ref_pred, ref_info.classes)
    shared = [r for r in (split_reason, ref_reason and f"the reference {ref_reason}") if r]
    degenerate = [f"split {config.split!r}: {split_reason}"] if split_reason else []
    degenerate += [f"reference: {ref_reason}"] if ref_reason else []
    speeds = speed_vs_fp32([
        TimedArtifact(label, r.info.precision, runtime_name(res.runtime), r.info.source_sha256, lat)
        for label, r, res, lat in zip(["reference", *labels], runners, run.results.runs, latency)
    ])
    results = []
    for i, label in enumerate(labels, start=1):
        cand_run = run.results.runs[i]
        c = compare(ref_run.logits, cand_run.logits, images, ref_report, config.bootstrap, config.seed)
        assert c.metrics is not None and c.deltas is not None  # labelled images
        own = single_class(cand_run.logits.argmax(1), ref_info.classes)
        info = runners[i].info
        same_source = (None if info.source_sha256 is None or ref_info.source_sha256 is None
                       else info.source_sha256 == ref_info.source_sha256)
        results.append(CandidateResult(
            run=RunOutput(label, info, cand_run.runtime, cand_run.input_spec, c.metrics, latency[i]),
            source_matches_reference=same_source,
            deltas=c.deltas,
            agreement=c.agreement,
            flips=c.flips,
            confusion_delta=c.confusion_delta,
            logit_diff=c.logit_diff,
            checks=check_tolerances(ref_report, c.metrics, c.agreement.overall, c.agreement.groups,
                                    config.tolerances),
            other_source_allowed=config.allow_other_source,
            reference_sha256=ref_info.source_sha256,
            degenerate=tuple(shared + ([own] if own else [])),
            speed_vs_fp32=speeds.get(label),
        ))
        degenerate += [f"{label}: {own}"] if own else []
    return ValidationResult(
        reference=ref_out,
        candidates=tuple(results),
        data=_data_summary(manifest, config.split, y_true, group_names, ref_info.classes, group_order),
        config=config,
        options={"backend": backend, "device": str(dev), "allow_fallback": allow_fallback},
        fingerprint=run.fingerprint,
        created_utc=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        degenerate=tuple(degenerate),
        model_size=run.reference_size if _is_path(reference) else None,
    )
