"""Self-checks of an exported graph with what `fairdeploy validate` uses: the runtime's OrtRunner (CPU) for the
logits and validation's agreement_stats / logit_diff_stats for the comparison, summed up as export.json
records it."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from fairdeploy.errors import FairdeployError
from fairdeploy.runtime.base import ArtifactInfo, infer_batches
from fairdeploy.runtime.ort_runner import OrtRunner
from fairdeploy.validation.compare import agreement_stats, logit_diff_stats


@dataclass(frozen=True)
class Agreement:
    """How far one set of logits is from a reference: max |Δlogit| and top-1 agreement, overall and per group."""

    n: int
    max_abs_logit_diff: float
    top1_agreement: float
    top1_agreement_per_group: dict[str, float]

    def to_dict(self) -> dict[str, float | int]:
        """The overall figures (export.json keeps the per-group agreement beside them)."""
        return {"n": self.n, "max_abs_logit_diff": self.max_abs_logit_diff, "top1_agreement": self.top1_agreement}


def compare_logits(reference: np.ndarray, logits: np.ndarray, groups: np.ndarray | None = None,
                   group_order: Sequence[str] = ()) -> Agreement:
    """`logits` against `reference` as validate compares a candidate with its reference; `groups` are each
    sample's group name (None: no per-group figures)."""
    if reference.shape != logits.shape:
        raise FairdeployError(f"logits shape {logits.shape} differs from the reference's {reference.shape}")
    if len(reference) == 0:
        raise FairdeployError("no samples to compare")
    if groups is None:
        groups, group_order = np.zeros(len(reference), dtype=np.int64), ()
    agreement = agreement_stats(reference.argmax(1), logits.argmax(1), groups, group_order)
    diff = logit_diff_stats(reference, logits, groups, group_order)
    return Agreement(n=len(reference), max_abs_logit_diff=diff.max_abs, top1_agreement=agreement.overall,
                     top1_agreement_per_group=agreement.groups)


def onnx_logits(path: str | os.PathLike[str], inputs: np.ndarray, batch_sizes: Sequence[int],
                threads: int = 0, info: ArtifactInfo | None = None) -> list[np.ndarray]:
    """The graph's logits on `inputs` run at each batch size, from one CPU OrtRunner (`info`: for a graph
    without fairdeploy metadata, see ort_runner.graph_info)."""
    with OrtRunner(path, threads=threads, info=info) as runner:
        return [infer_batches(runner, inputs, bs) for bs in batch_sizes]


def check_at_batch_sizes(
    path: str | os.PathLike[str], inputs: np.ndarray, reference: np.ndarray, batch_sizes: Sequence[int]
) -> Agreement:
    """The worst max |Δlogit| and top-1 agreement over running the graph at each batch size."""
    if not batch_sizes:
        raise FairdeployError("no batch sizes to check")
    runs = [compare_logits(reference, logits) for logits in onnx_logits(path, inputs, batch_sizes)]
    return Agreement(
        n=runs[0].n,
        max_abs_logit_diff=max(a.max_abs_logit_diff for a in runs),
        top1_agreement=min(a.top1_agreement for a in runs),
        top1_agreement_per_group={},
    )
