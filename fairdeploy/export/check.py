"""Self-checks of an exported graph: ONNX Runtime (CPU) logits on batches, compared with a reference."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fairdeploy.artifact.metadata import INPUT_NAME, OUTPUT_NAME
from fairdeploy.errors import FairdeployError


@dataclass(frozen=True)
class Agreement:
    """How far one set of logits is from a reference: max |Δlogit| and top-1 agreement."""

    n: int
    max_abs_logit_diff: float
    top1_agreement: float

    def to_dict(self) -> dict[str, float | int]:
        return {"n": self.n, "max_abs_logit_diff": self.max_abs_logit_diff, "top1_agreement": self.top1_agreement}


def compare_logits(reference: np.ndarray, logits: np.ndarray) -> Agreement:
    """max |reference - logits| and the share of rows whose argmax agrees."""
    if reference.shape != logits.shape:
        raise FairdeployError(f"logits shape {logits.shape} differs from the reference's {reference.shape}")
    if len(reference) == 0:
        raise FairdeployError("no samples to compare")
    diff = float(np.max(np.abs(reference.astype(np.float64) - logits.astype(np.float64))))
    agree = float(np.mean(reference.argmax(1) == logits.argmax(1)))
    return Agreement(n=len(reference), max_abs_logit_diff=diff, top1_agreement=agree)


def ort_session(path: str | os.PathLike[str], threads: int = 0):
    """A CPU ONNX Runtime session (the runtime every machine has); a load failure is a FairdeployError."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    if threads:
        opts.intra_op_num_threads = threads
    try:
        return ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise FairdeployError(f"{Path(path).name}: ONNX Runtime cannot load it ({first})") from exc


def ort_logits(session, inputs: np.ndarray, batch_size: int) -> np.ndarray:
    """Run `inputs` (N, 3, H, W) through the session in chunks of batch_size; (N, K) float32 logits."""
    outs = []
    for start in range(0, len(inputs), batch_size):
        chunk = np.ascontiguousarray(inputs[start : start + batch_size], dtype=np.float32)
        outs.append(np.asarray(session.run([OUTPUT_NAME], {INPUT_NAME: chunk})[0], dtype=np.float32))
    return np.concatenate(outs)


def check_at_batch_sizes(
    path: str | os.PathLike[str], inputs: np.ndarray, reference: np.ndarray, batch_sizes: Sequence[int]
) -> Agreement:
    """The worst max |Δlogit| and top-1 agreement over running the graph at each batch size."""
    if not batch_sizes:
        raise FairdeployError("no batch sizes to check")
    session = ort_session(path)
    runs = [compare_logits(reference, ort_logits(session, inputs, bs)) for bs in batch_sizes]
    return Agreement(
        n=runs[0].n,
        max_abs_logit_diff=max(a.max_abs_logit_diff for a in runs),
        top1_agreement=min(a.top1_agreement for a in runs),
    )
