"""TorchRunner: a fairdeploy checkpoint directory run by PyTorch on the CPU or a CUDA device."""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from fairdeploy.models.checkpoint import (
    WEIGHTS_FILE,
    ModelSpec,
    checkpoint_hash,
    load_checkpoint,
    read_spec,
    resolve_checkpoint,
)
from fairdeploy.runtime.base import ArtifactInfo, BaseRunner, ImageBatch, InputSpec, runner_logits

if TYPE_CHECKING:
    from fairdeploy.models.size import ModelSize


def spec_info(spec: ModelSpec, path: str, source_sha256: str | None, size_bytes: int = 0) -> ArtifactInfo:
    """ArtifactInfo of an FP32 PyTorch model described by its spec (a checkpoint's, or a model in memory)."""
    return ArtifactInfo(
        path=path,
        kind="checkpoint",
        arch=spec.arch,
        classes=spec.classes,
        groups=spec.groups,
        image_size=spec.image_size,
        mean=tuple(spec.mean),
        std=tuple(spec.std),
        precision="fp32",
        source_sha256=source_sha256,
        size_bytes=size_bytes,
    )


def checkpoint_info(path: str | os.PathLike[str]) -> ArtifactInfo:
    """ArtifactInfo of a checkpoint directory (or a run directory whose best/ is one), from model.json."""
    d = resolve_checkpoint(path)
    return spec_info(read_spec(d), str(d), checkpoint_hash(d),
                     (d / WEIGHTS_FILE).stat().st_size if (d / WEIGHTS_FILE).is_file() else 0)


class TorchRunner(BaseRunner):
    """Loads the checkpoint on activate (safetensors, no pickle); infer runs under inference_mode.

    `module`: the model already in memory (eval mode, on `device`), run instead of loading `path` (export checks
    the model it exports); `info` then describes it (default: read from the checkpoint at `path`)."""

    backend = "torch"

    def __init__(self, path: str | os.PathLike[str], device: torch.device, *, module: torch.nn.Module | None = None,
                 info: ArtifactInfo | None = None) -> None:
        super().__init__(info if info is not None else checkpoint_info(path))
        self.path = Path(self.info.path)
        self.device = device
        self._module = module
        self._model: torch.nn.Module | None = None

    def _activate(self) -> InputSpec:
        self._model = self._module if self._module is not None else load_checkpoint(self.path, self.device)[0]
        size = self.info.image_size
        return InputSpec("input", (-1, 3, size, size), "float32")

    def model_size(self) -> ModelSize:
        """Params and MACs of the loaded model for one image at its input size (the runner must be open)."""
        from fairdeploy.models.size import model_size

        assert self._model is not None, "open the runner first"
        return model_size(self._model, self.info.image_size, self.device)

    def _infer(self, batch: np.ndarray) -> np.ndarray:
        assert self._model is not None
        with torch.inference_mode():
            x = torch.from_numpy(batch).to(self.device, non_blocking=False)
            return self._model(x).float().cpu().numpy()

    def _deactivate(self) -> None:
        self._model = None
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def _describe(self) -> dict[str, Any]:
        d: dict[str, Any] = {"device": str(self.device)}
        if self.device.type == "cuda":
            d["gpu"] = torch.cuda.get_device_name(self.device)
        else:
            d["threads"] = torch.get_num_threads()
        return d


def module_logits(model: torch.nn.Module, info: ArtifactInfo, batches: Iterable[ImageBatch]) -> np.ndarray:
    """The logits of a model already in memory (eval mode, on the CPU) over `batches`: a CPU TorchRunner over it,
    described (and named) by `info`."""
    return runner_logits(TorchRunner(info.path, torch.device("cpu"), module=model, info=info), batches)
