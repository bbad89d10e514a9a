"""Channel importance criteria as Torch-Pruning `Importance` callables: a coupled group in, one score per channel
out (low = removed first). Fairness-blind: magnitude, taylor. Fairness-aware: fairprune, snnl, group-taylor.

Every criterion is *prepared* on a model (gradients, curvatures or SNNL scores are computed once per round on
score sets) and then called by Torch-Pruning's pruner on each coupled group. Scores of one coupled group are
divided by their mean absolute value, as Torch-Pruning's own criteria do (normalizer "mean"), so that the
global ranking compares channels across layers of different widths; group-taylor returns a global removal
rank instead (see `fair_share_order`).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import torch
import torch_pruning as tp
from torch import nn
from torch.utils.data import Dataset

from fairdeploy.errors import FairdeployError
from fairdeploy.pruning.curvature import DEFAULT_ESTIMATOR, group_gradient
from fairdeploy.pruning.saliency import DEFAULT_BETA
from fairdeploy.pruning.scoresets import DEFAULT_SCORE_BATCH_SIZE
from fairdeploy.pruning.snnl import DEFAULT_SNNL_BATCH_SIZE, DEFAULT_SNNL_TEMPERATURE
from fairdeploy.pruning.structured import channel_groups, group_channel_scores

CRITERIA = {
    "magnitude": "fairness-blind: L2 norm of every weight a channel's removal deletes (Torch-Pruning "
                 "GroupMagnitudeImportance, p=2)",
    "taylor": "fairness-blind: first-order Taylor |w * dL/dw| summed over the coupled weights, gradient of the "
              "loss on a class-stratified train sample (Torch-Pruning GroupTaylorImportance)",
    "fairprune": "fairness-aware: FairPrune saliency 0.5*w^2*(H_unpriv - beta*H_priv) summed over the coupled "
                 "weights (per-sample MC-Fisher curvature per group); keeps channels the unprivileged group needs",
    "snnl": "fairness-aware: per-channel soft nearest neighbour loss of the root conv's feature maps against the "
            "group (low = the channel separates the groups = removed first); ties broken by magnitude",
    "group-taylor": "fairness-aware: Taylor importance computed separately on each group's samples; channels are "
                    "removed in an order that cuts every group's share of its own importance at the same pace "
                    "(in the spirit of FairGRAPE), so channels important to any group are kept",
}
BLIND = ("magnitude", "taylor")


def mean_normalised(scores: torch.Tensor) -> torch.Tensor:
    """scores / mean(|scores|) (sign kept; an all-zero vector stays zero)."""
    scale = scores.abs().mean()
    return scores / scale if float(scale) > 0 else scores


def root_module(group: tp.dependency.Group) -> nn.Module:
    return group[0].dep.target.module


class TableImportance(tp.importance.Importance):
    """Scores computed beforehand, looked up by the coupled group's root layer name. The pruner may run on a
    copy of the model (the budget search does), so lookups go by name, not by module object."""

    def __init__(self, table: Mapping[str, torch.Tensor], names: Mapping[nn.Module, str]):
        self.table, self.names = dict(table), dict(names)

    def __call__(self, group: tp.dependency.Group) -> torch.Tensor | None:
        name = self.names.get(root_module(group))
        if name is None or name not in self.table:
            return None
        scores = self.table[name]
        idxs = list(group[0].idxs)
        return scores[idxs] if len(idxs) != len(scores) else scores


# ---- gradients on score sets -------------------------------------------------------------------------------

def _with_grads(model: nn.Module, grads: Mapping[str, torch.Tensor], fn: Callable[[], object]) -> object:
    """Run `fn` with `grads` ({parameter name: gradient}, e.g. curvature.group_gradient's) as the parameters'
    .grad (Torch-Pruning's Taylor importance reads them there); other parameters get none."""
    params = dict(model.named_parameters())
    for k, p in params.items():
        p.grad = grads[k].to(p.device) if k in grads else None
    try:
        return fn()
    finally:
        for p in params.values():
            p.grad = None


# ---- the group-aware order ---------------------------------------------------------------------------------

def fair_share_order(per_group: Sequence[torch.Tensor]) -> torch.Tensor:
    """Removal order over N channels given each group's importance of every channel (G tensors of N, >= 0).

    Greedy, in the spirit of FairGRAPE: each group g has lost the share L_g = (its importance of the removed
    channels) / (its importance of all channels). Each pick removes the remaining channel that keeps the largest
    share lost by any group, max_g (L_g + imp_g[c] / total_g), smallest; ties go to the smaller summed share,
    then the lower index. Returns rank[c] = the pick at which channel c goes (0 first), so "low rank = removed
    first" is an ordinary importance score for a global pruner.
    """
    imp = torch.stack([p.to(torch.float64).clamp_min(0) for p in per_group])  # (G, N)
    _, n = imp.shape
    share = imp / imp.sum(1, keepdim=True).clamp_min(1e-300)
    lost = torch.zeros(share.shape[0], 1, dtype=torch.float64)
    removed = torch.zeros(n, dtype=torch.bool)
    rank = torch.empty(n, dtype=torch.float64)
    total_share = share.sum(0)
    for r in range(n):
        worst = (lost + share).max(0).values
        worst[removed] = torch.inf
        best = worst.min()
        tied = (worst == best).nonzero().view(-1)
        c = int(tied[torch.argmin(total_share[tied])]) if len(tied) > 1 else int(tied[0])
        removed[c] = True
        rank[c] = r
        lost[:, 0] += share[:, c]
    return rank


# ---- preparing a criterion on a model ----------------------------------------------------------------------

@dataclass
class ScoreData:
    """What the criteria score with: a fairness-blind sample, one equal-sized sample per group, the two groups
    FairPrune contrasts, group-balanced SNNL batches."""

    blind: Dataset
    per_group: dict[str, Dataset]
    unprivileged: str
    privileged: str
    snnl_batches: Dataset | None = None
    snnl_batch_size: int = DEFAULT_SNNL_BATCH_SIZE
    batch_size: int = DEFAULT_SCORE_BATCH_SIZE
    beta: float = DEFAULT_BETA
    curvature: str = DEFAULT_ESTIMATOR
    temperature: float = DEFAULT_SNNL_TEMPERATURE
    seed: int = 0
    info: dict[str, object] = field(default_factory=dict)


def prepare_importance(criterion: str, model: nn.Module, dg: tp.DependencyGraph, ignored: Sequence[nn.Module],
                       data: ScoreData, device: torch.device) -> tuple[dict[str, torch.Tensor], dict[str, object]]:
    """Score every prunable coupled group of `model` with `criterion`; returns {root layer name: scores} and
    notes (e.g. how many SNNL scores tied)."""
    if criterion not in CRITERIA:
        raise FairdeployError(f"unknown criterion {criterion!r}; choose one of {', '.join(CRITERIA)}")
    names = {m: n for n, m in model.named_modules()}
    groups = channel_groups(dg, model, ignored=[names[m] for m in ignored])
    notes: dict[str, object] = {}

    def each(imp: tp.importance.Importance) -> dict[str, torch.Tensor]:
        out = {}
        for g in groups:
            s = imp(g.group)
            if s is not None:
                out[g.root] = s.detach().to("cpu", torch.float64)
        return out

    magnitude = tp.importance.GroupMagnitudeImportance(p=2)
    if criterion == "magnitude":
        return each(magnitude), notes
    if criterion == "taylor":
        grads = group_gradient(model, data.blind, device, batch_size=data.batch_size)
        return _with_grads(model, grads, lambda: each(tp.importance.GroupTaylorImportance())), notes  # type: ignore[return-value]
    if criterion == "group-taylor":
        per_group = {}
        for gname, ds in data.per_group.items():
            grads = group_gradient(model, ds, device, batch_size=data.batch_size)
            per_group[gname] = _with_grads(model, grads, lambda: each(tp.importance.GroupTaylorImportance()))
        keys = list(next(iter(per_group.values())))
        sizes = [len(per_group[next(iter(per_group))][k]) for k in keys]
        flat = [torch.cat([per_group[g][k] for k in keys]) for g in per_group]
        rank = fair_share_order(flat)
        out, start = {}, 0
        for k, size in zip(keys, sizes):
            out[k] = rank[start:start + size]
            start += size
        notes["groups"] = list(per_group)
        return out, notes
    if criterion == "fairprune":
        from fairdeploy.pruning.curvature import group_curvature
        from fairdeploy.pruning.saliency import fairprune_saliency

        layers = [n for n, m in model.named_modules() if n and isinstance(m, (nn.Conv2d, nn.Linear))]
        h = {role: group_curvature(model, data.per_group[gname], data.curvature, device, layers=layers,
                                   batch_size=data.batch_size, seed=data.seed)
             for role, gname in (("u", data.unprivileged), ("p", data.privileged))}
        modules = dict(model.named_modules())
        sal = fairprune_saliency({f"{n}.weight": modules[n].weight for n in layers}, h["u"], h["p"], data.beta)
        out = {g.root: mean_normalised(group_channel_scores(dg, g.group, sal)) for g in groups}
        notes["unprivileged"], notes["privileged"] = data.unprivileged, data.privileged
        return out, notes
    # snnl
    from fairdeploy.pruning.snnl import snnl_channel_scores

    if data.snnl_batches is None:
        raise FairdeployError("the snnl criterion needs group-balanced batches with at least two groups")
    roots = [g.root for g in groups]
    conv_roots = [g.root for g in groups if isinstance(root_module(g.group), nn.Conv2d)]
    snnl = snnl_channel_scores(model, conv_roots, data.snnl_batches, device, data.temperature, False,
                               data.snnl_batch_size)
    mags = each(magnitude)
    out, tied = {}, 0
    for name in roots:
        base = mags[name]
        if name not in snnl:  # a Linear root (e.g. VGG's hidden classifier layers): magnitude decides
            out[name] = base
            continue
        s = snnl[name].to(torch.float64)
        tied += int(len(s) - torch.unique(s).numel())
        # SNNL values are O(1) everywhere; a 1e-6 share of the normalised magnitude breaks exact ties only
        out[name] = s + 1e-6 * base / max(float(base.max()), 1e-12)
    notes["snnl_tied_channels"] = tied
    notes["snnl_layers"] = conv_roots
    if tied:
        warnings.warn(f"snnl: {tied} channel score(s) tied exactly with another channel of the same layer; "
                      "ties are broken by magnitude", stacklevel=2)
    return out, notes
