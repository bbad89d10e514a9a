"""Runners: every backend returns the logits PyTorch returns on the same batch, in the promised shape."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
from numerics_oracles import agreement_floor, fp16_logit_bound

from fairdeploy.errors import FairdeployError, MissingDependencyError
from fairdeploy.models import ModelSpec, create_model, load_checkpoint, save_checkpoint
from fairdeploy.runtime import (
    BaseRunner,
    InputSpec,
    Runner,
    artifact_kind,
    choose_backend,
    runner_from_artifact,
)
from fairdeploy.runtime.ort_runner import (
    GRAPH_OPT_ENV,
    OrtRunner,
    check_providers,
    missing_providers,
    session_options,
)
from fairdeploy.runtime.torch_runner import TorchRunner
from fairdeploy.validation.fingerprint import environment_fingerprint

CPU = torch.device("cpu")


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    """2 shared cores: torch's intra-op threads contend with other processes' (10x slower); use one here."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _batch(n: int, size: int = 32, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, 3, size, size)).astype(np.float32)


def _torch_logits(checkpoint: Path, batch: np.ndarray) -> np.ndarray:
    model, _ = load_checkpoint(checkpoint, "cpu")
    with torch.no_grad():
        return model(torch.from_numpy(batch)).numpy()


def test_torch_runner_matches_the_model_and_keeps_the_contract(trained_checkpoint: Path) -> None:
    batch = _batch(5)
    runner = TorchRunner(trained_checkpoint, CPU)
    assert isinstance(runner, Runner)
    with pytest.raises(RuntimeError, match="not active"):
        runner.infer(batch)
    with runner:
        assert runner.input_spec() == InputSpec("input", (-1, 3, 32, 32), "float32")
        out = runner.infer(batch)
        one = runner.infer(batch[:1])
        as_f64 = runner.infer(batch.astype(np.float64))  # converted to float32, not rejected
    assert out.shape == (5, 3) and out.dtype == np.float32 and out.flags.c_contiguous
    assert one.shape == (1, 3)
    np.testing.assert_allclose(out, _torch_logits(trained_checkpoint, batch), rtol=0, atol=1e-6)
    np.testing.assert_allclose(one[0], out[0], rtol=0, atol=1e-5)
    np.testing.assert_allclose(as_f64, out, rtol=0, atol=1e-6)
    assert not runner.is_active
    assert runner.info.classes == ("cross", "disc", "ring") and runner.info.kind == "checkpoint"
    assert runner.info.size_bytes == (Path(trained_checkpoint) / "model.safetensors").stat().st_size


def test_wrong_input_shape_is_named(trained_checkpoint: Path) -> None:
    with TorchRunner(trained_checkpoint, CPU) as runner:
        with pytest.raises(FairdeployError, match=r"\(N, 3, 32, 32\), got \(2, 3, 48, 48\)"):
            runner.infer(_batch(2, size=48))


@pytest.mark.numerics
def test_ort_fp32_matches_pytorch(trained_checkpoint: Path, runtime_fp32_onnx: Path) -> None:
    batch = _batch(7, seed=1)
    runner = runner_from_artifact(runtime_fp32_onnx, device="cpu")
    assert isinstance(runner, OrtRunner) and runner.backend == "onnxruntime"
    with runner:
        assert runner.input_spec() == InputSpec("input", (-1, 3, 32, 32), "float32")
        out = runner.infer(batch)
        single = np.concatenate([runner.infer(batch[i : i + 1]) for i in range(len(batch))])
    expected = _torch_logits(trained_checkpoint, batch)
    assert out.shape == (7, 3) and out.dtype == np.float32
    np.testing.assert_allclose(out, expected, rtol=0, atol=1e-4)
    np.testing.assert_allclose(single, expected, rtol=0, atol=1e-4)  # the dynamic batch axis works
    assert runner.describe()["providers_active"] == ["CPUExecutionProvider"]
    assert runner.info.source_sha256 is not None and runner.info.precision == "fp32"


@pytest.mark.numerics
def test_ort_matches_pytorch_on_another_architecture(tmp_path: Path) -> None:
    """mobilenet_v3_small (hardswish, squeeze-excitation), untrained: ONNX Runtime == PyTorch."""
    from fairdeploy.export.onnx_export import export_onnx

    torch.manual_seed(0)
    spec = ModelSpec(arch="mobilenet_v3_small", classes=("a", "b", "c", "d"), groups=("g0", "g1"), image_size=32)
    ckpt = save_checkpoint(create_model(spec.arch, 4).eval(), spec, tmp_path / "ckpt")
    onnx_path = export_onnx(ckpt, tmp_path / "model.fp32.onnx").path
    batch = _batch(4, seed=2)
    with runner_from_artifact(onnx_path, backend="onnxruntime", device="cpu") as ort_runner, \
            runner_from_artifact(ckpt, device="cpu") as torch_runner:
        a, b = ort_runner.infer(batch), torch_runner.infer(batch)
    assert a.shape == (4, 4)
    np.testing.assert_allclose(a, b, rtol=0, atol=1e-4)


@pytest.mark.numerics
def test_ort_fp16_and_int8_stay_close_to_pytorch(
    trained_checkpoint: Path, runtime_fp32_onnx: Path, synth_manifest: Path, tmp_path: Path
) -> None:
    """FP16 within FP16's rounding of the logits; INT8 (Q/DQ on the CPU provider) at least halfway between an exact
    copy and a model that ignores the image (numerics_oracles: how many decisions INT8 flips depends on the CPU)."""
    from fairdeploy.data.loading import Encoding, eval_transform, split_dataset
    from fairdeploy.data.manifest import read_manifest
    from fairdeploy.export.calibration import CalibrationRecipe, draw_calibration_set
    from fairdeploy.export.fp16 import convert_fp16
    from fairdeploy.export.int8 import quantize_int8
    from fairdeploy.models import read_spec

    spec = read_spec(trained_checkpoint)
    manifest = read_manifest(synth_manifest)
    fp16 = convert_fp16(runtime_fp32_onnx, tmp_path / "model.fp16.onnx")
    cal = draw_calibration_set(manifest, spec, CalibrationRecipe(size=48, batch_size=16))
    int8 = quantize_int8(runtime_fp32_onnx, tmp_path / "model.int8.onnx", cal)
    ds = split_dataset(manifest, "test", Encoding(spec.classes, spec.groups),
                      eval_transform(spec.image_size, spec.mean, spec.std))
    images = np.stack([ds[i][0].numpy() for i in range(len(ds))])
    expected = _torch_logits(trained_checkpoint, images)
    with runner_from_artifact(fp16, device="cpu") as r16, runner_from_artifact(int8, device="cpu") as r8:
        assert r16.info.precision == "fp16" and r8.info.precision == "int8"
        out16, out8 = r16.infer(images), r8.infer(images)
    assert out16.dtype == np.float32 and out8.dtype == np.float32 and out8.shape == expected.shape
    assert np.abs(out16 - expected).max() < fp16_logit_bound(expected)
    agreement8 = float((out8.argmax(1) == expected.argmax(1)).mean())
    assert agreement8 >= agreement_floor(expected.argmax(1)), agreement8
    assert np.abs(out8 - expected).max() > 0  # it really is a different (quantized) graph


def test_provider_fallback_is_an_error_naming_requested_and_active(runtime_fp32_onnx: Path) -> None:
    """CUDAExecutionProvider is not available here: ONNX Runtime would silently use the CPU."""
    runner = runner_from_artifact(runtime_fp32_onnx, backend="ort-cuda", device="cpu")
    with pytest.raises(MissingDependencyError) as err:
        runner.activate()
    msg = str(err.value)
    assert "requested providers CUDAExecutionProvider, CPUExecutionProvider" in msg
    assert "the session runs on CPUExecutionProvider" in msg and "--allow-fallback" in msg
    assert "\n" not in msg
    assert not runner.is_active


@pytest.mark.numerics
def test_allowed_fallback_is_recorded_in_the_fingerprint(trained_checkpoint: Path, runtime_fp32_onnx: Path) -> None:
    batch = _batch(3, seed=3)
    with runner_from_artifact(runtime_fp32_onnx, backend="ort-cuda", device="cpu", allow_fallback=True) as runner:
        out = runner.infer(batch)
        fp = environment_fingerprint([runner])
    entry = fp["runners"][runner.name]
    assert entry["fallback"] is True
    assert entry["providers_missing"] == ["CUDAExecutionProvider"]
    assert entry["providers_active"] == ["CPUExecutionProvider"]
    assert entry["providers_requested"] == ["CUDAExecutionProvider", "CPUExecutionProvider"]
    np.testing.assert_allclose(out, _torch_logits(trained_checkpoint, batch), rtol=0, atol=1e-4)


@pytest.mark.numerics
def test_graph_optimisation_level_is_read_from_the_environment(runtime_fp32_onnx: Path, run_main, tmp_path: Path,
                                                              synth_manifest: Path, trained_checkpoint: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """$FAIRDEPLOY_ORT_GRAPH_OPT sets every session's level (recorded by the runner); unset, ONNX Runtime's default
    holds; anything else is one line naming the valid levels, exit 2 from the CLI."""
    batch = _batch(4, seed=5)
    monkeypatch.delenv(GRAPH_OPT_ENV, raising=False)
    assert session_options().graph_optimization_level == ort.SessionOptions().graph_optimization_level
    with runner_from_artifact(runtime_fp32_onnx, device="cpu") as runner:
        fused = runner.infer(batch)
        assert "graph_optimization" not in runner.describe()
    monkeypatch.setenv(GRAPH_OPT_ENV, "disable")
    options = session_options(threads=2)
    assert options.graph_optimization_level == ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    assert options.intra_op_num_threads == 2
    with runner_from_artifact(runtime_fp32_onnx, device="cpu") as runner:
        plain = runner.infer(batch)
        assert runner.describe()["graph_optimization"] == "disable"
    # the same graph without fusions: float32 rounding apart, the same logits (BatchNorm no longer folded)
    np.testing.assert_allclose(plain, fused, rtol=0, atol=1e-4 * max(1.0, float(np.abs(fused).max())))
    monkeypatch.setenv(GRAPH_OPT_ENV, "fast")
    message = (f"{GRAPH_OPT_ENV}='fast' is not a graph optimisation level; choose one of disable, basic, extended, "
               "all (or leave it unset for ONNX Runtime's default)")
    with pytest.raises(FairdeployError) as err:
        runner_from_artifact(runtime_fp32_onnx, device="cpu").activate()
    assert str(err.value) == message
    code, _, stderr = run_main("validate", "-r", str(trained_checkpoint), "-c", str(runtime_fp32_onnx), "--data",
                               str(synth_manifest), "--out", str(tmp_path / "val"), "--device", "cpu",
                               "--bootstrap", "0", "--no-latency")
    assert code == 2 and stderr.strip().splitlines() == [f"error: {message}"]
    assert not (tmp_path / "val").exists()


def test_check_providers_rules() -> None:
    trt = ("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider")
    assert missing_providers(trt, ("CUDAExecutionProvider", "CPUExecutionProvider")) == ("TensorrtExecutionProvider",)
    assert missing_providers(trt, trt) == ()
    assert missing_providers(("CPUExecutionProvider",), ("CPUExecutionProvider",)) == ()
    assert check_providers("m.onnx", trt, ("CPUExecutionProvider",), ("CPUExecutionProvider",), True) == trt[:2]
    with pytest.raises(MissingDependencyError, match="TensorrtExecutionProvider, CUDAExecutionProvider did not load"):
        check_providers("m.onnx", trt, ("CPUExecutionProvider",), ("CPUExecutionProvider",), False)


def test_runner_from_artifact_chooses_by_kind_and_backend(trained_checkpoint: Path, runtime_fp32_onnx: Path,
                                                          tmp_path: Path) -> None:
    assert isinstance(runner_from_artifact(trained_checkpoint, device="cpu"), TorchRunner)
    assert isinstance(runner_from_artifact(trained_checkpoint.parent, device="cpu"), TorchRunner)  # run dir
    assert artifact_kind(runtime_fp32_onnx) == "onnx"
    assert choose_backend("onnx", "auto", CPU) == "onnxruntime"
    assert choose_backend("engine", "auto", CPU) == "tensorrt"
    assert choose_backend("checkpoint", "auto", CPU) == "torch"
    with pytest.raises(FairdeployError, match=r"backend 'tensorrt' cannot run a onnx artifact; choose one of "
                                              r"onnxruntime, ort-cuda, ort-trt"):
        runner_from_artifact(runtime_fp32_onnx, backend="tensorrt", device="cpu")
    with pytest.raises(FairdeployError, match=r"backend 'onnxruntime' cannot run a checkpoint artifact; choose one of torch"):
        runner_from_artifact(trained_checkpoint, backend="onnxruntime", device="cpu")
    with pytest.raises(FairdeployError, match=r"unknown backend 'tflite'; choose one of auto, torch, onnxruntime"):
        runner_from_artifact(runtime_fp32_onnx, backend="tflite", device="cpu")
    with pytest.raises(FairdeployError, match=r"artifact .*nothing\.onnx not found"):
        runner_from_artifact(tmp_path / "nothing.onnx", device="cpu")
    weird = tmp_path / "model.tflite"
    weird.write_bytes(b"x")
    with pytest.raises(FairdeployError, match=r"unknown kind \(suffix '\.tflite'\); expected a checkpoint directory"):
        runner_from_artifact(weird, device="cpu")


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_onnx_without_fairdeploy_metadata_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "plain.onnx"
    torch.onnx.export(torch.nn.Linear(4, 2), (torch.zeros(1, 4),), str(path), dynamo=False)
    with pytest.raises(FairdeployError, match="not a fairdeploy export"):
        runner_from_artifact(path, device="cpu")


class _WrongShapeRunner(BaseRunner):
    backend = "broken"

    def _activate(self) -> InputSpec:
        return InputSpec("input", (-1, 3, 32, 32), "float32")

    def _infer(self, batch: np.ndarray) -> np.ndarray:
        return np.zeros((batch.shape[0], 2, 1))

    def _deactivate(self) -> None:
        pass


def test_base_runner_refuses_a_backend_output_of_the_wrong_shape(trained_checkpoint: Path) -> None:
    from fairdeploy.runtime.torch_runner import checkpoint_info

    with _WrongShapeRunner(checkpoint_info(trained_checkpoint)) as runner:
        with pytest.raises(FairdeployError, match=r"returned logits of shape \(2, 2, 1\) for a batch of 2; expected \(2, 3\)"):
            runner.infer(_batch(2))


@pytest.mark.gpu
def test_torch_and_ort_cuda_runners_on_gpu(trained_checkpoint: Path, runtime_fp32_onnx: Path) -> None:
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device here")
    batch = _batch(4, seed=4)
    with runner_from_artifact(trained_checkpoint, device="cuda") as runner:
        out = runner.infer(batch)
        assert runner.describe()["device"].startswith("cuda")
    np.testing.assert_allclose(out, _torch_logits(trained_checkpoint, batch), rtol=0, atol=1e-3)


def test_onnx_runner_device_is_the_one_given_never_device_0_assumed(runtime_fp32_onnx: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """'cuda' means the current CUDA device (here faked as 3); 'cuda:1' means 1; a CPU device never asks CUDA."""
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 3)
    plain = runner_from_artifact(runtime_fp32_onnx, backend="ort-cuda", device=torch.device("cuda"))
    one = runner_from_artifact(runtime_fp32_onnx, backend="ort-cuda", device=torch.device("cuda", 1))
    assert isinstance(plain, OrtRunner) and isinstance(one, OrtRunner)
    assert (plain.device_index, one.device_index) == (3, 1)
    assert plain._provider_list()[0] == ("CUDAExecutionProvider", {"device_id": 3})

    def boom(*_: object) -> None:
        raise AssertionError("CUDA was queried for a CPU runner")

    for name in ("current_device", "is_available", "device_count", "get_device_properties"):
        monkeypatch.setattr(torch.cuda, name, boom)
    with runner_from_artifact(runtime_fp32_onnx, device=torch.device("cpu")) as cpu:
        assert cpu.backend == "onnxruntime" and cpu.infer(_batch(2)).shape == (2, 3)
