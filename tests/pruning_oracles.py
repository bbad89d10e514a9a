"""Oracles shared by the pruning tests (imported by them; not a test module)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch_pruning as tp
from torch import nn


def expected_selection(rec: dict) -> int:
    """Oracle for the selection rule, read off prune.json: the first step with the highest selection value among
    the steps the guard accepted, step 0 (the unpruned model) being the baseline. Values: FATE on the target gap,
    the gap itself (lower is better), macro-F1, or the step number for `last`; an undefined one never wins."""
    select, target = rec["selection"]["criterion"], rec["selection"]["target"]

    def value(step: dict) -> float:
        v = {"fate": step["fate"].get(target), "f1": step["val"]["f1_macro"], "last": step["step"],
             "gap": None if step["val"]["fairness"].get(target) is None else -step["val"]["fairness"][target]}[select]
        return -math.inf if v is None else float(v)

    best, best_value = 0, value(rec["steps"][0])
    for i, step in enumerate(rec["steps"][1:], start=1):
        if step["eligible"] and value(step) > best_value:
            best, best_value = i, value(step)
    return best


@torch.no_grad()
def zero_channels(dg: tp.DependencyGraph, module: nn.Module, idxs: Sequence[int]) -> None:
    """Silence channels `idxs` of `module` without removing them: zero the output rows (weights and biases)
    of every coupled conv/linear and the affine parameters of every coupled BatchNorm, so the channels emit
    exactly 0. Physically removing the same channels must then leave the logits unchanged."""
    pruner = dg.get_pruner_of_module(module)
    group = dg.get_pruning_group(module, pruner.prune_out_channels, list(idxs))
    for item in group.items:
        layer = item.dep.target.module
        if not dg.is_out_channel_pruning_fn(item.dep.handler) or not isinstance(layer, nn.Module):
            continue
        ix = torch.as_tensor(item.idxs, dtype=torch.long)
        if isinstance(layer, (nn.Conv2d, nn.Linear, nn.BatchNorm2d)):
            if getattr(layer, "weight", None) is not None:
                layer.weight[ix] = 0
            if getattr(layer, "bias", None) is not None:
                layer.bias[ix] = 0
