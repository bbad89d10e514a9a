"""The Runner protocol (NCHW float32 batch in, (N, K) float32 logits out), its base, run_runners (every runner over
the same batches) and runner_from_artifact."""

from __future__ import annotations

import abc
import os
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np

from fairdeploy.errors import FairdeployError

ARTIFACT_KINDS = ("checkpoint", "onnx", "engine")
BACKENDS = ("auto", "torch", "onnxruntime", "ort-cuda", "ort-trt", "tensorrt")
# The backends that can run each kind of artifact; the first is what 'auto' picks on the CPU.
KIND_BACKENDS = {
    "checkpoint": ("torch",),
    "onnx": ("onnxruntime", "ort-cuda", "ort-trt"),
    "engine": ("tensorrt",),
}
ENGINE_SUFFIXES = (".engine", ".plan")


@dataclass(frozen=True)
class InputSpec:
    """The one input a runner takes: its name, shape (-1 = dynamic batch) and element type."""

    name: str
    shape: tuple[int, ...]
    dtype: str

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "shape": list(self.shape), "dtype": self.dtype}


@dataclass(frozen=True)
class ArtifactInfo:
    """What a runner's artifact says about itself: classes, groups, preprocessing, precision, source."""

    path: str
    kind: str  # one of ARTIFACT_KINDS
    arch: str | None
    classes: tuple[str, ...]
    groups: tuple[str, ...]
    image_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    precision: str  # fp32, fp16, int8
    source_sha256: str | None  # weights of the checkpoint the artifact came from (a checkpoint: its own)
    size_bytes: int

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        for k in ("classes", "groups", "mean", "std"):
            d[k] = list(d[k])
        return d


@runtime_checkable
class Runner(Protocol):
    """Anything validate can run: context-managed, one input, logits out. BaseRunner implements it."""

    name: str
    info: ArtifactInfo

    def activate(self) -> None: ...

    def deactivate(self) -> None: ...

    def __enter__(self) -> Runner: ...

    def __exit__(self, *exc: object) -> None: ...

    def input_spec(self) -> InputSpec: ...

    def infer(self, batch: np.ndarray) -> np.ndarray: ...

    def describe(self) -> dict[str, Any]: ...


def check_logits(name: str, out: Any, n: int, num_classes: int) -> np.ndarray:
    """Coerce a backend's output to C-contiguous float32 (n, num_classes), or name what came back."""
    arr = np.asarray(out)
    if arr.shape != (n, num_classes):
        raise FairdeployError(
            f"runner {name} returned logits of shape {tuple(arr.shape)} for a batch of {n}; "
            f"expected ({n}, {num_classes})"
        )
    return np.ascontiguousarray(arr, dtype=np.float32)


class BaseRunner(abc.ABC):
    """Activation bookkeeping and the input/output contract; backends implement _activate/_infer/_deactivate."""

    backend: str = "base"

    def __init__(self, info: ArtifactInfo) -> None:
        self.info = info
        self._active = False
        self._input_spec: InputSpec | None = None

    @property
    def name(self) -> str:
        return f"{self.backend}:{self.info.path}"

    @property
    def is_active(self) -> bool:
        return self._active

    def input_spec(self) -> InputSpec:
        """Name, shape (-1 = dynamic batch) and dtype of the input, as the active backend reports it."""
        if self._input_spec is None:
            raise RuntimeError(f"runner {self.name} is not active; use it as a context manager first")
        return self._input_spec

    def activate(self) -> None:
        if not self._active:
            self._input_spec = self._activate()
            self._active = True

    def deactivate(self) -> None:
        if self._active:
            self._active = False
            self._input_spec = None
            self._deactivate()

    def __enter__(self) -> BaseRunner:
        self.activate()
        return self

    def __exit__(self, *exc: object) -> None:
        self.deactivate()

    def infer(self, batch: np.ndarray) -> np.ndarray:
        """Logits (N, K) float32 of a float32 NCHW batch preprocessed with the artifact's eval_transform."""
        if not self._active:
            raise RuntimeError(f"runner {self.name} is not active; use it as a context manager first")
        size = self.info.image_size
        if not isinstance(batch, np.ndarray) or batch.ndim != 4 or tuple(batch.shape[1:]) != (3, size, size):
            shape = tuple(batch.shape) if isinstance(batch, np.ndarray) else type(batch).__name__
            raise FairdeployError(f"runner {self.name} takes a float32 batch (N, 3, {size}, {size}), got {shape}")
        if batch.shape[0] == 0:
            return np.zeros((0, self.info.num_classes), dtype=np.float32)
        x = np.ascontiguousarray(batch, dtype=np.float32)
        return check_logits(self.name, self._infer(x), x.shape[0], self.info.num_classes)

    def describe(self) -> dict[str, Any]:
        """Backend, device and (ONNX Runtime) providers in effect: goes into the fingerprint."""
        return {"backend": self.backend, **self._describe()}

    @abc.abstractmethod
    def _activate(self) -> InputSpec: ...

    @abc.abstractmethod
    def _infer(self, batch: np.ndarray) -> np.ndarray: ...

    @abc.abstractmethod
    def _deactivate(self) -> None: ...

    def _describe(self) -> dict[str, Any]:
        return {}


@dataclass(frozen=True)
class ImageBatch:
    """One batch every runner is fed: float32 NCHW images and, for images of a split, their class and group
    indices (None: unlabelled images, such as export's seeded random tensors)."""

    images: np.ndarray
    labels: np.ndarray | None = None
    groups: np.ndarray | None = None


def array_batches(images: np.ndarray, batch_size: int, labels: np.ndarray | None = None,
                  groups: np.ndarray | None = None) -> Iterator[ImageBatch]:
    """`images` (N, 3, H, W), with their labels and groups, cut in order into batches of `batch_size`."""
    if batch_size < 1:
        raise FairdeployError(f"batch size must be >= 1, got {batch_size}")
    for i in range(0, len(images), batch_size):
        part = slice(i, i + batch_size)
        yield ImageBatch(images[part], None if labels is None else labels[part],
                         None if groups is None else groups[part])


@dataclass(frozen=True)
class RunResult:
    """One runner's pass over the batches: its (N, K) float32 logits, the input it took, and describe() of its
    runtime as it ran."""

    name: str
    logits: np.ndarray
    input_spec: InputSpec
    runtime: dict[str, Any]


@dataclass(frozen=True)
class RunResults:
    """Every runner's pass over the very same batches (in the runners' order), and the labels and groups those
    batches carried (None when they carried none)."""

    runs: tuple[RunResult, ...]
    labels: np.ndarray | None
    groups: np.ndarray | None


def _joined(parts: list[np.ndarray | None]) -> np.ndarray | None:
    if not parts or any(p is None for p in parts):
        return None
    return np.concatenate([np.asarray(p) for p in parts]).astype(np.int64)


def run_runners(runners: Sequence[Runner], batches: Iterable[ImageBatch]) -> RunResults:
    """Feed each batch, in order, to every runner, and collect each runner's logits (checked to be (n, K)
    float32 for its artifact's K). The runners are active (the caller opens them, and may read them before
    closing them). Polygraphy's Comparator.run: `validate` and export's self-check both run their runners here,
    and compare what comes back with validation.compare.compare."""
    specs = [r.input_spec() for r in runners]
    chunks: list[list[np.ndarray]] = [[] for _ in runners]
    labels: list[np.ndarray | None] = []
    groups: list[np.ndarray | None] = []
    for batch in batches:
        x = np.ascontiguousarray(batch.images, dtype=np.float32)
        for out, r in zip(chunks, runners):
            out.append(check_logits(r.name, r.infer(x), len(x), r.info.num_classes))
        labels.append(batch.labels)
        groups.append(batch.groups)
    runs = tuple(
        RunResult(r.name, np.concatenate(out) if out else np.zeros((0, r.info.num_classes), np.float32), spec,
                  r.describe())
        for r, out, spec in zip(runners, chunks, specs)
    )
    return RunResults(runs, _joined(labels), _joined(groups))


def runner_logits(runner: Runner, batches: Iterable[ImageBatch]) -> np.ndarray:
    """One runner opened, run over `batches` (run_runners) and closed: its (N, K) logits."""
    with runner:
        return run_runners([runner], batches).runs[0].logits


def artifact_kind(path: str | os.PathLike[str]) -> str:
    """'checkpoint' (a directory), 'onnx' or 'engine', by what the path is; anything else is named."""
    p = Path(path)
    if not p.exists():
        raise FairdeployError(f"artifact {p} not found")
    if p.is_dir():
        return "checkpoint"
    if p.suffix.lower() == ".onnx":
        return "onnx"
    if p.suffix.lower() in ENGINE_SUFFIXES:
        return "engine"
    raise FairdeployError(
        f"artifact {p}: unknown kind (suffix {p.suffix or 'none'!r}); expected a checkpoint directory, "
        f"a .onnx file or a {' / '.join(ENGINE_SUFFIXES)} TensorRT engine"
    )


def choose_backend(kind: str, backend: str, device: Any) -> str:
    """The backend for an artifact kind: 'auto' picks by kind and device; an explicit one must fit the kind."""
    if backend not in BACKENDS:
        raise FairdeployError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    if backend == "auto":
        if kind == "onnx" and getattr(device, "type", "cpu") == "cuda":
            from fairdeploy.runtime.ort_runner import CUDA_PROVIDER, available_providers

            return "ort-cuda" if CUDA_PROVIDER in available_providers() else "onnxruntime"
        return KIND_BACKENDS[kind][0]
    if backend not in KIND_BACKENDS[kind]:
        raise FairdeployError(
            f"backend {backend!r} cannot run a {kind} artifact; choose one of {', '.join(KIND_BACKENDS[kind])} "
            "(or auto)"
        )
    return backend


def runner_from_artifact(
    path: str | os.PathLike[str],
    backend: str = "auto",
    device: Any = "auto",
    allow_fallback: bool = False,
) -> BaseRunner:
    """An inactive runner for a checkpoint directory, a .onnx file or a TensorRT engine.

    `device` is a torch.device or a string for resolve_device ('auto', 'cpu', 'cuda[:N]'). The runner
    reads its artifact's metadata now (so mismatches surface before any inference); heavy runtimes are
    imported and sessions created on activate. ONNX Runtime providers that silently fail to load raise
    unless `allow_fallback`, which records the fallback in the runner's describe() instead.
    """
    import torch

    from fairdeploy.device import resolve_device

    dev = device if isinstance(device, torch.device) else resolve_device(str(device))
    kind = artifact_kind(path)
    chosen = choose_backend(kind, backend, dev)
    if chosen == "torch":
        from fairdeploy.runtime.torch_runner import TorchRunner

        return TorchRunner(path, dev)
    if chosen in ("onnxruntime", "ort-cuda", "ort-trt"):
        from fairdeploy.runtime.ort_runner import OrtRunner

        # 'cuda' without an index is the current CUDA device (torch's meaning), not device 0
        index = (dev.index if dev.index is not None else torch.cuda.current_device()) if dev.type == "cuda" else 0
        return OrtRunner(path, backend=chosen, device_index=index, allow_fallback=allow_fallback)
    from fairdeploy.runtime.trt_runner import TensorRTRunner

    return TensorRTRunner(path, dev)
