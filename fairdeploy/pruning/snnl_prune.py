"""SNNL sensitive-channel pruning steps: SNNL's importance on the feature layers' channels, then the pruner
physically removes the lowest ones."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn
from torch.utils.data import Dataset, Subset

from fairdeploy.errors import FairdeployError
from fairdeploy.models.registry import classifier_head_name
from fairdeploy.models.sparsity import Masks, masks_from_model
from fairdeploy.progress import Progress, no_progress
from fairdeploy.pruning.criteria import ScoreData, SnnlImportance, feature_layer_groups
from fairdeploy.pruning.iterate import StepOutput, step_progress
from fairdeploy.pruning.layers import resolve_feature_layers
from fairdeploy.pruning.removal import LowestCount, remove_lowest
from fairdeploy.pruning.snnl import DEFAULT_SNNL_BATCH_SIZE, DEFAULT_SNNL_BATCHES, DEFAULT_SNNL_TEMPERATURE
from fairdeploy.pruning.structured import DEFAULT_ROUND_TO, OriginalIds, channel_groups, dependency_graph


@dataclass(frozen=True)
class SnnlConfig:
    layers: str = "last"  # "last" or comma-separated conv layer names
    temperature: float = DEFAULT_SNNL_TEMPERATURE
    compat: bool = False  # the published code's numerator with the self pair
    channels_per_round: int = DEFAULT_ROUND_TO  # one aligned block per round (a multiple of round_to)
    max_channels: int | None = None  # total channels removed over all rounds (None: no cap)
    batches: int = DEFAULT_SNNL_BATCHES  # group-balanced batches averaged per round
    batch_size: int = DEFAULT_SNNL_BATCH_SIZE
    score_split: str = "train"
    round_to: int = DEFAULT_ROUND_TO

    def validate(self) -> None:
        if self.temperature <= 0:
            raise FairdeployError(f"temperature must be > 0, got {self.temperature}")
        if self.channels_per_round < 1:
            raise FairdeployError(f"channels_per_round must be >= 1, got {self.channels_per_round}")
        if self.round_to < 1:
            raise FairdeployError(f"round_to must be >= 1, got {self.round_to}")
        if self.channels_per_round % self.round_to:
            raise FairdeployError(
                f"channels_per_round {self.channels_per_round} is not a multiple of round_to {self.round_to} "
                "(channel counts stay aligned); change one of them (round_to = 1 disables alignment)"
            )
        if self.max_channels is not None and self.max_channels < 1:
            raise FairdeployError(f"max_channels must be >= 1, got {self.max_channels}")
        if self.batches < 1 or self.batch_size < 4:
            raise FairdeployError(f"SNNL needs >= 1 batch of >= 4 images, got {self.batches} of {self.batch_size}")
        if self.score_split not in ("train", "val"):
            raise FairdeployError(f"score split must be train or val, got {self.score_split!r}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def check_channel_budget(model: nn.Module, layers: list[str], cfg: SnnlConfig) -> None:
    """A layer must keep channels: more channels per round (or in total) than the layers have is an error."""
    modules = dict(model.named_modules())
    sizes = {n: modules[n].out_channels for n in layers}
    keep = max(cfg.round_to, 1)
    available = sum(max(0, c - keep) for c in sizes.values())
    desc = ", ".join(f"{n} has {c}" for n, c in sizes.items())
    if cfg.channels_per_round > available:
        raise FairdeployError(
            f"channels_per_round {cfg.channels_per_round} is more than the {available} channel(s) that can "
            f"be removed ({desc}; at least {keep} must stay per layer)"
        )
    if cfg.max_channels is not None and cfg.max_channels > available:
        raise FairdeployError(
            f"max_channels {cfg.max_channels} is more than the {available} channel(s) that can be removed "
            f"({desc}; at least {keep} must stay per layer)"
        )


def check_feature_layers(model: nn.Module, layers: list[str], image_size: int) -> None:
    """Each feature layer's channels form a coupled group of their own (two layers of one residual stream are the
    same channels): checked before any work."""
    dg = dependency_graph(model, image_size)
    feature_layer_groups(dg, channel_groups(dg, model), layers)


class SnnlStep:
    """Callable step: SNNL's importance (fairdeploy.pruning.criteria.SnnlImportance) on the feature layers' outputs,
    then the pruner (removal.remove_lowest) removes the lowest `channels_per_round` of them (SNNL's rule)."""

    def __init__(self, cfg: SnnlConfig, arch: str, image_size: int, score_ds: Dataset, batch_order: list[int],
                 batch_size: int, device: torch.device, progress: Progress = no_progress):
        self.cfg, self.arch, self.image_size = cfg, arch, image_size
        self.batches = Subset(score_ds, batch_order)
        self.batch_size = batch_size
        self.device, self.progress = device, progress
        self.importance: SnnlImportance | None = None  # made on the first step, when the layers are resolved
        self.ids = OriginalIds()
        self.removed_total = 0

    def budget(self) -> int:
        """This round's channels: channels_per_round, at most what --max-channels leaves, a multiple of round_to."""
        cfg = self.cfg
        budget = cfg.channels_per_round
        if cfg.max_channels is not None:
            budget = min(budget, cfg.max_channels - self.removed_total)
            budget -= budget % cfg.round_to if budget >= cfg.round_to else 0
        return budget

    def __call__(self, model: nn.Module, masks: Masks, step: int) -> StepOutput:
        cfg = self.cfg
        if self.importance is None:
            self.importance = SnnlImportance(cfg.temperature, compat=cfg.compat, tie_break=False,
                                             layers=resolve_feature_layers(model, cfg.layers, self.arch))
        importance, layers = self.importance, self.importance.layers or []
        head = classifier_head_name(self.arch)
        dg = dependency_graph(model, self.image_size, self.device)
        data = ScoreData(snnl_batches=self.batches, snnl_batch_size=self.batch_size)
        t0 = time.perf_counter()
        groups = channel_groups(dg, model, ignored=[head])
        importance.prepare(model, dg, groups, data, self.device, step_progress(self.progress, step))
        seconds = time.perf_counter() - t0
        stats = {"snnl_images": len(self.batches), "seconds": seconds,
                 "images_per_s": len(self.batches) / max(seconds, 1e-9), "device": str(self.device)}
        by_root = {g.root: g for g in groups}  # ranked in the importance's order of groups (the feature layers')
        removal = remove_lowest(model, importance, LowestCount(self.budget(), cfg.round_to), dg,
                                [by_root[root] for root in importance.table])
        removed: dict[str, list[int]] = {}
        for n in layers:  # the feature layer's channels that went with its group's removed positions
            root, at_root = importance.layer_positions[n]  # before the removal (it changes only in prepare)
            gone = set(removal.removed.get(root, ()))
            mine = [i for i, r in enumerate(at_root) if r in gone]
            if mine:
                removed[n] = self.ids.remove(n, len(at_root), mine)
        total = removal.channels_removed
        self.removed_total += total
        if masks:
            masks = masks_from_model(model, [k.removesuffix(".weight") for k in masks])
        exhausted = None
        if total == 0:
            exhausted = "no channel left to remove in the SNNL layers"
        elif cfg.max_channels is not None and self.removed_total >= cfg.max_channels:
            exhausted = f"--max-channels {cfg.max_channels} reached"
        out = {"kind": "channel", "layers": layers, "channels_removed": total,
               "channels": {n: sorted(v) for n, v in removed.items()},
               "scores": {n: [round(float(s), 6) for s in importance.layer_scores[n]] for n in layers}}
        return StepOutput(model=model, removed=out, masks=masks, exhausted=exhausted, stats=stats)
