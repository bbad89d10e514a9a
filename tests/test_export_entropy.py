"""TensorRT's entropy calibration (fairdeploy/export/entropy.py): the threshold search against histograms whose
answer is computed by hand and against a plain-loop restatement of pytorch-quantization's `_compute_amax_entropy`
on random ReLU data; the |x| histogram against numpy's; the tensors calibrated against onnxruntime's own rule; and
quantize_qdq's "entropy" scales against the loop's thresholds."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from fairdeploy.export.entropy import (
    QUANTIZED_BINS,
    AbsHistogram,
    best_candidate,
    entropy_amax,
    entropy_ranges,
    kl_divergences,
    tensors_to_calibrate,
)


def reference_divergences(counts: np.ndarray, nbins: int = QUANTIZED_BINS) -> list[float]:
    """pytorch-quantization's search restated as plain loops (candidate by candidate, bin by bin): merge bins[:i]
    into nbins bins by np.digitize over linspace(0, i), spread each merged count over its non-zero source bins,
    fold the outliers into p's last bin, KL(p || q) of the normalised pair (inf where p > 0 and q = 0)."""
    bins = [float(c) for c in counts]
    bins[0] = bins[1]
    out = []
    for i in range(nbins, len(bins) + 1):
        space = np.linspace(0, i, num=nbins + 1)
        which = [int(d) - 1 for d in np.digitize(range(i), space)]
        merged = [0.0] * nbins
        members = [0] * nbins
        for k in range(i):
            if bins[k] != 0:
                merged[which[k]] += bins[k]
                members[which[k]] += 1
        q = [merged[which[k]] / members[which[k]] if bins[k] != 0 else 0.0 for k in range(i)]
        p = bins[:i]
        p[-1] += sum(bins[i:])
        sp, sq = sum(p), sum(q)
        kl = 0.0
        for pk, qk in zip(p, q):
            if pk == 0:
                continue
            if qk == 0:
                kl = math.inf
                break
            kl += (pk / sp) * math.log((pk / sp) / (qk / sq))
        out.append(kl)
    return out


def reference_threshold(counts: np.ndarray) -> int:
    """The reference's choice: the last candidate with the smallest divergence."""
    kl = reference_divergences(counts)
    return QUANTIZED_BINS + (len(kl) - 1 - int(np.argmin(kl[::-1])))


def alternating_with_outlier(m: int) -> np.ndarray:
    """256 bins: 1, 3, 1, 3, ... over bins 0-127 (bin 0 becomes bin 1's 3), nothing in 128-254, m in bin 255."""
    counts = np.zeros(256)
    counts[:128] = [1 if k % 2 == 0 else 3 for k in range(128)]
    counts[255] = m
    return counts


@pytest.mark.parametrize("m", [1, 100])
def test_hand_built_histogram(m: int) -> None:
    """Only two candidates are finite: i = 128 (each source bin its own quantized bin; the outlier folded into bin
    127) and i = 256 (no outlier; pairs merged, so (1, 3) becomes (2, 2) and the lone outlier bin keeps its count).
    Every 128 < i < 256 folds the outlier into an empty bin: inf. With T = 258 + m:
      KL(256) = 63 (1 ln(1/2) + 3 ln(3/2)) / T
      KL(128) = (255 / T) ln(258 / T) + ((3 + m) / T) ln(258 (3 + m) / (3 T))
    m = 1 makes clipping cheap (KL(128) = 0.00057 < KL(256) = 0.127); m = 100 makes it dear (0.690 > 0.092)."""
    counts = alternating_with_outlier(m)
    t = 258 + m
    kl_256 = 63 * (math.log(0.5) + 3 * math.log(1.5)) / t
    kl_128 = (255 / t) * math.log(258 / t) + ((3 + m) / t) * math.log(258 * (3 + m) / (3 * t))
    cands, kl = kl_divergences(counts)
    assert list(cands) == list(range(128, 257))
    assert kl[0] == pytest.approx(kl_128, rel=1e-12) and kl[-1] == pytest.approx(kl_256, rel=1e-12)
    assert np.isinf(kl[1:-1]).all()
    expected = 128 if m == 1 else 256
    assert (kl_128 < kl_256) == (m == 1)
    assert best_candidate(cands, kl) == expected == reference_threshold(counts)
    hist = AbsHistogram(bins=256, counts=counts.astype(np.int64), width=0.5)
    assert entropy_amax(hist) == expected * 0.5  # the candidate's bin edge


def test_a_tie_goes_to_the_largest_threshold() -> None:
    """Equal counts in bins 0-127 and none beyond: every candidate's q equals p (a merged bin spreads its count over
    its non-zero, equal bins), so every KL is 0 and the reference keeps the last, the full range."""
    counts = np.zeros(512)
    counts[:128] = 7
    cands, kl = kl_divergences(counts)
    assert np.abs(kl).max() < 1e-12 and set(reference_divergences(counts)) == {0.0}
    assert best_candidate(cands, kl) == 512 == reference_threshold(counts)


def test_zero_bin_takes_bin_one() -> None:
    """The exact zeros of a ReLU (bin 0) do not move the threshold: bin 0 is replaced by bin 1."""
    counts = alternating_with_outlier(1)
    _, kl = kl_divergences(counts)
    counts[0] = 10**6
    _, kl_zeros = kl_divergences(counts)
    np.testing.assert_array_equal(kl, kl_zeros)


@pytest.mark.parametrize("seed,kind", [(0, "relu"), (1, "heavy-tail"), (2, "sparse")])
def test_fast_search_equals_the_plain_loop_on_relu_data(seed: int, kind: str) -> None:
    """Random ReLU activations in two batches (the second reaching further: the histogram grows), every
    candidate's divergence and the chosen threshold equal the plain loop's."""
    rng = np.random.default_rng(seed)
    batches = []
    for scale in (1.0, 1.3):
        x = rng.standard_normal(20_000) * scale
        if kind == "heavy-tail":
            x = rng.standard_t(3, 20_000) * scale
        elif kind == "sparse":
            x = np.where(rng.random(20_000) < 0.9, 0.0, x)
        batches.append(np.maximum(x, 0.0))
    batches[1][0] = 1.25 * batches[0].max()
    hist = AbsHistogram(bins=1024)
    for b in batches:
        hist.add(b)
    assert hist.counts is not None and len(hist.counts) > 1024  # the second batch grew it
    cands, kl = kl_divergences(hist.counts)
    ref = np.array(reference_divergences(hist.counts))
    assert np.array_equal(np.isinf(kl), np.isinf(ref)) and np.isfinite(ref).sum() > 100
    finite = np.isfinite(ref)
    np.testing.assert_allclose(kl[finite], ref[finite], rtol=1e-9, atol=1e-13)
    assert best_candidate(cands, kl) == reference_threshold(hist.counts)


def test_histogram_of_abs_values_grows_with_the_first_batch_width() -> None:
    """First batch: 2048 bins over [0, its max]; a later, wider batch: more bins of the same width. The counts
    equal numpy's histogram of every |x| over the final edges, but for the first batch's maximum, which sat on its
    last bin's closed upper edge (bin 2047) and is bin 2048 for numpy's wider range."""
    rng = np.random.default_rng(3)
    first, second = rng.standard_normal(5000), rng.standard_normal(5000) * 3
    hist = AbsHistogram()
    hist.add(first)
    assert len(hist.counts) == 2048 and hist.width == pytest.approx(np.abs(first).max() / 2048)
    hist.add(second)
    edges = hist.edges
    assert len(hist.counts) > 2048 and edges[-1] >= np.abs(second).max() > edges[-2]
    expected, _ = np.histogram(np.abs(np.concatenate([first, second])), bins=edges)
    expected[2048] -= 1
    expected[2047] += 1
    np.testing.assert_array_equal(hist.counts, expected)
    empty = AbsHistogram()
    empty.add(np.zeros(10))
    assert empty.counts is None and entropy_amax(empty) == 0.0


def _one_conv(path: Path) -> Path:
    from onnx import TensorProto, helper

    w = numpy_helper.from_array(np.random.default_rng(0).standard_normal((4, 3, 1, 1)).astype(np.float32), "w")
    graph = helper.make_graph(
        [helper.make_node("Relu", ["input"], ["r"], name="relu"),
         helper.make_node("Conv", ["r", "w"], ["logits"], name="conv")], "relu_conv",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["n", 3, 8, 8])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["n", 4, 8, 8])], [w])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return path


def test_quantize_qdq_entropy_scale_is_the_loops_threshold(tmp_path: Path) -> None:
    """The conv's input (a ReLU output) gets scale amax / 127 with amax the plain loop's threshold on the |x|
    histogram of the calibration batches: the search runs for real inside quantize_qdq."""
    from fairdeploy.export.int8 import array_reader, quantize_qdq

    rng = np.random.default_rng(4)
    batches = [rng.standard_normal((8, 3, 8, 8)).astype(np.float32) for _ in range(2)]
    batches[0][0, 0, 0, 0] = 40.0  # an outlier the threshold clips (first batch: 2048 bins over [0, 40])
    model = quantize_qdq(_one_conv(tmp_path / "m.onnx"), array_reader(batches), "entropy")
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    q = next(n for n in model.graph.node if n.op_type == "QuantizeLinear" and n.input[0] == "r")
    hist = AbsHistogram()
    for b in batches:
        hist.add(np.maximum(b, 0))
    amax = reference_threshold(hist.counts) * hist.width
    assert 2.0 < amax < 40.0
    assert float(inits[q.input[1]]) == pytest.approx(amax / 127, rel=1e-6)


@pytest.fixture(scope="module")
def resnet18_onnx(tmp_path_factory: pytest.TempPathFactory) -> Path:
    import torch
    from onnxruntime.quantization.shape_inference import quant_pre_process

    from fairdeploy.export.onnx_export import export_model_onnx
    from fairdeploy.models import ModelSpec
    from fairdeploy.models.checkpoint import build_model

    spec = ModelSpec(arch="resnet18", classes=("a", "b", "c"), groups=("x", "y"), image_size=32)
    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("resnet18")
    export_model_onnx(build_model(spec).eval(), spec, out / "model.fp32.onnx", "0" * 64)
    quant_pre_process(str(out / "model.fp32.onnx"), str(out / "pre.onnx"), skip_optimization=True)
    return out


def test_calibrated_tensors_are_onnxruntimes_own_choice(resnet18_onnx: Path) -> None:
    """The tensors histogrammed are exactly those onnxruntime's calibrator selects for the same op types."""
    from onnxruntime.quantization import CalibrationMethod
    from onnxruntime.quantization.calibrate import create_calibrator

    from fairdeploy.export.qdq_placement import ort_settings

    op_types, _ = ort_settings("tensorrt")
    pre = resnet18_onnx / "pre.onnx"
    calibrator = create_calibrator(pre, op_types, augmented_model_path=str(resnet18_onnx / "aug.onnx"),
                                   calibrate_method=CalibrationMethod.MinMax)
    theirs, _ = calibrator.select_tensors_to_calibrate(onnx.load(str(pre)))
    ours = tensors_to_calibrate(onnx.load(str(pre)), op_types)
    assert len(ours) == len(set(ours)) and set(ours) == set(theirs) and len(ours) > 20


def test_every_quantized_activation_gets_its_entropy_range(resnet18_onnx: Path) -> None:
    """In the resnet18 Q/DQ graph every activation QuantizeLinear's scale is its tensor's entropy amax / 127 (no
    tensor fell back to onnxruntime's own MinMax range)."""
    from fairdeploy.export.int8 import array_reader, quantize_qdq
    from fairdeploy.export.qdq_placement import ort_settings

    rng = np.random.default_rng(5)
    batches = [rng.standard_normal((4, 3, 32, 32)).astype(np.float32) for _ in range(2)]
    op_types, _ = ort_settings("tensorrt")
    ranges = entropy_ranges(resnet18_onnx / "pre.onnx", op_types, array_reader(batches))
    model = quantize_qdq(resnet18_onnx / "model.fp32.onnx", array_reader(batches), "entropy")
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    activations = [n for n in model.graph.node if n.op_type == "QuantizeLinear" and n.input[0] not in inits]
    assert len(activations) > 10
    for n in activations:
        lo, hi = ranges[n.input[0]]
        assert lo == -hi and float(inits[n.input[1]]) == pytest.approx(hi / 127, rel=1e-6), n.input[0]
