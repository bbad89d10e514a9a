"""FairPrune steps: group curvatures -> saliency -> weight, 2:4 or physical channel removal."""

from __future__ import annotations

import time
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
from fairdeploy.pruning.curvature import DEFAULT_ESTIMATOR, ESTIMATORS, group_curvature, group_gradient
from fairdeploy.pruning.iterate import StepOutput
from fairdeploy.pruning.layers import weight_layers
from fairdeploy.pruning.masks import SCOPES, select_weights, two_four_eligible, two_four_mask
from fairdeploy.pruning.saliency import DEFAULT_BETA, check_beta, fairprune_saliency
from fairdeploy.pruning.scoresets import DEFAULT_SCORE_BATCH_SIZE, DEFAULT_SCORE_SAMPLES
from fairdeploy.pruning.structured import (
    DEFAULT_ROUND_TO,
    channel_groups,
    dependency_graph,
    group_channel_scores,
    lowest_channels,
    prune_out_channels,
)

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
            raise FairdeployError(f"--ratio must be in (0, 1), got {self.ratio}")
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
    """Callable step for the iterative loop; keeps the original ids of removed channels across steps."""

    def __init__(self, cfg: FairPruneConfig, arch: str, image_size: int, score_ds: Dataset,
                 score_sets: dict[str, Sequence[int]], unprivileged: str, privileged: str,
                 device: torch.device, seed: int = 0, progress: Progress = no_progress):
        self.cfg, self.arch, self.image_size = cfg, arch, image_size
        self.sets = {role: Subset(score_ds, list(score_sets[g])) for role, g in
                     (("unprivileged", unprivileged), ("privileged", privileged))}
        self.names = {"unprivileged": unprivileged, "privileged": privileged}
        self.device, self.seed, self.progress = device, seed, progress
        self.channel_ids: dict[str, list[int]] = {}
        self.stats: dict[str, Any] = {}

    # -- importance ------------------------------------------------------------------------------------
    def saliency(self, model: nn.Module, layers: list[str], step: int) -> dict[str, torch.Tensor]:
        cfg = self.cfg
        h, g = {}, {}
        t0, n = time.perf_counter(), 0
        for role, subset in self.sets.items():
            n += len(subset)
            h[role] = group_curvature(
                model, subset, cfg.curvature, self.device, layers=layers, batch_size=cfg.batch_size,
                mc_samples=cfg.mc_samples, probes=cfg.probes, seed=self.seed * 1000 + step,
                progress=self.progress, task=f"curvature {self.names[role]} (step {step})",
            )
            if cfg.first_order:
                g[role] = group_gradient(model, subset, self.device, layers=layers, batch_size=cfg.batch_size)
        seconds = time.perf_counter() - t0
        self.stats = {"curvature": cfg.curvature, "samples": n, "seconds": seconds,
                      "samples_per_s": n / max(seconds, 1e-9), "device": str(self.device)}
        modules = dict(model.named_modules())
        weights = {f"{n}.weight": modules[n].weight for n in layers}
        return fairprune_saliency(weights, h["unprivileged"], h["privileged"], cfg.beta,
                                  g.get("unprivileged"), g.get("privileged"))

    # -- removal ---------------------------------------------------------------------------------------
    def __call__(self, model: nn.Module, masks: Masks, step: int) -> StepOutput:
        if self.cfg.granularity == "channel":
            return self._channel_step(model, masks, step)
        return self._weight_step(model, masks, step)

    def _weight_step(self, model: nn.Module, masks: Masks, step: int) -> StepOutput:
        cfg = self.cfg
        layers = weight_layers(model, self.arch, cfg.include_head)
        scores = self.saliency(model, layers, step)
        modules = dict(model.named_modules())
        keep = {k: (masks[k].cpu() if k in masks else torch.ones_like(scores[k], dtype=torch.bool)) for k in scores}
        if cfg.granularity == "2:4":
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
                              exhausted="2:4 sparsity is reached in a single step", stats=self.stats)
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
        return StepOutput(model=model, removed=removed, masks=new_masks, exhausted=exhausted, stats=self.stats)

    def _channel_step(self, model: nn.Module, masks: Masks, step: int) -> StepOutput:
        cfg = self.cfg
        layers = [n for n, m in model.named_modules() if n and isinstance(m, (nn.Conv2d, nn.Linear))]
        scores = self.saliency(model, layers, step)
        head = classifier_head_name(self.arch)
        dg = dependency_graph(model, self.image_size, self.device)
        groups = channel_groups(dg, model, ignored=[head])
        if not groups:
            raise FairdeployError(f"the {self.arch} model has no prunable channel group")
        channel_scores = [group_channel_scores(dg, g.group, scores) for g in groups]
        plan = lowest_channels(channel_scores, cfg.ratio, cfg.round_to)
        modules = dict(model.named_modules())
        removed_ids: dict[str, list[int]] = {}
        for g, idxs in zip(groups, plan):
            if not idxs:
                continue
            ids = self.channel_ids.setdefault(g.root, list(range(g.channels)))
            removed_ids[g.root] = [ids[i] for i in idxs]
            prune_out_channels(dg, modules[g.root], idxs)
            self.channel_ids[g.root] = [c for i, c in enumerate(ids) if i not in set(idxs)]
        if masks:  # a weight-sparse model keeps its zeros; masks follow the new shapes
            masks = masks_from_model(model, [k.removesuffix(".weight") for k in masks])
        total = sum(len(v) for v in removed_ids.values())
        removed = {"kind": "channel", "channels_removed": total, "channels": removed_ids,
                   "groups": {g.root: g.channels for g in groups}}
        exhausted = None if total else "no group can lose channels at this ratio and alignment"
        return StepOutput(model=model, removed=removed, masks=masks, exhausted=exhausted, stats=self.stats)
