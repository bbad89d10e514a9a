"""Fairness pruning: FairPrune (weight, channel, 2:4) and SNNL channel pruning, masks (fine-tuning with the masks
held is fairdeploy.training.finetune)."""

from fairdeploy.pruning.curvature import ESTIMATORS, group_curvature, group_gradient
from fairdeploy.pruning.fairprune import GRANULARITIES, FairPruneConfig
from fairdeploy.pruning.masks import lowest_k, select_weights, two_four_mask
from fairdeploy.pruning.run import METHODS, PRUNE_FILE, PruneConfig, PruneResult, prune_checkpoint
from fairdeploy.pruning.saliency import fairprune_saliency
from fairdeploy.pruning.selection import Guard, StopRule
from fairdeploy.pruning.snnl import snnl_per_channel
from fairdeploy.pruning.snnl_prune import SnnlConfig

__all__ = [
    "ESTIMATORS",
    "GRANULARITIES",
    "METHODS",
    "PRUNE_FILE",
    "FairPruneConfig",
    "Guard",
    "PruneConfig",
    "PruneResult",
    "SnnlConfig",
    "StopRule",
    "fairprune_saliency",
    "group_curvature",
    "group_gradient",
    "lowest_k",
    "prune_checkpoint",
    "select_weights",
    "snnl_per_channel",
    "two_four_mask",
]
