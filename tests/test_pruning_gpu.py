"""The CUDA path: curvature on the GPU equals the CPU result; prune and finetune run on the device."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torchvision

from fairdeploy.pruning.curvature import group_curvature

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


@pytest.mark.parametrize("estimator", ["fisher", "empirical", "hutchinson"])
def test_curvature_on_cuda_equals_cpu(estimator: str) -> None:
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=3).eval()
    g = torch.Generator().manual_seed(0)
    data = [(torch.randn(8, 3, 32, 32, generator=g), torch.randint(0, 3, (8,), generator=g))]
    layers = ["conv1", "layer1.0.conv1", "layer3.0.conv1", "layer4.1.conv2", "fc"]
    cpu = group_curvature(model, data, estimator, "cpu", layers=layers, seed=1)
    gpu = group_curvature(model, data, estimator, "cuda", layers=layers, seed=1)
    for k in cpu:
        scale = float(cpu[k].abs().max())
        torch.testing.assert_close(gpu[k], cpu[k], rtol=1e-3, atol=1e-4 * scale, msg=k)


def test_prune_and_finetune_on_cuda(biased_checkpoint: Path, synth_manifest: Path, tmp_path: Path) -> None:
    from fairdeploy.data.manifest import read_manifest
    from fairdeploy.models import load_checkpoint
    from fairdeploy.pruning import FairPruneConfig, PruneConfig, StopRule, prune_checkpoint
    from fairdeploy.pruning.selection import Guard
    from fairdeploy.training.finetune import finetune_checkpoint
    from fairdeploy.training.loop import FitConfig

    manifest = read_manifest(synth_manifest)
    cfg = PruneConfig(fairprune=FairPruneConfig(granularity="channel", ratio=0.05), stop=StopRule(steps=1),
                      guard=Guard(protect_unprivileged=False, max_f1_drop=1.0, select="last"),
                      finetune=FitConfig(epochs=1, batch_size=64, lr=1e-4))
    result = prune_checkpoint(biased_checkpoint, manifest, tmp_path / "p", cfg, device="cuda")
    scoring = result.record.steps[1].work.scoring
    assert scoring["device"].startswith("cuda") and scoring["samples_per_s"] > 0
    assert result.record.device.startswith("cuda")
    ft = finetune_checkpoint(tmp_path / "p", manifest, tmp_path / "ft", FitConfig(epochs=1, lr=1e-4), "cuda")
    model, _ = load_checkpoint(ft.best_dir, "cuda")
    assert next(model.parameters()).is_cuda


@pytest.mark.parametrize("criterion", ["taylor", "group-taylor", "snnl"])
def test_budget_removal_on_cuda_selects_the_cpu_channels(criterion: str) -> None:
    """Scores computed on the GPU drive the same global removal as on the CPU (same channels, same MACs)."""
    import copy

    from torch.utils.data import TensorDataset

    from fairdeploy.pruning.criteria import ScoreData, prepare_importance
    from fairdeploy.pruning.removal import remove_to_budget
    from fairdeploy.pruning.structured import dependency_graph

    torch.manual_seed(0)
    base = torchvision.models.resnet18(num_classes=3).eval()
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(16, 3, 32, 32, generator=g), torch.randint(0, 3, (16,), generator=g)
    grp = torch.arange(16) % 2
    ds = TensorDataset(x, y, grp)
    halves = {n: TensorDataset(x[grp == i], y[grp == i], grp[grp == i]) for i, n in enumerate(("a", "b"))}
    data = ScoreData(blind=ds, per_group=halves, unprivileged="a", privileged="b", snnl_batches=ds,
                     snnl_batch_size=16, batch_size=8)
    removed, macs = {}, {}
    for dev in ("cpu", "cuda"):
        model = copy.deepcopy(base).to(dev)
        dg = dependency_graph(model, 32, dev)
        table, _ = prepare_importance(criterion, model, dg, [model.fc], data, torch.device(dev))
        r = remove_to_budget(model, table, 0.5 * 37_000_000, "macs", "fc", 32, device=dev)
        removed[dev], macs[dev] = r.removed, r.size.macs
    assert macs["cpu"] == macs["cuda"]
    overlap = sum(len(set(removed["cpu"][k]) & set(removed["cuda"].get(k, []))) for k in removed["cpu"])
    total = sum(len(v) for v in removed["cpu"].values())
    assert overlap >= 0.98 * total  # float reductions differ on the GPU: near-ties may swap
