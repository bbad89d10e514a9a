"""TensorRT runner: the sidecar checks (plain code, run here for real) and the engine path (TensorRT only)."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path
from typing import ClassVar

import numpy as np
import pytest
import torch
from fake_tensorrt import engine_bytes, fake_tensorrt, reference_logits

from fairdeploy.artifact.sidecar import EngineSidecar, write_sidecar
from fairdeploy.errors import EXIT_MISSING_DEPENDENCY, FairdeployError, MissingDependencyError
from fairdeploy.files.hashing import sha256_file
from fairdeploy.runtime import runner_from_artifact
from fairdeploy.runtime.trt_runner import EngineEnvironment, TensorRTRunner, detect_environment

BUILT = EngineEnvironment("10.3.0.30", "Orin", "8.7")
CLASSES = ("cross", "disc", "ring")
GROUPS = ("dark", "light")


def _fake_engine(folder: Path, env: EngineEnvironment = BUILT, onnx: Path | None = None,
                 dla_core: int | None = None, content: bytes = b"not really an engine") -> Path:
    """Engine bytes (not a real engine: the sidecar checks run before TensorRT reads it; the fake runtime
    below accepts them) and their sidecar."""
    engine = folder / "model.fp16.engine"
    engine.write_bytes(content)
    write_sidecar(folder / "model.fp16.engine.json", EngineSidecar(
        engine_file=engine.name, engine_sha256=sha256_file(engine), tensorrt_version=env.tensorrt_version,
        gpu_name=env.gpu_name, compute_capability=env.compute_capability, precision="fp16",
        onnx_file=onnx.name if onnx else "model.fp16.onnx", onnx_sha256="0" * 64, calibration_sha256=None,
        classes=CLASSES, groups=GROUPS, image_size=32, min_batch=1, opt_batch=8, max_batch=32, dla_core=dla_core,
    ))
    return engine


class _FakeStream:
    """Stands in for torch.cuda.Stream on a machine without CUDA; records that it was made and synchronised."""

    made: ClassVar[list[_FakeStream]] = []

    def __init__(self, device=None) -> None:
        self.cuda_stream = 0x5EED + len(self.made)
        self.synchronized = 0
        self.made.append(self)

    def synchronize(self) -> None:
        self.synchronized += 1


@pytest.fixture()
def fake_cuda(monkeypatch: pytest.MonkeyPatch):
    """torch.cuda's stream and device scopes faked (buffers are CPU tensors: the fake engine reads host
    memory); the legacy/current stream must not be used at all."""
    import contextlib

    _FakeStream.made = []
    monkeypatch.setattr(torch.cuda, "Stream", _FakeStream)
    monkeypatch.setattr(torch.cuda, "stream", lambda s: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "device", lambda d: contextlib.nullcontext())

    def no_current_stream(*a, **k):
        raise AssertionError("the runner used torch's current (default) stream")

    monkeypatch.setattr(torch.cuda, "current_stream", no_current_stream)
    monkeypatch.setattr(torch.cuda, "default_stream", no_current_stream)
    return _FakeStream


def _install(monkeypatch: pytest.MonkeyPatch, **kw):
    """The fake as `tensorrt`; memory="host" unless given: the CPU tests bind CPU tensors (not the real API)."""
    trt = fake_tensorrt("10.3.0.30", **{"memory": "host", **kw})
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    return trt


def test_runner_name_based_io_on_its_own_stream(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fake_cuda) -> None:
    """Items 6 and 7: the runner's I/O code against the fake Runtime/ICudaEngine/IExecutionContext: inputs and
    outputs bound by name, batches above the profile maximum chunked, execute_async_v3 on the runner's own
    stream (never the default one), results read after that stream."""
    trt = _install(monkeypatch, profile_batches=(1, 8, 4))
    runner = TensorRTRunner(_fake_engine(tmp_path), torch.device("cpu"), environment=BUILT)
    batch = np.random.default_rng(0).standard_normal((11, 3, 32, 32)).astype(np.float32)
    with runner:
        assert runner.input_spec().shape == (-1, 3, 32, 32) and runner.input_spec().dtype == "float32"
        out = runner.infer(batch)
    np.testing.assert_allclose(out, reference_logits(batch, 3), rtol=1e-5, atol=1e-6)
    runs = [c for c in trt.calls if c[0] == "context.execute_async_v3"]
    assert len(fake_cuda.made) == 1 and [c[1] for c in runs] == [fake_cuda.made[0].cuda_stream] * 3
    assert fake_cuda.made[0].cuda_stream != 0 and fake_cuda.made[0].synchronized == 3
    shapes = [c[2][0] for c in trt.calls if c[0] == "context.set_input_shape"]
    assert shapes == [4, 4, 3]  # max_batch 4 from the engine's profile
    assert ("context.set_tensor_address", "input") in trt.calls and ("context.set_tensor_address", "logits") in trt.calls
    assert "runtime.DLA_core" not in [c[0] for c in trt.calls]


def test_runner_sets_the_dla_core_before_deserialising(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                       fake_cuda) -> None:
    """Item 2: runtime.DLA_core from the sidecar, set before deserialize_cuda_engine (a DLA engine does not
    deserialize without it)."""
    trt = _install(monkeypatch, dla_cores=2)
    runner = TensorRTRunner(_fake_engine(tmp_path, dla_core=1, content=engine_bytes(1)), torch.device("cpu"),
                            environment=BUILT)
    with runner:
        runner.infer(np.zeros((2, 3, 32, 32), np.float32))
    order = [c[0] for c in trt.calls]
    assert ("runtime.DLA_core", 1) in trt.calls
    assert order.index("runtime.DLA_core") < order.index("runtime.deserialize_cuda_engine")
    assert runner.describe()["dla_core"] == 1


@pytest.mark.parametrize("version,cores,core", [("10.3.0.30", 0, 0), ("10.3.0.30", 2, 2), ("10.8.0", 2, 0)])
def test_a_dla_core_the_machine_lacks_is_refused_before_tensorrt_reads_the_engine(
        version: str, cores: int, core: int, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fake_cuda) -> None:
    """IRuntime.DLA_core's setter never fails (NvInferRuntime.h: with no DLA it does nothing), so the runner checks
    runtime.num_DLA_cores itself: one line naming the core, before deserialising (10.8 has no DLA at all)."""
    trt = fake_tensorrt(version, dla_cores=cores, memory="host")
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    here = EngineEnvironment(version, "Orin", "8.7")
    engine = _fake_engine(tmp_path, env=here, dla_core=core, content=engine_bytes(core))
    runner = TensorRTRunner(engine, torch.device("cpu"), environment=here)
    where = "has no DLA" if cores == 0 or version == "10.8.0" else f"has DLA cores 0..{cores - 1}"
    with pytest.raises(FairdeployError, match=rf"built for DLA core {core}, this machine {where}; rebuild it here"):
        runner.activate()
    assert "runtime.deserialize_cuda_engine" not in [c[0] for c in trt.calls]


def test_the_fake_runtime_needs_the_core_for_a_dla_engine(monkeypatch: pytest.MonkeyPatch) -> None:
    """The control for the check above: the fake, like the real runtime, returns None (reason logged) for a DLA
    engine when no valid core was set, and its setter does nothing without a DLA."""
    trt = fake_tensorrt("10.3.0.30", dla_cores=2)
    runtime = trt.Runtime(trt.Logger())
    assert runtime.deserialize_cuda_engine(engine_bytes(1)) is None
    runtime.DLA_core = 1
    assert runtime.deserialize_cuda_engine(engine_bytes(1)) is not None
    none = fake_tensorrt("10.3.0.30", dla_cores=0).Runtime(trt.Logger())
    none.DLA_core = 1
    assert none.DLA_core == -1


def test_host_memory_is_not_what_the_real_engine_reads(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                       fake_cuda) -> None:
    """The fake in its real-API mode reads device memory: the CPU tensors of the plumbing tests are refused
    (execute_async_v3 returns False, the reason logged), and the runner's error carries the reason in one line."""
    _install(monkeypatch, memory="device")
    runner = TensorRTRunner(_fake_engine(tmp_path), torch.device("cpu"), environment=BUILT)
    with runner, pytest.raises(FairdeployError, match=r"TensorRT execution failed: IExecutionContext::enqueueV3: "
                                                      r"(address 0x[0-9a-f]+ is not CUDA device memory|the bindings "
                                                      r"read device memory and there is no CUDA device here)"):
        runner.infer(np.zeros((2, 3, 32, 32), np.float32))


def test_runner_refuses_an_engine_tensorrt_cannot_read(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                       fake_cuda) -> None:
    _install(monkeypatch)
    runner = TensorRTRunner(_fake_engine(tmp_path, content=b"corrupt bytes"), torch.device("cpu"), environment=BUILT)
    with pytest.raises(FairdeployError, match="TensorRT could not deserialize the engine: IRuntime::deserializeCuda"
                                              "Engine: Error Code 1: Serialization") as e:
        runner.activate()
    assert "\n" not in str(e.value)


def test_engine_for_another_tensorrt_version_is_refused(tmp_path: Path) -> None:
    engine = _fake_engine(tmp_path)
    here = EngineEnvironment("10.12.0.36", "Orin", "8.7")
    with pytest.raises(FairdeployError, match=r"built with TensorRT 10\.3\.0\.30, this machine has TensorRT 10\.12\.0\.36; "
                                              r"rebuild it here"):
        TensorRTRunner(engine, torch.device("cuda"), environment=here)


def test_same_tensorrt_release_with_another_build_number_is_accepted(tmp_path: Path) -> None:
    engine = _fake_engine(tmp_path)
    runner = TensorRTRunner(engine, torch.device("cuda"), environment=EngineEnvironment("10.3.0.26", "Orin", "8.7"))
    assert runner.info.kind == "engine" and runner.info.classes == CLASSES and runner.info.precision == "fp16"
    assert runner.describe()["built_with_tensorrt"] == "10.3.0.30"


def test_engine_for_another_gpu_is_refused(tmp_path: Path) -> None:
    engine = _fake_engine(tmp_path)
    with pytest.raises(FairdeployError, match=r"built for compute capability 8\.7 \(Orin\), this GPU is 9\.0 \(NVIDIA H100"):
        TensorRTRunner(engine, torch.device("cuda"), environment=EngineEnvironment("10.3.0", "NVIDIA H100 80GB HBM3", "9.0"))
    with pytest.raises(FairdeployError, match=r"built on GPU 'Orin', this GPU is 'Jetson AGX Orin'"):
        TensorRTRunner(engine, torch.device("cuda"), environment=EngineEnvironment("10.3.0", "Jetson AGX Orin", "8.7"))


def test_engine_bytes_that_differ_from_the_sidecar_are_refused(tmp_path: Path) -> None:
    engine = _fake_engine(tmp_path)
    engine.write_bytes(b"changed after the sidecar was written")
    with pytest.raises(FairdeployError, match=r"model\.fp16\.engine does not match its sidecar"):
        TensorRTRunner(engine, torch.device("cuda"), environment=BUILT)


def test_engine_without_sidecar_is_refused(tmp_path: Path) -> None:
    engine = tmp_path / "model.fp32.engine"
    engine.write_bytes(b"x")
    with pytest.raises(FairdeployError, match=r"engine sidecar .*model\.fp32\.engine\.json not found"):
        TensorRTRunner(engine, torch.device("cuda"), environment=BUILT)


def test_engine_info_takes_normalisation_from_the_onnx_beside_it(tmp_path: Path, runtime_fp32_onnx: Path) -> None:
    onnx = tmp_path / "model.fp32.onnx"
    onnx.write_bytes(runtime_fp32_onnx.read_bytes())
    runner = TensorRTRunner(_fake_engine(tmp_path, onnx=onnx), torch.device("cuda"), environment=BUILT)
    assert runner.info.mean == pytest.approx((0.485, 0.456, 0.406))
    assert runner.info.source_sha256 is not None and len(runner.info.source_sha256) == 64
    assert runner.info.size_bytes == len(b"not really an engine")


@pytest.mark.skipif(importlib.util.find_spec("tensorrt") is not None, reason="TensorRT is installed here")
def test_missing_tensorrt_or_gpu_is_a_missing_dependency(tmp_path: Path) -> None:
    engine = _fake_engine(tmp_path)
    with pytest.raises(MissingDependencyError):
        detect_environment(torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu"), str(engine))
    with pytest.raises(MissingDependencyError):
        runner_from_artifact(engine, device="cpu")


@pytest.mark.skipif(importlib.util.find_spec("tensorrt") is not None, reason="TensorRT is installed here")
def test_cli_engine_without_tensorrt_exits_3(tmp_path: Path, trained_checkpoint: Path, synth_manifest: Path) -> None:
    engine = _fake_engine(tmp_path)
    out = tmp_path / "val"
    proc = subprocess.run(
        [sys.executable, "-m", "fairdeploy", "validate", "-r", str(trained_checkpoint), "-c", str(engine),
         "--data", str(synth_manifest), "--out", str(out), "--device", "cpu", "--no-latency", "--bootstrap", "0"],
        capture_output=True, text=True, timeout=120, check=False,
    )
    assert proc.returncode == EXIT_MISSING_DEPENDENCY, proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "TensorRT engine needs a CUDA GPU" in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr and not out.exists()


@pytest.mark.gpu
def test_runner_cuda_path_against_the_device_memory_fake(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The runner's CUDA path for real (torch CUDA buffers, its own stream, results read after it) against the fake
    reading device memory as the real bindings do; a host address is refused by the same fake (the control)."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device: the fake engine reads the runner's device buffers through CUDA")
    trt = _install(monkeypatch, memory="device", profile_batches=(1, 8, 4))
    runner = TensorRTRunner(_fake_engine(tmp_path), torch.device("cuda"), environment=BUILT)
    batch = np.random.default_rng(0).standard_normal((11, 3, 32, 32)).astype(np.float32)
    with runner:
        out = runner.infer(batch)
    np.testing.assert_allclose(out, reference_logits(batch, 3), rtol=1e-5, atol=1e-6)
    runs = [c for c in trt.calls if c[0] == "context.execute_async_v3"]
    assert len(runs) == 3 and all(c[1] != 0 for c in runs)  # the runner's own stream, never the legacy default
    context = trt.Runtime(trt.Logger()).deserialize_cuda_engine(b"x").create_execution_context()
    host = torch.zeros((1, 3, 32, 32))
    assert context.set_input_shape("input", (1, 3, 32, 32))
    context.set_tensor_address("input", host.data_ptr())
    context.set_tensor_address("logits", torch.zeros((1, 3), device="cuda").data_ptr())
    assert context.execute_async_v3(torch.cuda.current_stream().cuda_stream) is False


@pytest.mark.gpu
def test_implicit_calibrator_feeds_device_memory(tmp_path: Path) -> None:
    """make_entropy_calibrator on the current CUDA device (build_engine's default): the builder fake reads the
    batches through their device pointers."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device: the fake builder reads the calibrator's device pointers through CUDA")
    from fairdeploy.export import tensorrt_build as tb
    from fairdeploy.export.profiles import TrtOptions

    (tmp_path / "model.fp32.onnx").write_bytes(b"onnx")
    batches = [np.random.default_rng(i).standard_normal((2, 3, 32, 32)).astype(np.float32) for i in range(3)]
    plan = tb.plan_build("10.3.0", "int8", TrtOptions(implicit_int8=True, timing_cache=None), 32)
    trt = fake_tensorrt("10.3.0", memory="device")
    tb.build_engine(tmp_path / "model.fp32.onnx", tmp_path / "model.int8.engine", plan, trt,
                    calibration_batches=batches, calibration_batch_size=2, calibration_sha256="e" * 64)
    np.testing.assert_allclose(trt.calibration["sums"], [float(b.astype(np.float64).sum()) for b in batches],
                               rtol=1e-6)


@pytest.mark.tensorrt
def test_tensorrt_engine_matches_pytorch(tmp_path: Path, trained_checkpoint: Path) -> None:
    """Export an FP32 engine with the export stage (engine + sidecar), then compare its logits with PyTorch."""
    pytest.importorskip("tensorrt", reason="TensorRT is not installed here")
    if not torch.cuda.is_available():
        pytest.skip("TensorRT needs a CUDA device")
    from fairdeploy.export.exporter import run_export
    from fairdeploy.export.profiles import ExportOptions, TrtOptions
    from fairdeploy.models import load_checkpoint

    result = run_export(trained_checkpoint, tmp_path / "export",
                        ExportOptions(tensorrt=TrtOptions(enabled=True, max_batch=8, timing_cache=None)))
    engine = result.engines["fp32"]
    batch = np.random.default_rng(0).standard_normal((11, 3, 32, 32)).astype(np.float32)  # > max_batch: chunked
    with runner_from_artifact(engine, device="cuda") as runner:
        assert runner.input_spec().shape[1:] == (3, 32, 32) and runner.input_spec().shape[0] == -1
        out = runner.infer(batch)
        one = runner.infer(batch[:1])
    model, _ = load_checkpoint(trained_checkpoint, "cpu")
    with torch.no_grad():
        expected = model(torch.from_numpy(batch)).numpy()
    assert out.shape == (11, 3) and out.dtype == np.float32 and one.shape == (1, 3)
    np.testing.assert_allclose(out, expected, rtol=0, atol=1e-2)
