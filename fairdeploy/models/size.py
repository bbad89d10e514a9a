"""Parameter, non-zero parameter and multiply-accumulate counts of a model at its input size."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn


@dataclass(frozen=True)
class ModelSize:
    params: int
    nonzero_params: int
    macs: int  # multiply-accumulates of one image (dense: zeros are counted)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def model_size(model: nn.Module, image_size: int, device: torch.device | str = "cpu") -> ModelSize:
    """Counts for one image of `image_size` (torch-pruning's op counter; the model is left unchanged)."""
    import torch_pruning as tp

    was_training = model.training
    model.eval()
    example = torch.zeros(1, 3, image_size, image_size, device=device)
    with torch.no_grad():
        macs, params = tp.utils.count_ops_and_params(model, example)
    model.train(was_training)
    nonzero = sum(int((p != 0).sum()) for p in model.parameters())
    return ModelSize(params=int(params), nonzero_params=nonzero, macs=int(macs))


def checkpoint_size(path: Path) -> tuple[ModelSize, int]:
    """A checkpoint's counts at its input size (loaded on the CPU), and that image size."""
    from fairdeploy.models.checkpoint import load_checkpoint

    model, spec = load_checkpoint(path, "cpu")
    return model_size(model, spec.image_size), spec.image_size
