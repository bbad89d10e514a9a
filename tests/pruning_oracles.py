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


def expected_eligible(rec: dict, step: dict) -> bool:
    """Oracle for the guard, read off prune.json: a step is eligible when the unprivileged group lost at most
    max_group_drop of validation accuracy (if protected) and macro-F1 fell at most max_f1_drop, both against step
    0 and recomputed from the steps' recorded validation figures under the recorded guard settings."""
    guard, base, unprivileged = rec["params"]["guard"], rec["steps"][0]["val"], rec["groups"]["unprivileged"]
    group_loss = base["group_accuracy"][unprivileged] - step["val"]["group_accuracy"][unprivileged]
    f1_loss = base["f1_macro"] - step["val"]["f1_macro"]
    return ((not guard["protect_unprivileged"] or group_loss <= guard["max_group_drop"] + 1e-12)
            and f1_loss <= guard["max_f1_drop"] + 1e-12)


def expected_fate(rec: dict, step: dict) -> float | None:
    """FATE of a step on the selection target, from the recorded validation figures: relative macro-F1 change minus
    relative gap change against step 0 (None where the input model's gap or F1 is 0 or a gap is undefined)."""
    target, base = rec["selection"]["target"], rec["steps"][0]["val"]
    gap_b, gap = base["fairness"].get(target), step["val"]["fairness"].get(target)
    if gap_b is None or gap is None or gap_b == 0 or base["f1_macro"] == 0:
        return None
    return (step["val"]["f1_macro"] - base["f1_macro"]) / base["f1_macro"] - (gap - gap_b) / gap_b


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
