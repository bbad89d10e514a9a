"""TensorRTRunner: a serialized engine (TensorRT >= 10, name-based I/O) on torch CUDA buffers; sidecar checked.
The addresses bound with set_tensor_address are device pointers (torch CUDA tensors' data_ptr()): the engine reads
and writes device memory on the stream execute_async_v3 is given."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fairdeploy.errors import FairdeployError, MissingDependencyError
from fairdeploy.runtime.base import ArtifactInfo, BaseRunner, InputSpec
from fairdeploy.trt_env import (
    EngineEnvironment,
    engine_environment,
    import_tensorrt,
    one_line,
    tensorrt_logger,
)


def detect_environment(device: torch.device, engine: str = "engine") -> EngineEnvironment:
    """The installed TensorRT version and the name / compute capability of `device` (a CUDA device)."""
    if device.type != "cuda":
        if not torch.cuda.is_available():
            raise MissingDependencyError(f"{engine}: a TensorRT engine needs a CUDA GPU and none is available here")
        raise FairdeployError(f"{engine}: a TensorRT engine runs on a CUDA device, not {device}; use --device cuda")
    return engine_environment(device, f"running {engine}")


def sidecar_path(engine: Path) -> Path:
    """model.<precision>.engine -> model.<precision>.engine.json"""
    return engine.with_name(engine.name + ".json")


def engine_info(path: Path, sidecar: Any) -> ArtifactInfo:
    """ArtifactInfo of an engine: labels and size from its sidecar; normalisation, architecture and source
    checkpoint from the ONNX it was built from when that file is beside it (the sidecar lacks them)."""
    mean: tuple[float, ...] = tuple(getattr(sidecar, "mean", None) or ())
    std: tuple[float, ...] = tuple(getattr(sidecar, "std", None) or ())
    arch = getattr(sidecar, "arch", None)
    source = getattr(sidecar, "checkpoint_sha256", None)
    onnx_path = path.with_name(Path(sidecar.onnx_file).name)
    if onnx_path.is_file() and not (mean and std and source):
        from fairdeploy.artifact.metadata import read_onnx_metadata

        meta = read_onnx_metadata(onnx_path)
        mean, std = mean or tuple(meta.mean), std or tuple(meta.std)
        arch, source = arch or meta.arch, source or meta.checkpoint_sha256
    return ArtifactInfo(
        path=str(path), kind="engine", arch=arch, classes=tuple(sidecar.classes), groups=tuple(sidecar.groups),
        image_size=int(sidecar.image_size), mean=mean, std=std, precision=str(sidecar.precision),
        source_sha256=source, size_bytes=path.stat().st_size,
    )


class TensorRTRunner(BaseRunner):
    """Deserializes the engine on activate (on the sidecar's DLA core, if any); infer sets the input shape,
    binds torch CUDA tensors by name and runs execute_async_v3 on the runner's own CUDA stream (TensorRT warns
    about, and synchronises on, the legacy default stream). Batches above the profile's maximum are chunked."""

    backend = "tensorrt"

    def __init__(
        self,
        path: str | os.PathLike[str],
        device: torch.device,
        environment: EngineEnvironment | None = None,
    ) -> None:
        from fairdeploy.artifact.sidecar import check_sidecar, read_sidecar

        p = Path(path)
        if not p.is_file():
            raise FairdeployError(f"engine {p} not found")
        sidecar = read_sidecar(sidecar_path(p))
        env = environment if environment is not None else detect_environment(device, str(p))
        check_sidecar(sidecar, env.tensorrt_version, env.gpu_name, env.compute_capability, engine_path=p,
                      source=str(p))
        super().__init__(engine_info(p, sidecar))
        self.path = p
        self.device = device
        self.sidecar = sidecar
        self.environment = env
        self._engine: Any = None
        self._context: Any = None
        self._stream: Any = None
        self._io: dict[str, Any] = {}
        self._logger: Any = None

    def _activate(self) -> InputSpec:
        trt = import_tensorrt(f"running {self.path}")
        self._logger = logger = tensorrt_logger(trt)  # lives as long as the runtime and engine it was given to
        runtime = trt.Runtime(logger)
        dla_core = getattr(self.sidecar, "dla_core", None)
        if dla_core is not None:
            # IRuntime.DLA_core's setter never fails (it does nothing without a DLA): check the core exists first.
            have = int(getattr(runtime, "num_DLA_cores", 0) or 0)
            if not 0 <= int(dla_core) < have:
                where = "this machine has no DLA" if have == 0 else f"this machine has DLA cores 0..{have - 1}"
                raise FairdeployError(f"{self.path}: built for DLA core {dla_core}, {where}; rebuild it here "
                                      "(export --dla-core N, or -1 for the GPU)")
            runtime.DLA_core = int(dla_core)  # before deserialising: the engine runs on the core it was built for
        with torch.cuda.device(self.device):
            engine = runtime.deserialize_cuda_engine(self.path.read_bytes())
            if engine is None:
                raise FairdeployError(f"{self.path}: TensorRT could not deserialize the engine: {self._why()}")
            context = engine.create_execution_context()
            stream = torch.cuda.Stream(device=self.device)  # our own stream, not the legacy default one
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        inputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        outputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
        if len(inputs) != 1 or len(outputs) != 1:
            raise FairdeployError(
                f"{self.path}: expected one input and one output, the engine has {inputs} -> {outputs}"
            )
        in_name, out_name = inputs[0], outputs[0]
        in_np = np.dtype(trt.nptype(engine.get_tensor_dtype(in_name)))
        out_np = np.dtype(trt.nptype(engine.get_tensor_dtype(out_name)))
        _, _, max_shape = engine.get_tensor_profile_shape(in_name, 0)
        self._engine, self._context, self._stream = engine, context, stream
        self._io = {
            "input": in_name, "output": out_name,
            "input_dtype": _torch_dtype(in_np), "output_dtype": _torch_dtype(out_np),
            "max_batch": int(max_shape[0]),
        }
        return InputSpec(in_name, tuple(int(d) for d in engine.get_tensor_shape(in_name)), in_np.name)

    def _infer(self, batch: np.ndarray) -> np.ndarray:
        step = self._io["max_batch"]
        return np.concatenate([self._infer_chunk(batch[i : i + step]) for i in range(0, len(batch), step)])

    def _infer_chunk(self, batch: np.ndarray) -> np.ndarray:
        ctx, io = self._context, self._io
        stream = self._stream
        # Copies, allocation and the engine all run on the runner's stream, in that order.
        with torch.cuda.device(self.device), torch.cuda.stream(stream):
            x = torch.from_numpy(np.ascontiguousarray(batch)).to(self.device, dtype=io["input_dtype"]).contiguous()
            if not ctx.set_input_shape(io["input"], tuple(x.shape)):
                raise FairdeployError(f"{self.path}: the engine rejects input shape {tuple(x.shape)}")
            out = torch.empty(tuple(ctx.get_tensor_shape(io["output"])), dtype=io["output_dtype"], device=self.device)
            if not (ctx.set_tensor_address(io["input"], x.data_ptr())
                    and ctx.set_tensor_address(io["output"], out.data_ptr())):
                raise FairdeployError(f"{self.path}: TensorRT refused the I/O buffers")
            if not ctx.execute_async_v3(stream.cuda_stream):
                raise FairdeployError(f"{self.path}: TensorRT execution failed: {self._why()}")
            result = out.float().cpu()  # ordered after the engine on the same stream
            stream.synchronize()
            return result.numpy()

    def _why(self) -> str:
        """TensorRT's first error since activation, as one line."""
        errors = self._logger.errors if self._logger is not None else []
        return one_line(errors[0]) if errors else "no reason logged"

    def _deactivate(self) -> None:
        self._context = None
        self._engine = None
        self._stream = None
        self._io = {}
        self._logger = None

    def _describe(self) -> dict[str, Any]:
        return {
            "device": str(self.device),
            "tensorrt": self.environment.tensorrt_version,
            "gpu": self.environment.gpu_name,
            "compute_capability": self.environment.compute_capability,
            "built_with_tensorrt": self.sidecar.tensorrt_version,
            "dla_core": getattr(self.sidecar, "dla_core", None),
        }


def _torch_dtype(dtype: np.dtype) -> torch.dtype:
    table = {np.dtype(np.float32): torch.float32, np.dtype(np.float16): torch.float16}
    if dtype not in table:
        raise FairdeployError(f"engine I/O type {dtype} is not supported; expected float32 or float16")
    return table[dtype]
