"""OrtRunner: an exported .onnx run by ONNX Runtime (CPU, CUDA or TensorRT provider), fallback checked."""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from fairdeploy.errors import FairdeployError, MissingDependencyError
from fairdeploy.runtime.base import ArtifactInfo, BaseRunner, InputSpec

CPU_PROVIDER = "CPUExecutionProvider"
CUDA_PROVIDER = "CUDAExecutionProvider"
TRT_PROVIDER = "TensorrtExecutionProvider"

# Each ONNX Runtime backend and the providers it asks for, in priority order (the CPU runs what the
# others cannot: that is normal placement, not a fallback).
ORT_BACKENDS: dict[str, tuple[str, ...]] = {
    "onnxruntime": (CPU_PROVIDER,),
    "ort-cuda": (CUDA_PROVIDER, CPU_PROVIDER),
    "ort-trt": (TRT_PROVIDER, CUDA_PROVIDER, CPU_PROVIDER),
}

_ORT_DTYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16}


def import_onnxruntime() -> Any:
    try:
        import onnxruntime
    except ImportError as exc:
        raise MissingDependencyError(
            "onnxruntime is not installed; pip install onnxruntime (or onnxruntime-gpu)"
        ) from exc
    return onnxruntime


# $FAIRDEPLOY_ORT_GRAPH_OPT: ONNX Runtime's graph optimisation level for every session fairdeploy creates (unset:
# ONNX Runtime's default, all). Fused kernels differ by instruction set; "disable" runs the graph's own operators,
# which scripts/test-isa.sh uses to check that results do not rest on one CPU's fusions.
GRAPH_OPT_ENV = "FAIRDEPLOY_ORT_GRAPH_OPT"
GRAPH_OPT_LEVELS = {"disable": "ORT_DISABLE_ALL", "basic": "ORT_ENABLE_BASIC", "extended": "ORT_ENABLE_EXTENDED",
                    "all": "ORT_ENABLE_ALL"}


def graph_optimization_level() -> str | None:
    """The level named by $FAIRDEPLOY_ORT_GRAPH_OPT (a key of GRAPH_OPT_LEVELS), None when it is unset or empty."""
    value = os.environ.get(GRAPH_OPT_ENV, "").strip()
    if not value:
        return None
    if value not in GRAPH_OPT_LEVELS:
        raise FairdeployError(f"{GRAPH_OPT_ENV}={value!r} is not a graph optimisation level; choose one of "
                              f"{', '.join(GRAPH_OPT_LEVELS)} (or leave it unset for ONNX Runtime's default)")
    return value


def session_options(threads: int = 0) -> Any:
    """The onnxruntime.SessionOptions every fairdeploy session is created with: errors-only logging (a provider
    that fails to load is reported by us), `threads` intra-op threads (0: ONNX Runtime's default) and the graph
    optimisation level of $FAIRDEPLOY_ORT_GRAPH_OPT."""
    ort = import_onnxruntime()
    level = graph_optimization_level()  # checked before anything is created
    options = ort.SessionOptions()
    options.log_severity_level = 3
    if threads:
        options.intra_op_num_threads = threads
    if level is not None:
        options.graph_optimization_level = getattr(ort.GraphOptimizationLevel, GRAPH_OPT_LEVELS[level])
    return options


def available_providers() -> list[str]:
    return list(import_onnxruntime().get_available_providers())


def missing_providers(requested: Sequence[str], active: Sequence[str]) -> tuple[str, ...]:
    """The requested providers (other than the CPU) that the session does not run with."""
    return tuple(p for p in requested if p != CPU_PROVIDER and p not in active)


def check_providers(
    path: str, requested: Sequence[str], active: Sequence[str], available: Sequence[str], allow_fallback: bool
) -> tuple[str, ...]:
    """Fail loudly when ONNX Runtime silently dropped a requested provider, unless fallback is allowed."""
    missing = missing_providers(requested, active)
    if missing and not allow_fallback:
        raise MissingDependencyError(
            f"{path}: ONNX Runtime falls back: requested providers {', '.join(requested)} but the session runs "
            f"on {', '.join(active) or 'none of them'} ({', '.join(missing)} did not load; "
            f"available here: {', '.join(available)}); "
            "install onnxruntime-gpu with its CUDA/TensorRT libraries, choose --backend onnxruntime, "
            "or pass --allow-fallback"
        )
    return missing


def onnx_info(path: str | os.PathLike[str]) -> ArtifactInfo:
    """ArtifactInfo of a .onnx file from its fairdeploy metadata (written by fairdeploy export)."""
    from fairdeploy.artifact.metadata import read_onnx_metadata

    p = Path(path)
    meta = read_onnx_metadata(p)
    size = p.stat().st_size
    external = p.with_name(p.name + ".data")
    if external.is_file():
        size += external.stat().st_size
    return ArtifactInfo(
        path=str(p),
        kind="onnx",
        arch=meta.arch,
        classes=tuple(meta.classes),
        groups=tuple(meta.groups),
        image_size=int(meta.image_size),
        mean=tuple(float(x) for x in meta.mean),
        std=tuple(float(x) for x in meta.std),
        precision=str(meta.precision),
        source_sha256=meta.checkpoint_sha256,
        size_bytes=size,
    )


def graph_info(path: str | os.PathLike[str], image_size: int, num_classes: int) -> ArtifactInfo:
    """ArtifactInfo of a .onnx without fairdeploy metadata (a graph export is still measuring, such as a
    mixed-precision candidate): input size and class count as the caller knows them, classes named by index,
    nothing else recorded."""
    p = Path(path)
    return ArtifactInfo(path=str(p), kind="onnx", arch=None, classes=tuple(str(k) for k in range(num_classes)),
                        groups=(), image_size=int(image_size), mean=(), std=(), precision="unknown",
                        source_sha256=None, size_bytes=p.stat().st_size)


def _shape_text(shape: Sequence[int]) -> str:
    """(-1, 3, 224, 224) -> 'N x 3 x 224 x 224' (a dynamic dimension is N)."""
    return " x ".join("N" if d < 0 else str(d) for d in shape)


class OrtRunner(BaseRunner):
    """An InferenceSession created on activate; the providers in effect are compared with those requested."""

    def __init__(
        self,
        path: str | os.PathLike[str],
        backend: str = "onnxruntime",
        device_index: int = 0,
        allow_fallback: bool = False,
        info: ArtifactInfo | None = None,
        threads: int = 0,
    ) -> None:
        if backend not in ORT_BACKENDS:
            raise FairdeployError(f"unknown ONNX Runtime backend {backend!r}; choose one of {', '.join(ORT_BACKENDS)}")
        super().__init__(info if info is not None else onnx_info(path))
        self.path = Path(path)
        self.backend = backend
        self.device_index = device_index
        self.allow_fallback = allow_fallback
        self.threads = threads  # intra-op threads; 0 = ONNX Runtime's default
        self.requested: tuple[str, ...] = ORT_BACKENDS[backend]
        self.active_providers: tuple[str, ...] = ()
        self.fallback: tuple[str, ...] = ()
        self.graph_optimization: str | None = None
        self._session: Any = None
        self._input_name = ""
        self._output_name = ""
        self._input_dtype: type = np.float32
        self._shape: tuple[int, ...] = ()

    def _provider_list(self) -> list[Any]:
        out: list[Any] = []
        for p in self.requested:
            if p in (CUDA_PROVIDER, TRT_PROVIDER):
                out.append((p, {"device_id": self.device_index}))
            else:
                out.append(p)
        return out

    def _activate(self) -> InputSpec:
        ort = import_onnxruntime()
        available = list(ort.get_available_providers())
        if not self.allow_fallback:
            # ONNX Runtime would log a warning and quietly use the CPU: refuse before creating the session.
            check_providers(str(self.path), self.requested, [p for p in self.requested if p in available],
                            available, False)
        options = session_options(self.threads)
        self.graph_optimization = graph_optimization_level()  # as the session was made (None: ORT's default)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "provider not in available names": checked below, loudly
            try:
                session = ort.InferenceSession(str(self.path), options, providers=self._provider_list())
            except Exception as exc:  # ORT raises its own exception types for a bad model
                first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
                raise FairdeployError(f"{self.path}: ONNX Runtime cannot load this model: {first}") from exc
        self.active_providers = tuple(session.get_providers())
        # A provider can be listed as available and still fail to load (CUDA / TensorRT libraries missing).
        self.fallback = check_providers(str(self.path), self.requested, self.active_providers, available,
                                        self.allow_fallback)
        inputs, outputs = session.get_inputs(), session.get_outputs()
        if len(inputs) != 1:
            raise FairdeployError(f"{self.path}: expected one input, the graph has {len(inputs)}")
        out_names = [o.name for o in outputs]
        self._output_name = "logits" if "logits" in out_names else out_names[0]
        inp = inputs[0]
        if inp.type not in _ORT_DTYPES:
            raise FairdeployError(f"{self.path}: input {inp.name!r} has type {inp.type}; expected tensor(float)")
        self._input_name = inp.name
        self._input_dtype = _ORT_DTYPES[inp.type]
        shape = tuple(d if isinstance(d, int) else -1 for d in inp.shape)
        size = self.info.image_size
        if len(shape) == 4 and any(d > 0 and d != want for d, want in zip(shape[1:], (3, size, size))):
            raise FairdeployError(
                f"{self.path}: the metadata says the input is 3x{size}x{size} but the graph's input {inp.name!r} "
                f"has shape {_shape_text(shape)}; the file's metadata does not describe this model (re-export it)")
        self._session = session
        self._shape = shape
        return InputSpec(inp.name, shape, np.dtype(self._input_dtype).name)

    def _infer(self, batch: np.ndarray) -> np.ndarray:
        x = batch if self._input_dtype is np.float32 else batch.astype(self._input_dtype)
        try:
            return self._session.run([self._output_name], {self._input_name: x})[0]
        except Exception as exc:  # ORT's InvalidArgument / Fail have no importable common base
            if type(exc).__module__.split(".")[0] != "onnxruntime":
                raise
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise FairdeployError(
                f"{self.path}: ONNX Runtime cannot run a batch of shape {_shape_text(x.shape)} (the graph's input "
                f"{self._input_name!r} has shape {_shape_text(self._shape)}): {first}") from exc

    def _deactivate(self) -> None:
        self._session = None

    def _describe(self) -> dict[str, Any]:
        return {
            "device": "cpu" if self.backend == "onnxruntime" else f"cuda:{self.device_index}",
            "providers_requested": list(self.requested),
            "providers_active": list(self.active_providers),
            "fallback": bool(self.fallback),
            "providers_missing": list(self.fallback),
            **({"threads": self.threads} if self.threads else {}),
            **({"graph_optimization": self.graph_optimization} if self.graph_optimization is not None else {}),
        }
