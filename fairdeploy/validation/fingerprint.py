"""The environment a validation ran in: Python, runtime versions, providers in effect, CPU (with the instruction-set
features its INT8 / FP16 kernels depend on) and GPU."""

from __future__ import annotations

import os
import platform
from collections.abc import Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

import torch

from fairdeploy.runtime.base import Runner

# Distributions whose versions matter to a result (either name of a package that ships under two).
PACKAGES = {
    "numpy": ("numpy",),
    "torch": ("torch",),
    "torchvision": ("torchvision",),
    "onnx": ("onnx",),
    "onnxruntime": ("onnxruntime", "onnxruntime-gpu"),
    "tensorrt": ("tensorrt", "tensorrt-cu13", "tensorrt-cu12"),
    "fairdeploy": ("fairdeploy",),
}


def package_version(names: Sequence[str]) -> str | None:
    """The installed version of the first of `names` that is installed (no import: TensorRT is slow)."""
    for name in names:
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return None


CPUINFO = Path("/proc/cpuinfo")

# The instruction-set features that decide which INT8 / FP16 kernels ONNX Runtime (MLAS) and torch (oneDNN) run,
# as Linux names them in /proc/cpuinfo: the same graph's INT8 results differ between them (AVX2 only vs VNNI vs AMX).
ISA_FEATURES = ("avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512_vnni", "avx_vnni", "avx512_bf16",
                "avx512_fp16", "amx_tile", "amx_int8", "amx_bf16")
# Environment variables that make torch's libraries use less than the CPU has (scripts/test-isa.sh sets them).
ISA_LIMIT_ENV = ("ONEDNN_MAX_CPU_ISA", "ATEN_CPU_CAPABILITY", "MKL_ENABLE_INSTRUCTIONS")


def _read_cpuinfo() -> str | None:
    try:
        return CPUINFO.read_text(errors="replace")
    except OSError:  # no /proc (macOS, Windows) or unreadable
        return None


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (Linux), else what platform reports."""
    for line in (_read_cpuinfo() or "").splitlines():
        if line.lower().startswith(("model name", "hardware", "cpu model")):
            return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def cpu_isa(cpuinfo: str | None = None) -> dict[str, bool] | None:
    """Which of ISA_FEATURES the CPU has, from the first processor's flags line of /proc/cpuinfo (`cpuinfo`: that
    file's text, read from the machine when None). None where there is no such line to read (macOS, Windows):
    unknown, not "none of them"."""
    text = _read_cpuinfo() if cpuinfo is None else cpuinfo
    for line in (text or "").splitlines():
        key, sep, value = line.partition(":")
        if sep and key.strip().lower() in ("flags", "features"):  # x86 / ARM
            flags = set(value.split())
            return {name: name in flags for name in ISA_FEATURES}
    return None


def torch_cpu_capability() -> str | None:
    """The vector ISA torch's ATen kernels were dispatched to (e.g. AVX512, AVX2, DEFAULT), None where unknown."""
    try:
        return str(torch.backends.cpu.get_cpu_capability())
    except (AttributeError, RuntimeError):
        return None


def cpu_record() -> dict[str, Any]:
    """The CPU as a result depends on it: model, cores, torch threads, instruction-set features, the ISA torch's
    kernels use and any variable limiting it."""
    return {"model": cpu_model(), "logical_cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "isa": cpu_isa(), "torch_capability": torch_cpu_capability(),
            "isa_limits": {k: os.environ[k] for k in ISA_LIMIT_ENV if os.environ.get(k)}}


def gpu_info() -> dict[str, Any] | None:
    """Name, compute capability and CUDA version of each visible CUDA device (None without CUDA)."""
    if not torch.cuda.is_available():
        return None
    devices = []
    for i in range(torch.cuda.device_count()):
        major, minor = torch.cuda.get_device_capability(i)
        devices.append({"index": i, "name": torch.cuda.get_device_name(i), "compute_capability": f"{major}.{minor}"})
    return {"cuda": torch.version.cuda, "devices": devices}


def environment_fingerprint(runners: Sequence[Runner] = ()) -> dict[str, Any]:
    """Versions, CPU/GPU and, per runner, its backend, device and ONNX Runtime providers in effect."""
    ort_providers = None
    if package_version(PACKAGES["onnxruntime"]) is not None:
        try:
            import onnxruntime

            ort_providers = list(onnxruntime.get_available_providers())
        except ImportError:
            ort_providers = None
    return {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "packages": {key: package_version(names) for key, names in PACKAGES.items()},
        "cpu": cpu_record(),
        "gpu": gpu_info(),
        "onnxruntime_available_providers": ort_providers,
        "runners": {r.name: r.describe() for r in runners},
    }
