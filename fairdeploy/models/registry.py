"""create_model: torchvision classifiers by name, with num_classes set and optional local weights."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn
from torchvision import models as tvm

from fairdeploy.errors import FairdeployError

ARCHITECTURES: dict[str, Callable[..., nn.Module]] = {
    "resnet18": tvm.resnet18,
    "resnet34": tvm.resnet34,
    "resnet50": tvm.resnet50,
    "vgg11_bn": tvm.vgg11_bn,
    "vgg16_bn": tvm.vgg16_bn,
    "mobilenet_v3_small": tvm.mobilenet_v3_small,
    "mobilenet_v3_large": tvm.mobilenet_v3_large,
    "efficientnet_b0": tvm.efficientnet_b0,
}

# The final classification layer of each family, excluded from pruning by default.
_HEADS = {"resnet": "fc", "vgg": "classifier.6", "mobilenet_v3": "classifier.3", "efficientnet": "classifier.1"}


def family(arch: str) -> str:
    for prefix in _HEADS:
        if arch.startswith(prefix):
            return prefix
    raise FairdeployError(f"unknown architecture {arch!r}; choose one of {', '.join(ARCHITECTURES)}")


def classifier_head_name(arch: str) -> str:
    """Qualified module name of the last Linear layer (the classifier head)."""
    return _HEADS[family(arch)]


def create_model(arch: str, num_classes: int, weights: str | os.PathLike[str] | None = None) -> nn.Module:
    """A torchvision `arch` with a `num_classes` head, randomly initialised or from a local weights file.

    `weights` may be a .safetensors file or a plain state-dict .pt/.pth (loaded with weights_only=True,
    so no code in it runs). A head whose size differs from num_classes is left freshly initialised.
    """
    if arch not in ARCHITECTURES:
        raise FairdeployError(f"unknown architecture {arch!r}; choose one of {', '.join(ARCHITECTURES)}")
    if num_classes < 2:
        raise FairdeployError(f"num_classes must be at least 2, got {num_classes}")
    model = ARCHITECTURES[arch](weights=None, num_classes=num_classes)
    if weights is not None:
        load_weights_file(model, Path(weights), skip_prefix=classifier_head_name(arch))
    return model


def load_weights_file(model: nn.Module, path: Path, skip_prefix: str | None = None) -> None:
    """Load a local weights file into `model`; tensors of the head with a different shape are skipped."""
    if not path.is_file():
        raise FairdeployError(f"weights file {path} not found")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
            if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
                state = state["state_dict"]
    except Exception as exc:  # any decode failure is a bad file
        raise FairdeployError(f"weights file {path} could not be read: {str(exc).splitlines()[0]}") from exc
    if not isinstance(state, dict):
        raise FairdeployError(f"weights file {path} does not hold a state dict")
    own = model.state_dict()
    filtered = {}
    for k, v in state.items():
        if k not in own:
            continue
        if own[k].shape != v.shape:
            if skip_prefix and k.startswith(skip_prefix + "."):
                continue
            raise FairdeployError(
                f"weights file {path}: tensor {k} has shape {tuple(v.shape)}, the model expects {tuple(own[k].shape)}"
            )
        filtered[k] = v
    missing = [k for k in own if k not in filtered and not (skip_prefix and k.startswith(skip_prefix + "."))]
    if missing:
        raise FairdeployError(
            f"weights file {path} lacks {len(missing)} tensor(s) of this architecture, e.g. {missing[0]}"
        )
    model.load_state_dict(filtered, strict=False)
