"""A checkpoint's weight masks: the zeros of its sparse layers (model.json `sparsity`), read back from the
weights, re-applied after an optimiser step, measured."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import torch
from torch import nn

from fairdeploy.errors import FairdeployError
from fairdeploy.models.checkpoint import ModelSpec

Masks = dict[str, torch.Tensor]  # "<layer>.weight" -> bool tensor of the weight's shape, True = kept


def spec_masks(model: nn.Module, spec: ModelSpec) -> Masks:
    """The masks a checkpoint's model.json declares: the zeros of its sparse layers (none if dense)."""
    if not spec.sparsity:
        return {}
    layers = spec.sparsity.get("layers")
    if not isinstance(layers, list) or not layers:
        raise FairdeployError(f"model.json: sparsity {spec.sparsity!r} lists no layers")
    return masks_from_model(model, layers)


def masks_from_model(model: nn.Module, layers: Sequence[str]) -> Masks:
    """Keep masks read back from a checkpoint: the non-zero weights of `layers`."""
    modules = dict(model.named_modules())
    out = {}
    for n in layers:
        m = modules.get(n)
        if m is None or getattr(m, "weight", None) is None:
            raise FairdeployError(f"model.json lists sparse layer {n!r}, which this model does not have")
        out[f"{n}.weight"] = m.weight.detach() != 0
    return out


@torch.no_grad()
def apply_masks(model: nn.Module, masks: Mapping[str, torch.Tensor]) -> None:
    """Zero the pruned weights in place."""
    params = dict(model.named_parameters())
    for name, keep in masks.items():
        p = params[name]
        p.mul_(keep.to(device=p.device, dtype=p.dtype))


def mask_reapplier(masks: Mapping[str, torch.Tensor]) -> Callable[[nn.Module], None]:
    """An `after_step` callback for the training loop: pruned weights stay zero after every optimiser step."""
    cache: dict[tuple[str, torch.device], torch.Tensor] = {}

    @torch.no_grad()
    def reapply(model: nn.Module) -> None:
        params = dict(model.named_parameters())
        for name, keep in masks.items():
            p = params[name]
            key = (name, p.device)
            if key not in cache:
                cache[key] = keep.to(device=p.device, dtype=p.dtype)
            p.mul_(cache[key])

    return reapply


def sparsity(masks: Mapping[str, torch.Tensor]) -> float:
    """Fraction of masked-out weights over the masked layers."""
    total = sum(m.numel() for m in masks.values())
    return 0.0 if total == 0 else float(sum(int((~m).sum()) for m in masks.values()) / total)
