"""Score, then remove: the pruner. A criterion (a Torch-Pruning `Importance`, fairdeploy.pruning.criteria) scores
each coupled channel group; the pruner decides how many of the lowest-scored channels go and removes them.

Two ways to decide, one loop over Torch-Pruning's coupled groups: `remove_channels` / `remove_to_budget` (a
compression run: Torch-Pruning's global pruner, to a channel ratio or down to a MAC / parameter budget) and
`remove_lowest` (a FairPrune / SNNL step: a `SelectionRule`, the method's own rule for how much one step cuts).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

import torch
import torch_pruning as tp
from torch import nn

from fairdeploy.errors import FairdeployError
from fairdeploy.models.size import ModelSize, model_size
from fairdeploy.pruning.criteria import TableImportance
from fairdeploy.pruning.structured import (
    DEFAULT_ROUND_TO,
    ChannelGroup,
    lowest_channels,
    prune_out_channels,
)

BUDGET_METRICS = ("macs", "params")
DEFAULT_MAX_LAYER_RATIO = 0.9  # no layer loses more than this share of its channels in one removal


class BudgetUnreachable(FairdeployError):
    """Channel removal cannot bring the model down to the budget (every layer at its removal limit)."""


@dataclass(frozen=True)
class Removal:
    """What one removal did: the channel ratio used, the size after (a compression run's removal; None for a
    FairPrune / SNNL step, whose loop measures the model itself), and {root layer: removed channel indices
    (positions in the layer before this removal)}."""

    ratio: float
    size: ModelSize | None
    removed: dict[str, list[int]]

    @property
    def channels_removed(self) -> int:
        return sum(len(v) for v in self.removed.values())


def protected(table: Mapping[str, torch.Tensor], round_to: int, max_layer_ratio: float) -> dict[str, torch.Tensor]:
    """The table with each layer's best channels set to +inf so that the layer keeps at least
    (1 - max_layer_ratio) of them, rounded up to a multiple of round_to. Torch-Pruning's pruner skips a group
    whose removal would empty a layer (it does not cap it), so without this a global ratio that reaches every
    channel of one layer would prune *less*, and the budget search would not be monotone."""
    out = {}
    step = max(round_to, 1)
    for name, scores in table.items():
        n = len(scores)
        keep = min(n, max(step, step * math.ceil((1 - max_layer_ratio) * n / step)))
        s = scores.to(torch.float64).clone()
        if keep > 0:
            s[torch.argsort(s, descending=True, stable=True)[:keep]] = math.inf
        out[name] = s
    return out


def removable_fraction(table: Mapping[str, torch.Tensor]) -> float:
    """Share of the scored channels that a protected table lets the pruner remove."""
    total = sum(len(s) for s in table.values())
    finite = sum(int(torch.isfinite(s).sum()) for s in table.values())
    return finite / max(total, 1)


def _pruner(model: nn.Module, table: Mapping[str, torch.Tensor], ratio: float, head: str, image_size: int,
            round_to: int, max_layer_ratio: float, device: torch.device | str) -> tp.pruner.BasePruner:
    modules = dict(model.named_modules())
    if head not in modules:
        raise FairdeployError(f"classifier head {head!r} not found in the model")
    names = {m: n for n, m in model.named_modules()}
    example = torch.zeros(1, 3, image_size, image_size, device=device)
    return tp.pruner.BasePruner(
        model, example, importance=TableImportance(table, names), global_pruning=True, pruning_ratio=ratio,
        max_pruning_ratio=max_layer_ratio, ignored_layers=[modules[head]], round_to=round_to if round_to > 1 else None,
    )


def remove_channels(model: nn.Module, table: Mapping[str, torch.Tensor], ratio: float, head: str, image_size: int,
                    round_to: int = DEFAULT_ROUND_TO, max_layer_ratio: float = DEFAULT_MAX_LAYER_RATIO,
                    device: torch.device | str = "cpu") -> Removal:
    """Remove (in place) the globally lowest-scored `ratio` of the prunable channels, as Torch-Pruning's global
    pruner selects them (each layer keeps a multiple of `round_to` and at least 1 - max_layer_ratio of its
    channels); `table` maps each coupled group's root layer name to one score per channel."""
    if not 0.0 <= ratio < 1.0:
        raise FairdeployError(f"channel ratio must be in [0, 1), got {ratio}")
    was_training = model.training
    model.eval()
    removed: dict[str, list[int]] = {}
    if ratio > 0:
        pruner = _pruner(model, protected(table, round_to, max_layer_ratio), ratio, head, image_size, round_to, max_layer_ratio, device)
        with torch.no_grad():
            for group in pruner.step(interactive=True):
                root = group[0].dep.target.module
                name = pruner.DG._module2name[root]
                removed[name] = sorted(int(i) for i in group[0].idxs)
                group.prune()
    model.train(was_training)
    return Removal(ratio=ratio, size=model_size(model, image_size, device), removed=removed)


def budget_value(size: ModelSize, metric: str) -> int:
    return size.macs if metric == "macs" else size.params


def remove_to_budget(model: nn.Module, table: Mapping[str, torch.Tensor], target: float, metric: str, head: str,
                     image_size: int, round_to: int = DEFAULT_ROUND_TO,
                     max_layer_ratio: float = DEFAULT_MAX_LAYER_RATIO,
                     device: torch.device | str = "cpu", iterations: int = 14) -> Removal:
    """Remove the fewest channels (by the same global ranking) that bring `metric` (macs or params) to at most
    `target` (an absolute count): bisection on the channel ratio over copies of the model, then the removal
    on `model` itself. Fails clearly when even the largest allowed ratio stays above the budget."""
    if metric not in BUDGET_METRICS:
        raise FairdeployError(f"unknown budget metric {metric!r}; choose one of {', '.join(BUDGET_METRICS)}")
    now = model_size(model, image_size, device)
    if budget_value(now, metric) <= target:
        return Removal(ratio=0.0, size=now, removed={})

    def trial(r: float) -> int:
        trial_model = copy.deepcopy(model)
        return budget_value(remove_channels(trial_model, table, r, head, image_size, round_to, max_layer_ratio,
                                            device).size, metric)

    lo, hi = 0.0, removable_fraction(protected(table, round_to, max_layer_ratio)) * 0.999
    if trial(hi) > target:
        raise BudgetUnreachable(
            f"the {metric} budget {target:,.0f} cannot be reached by channel removal (at most {max_layer_ratio:.0%} "
            f"of each layer's channels); ask for a larger budget or more rounds"
        )
    for _ in range(iterations):
        mid = (lo + hi) / 2
        if trial(mid) <= target:
            hi = mid
        else:
            lo = mid
    result = remove_channels(model, table, hi, head, image_size, round_to, max_layer_ratio, device)
    if budget_value(result.size, metric) > target:  # cannot happen unless the removal is not deterministic
        raise FairdeployError(f"channel removal missed the {metric} budget: {budget_value(result.size, metric):,} "
                              f"> {target:,.0f}")
    return result


# ---- a step's rule: how many of the lowest-scored channels one FairPrune / SNNL step removes ----------------

class SelectionRule(Protocol):
    """Given each scored group's channel scores (low = removed first), the positions to remove from each."""

    def plan(self, scores: Sequence[torch.Tensor]) -> list[list[int]]: ...


@dataclass(frozen=True)
class LowestShare:
    """FairPrune's channel step: the `ratio` of all scored channels with the lowest scores (ranked over every group
    together), each group's share then aligned so that its remaining count is the nearest multiple of `round_to`
    (structured.lowest_channels)."""

    ratio: float
    round_to: int = DEFAULT_ROUND_TO

    def plan(self, scores: Sequence[torch.Tensor]) -> list[list[int]]:
        return lowest_channels(scores, self.ratio, self.round_to)


@dataclass(frozen=True)
class LowestCount:
    """SNNL's step: the `count` lowest scores over the groups (ties: group order, then position), no group going
    below `round_to` channels; each group's picks are then cut to a multiple of `round_to` by dropping its
    highest-scored ones, so a step removes at most `count`."""

    count: int
    round_to: int = DEFAULT_ROUND_TO

    def plan(self, scores: Sequence[torch.Tensor]) -> list[list[int]]:
        keep = max(self.round_to, 1)
        room = [max(0, len(s) - keep) for s in scores]
        candidates = sorted((float(s[i]), gi, i) for gi, s in enumerate(scores) for i in range(len(s)))
        chosen: list[list[int]] = [[] for _ in scores]
        taken = 0
        for _score, gi, pos in candidates:
            if taken >= self.count:
                break
            if len(chosen[gi]) < room[gi]:
                chosen[gi].append(pos)
                taken += 1
        return [sorted(c[:len(c) - len(c) % self.round_to]) for c in chosen]


def remove_lowest(model: nn.Module, importance: tp.importance.Importance, rule: SelectionRule,
                  dg: tp.DependencyGraph, groups: Sequence[ChannelGroup]) -> Removal:
    """One pruning step (in place): each of `groups` (structured.channel_groups of `dg`, the dependency graph of
    `model` as it is now, the classifier head's output left out) that the `importance` scores loses the positions
    `rule` picks from the scores, the groups ranked in the order given (ties follow it). Removal.removed holds the
    positions (before removal) per group root."""
    was_training = model.training
    model.eval()
    modules = dict(model.named_modules())
    scored = []
    for g in groups:
        scores = importance(g.group)
        if scores is not None:
            scored.append((g, scores.detach().to("cpu", torch.float64)))
    plan = rule.plan([s for _, s in scored])
    removed: dict[str, list[int]] = {}
    with torch.no_grad():
        for (g, _), idxs in zip(scored, plan):
            if idxs:
                prune_out_channels(dg, modules[g.root], idxs)
                removed[g.root] = sorted(int(i) for i in idxs)
    model.train(was_training)
    total = sum(len(s) for _, s in scored)
    return Removal(ratio=sum(len(v) for v in removed.values()) / max(total, 1), size=None, removed=removed)
