"""FP16 and INT8 ONNX from a trained checkpoint: Q/DQ structure (symmetric, zero points 0, per-channel
weights), ONNX Runtime CPU inference, top-1 agreement with FP32 on the synthetic test split (recomputed
here and compared with what export.json records), calibration metadata, and the FP16 graph's types.

Which decisions INT8 flips depends on the model's margins and on the CPU's INT8 kernels (2 of 94 on an Intel Xeon
with VNNI, 0 of 94 on an AMD EPYC with AVX2 only), so no assertion here counts on flips: agreement floors come
from a control (a model that ignores the image), and the per-group comparison uses flips built by hand."""

from __future__ import annotations

import importlib
import json
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from numerics_oracles import agreement_floor, fp16_logit_bound
from onnx import TensorProto, helper, numpy_helper

from fairdeploy.artifact.metadata import read_onnx_metadata
from fairdeploy.data.loading import Encoding, eval_transform, split_dataset
from fairdeploy.data.manifest import read_manifest
from fairdeploy.export.calibration import CalibrationItem, set_hash
from fairdeploy.export.exporter import run_export
from fairdeploy.export.profiles import resolve_options
from fairdeploy.files.hashing import sha256_file
from fairdeploy.models import read_spec
from fairdeploy.runtime.ort_runner import session_options


@pytest.fixture(scope="module")
def exported(trained_checkpoint: Path, synth_manifest: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("export") / "out"
    options = resolve_options(None, {"onnx": {"precision": ("fp16", "int8")}, "calibration": {"size": 48, "method": "minmax"}})
    run_export(trained_checkpoint, out, options, data=synth_manifest, check_split="test")  # the split test_split reads
    return out


@pytest.fixture(scope="module")
def test_split(trained_checkpoint: Path, synth_manifest: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    spec = read_spec(trained_checkpoint)
    ds = split_dataset(read_manifest(synth_manifest), "test", Encoding(spec.classes, spec.groups),
                       eval_transform(spec.image_size, spec.mean, spec.std))
    x = np.stack([ds[i][0].numpy() for i in range(len(ds))])
    return x, np.asarray(ds.labels), np.asarray(ds.groups)


def _logits(path: Path, x: np.ndarray) -> np.ndarray:
    sess = ort.InferenceSession(str(path), session_options(), providers=["CPUExecutionProvider"])
    assert sess.get_providers() == ["CPUExecutionProvider"]
    return np.concatenate([sess.run(["logits"], {"input": x[i : i + 16]})[0] for i in range(0, len(x), 16)])


def with_rotated_logits(model: onnx.ModelProto, images: np.ndarray) -> onnx.ModelProto:
    """`model` whose logits are rotated by one class (np.roll(logits, 1)) for exactly the inputs equal to one of
    `images` (every element; the graph compares its input with them as constants), unchanged for every other input:
    a graph that disagrees with the model on a hand-picked set of images, on any CPU."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    g = out.graph
    x, logits = g.input[0].name, g.output[0].name
    k_classes = g.output[0].type.tensor_type.shape.dim[1].dim_value
    raw = f"{logits}/before_rotation"
    for node in g.node:
        node.output[:] = [raw if o == logits else o for o in node.output]
    consts = {"rot/images": images.reshape(len(images), -1).astype(np.float32),
              "rot/shape": np.array([0, 1, -1], np.int64), "rot/axis2": np.array([2], np.int64),
              "rot/axis1": np.array([1], np.int64), "rot/eps": np.array(1e-6, np.float32),
              "rot/half": np.array(0.5, np.float32), "rot/last": np.array([k_classes - 1], np.int64),
              "rot/end": np.array([k_classes], np.int64), "rot/zero": np.array([0], np.int64)}
    g.initializer.extend(numpy_helper.from_array(v, n) for n, v in consts.items())
    g.node.extend([
        helper.make_node("Reshape", [x, "rot/shape"], ["rot/x"]),  # (N, 1, D)
        helper.make_node("Sub", ["rot/x", "rot/images"], ["rot/diff"]),  # (N, k, D)
        helper.make_node("Abs", ["rot/diff"], ["rot/abs"]),
        helper.make_node("ReduceSum", ["rot/abs", "rot/axis2"], ["rot/l1"], keepdims=0),  # (N, k): 0 = same image
        helper.make_node("Less", ["rot/l1", "rot/eps"], ["rot/same"]),
        helper.make_node("Cast", ["rot/same"], ["rot/samef"], to=TensorProto.FLOAT),
        helper.make_node("ReduceSum", ["rot/samef", "rot/axis1"], ["rot/hits"], keepdims=1),  # (N, 1)
        helper.make_node("Greater", ["rot/hits", "rot/half"], ["rot/chosen"]),
        helper.make_node("Slice", [raw, "rot/last", "rot/end", "rot/axis1"], ["rot/tail"]),
        helper.make_node("Slice", [raw, "rot/zero", "rot/last", "rot/axis1"], ["rot/head"]),
        helper.make_node("Concat", ["rot/tail", "rot/head"], ["rot/rolled"], axis=1),
        helper.make_node("Where", ["rot/chosen", "rot/rolled", raw], [logits]),
    ])
    onnx.checker.check_model(out)
    return out


def test_with_rotated_logits_changes_exactly_the_chosen_images(tmp_path: Path) -> None:
    """The construction itself, on a graph whose logits are its input's first three pixels."""
    x = np.random.default_rng(0).standard_normal((5, 3, 4, 4)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("Flatten", ["input"], ["flat"]),
         helper.make_node("Slice", ["flat", "s0", "s3", "s1"], ["logits"])], "first3",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["n", 3, 4, 4])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["n", 3])],
        [numpy_helper.from_array(np.array([v], np.int64), f"s{v}") for v in (0, 1, 3)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    path = tmp_path / "rot.onnx"
    onnx.save(with_rotated_logits(model, x[[1, 3]]), str(path))
    out = _logits(path, x)
    first3 = x.reshape(5, -1)[:, :3]
    assert np.array_equal(out[[0, 2, 4]], first3[[0, 2, 4]])
    assert np.array_equal(out[[1, 3]], np.roll(first3[[1, 3]], 1, axis=1))
    nudged = x.copy()
    nudged[1, 2, 3, 3] += 1e-3  # one element off: not the chosen image any more
    assert np.array_equal(_logits(path, nudged)[1], first3[1])


def test_int8_graph_is_symmetric_per_channel_qdq(exported: Path) -> None:
    model = onnx.load(str(exported / "model.int8.onnx"))
    ops = Counter(n.op_type for n in model.graph.node)
    assert ops["QuantizeLinear"] > 0 and ops["DequantizeLinear"] > ops["QuantizeLinear"]  # + weight DQs
    consts = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    for n in model.graph.node:
        if n.op_type in ("QuantizeLinear", "DequantizeLinear"):
            assert len(n.input) == 3, f"{n.name} has no explicit zero point"
            zp = consts[n.input[2]]
            assert zp.dtype == np.int8 and not zp.any(), f"{n.name}: zero point {zp} is not int8 0"
    # Every Conv's weight arrives through a DequantizeLinear with one scale per output channel (axis 0).
    producers = {o: n for n in model.graph.node for o in n.output}
    convs = [n for n in model.graph.node if n.op_type == "Conv"]
    assert convs
    for conv in convs:
        dq = producers[conv.input[1]]
        assert dq.op_type == "DequantizeLinear"
        weight, scale = consts[dq.input[0]], consts[dq.input[1]]
        assert weight.dtype == np.int8 and scale.shape == (weight.shape[0],)
        axis = next((a.i for a in dq.attribute if a.name == "axis"), 1)
        assert axis == 0
        assert len(conv.input) < 3 or conv.input[2] in consts  # bias stays float (not an int32 DQ)


@pytest.mark.numerics
def test_int8_runs_on_ort_cpu_and_agreement_is_recorded(exported: Path, test_split) -> None:
    x, labels, groups = test_split
    fp32 = _logits(exported / "model.fp32.onnx", x)
    int8 = _logits(exported / "model.int8.onnx", x)
    assert int8.shape == fp32.shape == (len(x), 3)
    agreement = float(np.mean(int8.argmax(1) == fp32.argmax(1)))
    recorded = json.loads((exported / "export.json").read_text())["onnx"]["int8"]
    assert recorded["vs_fp32_onnx"]["n"] == len(x) == 94
    assert recorded["vs_fp32_onnx"]["top1_agreement"] == pytest.approx(agreement, abs=1e-12)
    assert recorded["accuracy"] == pytest.approx(float(np.mean(int8.argmax(1) == labels)), abs=1e-12)
    dark = groups == 0  # spec.groups = (dark, light)
    assert recorded["top1_agreement_per_group"]["dark"] == pytest.approx(
        float(np.mean(int8.argmax(1)[dark] == _logits(exported / "model.fp32.onnx", x[dark]).argmax(1))), abs=1e-12)
    assert agreement >= agreement_floor(fp32.argmax(1)), agreement


def test_int8_metadata_points_at_the_recorded_calibration_set(exported: Path, trained_checkpoint: Path) -> None:
    cal = json.loads((exported / "calibration.json").read_text())
    items = [CalibrationItem(**i) for i in cal["images"]]
    pre = cal["preprocessing"]
    assert set_hash(items, pre["image_size"], pre["mean"], pre["std"]) == cal["sha256"]  # the hash is of this list
    assert Counter((i.group, i.label) for i in items) == {(g, c): 8 for g in ("dark", "light")
                                                          for c in ("cross", "disc", "ring")}
    meta = read_onnx_metadata(exported / "model.int8.onnx")
    assert meta.precision == "int8" and meta.calibration_sha256 == cal["sha256"]
    fp32_meta = read_onnx_metadata(exported / "model.fp32.onnx")
    assert meta.checkpoint_sha256 == fp32_meta.checkpoint_sha256
    assert meta.classes == fp32_meta.classes == read_spec(trained_checkpoint).classes


@pytest.mark.numerics
def test_fp16_graph_has_half_weights_and_float_io(exported: Path, test_split) -> None:
    model = onnx.load(str(exported / "model.fp16.onnx"))
    assert model.graph.input[0].type.tensor_type.elem_type == TensorProto.FLOAT
    assert model.graph.output[0].type.tensor_type.elem_type == TensorProto.FLOAT
    inits = {i.name: i.data_type for i in model.graph.initializer}
    conv_weights = [inits[n.input[1]] for n in model.graph.node if n.op_type == "Conv"]
    assert conv_weights and set(conv_weights) == {TensorProto.FLOAT16}
    assert Counter(inits.values())[TensorProto.FLOAT] == 0
    assert read_onnx_metadata(exported / "model.fp16.onnx").precision == "fp16"
    x, _, _ = test_split
    fp32, fp16 = _logits(exported / "model.fp32.onnx", x), _logits(exported / "model.fp16.onnx", x)
    assert float(np.mean(fp16.argmax(1) == fp32.argmax(1))) >= agreement_floor(fp32.argmax(1))
    assert np.abs(fp16 - fp32).max() < fp16_logit_bound(fp32)


@pytest.mark.numerics  # FP32 graph vs PyTorch within 1e-4, same decisions
def test_export_json_records_checks_and_versions(exported: Path) -> None:
    summary = json.loads((exported / "export.json").read_text())
    fp32 = summary["onnx"]["fp32"]
    assert fp32["self_check"]["max_abs_logit_diff"] < 1e-4 and fp32["self_check"]["batch_sizes"] == [1, 8]
    assert fp32["self_check"]["source"].endswith("manifest.csv:test") and fp32["vs_pytorch"]["top1_agreement"] == 1.0
    assert summary["calibration"]["n"] == 48 and summary["options"]["precisions"] == ["fp32", "fp16", "int8"]
    assert summary["onnx"]["int8"]["placement"] == summary["calibration"]["recipe"]["placement"] == "tensorrt"
    assert summary["calibration"]["recipe"]["mixed_precision"] == "off" and "mixed_precision" not in summary["onnx"]["int8"]
    assert summary["versions"]["onnxruntime"] == ort.__version__ and summary["engines"] == {}
    assert sorted(p.name for p in exported.iterdir()) == [
        "calibration.json", "export.json", "model.fp16.onnx", "model.fp32.onnx", "model.int8.onnx"]


def test_export_json_keeps_its_layout(exported: Path) -> None:
    """export.json, written from the typed ExportSummary, has the keys in the order it has always had them."""
    summary = json.loads((exported / "export.json").read_text())
    assert list(summary) == ["created", "checkpoint", "options", "check_data", "onnx", "calibration", "engines",
                             "versions"]
    assert list(summary["checkpoint"]) == ["path", "sha256", "arch", "classes", "groups", "image_size", "mean", "std",
                                           "sparsity"]
    assert summary["check_data"] == {"source": summary["onnx"]["fp32"]["self_check"]["source"], "n": 94,
                                     "reference": "PyTorch FP32 on the CPU"}
    assert list(summary["calibration"]) == ["file", "sha256", "n", "recipe", "counts"]
    assert list(summary["calibration"]["counts"][0]) == ["group", "class", "n"]
    head, check = ["path", "precision", "sha256"], ["vs_pytorch", "vs_fp32_onnx", "top1_agreement_per_group",
                                                     "accuracy", "accuracy_per_group"]
    assert list(summary["onnx"]) == ["fp32", "fp16", "int8"]
    assert list(summary["onnx"]["fp32"]) == [*head, "opset", "nodes", "self_check", "simplified", "zero_weights",
                                             "total_weights", *(k for k in check if k != "vs_fp32_onnx")]
    assert list(summary["onnx"]["fp16"]) == [*head, *check]
    assert list(summary["onnx"]["int8"]) == [*head, "target", "placement", "qdq", "calibration_sha256", *check]
    assert list(summary["onnx"]["int8"]["vs_pytorch"]) == ["n", "max_abs_logit_diff", "top1_agreement"]


@pytest.fixture(scope="module")
def torch_reference(trained_checkpoint: Path, test_split) -> np.ndarray:
    """The checkpoint's PyTorch logits on the test split."""
    import torch

    from fairdeploy.models.checkpoint import load_checkpoint

    x, _, _ = test_split
    model, _ = load_checkpoint(trained_checkpoint, "cpu")
    with torch.no_grad():
        return np.concatenate([model(torch.from_numpy(x[i : i + 32])).numpy() for i in range(0, len(x), 32)])


class Spy:
    """Wraps the one runner loop (run_runners) and the one comparison (compare) where a module looks them up, and
    records every call: the runners' names with the batches they were fed, and each comparison's arguments with
    what it returned."""

    def __init__(self, mp: pytest.MonkeyPatch, run_modules, compare_modules) -> None:
        base = importlib.import_module("fairdeploy.runtime.base")
        compare_mod = importlib.import_module("fairdeploy.validation.compare")

        self.runs: list[tuple[list[str], list, object]] = []
        self.comparisons: list[tuple[tuple, object]] = []
        real_run, real_compare = base.run_runners, compare_mod.compare
        for module in run_modules:
            assert module.run_runners is real_run  # the very function, not a copy
            mp.setattr(module, "run_runners", self._run(real_run))
        for module in compare_modules:
            assert module.compare is real_compare
            mp.setattr(module, "compare", self._compare(real_compare))

    def _run(self, real):
        def run_runners(runners, batches):
            fed: list = []

            def recorded():
                for batch in batches:
                    fed.append(batch)
                    yield batch

            out = real(runners, recorded())
            self.runs.append(([r.name for r in runners], fed, out))
            return out
        return run_runners

    def _compare(self, real):
        def compare(*args, **kwargs):
            out = real(*args, **kwargs)
            self.comparisons.append((args, out))
            return out
        return compare

    def run_of(self, suffix: str):
        """The one run_runners call in which a runner's name ends with `suffix`: (runner names, batches, results)."""
        found = [r for r in self.runs if any(name.endswith(suffix) for name in r[0])]
        assert len(found) == 1, [r[0] for r in self.runs]
        return found[0]

    def comparison_of(self, candidate_logits: np.ndarray):
        """The one compare call on labelled images whose candidate logits are `candidate_logits` (that array)."""
        found = [out for args, out in self.comparisons if args[1] is candidate_logits and len(args) > 2
                 and args[2] is not None]
        assert len(found) == 1
        return found[0]


@pytest.fixture(scope="module")
def rotated_export(trained_checkpoint: Path, synth_manifest: Path, test_split, torch_reference: np.ndarray,
                   tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, np.ndarray, np.ndarray, Spy]:
    """`fairdeploy export --precision int8` whose INT8 graph (the real quantizer's) gets with_rotated_logits on
    the first two dark test images it agrees with PyTorch on, before export checks it: the INT8 candidate then
    disagrees with the reference on those two images at least, on any CPU. Returns the output folder, the
    unrotated INT8 graph's predictions, the rotated images' indices, and the Spy that saw export's self-check."""
    from fairdeploy.export import exporter

    base = importlib.import_module("fairdeploy.runtime.base")
    x, _, groups = test_split
    ref_pred = torch_reference.argmax(1)
    real_quantize = exporter.quantize_int8
    seen: dict[str, np.ndarray] = {}

    def quantize_then_rotate(fp32_path, out_path, cal, *args, **kwargs) -> Path:
        path = real_quantize(fp32_path, out_path, cal, *args, **kwargs)
        seen["pred"] = _logits(path, x).argmax(1)
        seen["chosen"] = np.flatnonzero((groups == 0) & (seen["pred"] == ref_pred))[:2]  # spec.groups[0] = dark
        assert len(seen["chosen"]) == 2, "the INT8 graph should agree with PyTorch on two dark images at least"
        onnx.save(with_rotated_logits(onnx.load(str(path)), x[seen["chosen"]]), str(path))
        return path

    out = tmp_path_factory.mktemp("export_rotated") / "out"
    options = resolve_options(None, {"onnx": {"precision": ("int8",)}, "calibration": {"size": 48, "method": "minmax"}})
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(exporter, "quantize_int8", quantize_then_rotate)
        spy = Spy(mp, [base], [exporter])  # export runs its runners through base.runner_logits
        run_export(trained_checkpoint, out, options, data=synth_manifest, check_split="test")
    return out, seen["pred"], seen["chosen"], spy


@pytest.mark.numerics
def test_export_check_and_validate_are_one_comparison(rotated_export, trained_checkpoint: Path, synth_manifest: Path,
                                                      test_split, torch_reference: np.ndarray) -> None:
    """Export's self-check and `fairdeploy validate` are one comparison: both feed their runners (PyTorch's
    TorchRunner on the checkpoint, a CPU OrtRunner on the INT8 graph) the same batches of the test split through
    runtime.run_runners and compare the logits with validation.compare.compare, and export.json records what that
    comparison returned. Its numbers equal a loop over logits computed here with torch and a bare ONNX Runtime
    session. The graph disagrees with PyTorch on two dark images by construction (rotated_export), so the
    per-group figures differ between the groups by a known amount, whatever the CPU's INT8 kernels flip or not."""
    from fairdeploy.validation import ValidationConfig, validate

    validate_mod = importlib.import_module("fairdeploy.validation.validate")  # the package's `validate` is the function

    out, unrotated, chosen, export_spy = rotated_export
    x, labels, groups = test_split
    spec = read_spec(trained_checkpoint)
    ref_pred, pred = torch_reference.argmax(1), _logits(out / "model.int8.onnx", x).argmax(1)
    assert np.flatnonzero(pred != unrotated).tolist() == sorted(chosen.tolist())  # exactly the rotated images

    def loop(a: np.ndarray, b: np.ndarray, k: int | None) -> float:
        rows = [i for i in range(len(x)) if k is None or groups[i] == k]
        return sum(int(a[i] == b[i]) for i in rows) / len(rows)

    agree = {g: loop(ref_pred, pred, k) for k, g in enumerate(spec.groups)}
    accuracy = {g: loop(labels, pred, k) for k, g in enumerate(spec.groups)}
    n_dark = int((groups == 0).sum())
    assert agree["dark"] == pytest.approx(loop(ref_pred, unrotated, 0) - 2 / n_dark, abs=1e-12)  # the constructed
    assert agree["light"] == loop(ref_pred, unrotated, 1) and agree["dark"] < 1.0  # flips, and no other change

    with pytest.MonkeyPatch.context() as mp:
        validate_spy = Spy(mp, [validate_mod], [validate_mod])
        cand = validate(trained_checkpoint, [out / "model.int8.onnx"], read_manifest(synth_manifest),
                        ValidationConfig(split="test", bootstrap=0, latency=None), backend="onnxruntime",
                        device="cpu").candidates[0]

    # The same runners over the same batches: export ran PyTorch and the INT8 graph one at a time, validate both
    # together; every run saw the test split in the same batches, with the same labels and groups.
    torch_names, torch_fed, torch_run = export_spy.run_of(str(trained_checkpoint))
    int8_names, int8_fed, int8_run = export_spy.run_of("model.int8.onnx")
    names, fed, run = validate_spy.run_of("model.int8.onnx")
    assert [n.split(":")[0] for n in (*torch_names, *int8_names)] == [n.split(":")[0] for n in names] == [
        "torch", "onnxruntime"]
    for batches in (torch_fed, int8_fed):
        assert [len(b.images) for b in batches] == [len(b.images) for b in fed]
        assert np.array_equal(np.concatenate([b.images for b in batches]), np.concatenate([b.images for b in fed]))
    assert np.array_equal(int8_run.labels, run.labels) and np.array_equal(int8_run.groups, run.groups)
    assert np.array_equal(run.labels, labels) and np.array_equal(run.groups, groups)
    assert np.array_equal(int8_run.runs[0].logits, run.runs[1].logits)  # the same graph on the same batches

    # One comparison: validate's candidate figures are what compare returned to it, export.json's what compare
    # returned to export, and the two comparisons agree (PyTorch's logits are the same weights on the same batches).
    exported, validated = export_spy.comparison_of(int8_run.runs[0].logits), validate_spy.comparison_of(
        run.runs[1].logits)
    assert cand.agreement is validated.agreement and cand.logit_diff is validated.logit_diff
    assert cand.flips is validated.flips and cand.run.metrics is validated.metrics
    assert exported.agreement == validated.agreement and exported.flips == validated.flips
    assert exported.metrics.to_dict() == validated.metrics.to_dict()
    assert exported.logit_diff.max_abs == pytest.approx(validated.logit_diff.max_abs, rel=1e-6)
    recorded = json.loads((out / "export.json").read_text())["onnx"]["int8"]
    assert recorded["sha256"] == sha256_file(out / "model.int8.onnx")  # export checked the rotated graph
    assert recorded["vs_pytorch"] == {"n": exported.n, "max_abs_logit_diff": exported.logit_diff.max_abs,
                                      "top1_agreement": exported.agreement.overall}
    assert recorded["top1_agreement_per_group"] == exported.agreement.groups
    assert recorded["accuracy"] == exported.metrics.overall_accuracy
    assert recorded["accuracy_per_group"] == {g: m.accuracy for g, m in exported.metrics.groups}

    # ... and its numbers are the brute-force loop's.
    assert exported.n == validated.n == len(x)
    assert exported.agreement.overall == pytest.approx(loop(ref_pred, pred, None), abs=1e-12)
    assert exported.agreement.groups == pytest.approx(agree, abs=1e-12)
    assert exported.metrics.overall_accuracy == pytest.approx(loop(labels, pred, None), abs=1e-12)
    assert {g: m.accuracy for g, m in exported.metrics.groups} == pytest.approx(accuracy, abs=1e-12)
    flips_by_hand = {g: sum(int(ref_pred[i] != pred[i]) for i in range(len(x)) if groups[i] == k)
                     for k, g in enumerate(spec.groups)}
    assert {g: f.changed for g, f in exported.flips.items()} == flips_by_hand
    assert flips_by_hand["dark"] >= 2  # the constructed flips at least
    pairs = zip(int8_run.runs[0].logits.ravel().tolist(), torch_run.runs[0].logits.ravel().tolist())
    assert exported.logit_diff.max_abs == max(abs(a - b) for a, b in pairs)
