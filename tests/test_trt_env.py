"""fairdeploy.trt_env: the one TensorRT import, version parser and GPU identity that export and runtime share."""

from __future__ import annotations

import re
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from fairdeploy import trt_env
from fairdeploy.artifact import sidecar
from fairdeploy.errors import FairdeployError
from fairdeploy.export import tensorrt_build
from fairdeploy.runtime import trt_runner

PACKAGE = Path(trt_env.__file__).parent


def test_one_tensorrt_import_and_one_version_parser() -> None:
    """Only trt_env imports `tensorrt`; export and runtime use trt_env's functions, not copies."""
    importers = sorted(str(p.relative_to(PACKAGE)) for p in PACKAGE.rglob("*.py")
                       if re.search(r"^\s*import tensorrt\b|^\s*from tensorrt\b", p.read_text(), re.MULTILINE))
    assert importers == ["trt_env.py"]
    assert tensorrt_build.import_tensorrt is trt_env.import_tensorrt is trt_runner.import_tensorrt
    assert tensorrt_build.gpu_identity is trt_env.gpu_identity
    assert trt_runner.EngineEnvironment is trt_env.EngineEnvironment


@pytest.mark.parametrize(("version", "parts"), [("10.3.0.30", (10, 3, 0)), ("11.0.0b1", (11, 0, 0)),
                                                 ("10.12", (10, 12)), ("9", (9,))])
def test_version_parts_build_and_sidecar_agree(version: str, parts: tuple[int, ...]) -> None:
    assert trt_env.version_parts(version) == parts == sidecar.trt_version_key(version)
    if len(parts) >= 2 and parts >= (10, 3):
        api = tensorrt_build.trt_api(version)
        assert (api.major, api.minor, api.patch) == (*parts, 0)[:3]
    with pytest.raises(FairdeployError, match="unparseable TensorRT version 'banana'"):
        trt_env.version_parts("banana")


def _fake_cuda(monkeypatch: pytest.MonkeyPatch, current: int) -> list[int]:
    asked: list[int] = []

    def props(index: int) -> SimpleNamespace:
        asked.append(index)
        return SimpleNamespace(name=f"GPU{index}", major=8, minor=index)

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: current)
    monkeypatch.setattr(torch.cuda, "get_device_properties", props)
    return asked


def test_gpu_identity_is_of_the_given_device_never_device_0_by_default(monkeypatch: pytest.MonkeyPatch) -> None:
    asked = _fake_cuda(monkeypatch, current=2)
    assert trt_env.gpu_identity() == ("GPU2", "8.2")  # the current device (what TensorRT builds on), not 0
    assert trt_env.gpu_identity(torch.device("cuda", 1)) == ("GPU1", "8.1")
    assert trt_env.gpu_identity("cuda:3") == ("GPU3", "8.3")
    assert trt_env.gpu_identity(torch.device("cuda")) == ("GPU2", "8.2")
    assert asked == [2, 1, 3, 2]


def test_gpu_identity_of_a_cpu_device_refuses_without_touching_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    def boom(*_: object) -> None:
        raise AssertionError("CUDA was queried for a CPU device")

    for name in ("is_available", "current_device", "get_device_properties"):
        monkeypatch.setattr(torch.cuda, name, boom)
    with pytest.raises(FairdeployError, match=r"CUDA device, not cpu; use --device cuda"):
        trt_env.gpu_identity(torch.device("cpu"))


def test_tensorrt_logger_keeps_errors_and_passes_warnings_on() -> None:
    """The ILogger given to Builder / OnnxParser / Runtime: errors (INTERNAL_ERROR, ERROR) kept for the one-line
    message after a call returns None, warnings as Python warnings, INFO and VERBOSE dropped."""
    from fake_tensorrt import Severity, fake_tensorrt

    trt = fake_tensorrt("10.3.0")
    logger = trt_env.tensorrt_logger(trt)
    assert isinstance(logger, trt.ILogger)
    with pytest.warns(UserWarning, match=r"^TensorRT: weights downcast to INT32$"):
        logger.log(Severity.WARNING, "weights downcast\n  to INT32")
    logger.log(Severity.INFO, "info")
    logger.log(Severity.VERBOSE, "verbose")
    logger.log(Severity.ERROR, "first\nerror")
    logger.log(Severity.INTERNAL_ERROR, "second")
    assert logger.errors == ["first\nerror", "second"]
    assert trt_env.one_line("first\nerror") == "first error" and len(trt_env.one_line("x" * 500)) == 300
