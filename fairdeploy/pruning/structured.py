"""Physical channel removal with torch-pruning's DependencyGraph: coupled groups, per-channel group scores,
aligned channel counts, and removal that keeps track of the original channel ids."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch_pruning as tp
from torch import nn

from fairdeploy.errors import FairdeployError

# channel granularity: a layer's remaining channel count is kept a multiple of this (1 = no alignment)
DEFAULT_ROUND_TO = 8


@dataclass(frozen=True)
class ChannelGroup:
    """One coupled set of channels, named by its root layer; `group` is torch-pruning's full-index Group."""

    root: str
    channels: int
    group: tp.dependency.Group


class OriginalIds:
    """Each layer's remaining channels as ids of the input model's channels, across removals (a step's record names
    the channels of the model the run started from, not positions in an already pruned layer)."""

    def __init__(self) -> None:
        self.ids: dict[str, list[int]] = {}

    def remove(self, name: str, width: int, positions: Sequence[int]) -> list[int]:
        """Record that `positions` of `name` (a layer of `width` channels when first seen) were removed; returns
        their original ids."""
        ids = self.ids.setdefault(name, list(range(width)))
        gone = {int(i) for i in positions}
        self.ids[name] = [c for i, c in enumerate(ids) if i not in gone]
        return [ids[i] for i in sorted(gone)]


def dependency_graph(model: nn.Module, image_size: int, device: torch.device | str = "cpu") -> tp.DependencyGraph:
    """Trace `model` (in eval mode, one image) into a dependency graph of coupled layers."""
    was_training = model.training
    model.eval()
    example = torch.zeros(1, 3, image_size, image_size, device=device)
    with torch.enable_grad():
        dg = tp.DependencyGraph().build_dependency(model, example_inputs=example, verbose=False)
    model.train(was_training)
    return dg


def module_name(dg: tp.DependencyGraph, module: nn.Module) -> str:
    return dg._module2name[module]


def channel_groups(dg: tp.DependencyGraph, model: nn.Module, ignored: Sequence[str] = ()) -> list[ChannelGroup]:
    """Every prunable coupled group rooted at a Conv2d or Linear; groups touching an `ignored` layer's output
    (the classifier head) are left out."""
    modules = dict(model.named_modules())
    ignored_modules = [modules[n] for n in ignored if n in modules]
    out = []
    for group in dg.get_all_groups(ignored_layers=ignored_modules, root_module_types=(nn.Conv2d, nn.Linear)):
        root = group[0].dep.target.module
        out.append(ChannelGroup(root=module_name(dg, root), channels=len(group[0].idxs), group=group))
    return out


def _out_fn(dg: tp.DependencyGraph, fn) -> bool:
    return dg.is_out_channel_pruning_fn(fn)


def group_channel_scores(dg: tp.DependencyGraph, group: tp.dependency.Group,
                         weight_scores: dict[str, torch.Tensor]) -> torch.Tensor:
    """Per-channel sum of per-weight scores over every conv/linear weight the channel's removal deletes.

    For each coupled layer: its output rows (out-channel removal) or its input columns (in-channel removal of
    the next layers, e.g. the head after a residual stage, or each of a flattened feature's positions), mapped
    back to the root's channel index. Layers without scores (and BatchNorm) contribute nothing.
    """
    root_channels = len(group[0].idxs)
    total = torch.zeros(root_channels, dtype=torch.float64)
    for item in group.items:
        dep, idxs, root_idxs = item.dep, item.idxs, item.root_idxs
        layer = dep.target.module
        if not isinstance(layer, (nn.Conv2d, nn.Linear)):
            continue
        name = module_name(dg, layer)
        score = weight_scores.get(f"{name}.weight")
        if score is None or any(r is None for r in root_idxs):
            continue
        score = score.to(torch.float64)
        if _out_fn(dg, dep.handler):
            local = score[idxs].flatten(1).sum(1)
        else:
            per_in = score.transpose(0, 1).flatten(1).sum(1)
            groups = getattr(layer, "groups", 1)
            if isinstance(layer, nn.Conv2d) and groups > 1:
                per_in = per_in.repeat(groups)
            local = per_in[idxs]
        total.scatter_add_(0, torch.as_tensor(root_idxs, dtype=torch.long), local)
    return total


def aligned_removal(n_selected: int, channels: int, round_to: int) -> int:
    """How many channels to remove from a layer of `channels` when `n_selected` were chosen: the remaining
    count is rounded to the nearest multiple of `round_to`, keeping at least `round_to` (at least 1)."""
    if round_to < 1:
        raise FairdeployError(f"round_to must be >= 1, got {round_to}")
    if n_selected <= 0:
        return 0
    keep_min = max(round_to, 1)
    if channels <= keep_min:
        return 0
    remaining = channels - n_selected
    rounded = int(round_to * math.floor(remaining / round_to + 0.5))
    rounded = min(max(rounded, keep_min), channels)
    return channels - rounded


def lowest_channels(scores: Sequence[torch.Tensor], ratio: float, round_to: int) -> list[list[int]]:
    """Global selection: the round(ratio * all channels) lowest scores across groups, then per group the
    aligned count of its lowest channels. Returns, per group, the channel indices to remove."""
    sizes = [len(s) for s in scores]
    if not sizes:
        return []
    flat = torch.cat([s.to(torch.float64) for s in scores])
    k = int(round(ratio * flat.numel()))
    order = torch.argsort(flat, stable=True)[:k]
    owner = torch.repeat_interleave(torch.arange(len(sizes)), torch.as_tensor(sizes))
    counts = torch.bincount(owner[order], minlength=len(sizes)).tolist()
    removal = [aligned_removal(c, n, round_to) for c, n in zip(counts, sizes)]
    if k > 0 and sum(removal) == 0:  # every group rounded to nothing: take round_to from the most-selected one
        for gi in sorted(range(len(sizes)), key=lambda i: -counts[i]):
            if counts[gi] > 0 and aligned_removal(max(round_to, 1), sizes[gi], round_to) > 0:
                removal[gi] = aligned_removal(max(round_to, 1), sizes[gi], round_to)
                break
    out = []
    for s, n in zip(scores, removal):
        out.append(sorted(torch.argsort(s.to(torch.float64), stable=True)[:n].tolist()))
    return out


def prune_out_channels(dg: tp.DependencyGraph, module: nn.Module, idxs: Sequence[int]) -> dict[str, list[int]]:
    """Remove output channels `idxs` of `module` and everything coupled to them, in place.

    Returns {layer name: removed output-channel indices (before removal)} for every coupled layer whose
    outputs shrank.
    """
    idxs = sorted(int(i) for i in idxs)
    if not idxs:
        return {}
    pruner = dg.get_pruner_of_module(module)
    if pruner is None:
        raise FairdeployError(f"layer {module_name(dg, module)} cannot be pruned by channels")
    group = dg.get_pruning_group(module, pruner.prune_out_channels, idxs)
    if not dg.check_pruning_group(group):
        raise FairdeployError(
            f"removing {len(idxs)} channel(s) of {module_name(dg, module)} would leave a coupled layer empty"
        )
    removed = {}
    for item in group.items:
        layer = item.dep.target.module
        if isinstance(layer, nn.Module) and _out_fn(dg, item.dep.handler) and layer in dg._module2name:
            removed[module_name(dg, layer)] = sorted(int(i) for i in item.idxs)
    group.prune()
    return removed
