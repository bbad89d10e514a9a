"""Physical channel removal: equals the masked model, shrinks params and MACs, exports to ONNX, reloads from
model.safetensors + model.json; per-channel group scores equal a brute-force sum over the removed weights."""

from __future__ import annotations

import copy
import io
from pathlib import Path

import numpy as np
import pytest
import torch
from pruning_oracles import zero_channels
from torch import nn

from fairdeploy.models import ModelSpec, create_model, load_checkpoint, save_checkpoint
from fairdeploy.models.registry import classifier_head_name
from fairdeploy.models.size import model_size
from fairdeploy.pruning.structured import (
    aligned_removal,
    channel_groups,
    dependency_graph,
    group_channel_scores,
    lowest_channels,
    prune_out_channels,
)

pytestmark = pytest.mark.usefixtures("one_thread")


def _model(arch: str) -> nn.Module:
    torch.manual_seed(0)
    model = create_model(arch, 3).eval()
    with torch.no_grad():  # non-trivial eval-mode BN statistics
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.1)
                m.running_var.uniform_(0.5, 1.5)
                m.weight.uniform_(0.5, 1.5)
    return model


def _plan(model: nn.Module, arch: str, seed: int = 0):
    dg = dependency_graph(model, 32)
    groups = channel_groups(dg, model, ignored=[classifier_head_name(arch)])
    g = torch.Generator().manual_seed(seed)
    plan = lowest_channels([torch.rand(c.channels, generator=g) for c in groups], 0.1, 8)
    return dg, groups, plan


@pytest.mark.parametrize("arch", ["resnet18", "mobilenet_v3_small"])
def test_physical_removal_equals_masked_model_and_reloads(arch: str, tmp_path: Path) -> None:
    model = _model(arch)
    masked = copy.deepcopy(model)
    dg, groups, plan = _plan(model, arch)
    assert sum(len(p) for p in plan) > 0
    dg_masked = dependency_graph(masked, 32)
    masked_modules = dict(masked.named_modules())
    for g, idxs in zip(groups, plan):
        if idxs:
            zero_channels(dg_masked, masked_modules[g.root], idxs)
    modules = dict(model.named_modules())
    for g, idxs in zip(groups, plan):
        if idxs:
            prune_out_channels(dg, modules[g.root], idxs)
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected, got = masked(x), model(x)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5 * float(expected.abs().max()))
    before, after = model_size(create_model(arch, 3), 32), model_size(model, 32)
    assert after.params < before.params and after.macs < before.macs
    # every remaining channel count of a pruned group is a multiple of 8
    for g, idxs in zip(groups, plan):
        if idxs:
            assert (g.channels - len(idxs)) % 8 == 0
    # the checkpoint rebuilds the pruned shapes from model.json alone (no pickle) and gives the same logits
    spec = ModelSpec(arch=arch, classes=("a", "b", "c"), groups=("dark", "light"), image_size=32)
    save_checkpoint(model, spec, tmp_path / "ckpt")
    reloaded, reloaded_spec = load_checkpoint(tmp_path / "ckpt")
    assert reloaded_spec.module_shapes  # the pruned shapes are recorded
    with torch.no_grad():
        torch.testing.assert_close(reloaded(x), got, rtol=0, atol=0)


@pytest.mark.numerics
def test_pruned_resnet18_exports_to_onnx() -> None:
    import onnxruntime as ort

    from fairdeploy.runtime.ort_runner import session_options

    model = _model("resnet18")
    dg, groups, plan = _plan(model, "resnet18", seed=3)
    modules = dict(model.named_modules())
    for g, idxs in zip(groups, plan):
        if idxs:
            prune_out_channels(dg, modules[g.root], idxs)
    x = torch.randn(2, 3, 32, 32)
    buf = io.BytesIO()
    torch.onnx.export(model, (x,), buf, dynamo=False, input_names=["input"], output_names=["logits"])
    sess = ort.InferenceSession(buf.getvalue(), session_options(), providers=["CPUExecutionProvider"])
    with torch.no_grad():
        ref = model(x).numpy()
    np.testing.assert_allclose(sess.run(None, {"input": x.numpy()})[0], ref, rtol=1e-4, atol=1e-5)


def _weight_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]


@pytest.mark.parametrize("arch,root_pick", [("resnet18", "fc"), ("mobilenet_v3_small", "se")])
def test_group_channel_scores_equal_brute_force_over_removed_weights(arch: str, root_pick: str) -> None:
    model = _model(arch)
    # tag every conv/linear weight with a unique id, so the removed ones can be found after removal
    offset = 0
    with torch.no_grad():
        for _, m in _weight_layers(model):
            n = m.weight.numel()
            m.weight.copy_(torch.arange(offset, offset + n, dtype=torch.float32).reshape(m.weight.shape))
            offset += n
    g = torch.Generator().manual_seed(0)
    per_id = torch.randn(offset, generator=g, dtype=torch.float64)
    scores = {f"{name}.weight": per_id[m.weight.detach().long().flatten()].reshape(m.weight.shape)
              for name, m in _weight_layers(model)}
    dg = dependency_graph(model, 32)
    groups = channel_groups(dg, model, ignored=[classifier_head_name(arch)])
    # a residual group whose removal also deletes head columns, or a group with a squeeze-excitation block
    key = "fc" if root_pick == "fc" else "fc1"
    group = next(c for c in groups if any(
        key in (dg._module2name.get(it.dep.target.module) or "").split(".") for it in c.group.items))
    fast = group_channel_scores(dg, group.group, scores)
    assert fast.shape == (group.channels,)
    for channel in (0, group.channels // 2, group.channels - 1):
        trial = copy.deepcopy(model)
        dg_t = dependency_graph(trial, 32)
        prune_out_channels(dg_t, dict(trial.named_modules())[group.root], [channel])
        left = torch.cat([m.weight.detach().long().flatten() for _, m in _weight_layers(trial)])
        removed = torch.ones(offset, dtype=torch.bool)
        removed[left] = False
        assert int(removed.sum()) > 0
        assert float(fast[channel]) == pytest.approx(float(per_id[removed].sum()), rel=1e-9, abs=1e-9)


def test_aligned_removal_rounds_the_remaining_count() -> None:
    assert aligned_removal(3, 64, 8) == 0  # 61 left -> 64
    assert aligned_removal(5, 64, 8) == 8  # 59 left -> 56
    assert aligned_removal(60, 64, 8) == 56  # at least round_to channels stay
    assert aligned_removal(3, 20, 8) == 4  # a count that is not a multiple is brought to one (16)
    assert aligned_removal(5, 8, 8) == 0  # a layer of round_to channels cannot lose any
    assert aligned_removal(3, 10, 1) == 3


def test_lowest_channels_is_global_and_aligned() -> None:
    a = torch.arange(16, dtype=torch.float64)  # 0..15
    b = torch.arange(16, dtype=torch.float64) + 3.5  # 3.5..18.5
    plan = lowest_channels([a, b], ratio=0.5, round_to=4)
    # k = 16 lowest of the 32: a's 0..9 (10) and b's 3.5..8.5 (6). a keeps 6 -> nearest multiple of 4 is 8
    # (remove 8); b keeps 10 -> 12 (remove 4). Within each group the lowest scores go.
    assert plan == [list(range(8)), list(range(4))]
