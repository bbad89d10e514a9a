"""TensorRT's entropy calibration (IInt8EntropyCalibrator2) for the explicit Q/DQ model: the same threshold search,
so that model.int8.onnx (validated under ONNX Runtime) and a TensorRT engine calibrated the implicit way get the
same activation scales for the same calibration set.

The search, as NVIDIA's pytorch-quantization states it (`calib/histogram.py`, `_compute_amax_entropy`, the
reference for IInt8EntropyCalibrator2; restated here, not copied):

* a histogram of |x| per tensor (HistogramCalibrator.collect): the first batch sets 2048 bins over [0, max|x|];
  a later batch reaching further adds bins of the same width (`AbsHistogram`);
* bin 0 takes bin 1's count (the exact zeros of a ReLU would otherwise dominate);
* for every candidate threshold i = 128 .. len(bins): the reference distribution p is bins[0, i) with every count
  beyond the threshold (the outliers) folded into bin i-1; the quantized distribution q merges bins[0, i) into
  128 bins (bin k goes to floor(k * 128 / i)) and spreads each merged count evenly over its non-zero source bins
  (empty source bins stay 0); KL(p || q) of the two, each normalised;
* the threshold with the smallest divergence, the last one on a tie; amax = its bin edge, i * bin width.

`kl_divergences` computes every candidate's KL at once from cumulative sums (p and q are constant over each
quantized bin's non-zero source bins, so KL needs only per-bin sums); tests/test_export_entropy.py checks it
against a plain loop that expands q bin by bin as the reference does, and against hand-computed histograms.

ONNX Runtime's own Entropy calibrator is not this search (a two-sided histogram, smoothing, other candidates),
which is why fairdeploy computes the ranges here and hands them to quantize_static as overrides.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

HISTOGRAM_BINS = 2048  # bins of the first batch's |x| histogram
QUANTIZED_BINS = 128  # signed int8: 127 levels and the sign (1 << (8 - 1)); also the first candidate threshold
# The divergences are sums of ~2048 float64 terms: two candidates closer than this are a tie (the reference, which
# sums in another order, would break such a tie by rounding alone); ties go to the larger threshold, as there.
TIE_ATOL = 1e-12
_CHUNK = 4096  # candidates per vectorised block (bounds memory when later batches grew the histogram)


@dataclass
class AbsHistogram:
    """Counts of |x| in bins of one width from 0, collected batch by batch (pytorch-quantization's
    HistogramCalibrator): the first batch with a non-zero value sets `bins` bins over [0, its max]; a later batch
    beyond the last edge adds bins of the same width. Values equal to the top edge fall in the last bin."""

    bins: int = HISTOGRAM_BINS
    counts: np.ndarray | None = None  # int64, one per bin
    width: float = 0.0
    zeros: int = field(default=0, repr=False)  # exact zeros seen before the first non-zero batch (bin 0)

    def add(self, x: np.ndarray) -> None:
        a = np.abs(np.asarray(x, dtype=np.float64)).ravel()
        if a.size == 0:
            return
        top = float(a.max())
        if self.counts is None:
            if top == 0.0:
                self.zeros += a.size
                return
            self.width = top / self.bins
            self.counts = np.zeros(self.bins, dtype=np.int64)
            self.counts[0] += self.zeros
        assert self.counts is not None
        n = len(self.counts)
        if top > n * self.width:
            n = max(n, math.ceil(top / self.width))
            if top > n * self.width:  # rounding of top / width
                n += 1
            self.counts = np.concatenate([self.counts, np.zeros(n - len(self.counts), dtype=np.int64)])
        idx = np.minimum((a / self.width).astype(np.int64), n - 1)
        self.counts += np.bincount(idx, minlength=n)

    @property
    def edges(self) -> np.ndarray:
        n = 0 if self.counts is None else len(self.counts)
        return np.arange(n + 1, dtype=np.float64) * self.width


def kl_divergences(counts: Sequence[float] | np.ndarray, quantized_bins: int = QUANTIZED_BINS,
                   start: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(candidate thresholds i, KL(p || q) of each) for a |x| histogram, per the module docstring: candidates
    start (default: quantized_bins) .. len(counts); inf where p has mass q cannot have (outliers folded into an
    empty bin)."""
    b = np.asarray(counts, dtype=np.float64).copy()
    start = quantized_bins if start is None else start
    if len(b) < max(start, 2):
        raise ValueError(f"a histogram of {len(b)} bins has no candidate threshold from {start}")
    b[0] = b[1]
    total = b.sum()
    cands = np.arange(start, len(b) + 1)
    if total == 0:
        return cands, np.zeros(len(cands))
    nz = b > 0
    cum_b = np.concatenate([[0.0], np.cumsum(b)])
    cum_nz = np.concatenate([[0], np.cumsum(nz)])
    blogb = np.zeros_like(b)
    blogb[nz] = b[nz] * np.log(b[nz])
    cum_blogb = np.concatenate([[0.0], np.cumsum(blogb)])
    j = np.arange(quantized_bins + 1)
    out = np.empty(len(cands))
    for s in range(0, len(cands), _CHUNK):
        i = cands[s : s + _CHUNK]
        lo = (j[None, :] * i[:, None] + quantized_bins - 1) // quantized_bins  # ceil(j * i / Q): first source bin
        sums = cum_b[lo[:, 1:]] - cum_b[lo[:, :-1]]  # per quantized bin: its source counts
        nonzero = cum_nz[lo[:, 1:]] - cum_nz[lo[:, :-1]]  # ... and how many of them are non-zero
        level = np.divide(sums, nonzero, out=np.ones_like(sums), where=nonzero > 0)  # q on its non-zero bins
        inside = cum_b[i]  # counts below the threshold: q's total
        outliers = total - inside
        last = b[i - 1] + outliers  # p's last bin
        p_log_p = cum_blogb[i - 1] + np.where(last > 0, last * np.log(np.where(last > 0, last, 1.0)), 0.0)
        p_log_q = (sums * np.log(level)).sum(axis=1) + np.where(outliers > 0, outliers * np.log(level[:, -1]), 0.0)
        with np.errstate(divide="ignore"):
            kl = (p_log_p - p_log_q) / total + np.log(inside / total)
        kl[(b[i - 1] == 0) & (outliers > 0)] = np.inf
        out[s : s + _CHUNK] = kl
    return cands, out


def best_candidate(candidates: np.ndarray, divergences: np.ndarray, tie_atol: float = TIE_ATOL) -> int:
    """The candidate with the smallest divergence; the largest of those within tie_atol of it."""
    best = float(np.min(divergences))
    return int(candidates[np.flatnonzero(divergences <= best + tie_atol)[-1]])


def entropy_amax(hist: AbsHistogram) -> float:
    """TensorRT's entropy threshold of a histogram: the bin edge of the KL-optimal candidate (0 for no data or
    all zeros)."""
    if hist.counts is None or hist.counts.sum() == 0:
        return 0.0
    counts = hist.counts
    if len(counts) < QUANTIZED_BINS:  # cannot happen for a histogram collected here (2048 bins and more)
        raise ValueError(f"an entropy histogram needs at least {QUANTIZED_BINS} bins, got {len(counts)}")
    cands, kl = kl_divergences(counts)
    return float(best_candidate(cands, kl) * hist.width)


def tensors_to_calibrate(model: Any, op_types: Collection[str]) -> list[str]:
    """The activation tensors onnxruntime's quantize_static calibrates for `op_types` (its
    CalibraterBase.select_tensors_to_calibrate rule): every input and output of a node of those types that has a
    float/float16 type in the graph's value_info, inputs or outputs and is not an initializer. Graph order."""
    from onnx import TensorProto

    typed = {v.name: v for v in (*model.graph.value_info, *model.graph.output, *model.graph.input)}
    inits = {i.name for i in model.graph.initializer}
    floats = (TensorProto.FLOAT, TensorProto.FLOAT16)
    out: dict[str, None] = {}
    for node in model.graph.node:
        if node.op_type not in op_types:
            continue
        for name in (*node.input, *node.output):
            v = typed.get(name)
            if (v is not None and name not in inits and v.type.HasField("tensor_type")
                    and v.type.tensor_type.elem_type in floats):
                out[name] = None
    return list(out)


def collect_histograms(model_path: Any, tensors: Sequence[str], reader: Any) -> dict[str, AbsHistogram]:
    """Run the ONNX model on every batch `reader` gives (an onnxruntime CalibrationDataReader) with `tensors` as
    extra outputs, and histogram |x| of each; the reader is rewound afterwards."""
    import onnx
    import onnxruntime as ort

    model = onnx.load(str(model_path))
    typed = {v.name: v for v in (*model.graph.value_info, *model.graph.input)}
    have = {o.name for o in model.graph.output}
    for name in tensors:
        if name not in have:
            model.graph.output.append(typed[name])
            have.add(name)
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # every tensor as in the graph
    session = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    hists = {name: AbsHistogram() for name in tensors}
    names = list(tensors)
    while (batch := reader.get_next()) is not None:
        for name, value in zip(names, session.run(names, batch)):
            hists[name].add(value)
    reader.rewind()
    return hists


def entropy_ranges(model_path: Any, op_types: Collection[str], reader: Any) -> dict[str, tuple[float, float]]:
    """TensorRT's entropy range (-amax, amax) of every tensor quantize_static calibrates for `op_types`, from the
    calibration batches `reader` gives."""
    import onnx

    tensors = tensors_to_calibrate(onnx.load(str(model_path), load_external_data=False), op_types)
    hists = collect_histograms(model_path, tensors, reader)
    return {name: (-(amax := entropy_amax(h)), amax) for name, h in hists.items()}
