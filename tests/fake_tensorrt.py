"""A recording fake of the `tensorrt` Python module, shaped after the real bindings of the given version
(NVIDIA/TensorRT python/src/infer/pyCore.cpp and pyInt8.cpp at 10.3, 10.16, 11.0 and 11.1, and the headers'
documentation). It records every call in `trt.calls`; it builds no engine, so nothing that uses it claims an
engine was built.

What it follows from the real API, because the code under test depends on it:
- 10.x has BuilderFlag.FP16/INT8/OBEY_PRECISION_CONSTRAINTS, IInt8EntropyCalibrator2, IBuilderConfig.int8_calibrator
  and set_calibration_profile (returns bool); 11.x has none of them (setting int8_calibrator raises AttributeError,
  as pybind11 does for an attribute the class lacks). BuilderFlag.TF32 exists everywhere and is set by default;
  clear_flag / set_flag / get_flag.
- DLA by release and platform as NVIDIA's "Working with DLA" (TensorRT 11.4.1 / 11.5.0) says: 10.0-10.7 on Linux
  (Jetson), none in 10.8+ or 11.0-11.3, 11.4.0 Windows on ARM only, 11.4.1 Jetson AGX Orin and Windows on ARM,
  11.5 Windows on ARM only. IBuilder.num_DLA_cores and IRuntime.num_DLA_cores: the machine's cores there, else 0.
  The setters never raise (IBuilderConfig.default_device_type / DLA_core and IRuntime.DLA_core are noexcept void
  setters; NvInferRuntime.h: "if getNbDLACores() returns 0, then this function does nothing"): a DLA build or
  engine the machine cannot serve fails later, in build_serialized_network (None) or deserialize_cuda_engine
  (None), with the reason sent to the logger.
- Loggers: ILogger subclasses with log(severity, msg), Severity INTERNAL_ERROR 0 .. VERBOSE 4; failures are logged
  at ERROR before the call returns None / False.
- create_timing_cache returns None for bytes it cannot read; set_timing_cache(cache, ignore_mismatch)
  returns a bool, False for a cache from another TensorRT version or GPU unless ignore_mismatch.
- build_serialized_network returns None for a network it cannot build (`build_error`, a layer the DLA cannot
  run without GPU fallback: `dla_unsupported` op types of the parsed ONNX). With an INT8 calibrator it calls
  read_calibration_cache, then (no cache) get_batch until it returns None, reading the device pointers it
  returns, then write_calibration_cache.
- Runtime (DLA_core, deserialize_cuda_engine), ICudaEngine (name-based I/O) and IExecutionContext
  (set_input_shape, set_tensor_address, execute_async_v3(stream handle)). Addresses are DEVICE pointers, as in
  the real bindings: the fake reads and writes them through torch CUDA (__cuda_array_interface__ on the stream
  passed), and refuses an address outside torch's CUDA allocations (the real engine would fault on it). Its
  logits are `reference_logits` of the input.
- memory="host" is NOT the real API: it reads the addresses as host memory, so the CPU suite can check the
  plumbing with CPU tensors; the GPU-marked tests use the default, memory="device".
"""

from __future__ import annotations

import ctypes
import enum
from pathlib import Path
from types import ModuleType, SimpleNamespace

import numpy as np

ENGINE_MAGIC = b"FAKE-SERIALIZED-BYTES"
GPU = "Fake GPU"


def version_key(version: str) -> tuple[int, int, int]:
    parts = [int(p) for p in version.split(".")[:3]]
    major, minor, patch = (parts + [0, 0, 0])[:3]
    return major, minor, patch


def dla_exists(version: str, platform: str = "linux") -> bool:
    """Whether TensorRT `version` has a DLA on `platform` (sys.platform), per NVIDIA's 'Working with DLA'."""
    v = version_key(version)
    if (10, 0, 0) <= v < (10, 8, 0):
        return platform == "linux"
    if v == (11, 4, 0) or (11, 5, 0) <= v < (11, 6, 0):
        return platform == "win32"
    if (11, 4, 1) <= v < (11, 5, 0):
        return platform in ("linux", "win32")
    return False


def timing_cache_blob(version: str, gpu: str = GPU, entries: bytes = b"") -> bytes:
    """What a real timing cache carries in its header: the TensorRT version and the device."""
    return f"TC|{version}|{gpu}|".encode() + entries


def engine_bytes(dla_core: int | None = None) -> bytes:
    """What the fake builder serializes: the magic, and the DLA core the engine was built for."""
    return ENGINE_MAGIC + (b"" if dla_core is None else f"|dla={dla_core}".encode())


def reference_logits(x: np.ndarray, num_classes: int) -> np.ndarray:
    """What the fake engine computes: per-channel means times a fixed matrix (N, C, H, W) -> (N, K)."""
    w = np.arange(1, 3 * num_classes + 1, dtype=np.float32).reshape(3, num_classes) / 10.0
    return x.astype(np.float32).mean(axis=(2, 3)) @ w


class Severity(enum.IntEnum):
    INTERNAL_ERROR = 0
    ERROR = 1
    WARNING = 2
    INFO = 3
    VERBOSE = 4


class IllegalAddress(RuntimeError):
    """An address the fake cannot read as the memory the real bindings expect."""


def _onnx_layers(path: str) -> list[tuple[str, str]]:
    """(node name, op type) of an ONNX file; none for bytes that are not one (the plumbing tests' b"onnx")."""
    try:
        import onnx

        return [(n.name, n.op_type) for n in onnx.load(path, load_external_data=False).graph.node]
    except Exception:  # noqa: BLE001 - not an ONNX file: a network without layers
        return []


class _Memory:
    """Reads and writes the addresses handed to the fake: CUDA device memory (the real API) or host memory."""

    def __init__(self, kind: str) -> None:
        if kind not in ("device", "host"):
            raise ValueError(f"memory must be 'device' or 'host', not {kind!r}")
        self.kind = kind

    def _device_view(self, ptr: int, shape: tuple[int, ...], dtype: np.dtype):
        import torch

        if not torch.cuda.is_available():
            raise IllegalAddress("the bindings read device memory and there is no CUDA device here "
                                 "(memory='host' is the CPU tests' stand-in)")
        nbytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
        segments = torch.cuda.memory_snapshot()
        if not any(s["address"] <= ptr and ptr + nbytes <= s["address"] + s["total_size"] for s in segments):
            raise IllegalAddress(f"address {ptr:#x} is not CUDA device memory (an illegal memory access)")

        interface = SimpleNamespace(__cuda_array_interface__={
            "shape": tuple(shape), "typestr": np.dtype(dtype).str, "data": (int(ptr), False), "strides": None,
            "version": 3})
        return torch.as_tensor(interface, device="cuda")

    def read(self, ptr: int, shape: tuple[int, ...], dtype: np.dtype, stream: int = 0) -> np.ndarray:
        if self.kind == "host":
            n = int(np.prod(shape)) * np.dtype(dtype).itemsize
            buf = (ctypes.c_char * n).from_address(int(ptr))
            return np.frombuffer(buf, dtype=dtype).reshape(shape).copy()
        import torch

        view = self._device_view(int(ptr), shape, dtype)
        with torch.cuda.stream(torch.cuda.ExternalStream(stream)) if stream else _nothing():
            return view.cpu().numpy()

    def write(self, ptr: int, values: np.ndarray, stream: int = 0) -> None:
        if self.kind == "host":
            ctypes.memmove(int(ptr), values.tobytes(), values.nbytes)
            return
        import torch

        view = self._device_view(int(ptr), values.shape, values.dtype)
        with torch.cuda.stream(torch.cuda.ExternalStream(stream)) if stream else _nothing():
            view.copy_(torch.from_numpy(np.ascontiguousarray(values)).to(view.device))


def _nothing():
    import contextlib

    return contextlib.nullcontext()


def fake_tensorrt(version: str, parse_ok: bool = True, build_error: str | None = None, dla_cores: int = 0,
                  gpu: str = GPU, num_classes: int = 3, image_size: int = 32, profile_batches=(1, 8, 32),
                  io_dtype: str = "float32", platform: str = "linux", dla_unsupported: tuple[str, ...] = (),
                  memory: str = "device") -> ModuleType:
    """A stand-in exposing only the API of the given version; it records every call in `trt.calls`."""
    legacy = version.startswith("10.")
    cores = dla_cores if dla_exists(version, platform) else 0
    mem = _Memory(memory)
    trt = ModuleType("tensorrt")
    trt.__version__ = version
    calls: list[tuple] = []
    trt.calls = calls  # type: ignore[attr-defined]
    trt.calibration = {"batches": [], "sums": []}  # type: ignore[attr-defined]
    trt.built = []  # type: ignore[attr-defined]  # what each successful build was configured with

    class ILogger:
        pass

    ILogger.Severity = Severity  # type: ignore[attr-defined]
    for s in Severity:
        setattr(ILogger, s.name, s)

    class Logger(ILogger):
        def __init__(self, min_severity: Severity = Severity.WARNING) -> None:
            calls.append(("Logger", min_severity))

        def log(self, severity: Severity, msg: str) -> None:
            calls.append(("Logger.log", severity, msg))

    def log_error(logger, msg: str) -> None:
        calls.append(("log", Severity.ERROR, msg))
        logger.log(Severity.ERROR, msg)

    flag_names = ["SPARSE_WEIGHTS", "GPU_FALLBACK", "TF32"]
    flag_names += ["FP16", "INT8", "OBEY_PRECISION_CONSTRAINTS"] if legacy else []
    trt.ILogger, trt.Logger = ILogger, Logger
    trt.BuilderFlag = SimpleNamespace(**{n: f"flag:{n}" for n in flag_names})
    trt.NetworkDefinitionCreationFlag = SimpleNamespace(
        **({"EXPLICIT_BATCH": 0, "STRONGLY_TYPED": 1} if legacy else {"STRONGLY_TYPED": 0}))
    trt.MemoryPoolType = SimpleNamespace(WORKSPACE="pool:workspace")
    trt.DeviceType = SimpleNamespace(GPU="device:gpu", DLA="device:dla")
    trt.TensorIOMode = SimpleNamespace(NONE="io:none", INPUT="io:input", OUTPUT="io:output")
    trt.DataType = SimpleNamespace(FLOAT="dtype:float", HALF="dtype:half", INT8="dtype:int8")
    _np = {"dtype:float": np.float32, "dtype:half": np.float16, "dtype:int8": np.int8}
    trt.nptype = lambda dt: _np[dt]

    class IProgressMonitor:
        def __init__(self) -> None:
            calls.append(("IProgressMonitor.__init__",))

    trt.IProgressMonitor = IProgressMonitor
    if legacy:
        class IInt8EntropyCalibrator2:
            def __init__(self) -> None:
                calls.append(("IInt8EntropyCalibrator2.__init__",))

        trt.IInt8EntropyCalibrator2 = IInt8EntropyCalibrator2

    class Profile:
        def set_shape(self, name, mn, opt, mx) -> None:
            calls.append(("profile.set_shape", name, tuple(mn), tuple(opt), tuple(mx)))

    class ITimingCache:
        def __init__(self, header: bytes, entries: bytes) -> None:
            self.header, self.entries = header, entries

        def serialize(self) -> bytes:
            return self.header + self.entries

    own_header = timing_cache_blob(version, gpu)

    class Network:
        def __init__(self) -> None:
            self.layers: list[tuple[str, str]] = []

    class Config:
        _removed = set() if legacy else {"int8_calibrator"}

        def __init__(self) -> None:
            self.__dict__["flags"] = {"flag:TF32"}  # TF32 is on by default
            self.__dict__["default_device_type"] = "device:gpu"
            self.__dict__["DLA_core"] = -1

        def __setattr__(self, name, value) -> None:
            if name in self._removed:
                raise AttributeError(f"'tensorrt.IBuilderConfig' object has no attribute '{name}'")
            calls.append(("config." + name, value))
            object.__setattr__(self, name, value)

        def set_memory_pool_limit(self, pool, size) -> None:
            calls.append(("config.set_memory_pool_limit", pool, size))

        def set_flag(self, flag) -> None:
            calls.append(("config.set_flag", flag))
            self.flags.add(flag)

        def clear_flag(self, flag) -> None:
            calls.append(("config.clear_flag", flag))
            self.flags.discard(flag)

        def get_flag(self, flag) -> bool:
            return flag in self.flags

        def add_optimization_profile(self, profile) -> int:
            calls.append(("config.add_optimization_profile",))
            return 0

        def create_timing_cache(self, data: bytes):
            data = bytes(data)
            calls.append(("config.create_timing_cache", data))
            if not data:
                return ITimingCache(own_header, b"")
            parts = data.split(b"|", 3)
            if len(parts) < 4 or parts[0] != b"TC":
                return None  # not a timing cache: the real binding returns None (nullptr)
            return ITimingCache(b"|".join(parts[:3]) + b"|", parts[3])

        def set_timing_cache(self, cache, ignore_mismatch) -> bool:
            ok = cache.header == own_header or bool(ignore_mismatch)
            calls.append(("config.set_timing_cache", bool(ignore_mismatch), ok))
            if ok:
                self.__dict__["_cache"] = cache
            return ok

        def get_timing_cache(self):
            cache = self.__dict__.get("_cache")
            if cache is not None:
                cache.entries = cache.entries + b"+"  # the build adds timings
            return cache

        if legacy:
            def set_calibration_profile(self, profile) -> bool:
                calls.append(("config.set_calibration_profile",))
                return True

    def _calibrate(calibrator, logger) -> bool:
        cached = calibrator.read_calibration_cache()
        calls.append(("calibrator.read_calibration_cache", cached is not None))
        if cached:
            return True  # TensorRT uses the cached scales and never asks for batches
        n = calibrator.get_batch_size()
        shape = (n, 3, image_size, image_size)
        while True:
            pointers = calibrator.get_batch(["input"])
            if not pointers:
                break
            try:
                data = mem.read(pointers[0], shape, np.float32)
            except IllegalAddress as exc:
                log_error(logger, f"Calibration failure: {exc}")
                return False
            trt.calibration["batches"].append(len(data))
            trt.calibration["sums"].append(float(data.astype(np.float64).sum()))
        calls.append(("calibrator.batches", len(trt.calibration["batches"])))
        calibrator.write_calibration_cache(memoryview(b"CALIBRATION-TABLE"))
        return True

    class Builder:
        def __init__(self, logger) -> None:
            calls.append(("Builder",))
            self._logger = logger

        @property
        def num_DLA_cores(self) -> int:
            return cores

        def create_network(self, flags: int) -> Network:
            calls.append(("create_network", flags))
            return Network()

        def create_builder_config(self) -> Config:
            return Config()

        def create_optimization_profile(self) -> Profile:
            return Profile()

        def build_serialized_network(self, network, config):
            monitor = config.__dict__.get("progress_monitor")
            if monitor is not None:  # what TensorRT does while building: phases and steps
                monitor.phase_start("Building engine", None, 3)
                for step in range(3):
                    assert monitor.step_complete("Building engine", step) is True
                monitor.phase_finish("Building engine")
            calls.append(("build_serialized_network",))
            on_dla = config.default_device_type == "device:dla"
            if on_dla and not 0 <= config.DLA_core < cores:
                log_error(self._logger, f"DLA core {config.DLA_core} requested, but this device has {cores} "
                                        "DLA cores")
                return None
            if on_dla and "flag:GPU_FALLBACK" not in config.flags:
                for name, op in network.layers:
                    if op in dla_unsupported:
                        log_error(self._logger, f"{name} ({op}): layer cannot run on DLA and GPU fallback is "
                                                "not enabled")
                        return None
            if build_error is not None:
                log_error(self._logger, build_error)
                return None
            calibrator = config.__dict__.get("int8_calibrator")
            if calibrator is not None and "flag:INT8" in config.flags and not _calibrate(calibrator, self._logger):
                return None
            trt.built.append({"flags": sorted(config.flags), "device": config.default_device_type,
                              "dla_core": config.DLA_core if on_dla else None})
            return engine_bytes(config.DLA_core if on_dla else None)

    class OnnxParser:
        def __init__(self, network: Network, logger) -> None:
            self.network = network
            self.num_errors = 0

        def parse_from_file(self, path: str) -> bool:
            calls.append(("parse_from_file", Path(path).name))
            if not parse_ok:
                self.num_errors = 1
                return False
            self.network.layers = _onnx_layers(path)
            return True

        def get_error(self, i: int) -> str:
            return "In node 3 (Foo): No importer registered for op: Foo"

    # ------------------------------------------------------------ runtime side
    dtype = "dtype:half" if io_dtype == "float16" else "dtype:float"
    mn, opt, mx = profile_batches

    class IExecutionContext:
        def __init__(self, logger) -> None:
            self.shapes: dict[str, tuple[int, ...]] = {}
            self.addresses: dict[str, int] = {}
            self._logger = logger

        def set_input_shape(self, name: str, shape) -> bool:
            shape = tuple(int(d) for d in shape)
            calls.append(("context.set_input_shape", name, shape))
            ok = name == "input" and mn <= shape[0] <= mx and shape[1:] == (3, image_size, image_size)
            if ok:
                self.shapes[name] = shape
            return ok

        def get_tensor_shape(self, name: str) -> tuple[int, ...]:
            if name == "logits":
                return (self.shapes["input"][0], num_classes)
            return self.shapes.get(name, (-1, 3, image_size, image_size))

        def set_tensor_address(self, name: str, ptr: int) -> bool:
            calls.append(("context.set_tensor_address", name))
            self.addresses[name] = int(ptr)
            return name in ("input", "logits")

        def execute_async_v3(self, stream_handle: int) -> bool:
            calls.append(("context.execute_async_v3", int(stream_handle)))
            np_dtype = trt.nptype(dtype)
            try:
                x = mem.read(self.addresses["input"], self.shapes["input"], np_dtype, int(stream_handle))
                result = reference_logits(np.asarray(x, dtype=np.float32), num_classes).astype(np_dtype)
                mem.write(self.addresses["logits"], result, int(stream_handle))
            except IllegalAddress as exc:
                log_error(self._logger, f"IExecutionContext::enqueueV3: {exc}")
                return False
            return True

    class ICudaEngine:
        num_io_tensors = 2
        _names = ("input", "logits")

        def __init__(self, logger) -> None:
            self._logger = logger

        def get_tensor_name(self, i: int) -> str:
            return self._names[i]

        def get_tensor_mode(self, name: str):
            return {"input": trt.TensorIOMode.INPUT, "logits": trt.TensorIOMode.OUTPUT}.get(name, trt.TensorIOMode.NONE)

        def get_tensor_dtype(self, name: str):
            return dtype

        def get_tensor_shape(self, name: str) -> tuple[int, ...]:
            return (-1, 3, image_size, image_size) if name == "input" else (-1, num_classes)

        def get_tensor_profile_shape(self, name: str, profile_index: int):
            s = (3, image_size, image_size)
            return [(mn, *s), (opt, *s), (mx, *s)]

        def create_execution_context(self) -> IExecutionContext:
            calls.append(("engine.create_execution_context",))
            return IExecutionContext(self._logger)

    class Runtime:
        def __init__(self, logger) -> None:
            calls.append(("Runtime",))
            self._logger = logger
            self._dla = -1

        @property
        def num_DLA_cores(self) -> int:
            return cores

        @property
        def DLA_core(self) -> int:
            return self._dla

        @DLA_core.setter
        def DLA_core(self, core: int) -> None:
            calls.append(("runtime.DLA_core", core))
            if cores:  # "if getNbDLACores() returns 0, then this function does nothing"
                self._dla = int(core)

        def deserialize_cuda_engine(self, data: bytes):
            data = bytes(data)
            calls.append(("runtime.deserialize_cuda_engine", len(data)))
            if data.startswith(b"corrupt"):
                log_error(self._logger, "IRuntime::deserializeCudaEngine: Error Code 1: Serialization (Serialization "
                                        "assertion magicTagRead == kMAGIC_TAG failed.Magic tag does not match)")
                return None
            if b"|dla=" in data:
                built_for = int(data.rsplit(b"|dla=", 1)[1])
                if not 0 <= self._dla < cores:
                    log_error(self._logger, f"engine built for DLA core {built_for}: the runtime's DLA core "
                                            f"{self._dla} is not one of this device's {cores}")
                    return None
            return ICudaEngine(self._logger)

    trt.Builder, trt.OnnxParser, trt.Runtime = Builder, OnnxParser, Runtime
    return trt


def names(calls: list[tuple]) -> list[str]:
    return [c[0] for c in calls]
