"""FairPrune steps: FairPrune's importance (group curvatures -> saliency) -> weight or 2:4 masks, or physical
channel removal by the pruner."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn
from torch.utils.data import Dataset, Subset

from fairdeploy.errors import FairdeployError
from fairdeploy.models.registry import classifier_head_name
from fairdeploy.models.sparsity import Masks, apply_masks, masks_from_model
from fairdeploy.progress import Progress, no_progress
from fairdeploy.pruning.criteria import FairPruneImportance, ScoreData
from fairdeploy.pruning.curvature import DEFAULT_ESTIMATOR, ESTIMATORS
from fairdeploy.pruning.iterate import StepOutput, step_progress
from fairdeploy.pruning.layers import weight_layers
from fairdeploy.pruning.masks import SCOPES, select_weights, two_four_eligible, two_four_mask
from fairdeploy.pruning.removal import LowestShare, remove_lowest
from fairdeploy.pruning.saliency import DEFAULT_BETA, check_beta
from fairdeploy.pruning.scoresets import DEFAULT_SCORE_BATCH_SIZE, DEFAULT_SCORE_SAMPLES
from fairdeploy.pruning.structured import DEFAULT_ROUND_TO, OriginalIds, channel_groups, dependency_graph

GRANULARITIES = ("weight", "channel", "2:4")


@dataclass(frozen=True)
class FairPruneConfig:
    """FairPrune's parameters (the iteration's stop rule and guard are separate)."""

    granularity: str = "weight"
    curvature: str = DEFAULT_ESTIMATOR
    beta: float = DEFAULT_BETA
    ratio: float = 0.005  # fraction of the still-unpruned weights (channels) removed per step
    first_order: bool = False
    # weight granularity: rank within each layer (default, as public FairPrune code does) or over all layers.
    # Global ranking concentrates on the stem, whose curvature scales with input intensity, and breaks the model.
    scope: str = "layer"
    include_head: bool = False
    score_samples: int = DEFAULT_SCORE_SAMPLES  # per group
    score_split: str = "train"
    mc_samples: int = 1
    probes: int = 1
    round_to: int = DEFAULT_ROUND_TO  # channel granularity: remaining channel counts kept multiples of this
    batch_size: int = DEFAULT_SCORE_BATCH_SIZE  # curvature batch size

    def validate(self) -> None:
        if self.granularity not in GRANULARITIES:
            raise FairdeployError(
                f"unknown granularity {self.granularity!r}; choose one of {', '.join(GRANULARITIES)}"
            )
        if self.curvature not in ESTIMATORS:
            raise FairdeployError(f"unknown curvature estimator {self.curvature!r}; choose one of {', '.join(ESTIMATORS)}")
        check_beta(self.beta)
        if not 0.0 < self.ratio < 1.0:
            raise FairdeployError(f"ratio must be in (0, 1), got {self.ratio}")
        if self.scope not in SCOPES:
            raise FairdeployError(f"unknown ranking scope {self.scope!r}; choose one of {', '.join(SCOPES)}")
        if self.score_split not in ("train", "val"):
            raise FairdeployError(f"score split must be train or val, got {self.score_split!r}")
        for name in ("score_samples", "mc_samples", "probes", "round_to", "batch_size"):
            if getattr(self, name) < 1:
                raise FairdeployError(f"{name.replace('_', ' ')} must be >= 1, got {getattr(self, name)}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class FairPruneStep:
    """Callable step for the iterative loop: FairPrune's importance (fairdeploy.pruning.criteria.FairPruneImportance)
    scored on the two groups' score sets, then weight or 2:4 masks from its per-weight saliency, or channels
    removed by the pruner (removal.remove_lowest with FairPrune's rule); keeps the original ids of removed channels
    across steps."""

    def __init__(self, cfg: FairPruneConfig, arch: str, image_size: int, score_ds: Dataset,
                 score_sets: dict[str, Sequence[int]], unprivileged: str, privileged: str,
                 device: torch.device, seed: int = 0, progress: Progress = no_progress):
        self.cfg, self.arch, self.image_size = cfg, arch, image_size
        self.sets = {role: Subset(score_ds, list(score_sets[g])) for role, g in
                     (("unprivileged", unprivileged), ("privileged", privileged))}
        self.names = {"unprivileged": unprivileged, "privileged": privileged}
        self.device, self.seed, self.progress = device, seed, progress
        # the channel step ranks FairPrune's raw per-channel sums (a compression run's criterion normalises them)
        self.importance = FairPruneImportance(cfg.beta, cfg.curvature, mc_samples=cfg.mc_samples, probes=cfg.probes,
                                              first_order=cfg.first_order, normalise=False)
        self.ids = OriginalIds()

    def score_data(self, step: int) -> ScoreData:
        """The score sets and the seed of step `step`'s curvature draws (seed * 1000 + step)."""
        return ScoreData(per_group={self.names[r]: s for r, s in self.sets.items()},
                         unprivileged=self.names["unprivileged"], privileged=self.names["privileged"],
                         batch_size=self.cfg.batch_size, seed=self.seed * 1000 + step)

    def __call__(self, model: nn.Module, masks: Masks, step: int) -> StepOutput:
        progress = step_progress(self.progress, step)
        if self.cfg.granularity == "channel":
            return self._channel_step(model, masks, step, progress)
        return self._mask_step(model, masks, step, progress)

    def _mask_step(self, model: nn.Module, masks: Masks, step: int, progress: Progress) -> StepOutput:
        """Weight or 2:4 granularity: masks from the per-weight saliency (the weights stay, zeroed)."""
        cfg = self.cfg
        layers = weight_layers(model, self.arch, cfg.include_head)
        scores = self.importance.saliency(model, layers, self.score_data(step), self.device, progress)
        stats = self.importance.stats
        keep = {k: (masks[k].cpu() if k in masks else torch.ones_like(scores[k], dtype=torch.bool)) for k in scores}
        if cfg.granularity == "2:4":
            modules = dict(model.named_modules())
            eligible = [n for n in layers if two_four_eligible(modules[n].weight)]
            if not eligible:
                raise FairdeployError("no layer of this model has a multiple-of-4 input dimension for 2:4 sparsity")
            new_masks = {**masks}
            for n in eligible:
                k = f"{n}.weight"
                new_masks[k] = keep[k] & two_four_mask(scores[k])
            apply_masks(model, new_masks)
            removed = {"kind": "2:4", "layers": eligible,
                       "skipped_layers": [n for n in layers if n not in eligible],
                       "weights_zeroed": int(sum(int((~new_masks[f"{n}.weight"]).sum()) for n in eligible))}
            return StepOutput(model=model, removed=removed, masks=new_masks,
                              exhausted="2:4 sparsity is reached in a single step", stats=stats)
        newly = select_weights(scores, keep, cfg.ratio, cfg.scope)
        new_masks = {**masks}
        per_layer = {}
        for k, chosen in newly.items():
            new_masks[k] = keep[k] & ~chosen
            per_layer[k.removesuffix(".weight")] = int(chosen.sum())
        apply_masks(model, new_masks)
        removed = {"kind": "weight", "weights_pruned": int(sum(per_layer.values())),
                   "per_layer": {n: c for n, c in per_layer.items() if c}}
        exhausted = None if any(bool(m.any()) for m in new_masks.values()) else "every weight is pruned"
        return StepOutput(model=model, removed=removed, masks=new_masks, exhausted=exhausted, stats=stats)

    def _channel_step(self, model: nn.Module, masks: Masks, step: int, progress: Progress) -> StepOutput:
        """Channel granularity: score every coupled group, then the pruner removes FairPrune's share."""
        cfg = self.cfg
        head = classifier_head_name(self.arch)
        dg = dependency_graph(model, self.image_size, self.device)
        groups = channel_groups(dg, model, ignored=[head])
        if not groups:
            raise FairdeployError(f"the {self.arch} model has no prunable channel group")
        self.importance.prepare(model, dg, groups, self.score_data(step), self.device, progress)
        removal = remove_lowest(model, self.importance, LowestShare(cfg.ratio, cfg.round_to), dg, groups)
        widths = {g.root: g.channels for g in groups if g.root in self.importance.table}  # the scored groups
        removed_ids = {root: self.ids.remove(root, widths[root], idxs) for root, idxs in removal.removed.items()}
        if masks:  # a weight-sparse model keeps its zeros; masks follow the new shapes
            masks = masks_from_model(model, [k.removesuffix(".weight") for k in masks])
        total = removal.channels_removed
        removed = {"kind": "channel", "channels_removed": total, "channels": removed_ids,
                   "groups": widths}
        exhausted = None if total else "no group can lose channels at this ratio and alignment"
        return StepOutput(model=model, removed=removed, masks=masks, exhausted=exhausted,
                          stats=self.importance.stats)
