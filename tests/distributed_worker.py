"""Run by tests/test_distributed.py, under torchrun (2 ranks) or as a plain process (1); rank 0 writes to OUT.

scores: FairPrune (Fisher, first-order) and SNNL scores and selections on a fixed model and score set
        (OUT/scores.safetensors, OUT/picks.json).
fit:    one epoch of the training loop on a BatchNorm-free convnet with deterministic inputs, SGD and
        group x class balanced sampling (OUT/last, OUT/trainer.json): with no per-rank statistics and no
        augmentation, two ranks must reproduce one process up to float rounding.

usage: python [-m torch.distributed.run --nproc-per-node N] tests/distributed_worker.py scores|fit MANIFEST OUT
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch


def fit_one_epoch(manifest_path: str, out: str) -> None:
    from torch import nn

    from fairdeploy.data.loading import Encoding, eval_transform, split_dataset
    from fairdeploy.data.manifest import read_manifest
    from fairdeploy.distributed import distributed_run
    from fairdeploy.models.checkpoint import IMAGENET_MEAN, IMAGENET_STD, ModelSpec
    from fairdeploy.training.loop import FitConfig, fit

    class NoNorm(nn.Module):  # module names of a resnet18 (conv1, fc), so save_checkpoint can describe it
        def __init__(self, k: int):
            super().__init__()
            self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
            self.fc = nn.Linear(64, k)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(torch.relu(self.conv1(x)).mean((2, 3)))

    torch.set_num_threads(1)
    with distributed_run("cpu"):
        manifest = read_manifest(manifest_path)
        spec = ModelSpec(arch="resnet18", classes=tuple(manifest.classes), groups=tuple(manifest.groups),
                         image_size=32, mean=IMAGENET_MEAN, std=IMAGENET_STD)
        enc = Encoding(spec.classes, spec.groups)
        tf = eval_transform(32, IMAGENET_MEAN, IMAGENET_STD)
        train, val = split_dataset(manifest, "train", enc, tf), split_dataset(manifest, "val", enc, tf)
        torch.manual_seed(0)
        model = NoNorm(len(spec.classes))
        cfg = FitConfig(epochs=1, batch_size=16, lr=0.05, optimizer="sgd", balance="group-class", seed=4)
        fit(model, spec, train, val, cfg, Path(out), torch.device("cpu"))


def main(manifest_path: str, out: str) -> None:
    from safetensors.torch import save_file

    from fairdeploy.data.loading import Encoding, eval_transform, split_dataset
    from fairdeploy.data.manifest import read_manifest
    from fairdeploy.distributed import distributed_run, world
    from fairdeploy.models.checkpoint import IMAGENET_MEAN, IMAGENET_STD
    from fairdeploy.models.registry import create_model
    from fairdeploy.pruning.curvature import group_curvature
    from fairdeploy.pruning.fairprune import FairPruneConfig, FairPruneStep
    from fairdeploy.pruning.scoresets import balanced_batch_order, group_score_sets
    from fairdeploy.pruning.snnl_prune import SnnlConfig, SnnlStep

    torch.set_num_threads(1)
    with distributed_run("cpu"):
        manifest = read_manifest(manifest_path)
        enc = Encoding(tuple(manifest.classes), tuple(manifest.groups))
        ds = split_dataset(manifest, "train", enc, eval_transform(32, IMAGENET_MEAN, IMAGENET_STD))
        torch.manual_seed(0)
        model = create_model("resnet18", len(enc.classes)).eval()
        dark, light = enc.groups.index("dark"), enc.groups.index("light")
        # 10 images per group in batches of 4: 3 batches of 4, 4, 2 -> rank 0 scores 2 batches, rank 1 one
        sets = group_score_sets(ds.labels, ds.groups, [dark, light], 10, seed=0)
        cfg = FairPruneConfig(granularity="weight", curvature="fisher", mc_samples=2, first_order=True, ratio=0.05,
                              batch_size=4)
        step = FairPruneStep(cfg, "resnet18", 32, ds, {"dark": sets[dark], "light": sets[light]}, "dark", "light",
                             torch.device("cpu"), seed=3)
        fisher = group_curvature(model, step.sets["unprivileged"], "fisher", "cpu", batch_size=4, mc_samples=2,
                                 seed=5)
        hutch = group_curvature(model, step.sets["privileged"], "hutchinson", "cpu", layers=["layer4.1.conv2", "fc"],
                                batch_size=4, seed=5)
        fp = step(model, {}, 1)
        order, bs = balanced_batch_order(ds.groups, [dark, light], 8, 3, seed=0)
        snnl = SnnlStep(SnnlConfig(layers="layer4.1.conv2,layer3.1.conv2", channels_per_round=16, round_to=8,
                                   batch_size=8, batches=3),
                        "resnet18", 32, ds, order, bs, torch.device("cpu"))(model, {}, 1)
        if world().is_main:
            Path(out).mkdir(parents=True, exist_ok=True)
            tensors = {f"fisher/{k}": v for k, v in fisher.items()}
            tensors.update({f"hutchinson/{k}": v for k, v in hutch.items()})
            tensors.update({f"mask/{k}": v.to(torch.uint8) for k, v in fp.masks.items()})
            save_file(tensors, str(Path(out) / "scores.safetensors"))
            picks = {"world": world().size, "fairprune": fp.removed, "snnl": snnl.removed}
            (Path(out) / "picks.json").write_text(json.dumps(picks, indent=1))


if __name__ == "__main__":
    {"scores": main, "fit": fit_one_epoch}[sys.argv[1]](sys.argv[2], sys.argv[3])
