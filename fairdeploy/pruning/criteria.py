"""Channel importance criteria as Torch-Pruning `Importance` callables: a coupled group in, one score per channel
out (low = removed first). Fairness-blind: magnitude, taylor. Fairness-aware: fairprune, snnl, group-taylor.

One small class per criterion (`Criterion`), listed in `CRITERION_CLASSES`: each is *prepared* on a model
(`prepare`: gradients, curvatures or SNNL scores computed once per round or step on score sets) and then called
by the pruner (fairdeploy.pruning.removal) on each coupled group. The compression runs and the FairPrune / SNNL
steps use the same classes. In a compression run the scores of one coupled group are divided by their mean
absolute value, as Torch-Pruning's own criteria do (normalizer "mean"), so that the global ranking compares
channels across layers of different widths; group-taylor returns a global removal rank instead (see
`fair_share_order`).
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
import torch_pruning as tp
from torch import nn
from torch.utils.data import Dataset

from fairdeploy.errors import FairdeployError
from fairdeploy.progress import Progress, no_progress
from fairdeploy.pruning.curvature import DEFAULT_ESTIMATOR, group_curvature, group_gradient
from fairdeploy.pruning.saliency import DEFAULT_BETA, fairprune_saliency
from fairdeploy.pruning.scoresets import DEFAULT_SCORE_BATCH_SIZE
from fairdeploy.pruning.snnl import DEFAULT_SNNL_BATCH_SIZE, DEFAULT_SNNL_TEMPERATURE, snnl_channel_scores
from fairdeploy.pruning.structured import ChannelGroup, channel_groups, group_channel_scores, module_name


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


# ---- what the criteria score with ---------------------------------------------------------------------------

@dataclass
class ScoreData:
    """What the criteria score with: a fairness-blind sample, one equal-sized sample per group, the two groups
    FairPrune contrasts, group-balanced SNNL batches; the batch and seed of the scoring passes. beta, curvature
    and temperature are the compression run's settings of the criteria that take them (`create_criterion`)."""

    blind: Dataset | None = None
    per_group: dict[str, Dataset] = field(default_factory=dict)
    unprivileged: str = ""
    privileged: str = ""
    snnl_batches: Dataset | None = None
    snnl_batch_size: int = DEFAULT_SNNL_BATCH_SIZE
    batch_size: int = DEFAULT_SCORE_BATCH_SIZE
    beta: float = DEFAULT_BETA
    curvature: str = DEFAULT_ESTIMATOR
    temperature: float = DEFAULT_SNNL_TEMPERATURE
    seed: int = 0
    info: dict[str, object] = field(default_factory=dict)


# ---- the criteria ------------------------------------------------------------------------------------------

class Criterion(TableImportance):
    """A channel importance criterion. `prepare` scores every coupled group of the model as it is now (the table:
    {root layer name: one score per channel}, float64 on the CPU, plus `notes` for the record); the pruner then
    calls the criterion on each coupled group, which looks its scores up by name."""

    name: ClassVar[str]
    description: ClassVar[str]

    def __init__(self) -> None:
        super().__init__({}, {})
        self.notes: dict[str, object] = {}

    @classmethod
    def from_data(cls, data: ScoreData | None) -> Criterion:
        """The criterion with a compression run's settings (ScoreData's beta, curvature, temperature)."""
        return cls()

    def prepare(self, model: nn.Module, dg: tp.DependencyGraph, groups: Sequence[ChannelGroup],
                data: ScoreData | None, device: torch.device | str,
                progress: Progress = no_progress) -> Criterion:
        """Score `groups` (of `dg`, traced from `model` as it is now) on `data`; returns self."""
        self.names = {m: n for n, m in model.named_modules()}
        self.notes = {}
        scores = self.score(model, dg, groups, data, torch.device(device), progress)
        self.table = {k: v.detach().to("cpu", torch.float64) for k, v in scores.items()}
        return self

    def score(self, model: nn.Module, dg: tp.DependencyGraph, groups: Sequence[ChannelGroup],
              data: ScoreData | None, device: torch.device, progress: Progress) -> dict[str, torch.Tensor]:
        raise NotImplementedError


def _each(imp: tp.importance.Importance, groups: Sequence[ChannelGroup]) -> dict[str, torch.Tensor]:
    """A Torch-Pruning criterion's scores of every group that it scores, by root name."""
    out = {}
    for g in groups:
        s = imp(g.group)
        if s is not None:
            out[g.root] = s.detach().to("cpu", torch.float64)
    return out


def _needs(data: ScoreData | None, what: str, criterion: str) -> ScoreData:
    if data is None or getattr(data, what) is None:
        raise FairdeployError(f"the {criterion} criterion needs score data ({what.replace('_', ' ')})")
    return data


class MagnitudeImportance(Criterion):
    name = "magnitude"
    description = ("fairness-blind: L2 norm of every weight a channel's removal deletes (Torch-Pruning "
                   "GroupMagnitudeImportance, p=2)")

    def score(self, model: nn.Module, dg: tp.DependencyGraph, groups: Sequence[ChannelGroup], data: ScoreData | None,
              device: torch.device, progress: Progress) -> dict[str, torch.Tensor]:
        return _each(tp.importance.GroupMagnitudeImportance(p=2), groups)


class TaylorImportance(Criterion):
    name = "taylor"
    description = ("fairness-blind: first-order Taylor |w * dL/dw| summed over the coupled weights, gradient of the "
                   "loss on a class-stratified train sample (Torch-Pruning GroupTaylorImportance)")

    def score(self, model: nn.Module, dg: tp.DependencyGraph, groups: Sequence[ChannelGroup], data: ScoreData | None,
              device: torch.device, progress: Progress) -> dict[str, torch.Tensor]:
        data = _needs(data, "blind", self.name)
        grads = group_gradient(model, data.blind, device, batch_size=data.batch_size)
        return _with_grads(model, grads, lambda: _each(tp.importance.GroupTaylorImportance(), groups))  # type: ignore[return-value]


class PerGroupTaylorImportance(Criterion):
    name = "group-taylor"
    description = ("fairness-aware: Taylor importance computed separately on each group's samples; channels are "
                   "removed in an order that cuts every group's share of its own importance at the same pace "
                   "(in the spirit of FairGRAPE), so channels important to any group are kept")

    def score(self, model: nn.Module, dg: tp.DependencyGraph, groups: Sequence[ChannelGroup], data: ScoreData | None,
              device: torch.device, progress: Progress) -> dict[str, torch.Tensor]:
        data = _needs(data, "per_group", self.name)
        per_group = {}
        for gname, ds in data.per_group.items():
            grads = group_gradient(model, ds, device, batch_size=data.batch_size)
            per_group[gname] = _with_grads(model, grads,
                                           lambda: _each(tp.importance.GroupTaylorImportance(), groups))
        keys = list(next(iter(per_group.values())))
        sizes = [len(per_group[next(iter(per_group))][k]) for k in keys]
        rank = fair_share_order([torch.cat([per_group[g][k] for k in keys]) for g in per_group])
        out, start = {}, 0
        for k, size in zip(keys, sizes):
            out[k] = rank[start:start + size]
            start += size
        self.notes["groups"] = list(per_group)
        return out


class FairPruneImportance(Criterion):
    """FairPrune's saliency 0.5 w^2 (H_u - beta H_p) per weight (optionally with each group's first-order term,
    fairdeploy.pruning.saliency) from per-sample curvature on the unprivileged and the privileged group's score
    sets, summed per channel over the coupled weights; `normalise` divides each group's scores by their mean
    absolute value (a compression run's global ranking; FairPrune's own channel steps rank the raw sums).
    `saliency` is the per-weight score itself, which FairPrune's weight-level and 2:4 masks rank."""

    name = "fairprune"
    description = ("fairness-aware: FairPrune saliency 0.5*w^2*(H_unpriv - beta*H_priv) summed over the coupled "
                   "weights (per-sample MC-Fisher curvature per group); keeps channels the unprivileged group needs")

    def __init__(self, beta: float = DEFAULT_BETA, curvature: str = DEFAULT_ESTIMATOR, *, mc_samples: int = 1,
                 probes: int = 1, first_order: bool = False, normalise: bool = True) -> None:
        super().__init__()
        self.beta, self.curvature = beta, curvature
        self.mc_samples, self.probes, self.first_order, self.normalise = mc_samples, probes, first_order, normalise
        self.stats: dict[str, Any] = {}  # timings of the last curvature passes

    @classmethod
    def from_data(cls, data: ScoreData | None) -> Criterion:
        return cls() if data is None else cls(beta=data.beta, curvature=data.curvature)

    def saliency(self, model: nn.Module, layers: Sequence[str], data: ScoreData, device: torch.device | str,
                 progress: Progress = no_progress) -> dict[str, torch.Tensor]:
        """Per-weight saliency of `layers` ({"<layer>.weight": tensor}); curvature (and gradients) on the two
        groups' score sets with data.seed."""
        data = _needs(data, "per_group", self.name)
        h, g = {}, {}
        t0, n = time.perf_counter(), 0
        for role, gname in (("u", data.unprivileged), ("p", data.privileged)):
            subset = data.per_group[gname]
            n += len(subset)  # type: ignore[arg-type]
            h[role] = group_curvature(model, subset, self.curvature, device, layers=layers,
                                      batch_size=data.batch_size, mc_samples=self.mc_samples, probes=self.probes,
                                      seed=data.seed, progress=progress, task=f"curvature {gname}")
            if self.first_order:
                g[role] = group_gradient(model, subset, device, layers=layers, batch_size=data.batch_size)
        seconds = time.perf_counter() - t0
        self.stats = {"curvature": self.curvature, "samples": n, "seconds": seconds,
                      "samples_per_s": n / max(seconds, 1e-9), "device": str(device)}
        modules = dict(model.named_modules())
        weights = {f"{name}.weight": modules[name].weight for name in layers}
        return fairprune_saliency(weights, h["u"], h["p"], self.beta, g.get("u"), g.get("p"))

    def score(self, model: nn.Module, dg: tp.DependencyGraph, groups: Sequence[ChannelGroup], data: ScoreData | None,
              device: torch.device, progress: Progress) -> dict[str, torch.Tensor]:
        data = _needs(data, "per_group", self.name)
        layers = [n for n, m in model.named_modules() if n and isinstance(m, (nn.Conv2d, nn.Linear))]
        sal = self.saliency(model, layers, data, device, progress)
        self.notes["unprivileged"], self.notes["privileged"] = data.unprivileged, data.privileged
        scale = mean_normalised if self.normalise else (lambda s: s)
        return {g.root: scale(group_channel_scores(dg, g.group, sal)) for g in groups}


class SnnlImportance(Criterion):
    """Per-channel soft nearest neighbour loss of a layer's feature maps against the group (fairdeploy.pruning.snnl),
    on group-balanced batches. `layers` None (a compression run): every group rooted at a conv layer is scored on
    that layer's output, a Linear root by magnitude, and exact ties are broken by magnitude (`tie_break`); with
    `layers` (an SNNL step's feature layers) only the groups of those layers are scored, on those layers' outputs
    (`layer_scores`), each layer in its own coupled group."""

    name = "snnl"
    description = ("fairness-aware: per-channel soft nearest neighbour loss of the root conv's feature maps against "
                   "the group (low = the channel separates the groups = removed first); ties broken by magnitude")

    def __init__(self, temperature: float = DEFAULT_SNNL_TEMPERATURE, *, compat: bool = False,
                 layers: Sequence[str] | None = None, tie_break: bool = True) -> None:
        super().__init__()
        self.temperature, self.compat, self.tie_break = temperature, compat, tie_break
        self.layers = None if layers is None else list(layers)
        self.layer_scores: dict[str, torch.Tensor] = {}
        self.layer_positions: dict[str, tuple[str, list[int]]] = {}  # layer -> (group root, root position per channel)

    @classmethod
    def from_data(cls, data: ScoreData | None) -> Criterion:
        return cls() if data is None else cls(temperature=data.temperature)

    def score(self, model: nn.Module, dg: tp.DependencyGraph, groups: Sequence[ChannelGroup], data: ScoreData | None,
              device: torch.device, progress: Progress) -> dict[str, torch.Tensor]:
        if data is None or data.snnl_batches is None:
            raise FairdeployError("the snnl criterion needs group-balanced batches with at least two groups")
        if self.layers is not None:
            self.layer_positions = feature_layer_groups(dg, groups, self.layers)
            layers = self.layers
        else:
            layers = [g.root for g in groups if isinstance(root_module(g.group), nn.Conv2d)]
            self.layer_positions = {g.root: (g.root, list(range(g.channels))) for g in groups if g.root in layers}
        self.layer_scores = snnl_channel_scores(model, layers, data.snnl_batches, device, self.temperature,
                                                self.compat, data.snnl_batch_size, progress)
        mags = _each(tp.importance.GroupMagnitudeImportance(p=2), groups) if self.tie_break else {}
        widths = {g.root: g.channels for g in groups}
        out: dict[str, torch.Tensor] = {}
        tied = 0
        for layer in layers:
            root, positions = self.layer_positions[layer]
            s = self.layer_scores[layer].to(torch.float64)
            tied += int(len(s) - torch.unique(s).numel())
            full = torch.full((widths[root],), torch.inf, dtype=torch.float64)
            full[positions] = s
            if self.tie_break:  # SNNL values are O(1); a 1e-6 share of the normalised magnitude breaks exact ties
                base = mags[root]
                full = full + 1e-6 * base / max(float(base.max()), 1e-12)
            out[root] = full
        if self.layers is None:
            for g in groups:  # a Linear root (e.g. VGG's hidden classifier layers): magnitude decides
                if g.root not in out and g.root in mags:
                    out[g.root] = mags[g.root]
            out = {g.root: out[g.root] for g in groups if g.root in out}  # the groups' order
            self.notes["snnl_tied_channels"] = tied
            self.notes["snnl_layers"] = layers
            if tied:
                warnings.warn(f"snnl: {tied} channel score(s) tied exactly with another channel of the same layer; "
                              "ties are broken by magnitude", stacklevel=3)
        return out


def feature_layer_groups(dg: tp.DependencyGraph, groups: Sequence[ChannelGroup],
                         layers: Sequence[str]) -> dict[str, tuple[str, list[int]]]:
    """For each of `layers`: the coupled group its output channels belong to (by root name) and the root position
    of each of its channels. Two layers of one group are the same channels (a residual stream), so they are refused,
    as is a layer without a prunable group."""
    found: dict[str, tuple[str, list[int]]] = {}
    for g in groups:
        for item in g.group.items:
            layer = item.dep.target.module
            if not (dg.is_out_channel_pruning_fn(item.dep.handler) and layer in dg._module2name):
                continue
            name = module_name(dg, layer)
            if name in layers and name not in found:
                found[name] = (g.root, [int(r) for r in item.root_idxs])
    for name in layers:
        if name not in found:
            raise FairdeployError(f"layer {name!r} has no prunable channel group (its channels cannot be removed)")
    by_root: dict[str, list[str]] = {}
    for name in layers:
        by_root.setdefault(found[name][0], []).append(name)
    coupled = next((names for names in by_root.values() if len(names) > 1), None)
    if coupled is not None:
        raise FairdeployError(f"layers {' and '.join(coupled)} are coupled (removing a channel of one removes it "
                              "from the other): give one of them")
    return found


# The criteria, by name (an explicit list: no registry filled by import side effects).
CRITERION_CLASSES: dict[str, type[Criterion]] = {c.name: c for c in (
    MagnitudeImportance, TaylorImportance, FairPruneImportance, SnnlImportance, PerGroupTaylorImportance)}
CRITERIA = {name: c.description for name, c in CRITERION_CLASSES.items()}
BLIND = ("magnitude", "taylor")


def create_criterion(name: str, data: ScoreData | None = None) -> Criterion:
    """The criterion `name` with a compression run's settings from `data`."""
    if name not in CRITERION_CLASSES:
        raise FairdeployError(f"unknown criterion {name!r}; choose one of {', '.join(CRITERIA)}")
    return CRITERION_CLASSES[name].from_data(data)


def prepare_importance(criterion: str, model: nn.Module, dg: tp.DependencyGraph, ignored: Sequence[nn.Module],
                       data: ScoreData | None,
                       device: torch.device) -> tuple[dict[str, torch.Tensor], dict[str, object]]:
    """Score every prunable coupled group of `model` (those touching an `ignored` layer's output left out) with
    `criterion`; returns {root layer name: scores} and notes (e.g. how many SNNL scores tied)."""
    imp = create_criterion(criterion, data)
    names = {m: n for n, m in model.named_modules()}
    groups = channel_groups(dg, model, ignored=[names[m] for m in ignored])
    imp.prepare(model, dg, groups, data, device)
    return imp.table, imp.notes
