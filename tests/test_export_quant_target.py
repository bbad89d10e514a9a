"""INT8 quantization targets (issue 19 §1): the "ort-cpu" graph for ONNX Runtime's CPU provider, checked by walking
it (U8 activations with the zero point their calibrated range implies, S8 per-channel weights with zero point 0,
recomputed here from the FP32 graph's tensors and weights); its logits against FP32 within a bound set by a
control; the target recorded in export.json and the ONNX metadata; unknown targets refused with one line.

The graphs are real torchvision models (resnet18, mobilenet_v3_small at 32 px, random init with BatchNorm statistics
of random batches, heads re-initialised to unit-variance logits), exported by fairdeploy's FP32 exporter and
quantized by fairdeploy's quantize_qdq on 4 batches of 8 random images."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from onnx_graphs import random_init_graphs

from fairdeploy.artifact.metadata import OnnxMetadata, read_onnx_metadata
from fairdeploy.errors import FairdeployError
from fairdeploy.export.exporter import run_export
from fairdeploy.export.int8 import array_reader, quantize_qdq
from fairdeploy.export.mixed_precision import graph_logits
from fairdeploy.export.profiles import resolve_options
from fairdeploy.export.quant_target import TARGETS
from fairdeploy.validation.fingerprint import cpu_isa

ARCHS = ("resnet18", "mobilenet_v3_small")
# ONNX Runtime warns that its U8S8 kernel on CPUs without VNNI (vpmaddubsw) can saturate and recommends 7-bit
# weights there: on such a CPU the graph under test is the one fairdeploy's docs recommend for it.
ISA = cpu_isa() or {}
REDUCE_RANGE = ISA.get("avx2", False) and not (ISA.get("avx512_vnni") or ISA.get("avx_vnni"))


@pytest.fixture(scope="module")
def graphs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, list[np.ndarray]]]:
    return random_init_graphs(ARCHS, tmp_path_factory)


@pytest.fixture(scope="module")
def ort_cpu(graphs) -> dict[str, onnx.ModelProto]:
    return {arch: quantize_qdq(path, array_reader(batches), "minmax", target="ort-cpu", reduce_range=REDUCE_RANGE)
            for arch, (path, batches) in graphs.items()}


def _inits(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}


def observed_ranges(fp32_path: Path, tensors: list[str], batches: list[np.ndarray]) -> dict[str, tuple[float, float]]:
    """Brute force: every named tensor of the FP32 graph made an output, run over the calibration batches; its
    min and max over all of them."""
    import onnxruntime as ort

    model = onnx.load(str(fp32_path))
    known = {o.name for o in model.graph.output}
    for t in tensors:
        if t not in known:
            model.graph.output.append(helper.make_tensor_value_info(t, TensorProto.FLOAT, None))
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    lo = {t: np.inf for t in tensors}
    hi = {t: -np.inf for t in tensors}
    for x in batches:
        for name, value in zip(names, session.run(names, {"input": x})):
            if name in lo:
                lo[name], hi[name] = min(lo[name], float(value.min())), max(hi[name], float(value.max()))
    return {t: (lo[t], hi[t]) for t in tensors}


# ---- the graph's types and zero points ----

@pytest.mark.parametrize("arch", ARCHS)
def test_ort_cpu_activations_are_uint8_with_the_zero_point_their_range_implies(graphs, ort_cpu, arch: str) -> None:
    path, batches = graphs[arch]
    model = ort_cpu[arch]
    inits = _inits(model)
    fp32_tensors = {o for n in onnx.load(str(path)).graph.node for o in n.output} | {"input"}
    quantize = [n for n in model.graph.node if n.op_type == "QuantizeLinear"]
    assert quantize and all(inits[n.input[2]].dtype == np.uint8 for n in quantize)
    # A tensor of the FP32 graph quantized on its own range (ORT gives ops like MaxPool / Flatten their input's
    # parameters instead: those tensors are checked below through the op that produced them).
    ranges = observed_ranges(path, sorted({n.input[0] for n in quantize} & fp32_tensors), batches)
    checked = 0
    for n in quantize:
        if n.input[0] not in ranges:
            continue
        lo, hi = ranges[n.input[0]]
        lo, hi = min(lo, 0.0), max(hi, 0.0)  # the range always holds 0 (ReLU outputs: zero point 0)
        scale, zero = float(inits[n.input[1]]), int(inits[n.input[2]])
        if scale != pytest.approx((hi - lo) / 255, rel=1e-5):
            continue  # a shared scale (see above)
        assert zero == round(-lo / scale), n.input[0]
        checked += 1
    assert checked >= {"resnet18": 20, "mobilenet_v3_small": 40}[arch]
    assert any(int(inits[n.input[2]]) == 0 for n in quantize)  # a ReLU output: range [0, max]
    assert any(int(inits[n.input[2]]) not in (0, 128) for n in quantize)  # an asymmetric one


@pytest.mark.parametrize("arch", ARCHS)
def test_ort_cpu_weights_are_int8_per_channel_with_zero_point_0(graphs, ort_cpu, arch: str) -> None:
    path, _ = graphs[arch]
    fp32 = _inits(onnx.load(str(path)))
    model = ort_cpu[arch]
    inits = _inits(model)
    qmax = 64 if REDUCE_RANGE else 127
    weights = 0
    for n in model.graph.node:
        if n.op_type != "DequantizeLinear" or n.input[0] not in inits or inits[n.input[0]].dtype != np.int8:
            continue
        q, scale, zero = inits[n.input[0]], inits[n.input[1]], inits[n.input[2]]
        assert not zero.any() and zero.dtype == np.int8
        original = fp32[n.input[0].removesuffix("_quantized")]
        axis = next((a.i for a in n.attribute if a.name == "axis"), 1)
        assert scale.shape == (original.shape[axis],)  # one scale per output channel
        absmax = np.moveaxis(np.abs(original), axis, 0).reshape(original.shape[axis], -1).max(1)
        np.testing.assert_allclose(scale, absmax / qmax, rtol=1e-6)  # symmetric: [-absmax, absmax]
        shape = [1] * original.ndim
        shape[axis] = -1
        np.testing.assert_array_equal(q, np.clip(np.rint(original / scale.reshape(shape)), -qmax, qmax))
        weights += 1
    convs = sum(n.op_type in ("Conv", "Gemm") for n in onnx.load(str(path)).graph.node)
    assert weights == convs  # every Conv and Gemm weight


@pytest.mark.parametrize("arch", ARCHS)
def test_ort_cpu_graph_is_not_the_tensorrt_one(graphs, ort_cpu, arch: str) -> None:
    """The target's own check accepts the graph; the TensorRT target's refuses it (asymmetric activations), and the
    other way round: the checks can fail."""
    from fairdeploy.export.int8 import qdq_summary

    path, batches = graphs[arch]
    trt = quantize_qdq(path, array_reader(batches), "minmax", target="tensorrt")
    mine, theirs = qdq_summary(ort_cpu[arch]), qdq_summary(trt)
    assert TARGETS["ort-cpu"].graph_problem(mine) is None and TARGETS["tensorrt"].graph_problem(theirs) is None
    assert "activation zero points" in TARGETS["tensorrt"].graph_problem(mine)
    assert "activation zero points" in TARGETS["ort-cpu"].graph_problem(theirs)
    # ORT fuses the Q/DQ around every op it quantizes: more Q nodes than the TensorRT placement's
    assert mine.quantize_nodes > theirs.quantize_nodes


# ---- logits against FP32: a bound from two controls ----

def _scaled(model: onnx.ModelProto, activation: float, weight_step: int) -> onnx.ModelProto:
    """`model` with every activation scale multiplied by `activation` (zero points kept) and every weight step
    `weight_step` times coarser (q // step rounded, scale * step); int32 biases follow (their scale is the input's
    times the weight's)."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    inits = _inits(out)
    act_scales = {n.input[1] for n in out.graph.node if n.op_type == "QuantizeLinear"}
    new: dict[str, np.ndarray] = {name: inits[name] * np.float32(activation) for name in act_scales}
    for n in out.graph.node:
        if n.op_type != "DequantizeLinear" or n.input[0] not in inits:
            continue
        q, scale = inits[n.input[0]], inits[n.input[1]]
        if q.dtype == np.int8:
            new[n.input[0]] = np.rint(q / weight_step).astype(np.int8)
            new[n.input[1]] = scale * np.float32(weight_step)
        elif q.dtype == np.int32:
            factor = activation * weight_step
            new[n.input[0]] = np.rint(q / factor).astype(np.int32)
            new[n.input[1]] = scale * np.float32(factor)
    for init in out.graph.initializer:
        if init.name in new:
            init.CopyFrom(numpy_helper.from_array(new[init.name].astype(inits[init.name].dtype), init.name))
    return out


@pytest.mark.parametrize("arch", ARCHS)
def test_ort_cpu_logits_agree_with_fp32_better_than_a_coarser_graph(graphs, ort_cpu, arch: str) -> None:
    """The bound: the same graph with every quantization step doubled (activation scales x 2, weights one bit
    fewer, biases rescaled; no range clipped). Rounding error grows with the step, so the real graph must be closer
    to FP32 than that. The clipped control (activation scales / 4: every range cut to a quarter) must exceed the
    bound, so the bound is not so loose that a broken calibration passes it."""
    path, batches = graphs[arch]
    x = np.concatenate(batches)
    fp32 = graph_logits(onnx.load(str(path)), x, 16, threads=1)

    def rel_error(model: onnx.ModelProto) -> float:
        return float(np.abs(graph_logits(model, x, 16, threads=1) - fp32).max() / np.abs(fp32).max())

    model = ort_cpu[arch]
    bound = rel_error(_scaled(model, 2.0, 2))
    real, clipped = rel_error(model), rel_error(_scaled(model, 0.25, 1))
    assert real < bound < clipped, (real, bound, clipped)


# ---- the target in the configuration, export.json and the ONNX metadata ----

def test_packaged_profiles_choose_their_target() -> None:
    assert resolve_options("cpu-workstation-int8").calibration.target == "ort-cpu"
    cpu = resolve_options("cpu-workstation-int8")
    assert cpu.calibration.qdq_placement == "ort-cpu" and not cpu.tensorrt.enabled and "int8" in cpu.precisions
    for gpu in ("workstation-int8", "jetson-agx-orin-int8-dla"):
        opts = resolve_options(gpu)
        assert opts.calibration.target == "tensorrt" and opts.calibration.qdq_placement == "tensorrt"
    none = resolve_options(None)  # no profile: the dataclass default
    assert none.calibration.target == "tensorrt" and none.calibration.placement is None
    flag = resolve_options("workstation-int8", {"calibration": {"target": "ort-cpu"}, "tensorrt": {"enabled": False}})
    assert flag.calibration.target == "ort-cpu" and flag.calibration.qdq_placement == "ort-cpu"  # flags win


@pytest.fixture(scope="module")
def exports(trained_checkpoint: Path, synth_manifest: Path, tmp_path_factory: pytest.TempPathFactory
            ) -> dict[str, Path]:
    """The same checkpoint and calibration set exported for each target (the CPU profile, and no profile)."""
    root = tmp_path_factory.mktemp("targets")
    out = {}
    for target, profile in (("ort-cpu", "cpu-workstation-int8"), ("tensorrt", None)):
        options = resolve_options(profile, {"onnx": {"precision": ("int8",)}, "calibration": {"size": 24}})
        run_export(trained_checkpoint, root / target, options, data=synth_manifest)
        out[target] = root / target
    return out


@pytest.mark.parametrize("target", list(TARGETS))
def test_target_is_recorded_in_export_json_and_the_onnx_metadata(exports, target: str) -> None:
    summary = json.loads((exports[target] / "export.json").read_text())
    int8 = summary["onnx"]["int8"]
    assert int8["target"] == summary["calibration"]["recipe"]["target"] == target
    assert summary["options"]["calibration"]["target"] == target
    assert int8["placement"] == summary["calibration"]["recipe"]["placement"] == TARGETS[target].placement
    assert read_onnx_metadata(exports[target] / "model.int8.onnx").quantization_target == target
    assert read_onnx_metadata(exports[target] / "model.fp32.onnx").quantization_target is None
    expected = 2 if target == "ort-cpu" else 3  # ONNX uint8 / int8
    assert int8["qdq"]["activation_zero_point_types"] == [expected]


def test_the_calibration_set_is_shared_by_both_targets(exports) -> None:
    a, b = (json.loads((exports[t] / "calibration.json").read_text()) for t in TARGETS)
    assert a["sha256"] == b["sha256"] and a["images"] == b["images"]
    assert (read_onnx_metadata(exports["ort-cpu"] / "model.int8.onnx").calibration_sha256
            == read_onnx_metadata(exports["tensorrt"] / "model.int8.onnx").calibration_sha256 == a["sha256"])


def test_metadata_round_trip_and_an_unknown_recorded_target() -> None:
    meta = OnnxMetadata("resnet18", ("a",), ("x",), 32, (0.5,) * 3, (0.2,) * 3, "0" * 64, "int8", "1" * 64, "ort-cpu")
    props = meta.to_props()
    assert props["fairdeploy.quantization_target"] == "ort-cpu"
    assert OnnxMetadata.from_props(props) == meta
    old = {k: v for k, v in props.items() if k != "fairdeploy.quantization_target"}  # an export from before targets
    assert OnnxMetadata.from_props(old).quantization_target is None
    with pytest.raises(FairdeployError, match=r"quantization_target 'gpu' is not one of tensorrt, ort-cpu"):
        OnnxMetadata.from_props({**props, "fairdeploy.quantization_target": "gpu"}, "m.onnx")


# ---- refusals: one line, naming the valid choices ----

def test_unknown_target_is_refused_with_one_line(run_main, trained_checkpoint: Path, synth_manifest: Path,
                                                 tmp_path: Path) -> None:
    code, _, err = run_main("export", "--model", str(trained_checkpoint), "--out", str(tmp_path / "out"),
                            "--precision", "int8", "--data", str(synth_manifest), "--int8-target", "cpu")
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, err
    assert "--int8-target" in lines[0] and "quantization target 'cpu' is not one of tensorrt, ort-cpu" in lines[0]
    assert not (tmp_path / "out" / "model.int8.onnx").exists()
    profile = tmp_path / "p.toml"
    profile.write_text('[calibration]\ntarget = "ORT-CPU"\n')
    with pytest.raises(FairdeployError, match=r"p\.toml: \[calibration\] target: quantization target 'ORT-CPU' is "
                                              r"not one of tensorrt, ort-cpu"):
        resolve_options(str(profile))
    with pytest.raises(FairdeployError, match=r"quantization target 'x' is not one of tensorrt, ort-cpu"):
        quantize_qdq("unused.onnx", None, target="x")


def test_combinations_that_cannot_work_are_refused() -> None:
    with pytest.raises(FairdeployError, match=r"target: a TensorRT INT8 engine needs model\.int8\.onnx quantized for "
                                              r"target 'tensorrt'.*this export's target is 'ort-cpu'"):
        resolve_options("cpu-workstation-int8", {"tensorrt": {"enabled": True}})
    # the implicit calibrator builds the engine from the fp32 ONNX: any target's int8.onnx can sit beside it
    assert resolve_options("cpu-workstation-int8", {"tensorrt": {"enabled": True, "implicit_int8": True}})
    with pytest.raises(FairdeployError, match=r"reduce_range \(7-bit weights\) is for target 'ort-cpu', not 'tensorrt'"):
        resolve_options("workstation-int8", {"calibration": {"reduce_range": True}})
    with pytest.raises(FairdeployError, match=r"mixed_precision 'group-aware' needs target 'tensorrt'"):
        resolve_options("cpu-workstation-int8", {"calibration": {"mixed_precision": "group-aware"}})

