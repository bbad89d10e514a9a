"""Engine sidecars (model.<precision>.engine.json): what an engine was built from and on; mismatch checks."""

from __future__ import annotations

import os
from dataclasses import MISSING, asdict, dataclass, fields
from pathlib import Path
from typing import Any

from fairdeploy.artifact.metadata import PRECISIONS
from fairdeploy.errors import FairdeployError
from fairdeploy.files.hashing import sha256_file
from fairdeploy.files.json_files import read_json, write_json
from fairdeploy.trt_env import version_parts

SIDECAR_FORMAT = 1


@dataclass(frozen=True)
class EngineSidecar:
    """Identity of a TensorRT engine: build environment, source ONNX, calibration set, labels."""

    engine_file: str
    engine_sha256: str
    tensorrt_version: str
    gpu_name: str
    compute_capability: str  # "8.7"
    precision: str
    onnx_file: str
    onnx_sha256: str
    calibration_sha256: str | None
    classes: tuple[str, ...]
    groups: tuple[str, ...]
    image_size: int
    min_batch: int
    opt_batch: int
    max_batch: int
    dla_core: int | None = None
    quantization: str | None = None  # "qdq" (explicit), "implicit-calibrator" (10.x) or None
    sparse_weights: bool = False
    build_settings: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["classes"], d["groups"] = list(self.classes), list(self.groups)
        d["format_version"] = SIDECAR_FORMAT
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str) -> EngineSidecar:
        names = {f.name for f in fields(cls)}
        required = [f.name for f in fields(cls) if f.default is MISSING and f.default_factory is MISSING]
        missing = [k for k in required if k not in d]
        if missing:
            raise FairdeployError(f"{source}: engine sidecar lacks {', '.join(missing)}")
        if d.get("precision") not in PRECISIONS:
            raise FairdeployError(f"{source}: precision {d.get('precision')!r} is not one of {', '.join(PRECISIONS)}")
        values = {k: v for k, v in d.items() if k in names}
        values["classes"] = tuple(str(c) for c in d["classes"])
        values["groups"] = tuple(str(g) for g in d["groups"])
        return cls(**values)


def write_sidecar(path: str | os.PathLike[str], sidecar: EngineSidecar) -> None:
    write_json(path, sidecar.to_dict())


def read_sidecar(path: str | os.PathLike[str]) -> EngineSidecar:
    p = Path(path)
    if not p.is_file():
        raise FairdeployError(f"engine sidecar {p} not found; an engine is only used with the JSON written beside it")
    data = read_json(p)
    if not isinstance(data, dict):
        raise FairdeployError(f"{p}: engine sidecar is not a JSON object")
    return EngineSidecar.from_dict(data, str(p))


def trt_version_key(version: str) -> tuple[int, ...]:
    """'10.3.0.30' -> (10, 3, 0): engines are tied to major.minor.patch (the build number is ignored)."""
    return version_parts(version)


def check_sidecar(
    sidecar: EngineSidecar,
    tensorrt_version: str,
    gpu_name: str,
    compute_capability: str,
    engine_path: str | os.PathLike[str] | None = None,
    source: str = "engine",
) -> None:
    """Refuse an engine built for another TensorRT version or GPU, or whose bytes changed; the message
    names the mismatch and what to do (rebuild from the ONNX on this machine)."""
    rebuild = f"rebuild it here from {sidecar.onnx_file} with `fairdeploy export --trt`"
    if trt_version_key(sidecar.tensorrt_version) != trt_version_key(tensorrt_version):
        raise FairdeployError(
            f"{source}: built with TensorRT {sidecar.tensorrt_version}, this machine has TensorRT "
            f"{tensorrt_version}; {rebuild}"
        )
    if str(sidecar.compute_capability) != str(compute_capability):
        raise FairdeployError(
            f"{source}: built for compute capability {sidecar.compute_capability} ({sidecar.gpu_name}), this GPU "
            f"is {compute_capability} ({gpu_name}); {rebuild}"
        )
    if sidecar.gpu_name.strip() != gpu_name.strip():
        raise FairdeployError(
            f"{source}: built on GPU {sidecar.gpu_name!r}, this GPU is {gpu_name!r}; {rebuild}"
        )
    if engine_path is not None:
        p = Path(engine_path)
        if not p.is_file():
            raise FairdeployError(f"{source}: engine file {p} not found")
        digest = sha256_file(p)
        if digest != sidecar.engine_sha256:
            raise FairdeployError(
                f"{source}: {p.name} does not match its sidecar (sha256 {digest[:12]}..., sidecar says "
                f"{sidecar.engine_sha256[:12]}...); {rebuild}"
            )
