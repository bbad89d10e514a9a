"""Group-aware mixed precision with oracles: a tiny CNN made quantization-hostile in one place (conv3's input has
one channel 10^3 times larger than the others, lit only by a marker in group b's images), so per-tensor INT8 of
that input wipes out the other channels and group b's decisions. The method must keep exactly that conv in FP32,
the result must pass the gate vanilla INT8 fails, and its per-layer ranking must equal a brute-force loop that
re-quantizes the model with ONNX Runtime's own nodes_to_exclude for every layer. Then the export path: what
export.json records is recomputed here."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from torch import nn

from fairdeploy.errors import FairdeployError
from fairdeploy.export.exporter import run_export
from fairdeploy.export.int8 import array_reader, quantize_qdq
from fairdeploy.export.mixed_precision import (
    EvalSet,
    evaluate,
    graph_logits,
    layer_sensitivity,
    plan_group_aware,
    with_fp32_layers,
)
from fairdeploy.export.profiles import resolve_options
from fairdeploy.validation.tolerances import Tolerances

HOSTILE = "/conv3/Conv"


class Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.conv2, self.conv3 = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 1), nn.Conv2d(8, 8, 1)
        self.fc = nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.conv3(torch.relu(self.conv2(torch.relu(self.conv1(x))))))
        return self.fc(x.mean((2, 3)))


@pytest.fixture(scope="module")
def hostile(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, onnx.ModelProto, EvalSet, list[np.ndarray]]:
    torch.manual_seed(0)
    model = Tiny().eval()
    rng = np.random.default_rng(0)
    x = rng.standard_normal((200, 3, 16, 16)).astype(np.float32)
    groups = np.arange(200) % 2
    x[groups == 1, 2, 4:8, 4:8] = 5.0  # group b's marker: a bright blue patch
    with torch.no_grad():
        model.conv1.weight[0].zero_()
        model.conv1.weight[0, 2, 1, 1], model.conv1.bias[0] = 1.0, -3.0  # channel 0 fires on the marker only
        model.conv2.weight[0].zero_()
        model.conv2.weight[0, 0], model.conv2.bias[0] = 1000.0, 0.0  # ... and is 1000x larger after conv2
        model.conv3.weight[:, 0] *= 1e-4  # conv3 reads it at a normal weight: FP32 decisions barely change
        d = model(torch.from_numpy(x)).numpy()
        model.fc.bias[1] -= float(np.median(d[:, 1] - d[:, 0]))  # both classes predicted
    path = tmp_path_factory.mktemp("tiny") / "tiny.onnx"
    torch.onnx.export(model, torch.from_numpy(x[:1]), str(path), input_names=["input"], output_names=["logits"],
                      dynamic_axes={"input": {0: "n"}, "logits": {0: "n"}}, opset_version=17, dynamo=False)
    fp32 = onnx.load(str(path))
    ref = graph_logits(fp32, x, threads=1)
    margin = np.abs(ref[:, 1] - ref[:, 0])
    keep = margin > np.median(margin)  # labels = FP32 decisions with a clear margin, so only real damage flips them
    data = EvalSet(x[keep], ref[keep].argmax(1), groups[keep], ("a", "b"), 2, "hostile")
    calibration = [x[i : i + 20] for i in range(0, 80, 20)]  # 40 per group
    return path, fp32, data, calibration


@pytest.mark.numerics
def test_group_aware_keeps_the_hostile_layer_and_passes_the_gate(hostile) -> None:
    path, fp32, data, calibration = hostile
    full = quantize_qdq(path, array_reader(calibration), "minmax")
    plan = plan_group_aware(full, fp32, data, Tolerances(), threads=1)
    assert not plan.vanilla.passed
    assert plan.vanilla.accuracy_drop_per_group["b"] > 0.5  # group b's decisions are the ones lost
    assert plan.kept_fp32 == (HOSTILE,)
    assert plan.sensitivity[0].layer == HOSTILE and plan.final.passed
    # The plan's numbers are the final graph's, recomputed from scratch.
    final = with_fp32_layers(full, fp32, plan.kept_fp32)
    again = evaluate(graph_logits(final, data.inputs, threads=1), graph_logits(fp32, data.inputs, threads=1), data,
                     Tolerances())
    assert again.to_dict() == plan.final.to_dict()
    record = plan.to_dict()
    assert [k["layer"] for k in record["kept_fp32"]] == [HOSTILE] and record["kept_fp32"][0]["rank"] == 1
    assert "group 'b'" in record["kept_fp32"][0]["why"]
    assert record["kept_fp32"][0]["sensitivity"]["accuracy_drop_per_group"] == \
        plan.sensitivity[0].evaluation.accuracy_drop_per_group


@pytest.mark.numerics
def test_sensitivity_ranking_equals_a_brute_force_requantization_loop(hostile) -> None:
    path, fp32, data, calibration = hostile
    full = quantize_qdq(path, array_reader(calibration), "minmax")
    reference = graph_logits(fp32, data.inputs, threads=1)
    fast = layer_sensitivity(full, fp32, data, reference, Tolerances(), threads=1)
    layers = ["/conv1/Conv", "/conv2/Conv", HOSTILE, "/fc/Gemm"]
    brute = []
    for layer in layers:  # ORT recalibrates with every other layer excluded, then the same placement
        only = quantize_qdq(path, array_reader(calibration), "minmax", keep_fp32=[x for x in layers if x != layer])
        brute.append((layer, evaluate(graph_logits(only, data.inputs, threads=1), reference, data, Tolerances()).harm))
    brute.sort(key=lambda lh: tuple(-h for h in lh[1]))
    assert [s.layer for s in fast] == [layer for layer, _ in brute]
    for s, (_, harm) in zip(fast, brute):
        assert s.evaluation.harm == pytest.approx(harm, abs=1e-6)


@pytest.mark.numerics
def test_fast_fp32_layers_equal_ort_exclusion(hostile) -> None:
    path, fp32, data, calibration = hostile
    fast = with_fp32_layers(quantize_qdq(path, array_reader(calibration), "minmax"), fp32, [HOSTILE])
    ort = quantize_qdq(path, array_reader(calibration), "minmax", keep_fp32=[HOSTILE])
    ops = sorted(n.op_type for n in fast.graph.node)
    assert ops == sorted(n.op_type for n in ort.graph.node)
    np.testing.assert_allclose(graph_logits(fast, data.inputs, threads=1), graph_logits(ort, data.inputs, threads=1),
                               rtol=0, atol=1e-6)


@pytest.mark.numerics
def test_export_records_the_plan(trained_checkpoint: Path, synth_manifest: Path, small_synth_manifest: Path,
                                 tmp_path: Path) -> None:
    # the plan's cost is one ONNX Runtime pass over val per layer tried: a smaller val split (48 images) proves the
    # same records, since the final numbers are recomputed below on whatever val the export used
    options = resolve_options(None, {"onnx": {"precision": ("int8",)}, "calibration": {"size": 24, "mixed_precision": "group-aware"}})
    result = run_export(trained_checkpoint, tmp_path / "out", options, data=small_synth_manifest,
                        images_root=synth_manifest.parent)
    recorded = json.loads(result.export_json.read_text())
    assert recorded == json.loads(json.dumps(result.summary.to_dict()))
    info = recorded["onnx"]["int8"]
    mixed = info["mixed_precision"]
    assert info["placement"] == "tensorrt" and recorded["calibration"]["recipe"]["mixed_precision"] == "group-aware"
    assert result.summary.onnx["int8"].int8.mixed_precision.kept_fp32 == tuple(k["layer"] for k in mixed["kept_fp32"])
    assert mixed["data"].endswith("manifest.csv:val") and mixed["final"]["gate_passed"]
    kept = [k["layer"] for k in mixed["kept_fp32"]]
    model = onnx.load(str(result.onnx["int8"]))
    producers = {o: n.op_type for n in model.graph.node for o in n.output}
    for node in model.graph.node:
        if node.op_type in ("Conv", "Gemm"):
            assert (producers.get(node.input[1]) == "DequantizeLinear") == (node.name not in kept)
    # The final numbers recorded are the written model.int8.onnx's on the val split, recomputed here.
    from fairdeploy.data.manifest import read_manifest
    from fairdeploy.export.exporter import load_check_data
    from fairdeploy.models import read_spec

    spec = read_spec(trained_checkpoint)
    val = load_check_data(read_manifest(small_synth_manifest, synth_manifest.parent), spec, "val", 0)
    assert len(val.labels) == 48
    data = EvalSet(val.inputs, val.labels, val.groups, tuple(spec.groups), spec.num_classes)
    fp32 = onnx.load(str(result.onnx["fp32"]))
    ref = graph_logits(fp32, data.inputs, threads=1)
    again = evaluate(graph_logits(model, data.inputs, threads=1), ref, data, Tolerances())
    assert again.to_dict() == mixed["final"]


def test_group_aware_needs_tensorrt_placement_and_a_val_split(trained_checkpoint: Path, synth_manifest: Path,
                                                              tmp_path: Path) -> None:
    with pytest.raises(FairdeployError, match="mixed_precision 'group-aware' needs placement 'tensorrt'"):
        resolve_options(None, {"onnx": {"precision": ("int8",)}, "calibration": {
            "size": 24, "mixed_precision": "group-aware", "placement": "ort-default"}})
    with pytest.raises(FairdeployError, match=r"mixed precision 'some' is not one of off, group-aware"):
        resolve_options(None, {"calibration": {"mixed_precision": "some"}})
    with pytest.raises(FairdeployError, match=r"Q/DQ placement 'trt' is not one of tensorrt, ort-default"):
        resolve_options(None, {"calibration": {"placement": "trt"}})
    assert not (tmp_path / "a").exists()  # refused before anything was written


def _cli(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    import sys

    from fairdeploy.cli import main

    monkeypatch.setattr(sys, "argv", ["fairdeploy", *args])
    try:
        main()
        code = 0
    except SystemExit as exc:
        code = int(exc.code or 0)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_cli_flags_choose_placement_and_refuse_unknown_values(trained_checkpoint: Path, synth_manifest: Path,
                                                              tmp_path: Path, monkeypatch, capsys) -> None:
    common = ["export", "--model", str(trained_checkpoint), "--precision", "int8", "--data", str(synth_manifest),
              "--calib-size", "24"]
    code, _, err = _cli(monkeypatch, capsys, *common, "--out", str(tmp_path / "bad"), "--int8-mixed", "sometimes")
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and "Traceback" not in err
    assert "mixed precision 'sometimes' is not one of off, group-aware" in lines[0]
    code, _, err = _cli(monkeypatch, capsys, *common, "--out", str(tmp_path / "ort"), "--int8-placement", "ort-default")
    assert code == 0, err
    summary = json.loads((tmp_path / "ort" / "export.json").read_text())
    assert summary["onnx"]["int8"]["placement"] == summary["calibration"]["recipe"]["placement"] == "ort-default"
    model = onnx.load(str(tmp_path / "ort" / "model.int8.onnx"))
    producers = {o: n.op_type for n in model.graph.node for o in n.output}
    adds = [n for n in model.graph.node if n.op_type == "Add"]
    assert adds and all(producers.get(t) == "DequantizeLinear" for a in adds for t in a.input)  # ORT: both inputs
