"""Engine sidecars: round trip, and refusal of a mismatched TensorRT version, GPU or engine file."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fairdeploy.artifact.sidecar import (
    EngineSidecar,
    check_sidecar,
    read_sidecar,
    trt_version_key,
    write_sidecar,
)
from fairdeploy.errors import FairdeployError
from fairdeploy.files.hashing import sha256_file


@pytest.fixture()
def engine(tmp_path: Path) -> tuple[Path, EngineSidecar]:
    path = tmp_path / "model.int8.engine"
    path.write_bytes(b"not a real engine, only bytes to hash")
    sidecar = EngineSidecar(
        engine_file=path.name, engine_sha256=sha256_file(path), tensorrt_version="10.3.0.30",
        gpu_name="Orin (nvgpu)", compute_capability="8.7", precision="int8", onnx_file="model.int8.onnx",
        onnx_sha256="a" * 64, calibration_sha256="c" * 64, classes=("cross", "disc", "ring"),
        groups=("dark", "light"), image_size=224, min_batch=1, opt_batch=1, max_batch=1, dla_core=0,
        quantization="qdq",
    )
    write_sidecar(tmp_path / "model.int8.engine.json", sidecar)
    return path, sidecar


def test_round_trip_keeps_every_field(engine: tuple[Path, EngineSidecar], tmp_path: Path) -> None:
    _, sidecar = engine
    raw = json.loads((tmp_path / "model.int8.engine.json").read_text())
    assert raw["tensorrt_version"] == "10.3.0.30" and raw["calibration_sha256"] == "c" * 64
    assert raw["classes"] == ["cross", "disc", "ring"] and raw["format_version"] == 1
    assert read_sidecar(tmp_path / "model.int8.engine.json") == sidecar


def test_matching_environment_passes(engine: tuple[Path, EngineSidecar]) -> None:
    path, sidecar = engine
    check_sidecar(sidecar, "10.3.0.30", "Orin (nvgpu)", "8.7", path)
    check_sidecar(sidecar, "10.3.0.26", "Orin (nvgpu)", "8.7", path)  # another build number of 10.3.0
    assert trt_version_key("10.3.0.30") == (10, 3, 0) == trt_version_key("10.3.0")


@pytest.mark.parametrize(
    ("version", "gpu", "cc", "message"),
    [
        ("10.7.0", "Orin (nvgpu)", "8.7", r"built with TensorRT 10\.3\.0\.30, this machine has TensorRT 10\.7\.0"),
        ("11.0.0", "Orin (nvgpu)", "8.7", r"this machine has TensorRT 11\.0\.0; rebuild it here from model\.int8\.onnx"),
        ("10.3.0.30", "NVIDIA H100 80GB HBM3", "9.0",
         r"built for compute capability 8\.7 \(Orin \(nvgpu\)\), this GPU is 9\.0 \(NVIDIA H100 80GB HBM3\)"),
        ("10.3.0.30", "Orin NX", "8.7", r"built on GPU 'Orin \(nvgpu\)', this GPU is 'Orin NX'"),
    ],
)
def test_mismatch_is_named(engine: tuple[Path, EngineSidecar], version: str, gpu: str, cc: str, message: str) -> None:
    path, sidecar = engine
    with pytest.raises(FairdeployError, match=message):
        check_sidecar(sidecar, version, gpu, cc, path, source="model.int8.engine")


def test_changed_or_missing_engine_and_sidecar(engine: tuple[Path, EngineSidecar], tmp_path: Path) -> None:
    path, sidecar = engine
    path.write_bytes(path.read_bytes() + b"!")
    with pytest.raises(FairdeployError, match="does not match its sidecar"):
        check_sidecar(sidecar, "10.3.0.30", "Orin (nvgpu)", "8.7", path)
    with pytest.raises(FairdeployError, match="engine file .* not found"):
        check_sidecar(sidecar, "10.3.0.30", "Orin (nvgpu)", "8.7", tmp_path / "gone.engine")
    with pytest.raises(FairdeployError, match="engine sidecar .* not found"):
        read_sidecar(tmp_path / "gone.engine.json")
    (tmp_path / "partial.json").write_text(json.dumps({"engine_file": "x", "precision": "fp16"}))
    with pytest.raises(FairdeployError, match="engine sidecar lacks engine_sha256, tensorrt_version"):
        read_sidecar(tmp_path / "partial.json")
