"""The TensorRT environment, defined once for export (building engines) and runtime (running them): the lazy
`tensorrt` import with its install hint, version-string parsing, and the identity of the GPU an engine is for.

Neutral on purpose: runtime/ and export/ both import it, and it imports neither.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from fairdeploy.errors import FairdeployError, MissingDependencyError

INSTALL_HINT = (
    "install it with `pip install 'fairdeploy[trt]'` on a machine with an NVIDIA GPU (Jetson: it comes with "
    "JetPack, `sudo apt install nvidia-jetpack`)"
)


@dataclass(frozen=True)
class EngineEnvironment:
    """What an engine is built for / must have been built for: the TensorRT version and the GPU."""

    tensorrt_version: str
    gpu_name: str
    compute_capability: str  # "9.0"


def import_tensorrt(what: str = "building or running a TensorRT engine") -> Any:
    """The `tensorrt` module, or MissingDependencyError (exit 3) naming what needed it and how to install it."""
    try:
        import tensorrt
    except ImportError as exc:
        raise MissingDependencyError(
            f"the TensorRT Python package is not installed, needed for {what}; {INSTALL_HINT}"
        ) from exc
    return tensorrt


def one_line(text: str, limit: int = 300) -> str:
    """A TensorRT message as one line of at most `limit` characters (its whitespace and newlines collapsed)."""
    flat = " ".join(str(text).split())
    return flat if len(flat) <= limit else flat[: limit - 3] + "..."


def tensorrt_logger(trt: Any) -> Any:
    """An ILogger for Builder / OnnxParser / Runtime that keeps TensorRT's errors in `.errors` (for a one-line
    FairdeployError after a call returns None or False) and passes its warnings on as Python warnings. The
    bindings' ILogger is subclassed as NVIDIA's samples do (log(severity, msg); Severity is an arithmetic enum,
    INTERNAL_ERROR 0 .. VERBOSE 4). Keep it alive as long as what it was given to."""
    import warnings

    class _Logger(trt.ILogger):
        def __init__(self) -> None:
            trt.ILogger.__init__(self)
            self.errors: list[str] = []

        def log(self, severity: Any, msg: str) -> None:
            if int(severity) <= int(trt.ILogger.Severity.ERROR):
                self.errors.append(str(msg))
            elif int(severity) == int(trt.ILogger.Severity.WARNING):
                warnings.warn(f"TensorRT: {one_line(msg)}", stacklevel=2)

    return _Logger()


def version_parts(version: str) -> tuple[int, ...]:
    """'10.3.0.30' -> (10, 3, 0): the leading numeric major.minor.patch (a build number is ignored;
    '11.0.0b1' -> (11, 0, 0)). An empty result is refused with the version named."""
    parts = []
    for piece in str(version).split(".")[:3]:
        digits = re.match(r"\d+", piece)
        if digits is None:
            break
        parts.append(int(digits.group()))
    if not parts:
        raise FairdeployError(f"unparseable TensorRT version {version!r}")
    return tuple(parts)


def _cuda_index(device: Any) -> int | None:
    """The CUDA ordinal of `device` (torch.device, 'cuda:N', int), None for 'the current CUDA device'."""
    if device is None or isinstance(device, int):
        return device
    import torch

    dev = device if isinstance(device, torch.device) else torch.device(str(device))
    if dev.type != "cuda":
        raise FairdeployError(f"a TensorRT engine is built and run on a CUDA device, not {dev}; use --device cuda")
    return dev.index


def gpu_identity(device: Any = None) -> tuple[str, str]:
    """(GPU name, compute capability 'major.minor') of `device` (torch.device / 'cuda:N' / ordinal; None = the
    current CUDA device, the one TensorRT builds on), via torch or, without a usable torch CUDA, cuda-python."""
    index = _cuda_index(device)
    try:
        import torch

        if torch.cuda.is_available():
            props = torch.cuda.get_device_properties(torch.cuda.current_device() if index is None else index)
            return str(props.name), f"{props.major}.{props.minor}"
    except FairdeployError:
        raise
    except Exception:  # noqa: BLE001, S110 - no usable torch CUDA: fall through to cuda-python
        pass
    try:  # cuda-python 12.x exposes `cuda.cudart`; 13.x `cuda.bindings.runtime` (same calls)
        try:
            from cuda.bindings import runtime as cudart  # type: ignore[import-not-found]
        except ImportError:
            from cuda import cudart  # type: ignore[import-not-found,no-redef]
        if index is None:
            err, index = cudart.cudaGetDevice()
            if int(err) != 0:
                raise RuntimeError("cudaGetDevice failed")
        err, props = cudart.cudaGetDeviceProperties(index)
        if int(err) == 0:
            name = props.name.decode() if isinstance(props.name, bytes) else str(props.name)
            return name.rstrip("\x00"), f"{props.major}.{props.minor}"
    except Exception:  # noqa: BLE001, S110 - no cuda-python or no device: the error below says so
        pass
    raise MissingDependencyError("no CUDA GPU is visible to torch or cuda-python; TensorRT engines need one")


def engine_environment(device: Any = None, what: str = "building or running a TensorRT engine") -> EngineEnvironment:
    """The installed TensorRT version and the identity of `device`'s GPU."""
    trt = import_tensorrt(what)
    name, capability = gpu_identity(device)
    return EngineEnvironment(str(trt.__version__), name, capability)
