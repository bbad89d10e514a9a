"""Weight-level and 2:4 masks: the "k lowest among still-unpruned" selection, 2:4 patterns (holding masks on a
model is fairdeploy.models.sparsity)."""

from __future__ import annotations

from collections.abc import Mapping

import torch

from fairdeploy.errors import FairdeployError
from fairdeploy.models.sparsity import Masks

SCOPES = ("global", "layer")


def lowest_k(scores: torch.Tensor, pruned: torch.Tensor, k: int) -> torch.Tensor:
    """Bool mask of the `k` lowest `scores` among entries not already `pruned` (ties: lower index first).

    Already-pruned entries are never chosen again, whatever their score.
    """
    if scores.shape != pruned.shape:
        raise ValueError(f"scores {tuple(scores.shape)} and pruned {tuple(pruned.shape)} differ in shape")
    free = int((~pruned).sum())
    if not 0 <= k <= free:
        raise FairdeployError(f"cannot prune {k} weight(s): only {free} remain unpruned")
    flat = torch.where(pruned, torch.full_like(scores, float("inf"), dtype=torch.float64),
                       scores.to(torch.float64)).flatten()
    chosen = torch.argsort(flat, stable=True)[:k]
    out = torch.zeros(flat.numel(), dtype=torch.bool)
    out[chosen.cpu()] = True
    return out.reshape(scores.shape).to(scores.device)


def select_weights(scores: Mapping[str, torch.Tensor], keep: Mapping[str, torch.Tensor], ratio: float,
                   scope: str = "global") -> Masks:
    """Newly pruned weights for one step: `ratio` of the still-unpruned weights with the lowest score,
    ranked over all layers together (`global`) or within each layer (`layer`). Returns bool masks, True =
    pruned in this step."""
    if not 0.0 < ratio < 1.0:
        raise FairdeployError(f"ratio must be in (0, 1), got {ratio}")
    if scope not in SCOPES:
        raise FairdeployError(f"unknown ranking scope {scope!r}; choose one of {', '.join(SCOPES)}")
    names = list(scores)
    if scope == "layer":
        out = {}
        for n in names:
            pruned = ~keep[n]
            k = int(round(ratio * int((~pruned).sum())))
            out[n] = lowest_k(scores[n], pruned, k)
        return out
    flat_scores = torch.cat([scores[n].flatten().cpu() for n in names])
    flat_pruned = torch.cat([(~keep[n]).flatten().cpu() for n in names])
    k = int(round(ratio * int((~flat_pruned).sum())))
    chosen = lowest_k(flat_scores, flat_pruned, k)
    out, offset = {}, 0
    for n in names:
        size = scores[n].numel()
        out[n] = chosen[offset:offset + size].reshape(scores[n].shape)
        offset += size
    return out


def two_four_eligible(weight: torch.Tensor) -> bool:
    """2:4 applies along the input-channel dimension, which needs a multiple of 4 input channels per group."""
    return weight.dim() >= 2 and weight.shape[1] % 4 == 0 and weight.shape[1] >= 4


def two_four_mask(scores: torch.Tensor) -> torch.Tensor:
    """Keep mask with 2 of every 4 consecutive input-channel weights kept: the 2 with the highest score.

    For a conv weight (out, in, kh, kw) the groups run along `in` for each (out, kh, kw), the layout
    TensorRT's sparse kernels need; for a linear weight (out, in) along `in`.
    """
    if not two_four_eligible(scores):
        raise FairdeployError(f"a weight of shape {tuple(scores.shape)} has no multiple-of-4 input dimension")
    moved = scores.movedim(1, -1)  # (out, kh, kw, in)
    grouped = moved.reshape(-1, 4).to(torch.float64)
    # stable: among equal scores keep the earlier weights
    order = torch.argsort(-grouped, dim=1, stable=True)[:, :2]
    keep = torch.zeros_like(grouped, dtype=torch.bool)
    keep.scatter_(1, order, True)
    return keep.reshape(moved.shape).movedim(-1, 1).contiguous()


def is_two_four(weight: torch.Tensor) -> bool:
    """True when every group of 4 consecutive input-channel weights has at least 2 zeros."""
    grouped = weight.movedim(1, -1).reshape(-1, 4)
    return bool(((grouped == 0).sum(1) >= 2).all())
