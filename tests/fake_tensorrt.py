"""A recording fake of the `tensorrt` Python module, shaped after the real bindings of the given version
(NVIDIA/TensorRT python/src/infer/pyCore.cpp and pyInt8.cpp at 10.3 and 11.x). It records every call in
`trt.calls`; it builds no engine, so nothing that uses it claims an engine was built.

What it follows from the real API, because the code under test depends on it:
- 10.x has BuilderFlag.FP16/INT8, IInt8EntropyCalibrator2, IBuilderConfig.int8_calibrator and
  set_calibration_profile (returns bool); 11.x has none of them (setting int8_calibrator raises).
- IBuilder.num_DLA_cores: the machine's DLA cores (0 on an ordinary GPU; always 0 on 11.0-11.3, which has
  no DLA, and asking for the DLA device there fails).
- create_timing_cache returns None for bytes it cannot read; set_timing_cache(cache, ignore_mismatch)
  returns a bool, False for a cache from another TensorRT version or GPU unless ignore_mismatch.
- build_serialized_network with an INT8 calibrator calls read_calibration_cache, then (no cache) get_batch
  until it returns None, reading the device pointers it returns, then write_calibration_cache.
- Runtime (DLA_core, deserialize_cuda_engine), ICudaEngine (name-based I/O) and IExecutionContext
  (set_input_shape, set_tensor_address, execute_async_v3(stream handle)). The fake engine reads its input
  from the bound address and writes logits to the output address, so the addresses must be host memory
  (CPU torch tensors in the tests); its logits are `reference_logits` of the input.
"""

from __future__ import annotations

import ctypes
from pathlib import Path
from types import ModuleType, SimpleNamespace

import numpy as np

ENGINE_MAGIC = b"FAKE-SERIALIZED-BYTES"
GPU = "Fake GPU"


def _dla_exists(version: str) -> bool:
    major, minor = (int(p) for p in version.split(".")[:2])
    return not (major == 11 and minor <= 3)


def timing_cache_blob(version: str, gpu: str = GPU, entries: bytes = b"") -> bytes:
    """What a real timing cache carries in its header: the TensorRT version and the device."""
    return f"TC|{version}|{gpu}|".encode() + entries


def reference_logits(x: np.ndarray, num_classes: int) -> np.ndarray:
    """What the fake engine computes: per-channel means times a fixed matrix (N, C, H, W) -> (N, K)."""
    w = np.arange(1, 3 * num_classes + 1, dtype=np.float32).reshape(3, num_classes) / 10.0
    return x.astype(np.float32).mean(axis=(2, 3)) @ w


def _host_array(ptr: int, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
    n = int(np.prod(shape)) * np.dtype(dtype).itemsize
    buf = (ctypes.c_char * n).from_address(int(ptr))
    return np.frombuffer(buf, dtype=dtype).reshape(shape)


def fake_tensorrt(version: str, parse_ok: bool = True, build_ok: bool = True, dla_cores: int = 0,
                  gpu: str = GPU, num_classes: int = 3, image_size: int = 32, profile_batches=(1, 8, 32),
                  io_dtype: str = "float32") -> ModuleType:
    """A stand-in exposing only the API of the given version; it records every call in `trt.calls`."""
    legacy = version.startswith("10.")
    has_dla = _dla_exists(version)
    trt = ModuleType("tensorrt")
    trt.__version__ = version
    calls: list[tuple] = []
    trt.calls = calls  # type: ignore[attr-defined]
    trt.calibration = {"batches": [], "sums": []}  # type: ignore[attr-defined]

    class Logger:
        WARNING = "warning"

        def __init__(self, level: str) -> None:
            calls.append(("Logger", level))

    flag_names = ["SPARSE_WEIGHTS", "GPU_FALLBACK"] + (["FP16", "INT8"] if legacy else [])
    trt.Logger = Logger
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

    class Config:
        _removed = set() if legacy else {"int8_calibrator"}

        def __setattr__(self, name, value) -> None:
            if name in self._removed:
                raise AttributeError(f"TensorRT {version} has no IBuilderConfig.{name}")
            if name == "default_device_type" and value == "device:dla" and not has_dla:
                raise RuntimeError(f"TensorRT {version} has no DLA")
            calls.append(("config." + name, value))
            object.__setattr__(self, name, value)

        def set_memory_pool_limit(self, pool, size) -> None:
            calls.append(("config.set_memory_pool_limit", pool, size))

        def set_flag(self, flag) -> None:
            calls.append(("config.set_flag", flag))

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

    def _calibrate(calibrator) -> None:
        cached = calibrator.read_calibration_cache()
        calls.append(("calibrator.read_calibration_cache", cached is not None))
        if cached:
            return  # TensorRT uses the cached scales and never asks for batches
        n = calibrator.get_batch_size()
        shape = (n, 3, image_size, image_size)
        while True:
            pointers = calibrator.get_batch(["input"])
            if not pointers:
                break
            data = _host_array(pointers[0], shape, np.float32)
            trt.calibration["batches"].append(len(data))
            trt.calibration["sums"].append(float(data.astype(np.float64).sum()))
        calls.append(("calibrator.batches", len(trt.calibration["batches"])))
        calibrator.write_calibration_cache(memoryview(b"CALIBRATION-TABLE"))

    class Builder:
        def __init__(self, logger) -> None:
            calls.append(("Builder",))

        @property
        def num_DLA_cores(self) -> int:
            return dla_cores if has_dla else 0

        def create_network(self, flags: int):
            calls.append(("create_network", flags))
            return "network"

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
            calibrator = config.__dict__.get("int8_calibrator")
            if calibrator is not None and ("config.set_flag", "flag:INT8") in calls:
                _calibrate(calibrator)
            calls.append(("build_serialized_network",))
            return ENGINE_MAGIC if build_ok else None

    class OnnxParser:
        def __init__(self, network, logger) -> None:
            self.num_errors = 0 if parse_ok else 1

        def parse_from_file(self, path: str) -> bool:
            calls.append(("parse_from_file", Path(path).name))
            return parse_ok

        def get_error(self, i: int) -> str:
            return "In node 3 (Foo): No importer registered for op: Foo"

    # ------------------------------------------------------------ runtime side
    dtype = "dtype:half" if io_dtype == "float16" else "dtype:float"
    mn, opt, mx = profile_batches

    class IExecutionContext:
        def __init__(self) -> None:
            self.shapes: dict[str, tuple[int, ...]] = {}
            self.addresses: dict[str, int] = {}

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
            x = _host_array(self.addresses["input"], self.shapes["input"], np_dtype)
            result = reference_logits(np.asarray(x, dtype=np.float32), num_classes).astype(np_dtype)
            ctypes.memmove(self.addresses["logits"], result.tobytes(), result.nbytes)
            return True

    class ICudaEngine:
        num_io_tensors = 2
        _names = ("input", "logits")

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
            return IExecutionContext()

    class Runtime:
        def __init__(self, logger) -> None:
            calls.append(("Runtime",))

        @property
        def DLA_core(self) -> int:
            return self.__dict__.get("_dla", -1)

        @DLA_core.setter
        def DLA_core(self, core: int) -> None:
            if not has_dla or core >= dla_cores:
                raise RuntimeError(f"DLA core {core} does not exist")
            calls.append(("runtime.DLA_core", core))
            self.__dict__["_dla"] = core

        def deserialize_cuda_engine(self, data: bytes):
            calls.append(("runtime.deserialize_cuda_engine", len(data)))
            return None if bytes(data).startswith(b"corrupt") else ICudaEngine()

    trt.Builder, trt.OnnxParser, trt.Runtime = Builder, OnnxParser, Runtime
    return trt


def names(calls: list[tuple]) -> list[str]:
    return [c[0] for c in calls]
