"""SNNL on hand-built features: hand-computed values, group-encoding channels score lower, compat = canonical
plus exactly the self-pair term; balanced batches; layer resolution."""

from __future__ import annotations

import math

import pytest
import torch
import torchvision

from fairdeploy.errors import FairdeployError
from fairdeploy.pruning.layers import resolve_feature_layers
from fairdeploy.pruning.scoresets import balanced_batch_order, group_score_sets
from fairdeploy.pruning.snnl import snnl_per_channel

pytestmark = pytest.mark.usefixtures("one_thread")


def _features() -> tuple[torch.Tensor, torch.Tensor]:
    """8 samples, 2 channels of 2-d maps. Channel 0 encodes the group (e1 for group 0, e2 for group 1);
    channel 1 encodes something unrelated to the group (e1 for samples 0,1,4,5; e2 for 2,3,6,7)."""
    groups = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1])
    e1, e2 = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])
    ch0 = torch.stack([e1 if g == 0 else e2 for g in groups.tolist()])
    ch1 = torch.stack([e1 if i in (0, 1, 4, 5) else e2 for i in range(8)])
    return torch.stack([ch0, ch1], dim=1).reshape(8, 2, 1, 2), groups


def _brute_force(feat: torch.Tensor, groups: torch.Tensor, t: float, compat: bool) -> list[float]:
    out = []
    b = feat.shape[0]
    for c in range(feat.shape[1]):
        z = feat[:, c].reshape(b, -1).double()
        rows = []
        for i in range(b):
            if not any(groups[j] == groups[i] for j in range(b) if j != i):
                continue  # a row with no same-group partner is left out of the mean
            num = den = 0.0
            for j in range(b):
                cos = float(z[i] @ z[j] / (z[i].norm() * z[j].norm()))
                e = math.exp(-(1 - cos) / t)
                if j != i:
                    den += e
                    if groups[j] == groups[i]:
                        num += e
                elif compat:
                    num += e
            rows.append(-math.log(num / den))
        out.append(sum(rows) / len(rows))
    return out


def test_hand_computed_values_and_group_channel_scores_lower() -> None:
    feat, groups = _features()
    s = snnl_per_channel(feat, groups, temperature=1.0)
    e = math.exp(-1.0)
    # channel 0: 3 same-group partners at distance 0, 4 others at distance 1
    assert float(s[0]) == pytest.approx(-math.log(3 / (3 + 4 * e)))
    # channel 1, any row: same-group partners 1 at distance 0 and 2 at distance 1; all 7 partners
    # 3 at distance 0 and 4 at distance 1
    assert float(s[1]) == pytest.approx(-math.log((1 + 2 * e) / (3 + 4 * e)))
    assert float(s[0]) < float(s[1])  # the channel that encodes the group scores lower


def test_canonical_and_compat_differ_exactly_by_the_self_pair() -> None:
    g = torch.Generator().manual_seed(0)
    feat = torch.randn(10, 4, 3, 3, generator=g)
    groups = torch.tensor([0, 1] * 5)
    for t in (0.5, 1.0, 2.0):
        canon = snnl_per_channel(feat, groups, t, compat=False)
        compat = snnl_per_channel(feat, groups, t, compat=True)
        torch.testing.assert_close(canon.double(), torch.tensor(_brute_force(feat, groups, t, False), dtype=torch.float64))
        torch.testing.assert_close(compat.double(), torch.tensor(_brute_force(feat, groups, t, True), dtype=torch.float64))
        assert bool((compat < canon).all())  # the self pair (exp(0) = 1) only ever raises the numerator


def test_rows_without_a_same_group_partner_are_left_out_and_bad_temperature() -> None:
    feat, groups = _features()
    lone = torch.tensor([0, 0, 0, 0, 1, 1, 1, 2])  # sample 7 is alone in its group
    s = snnl_per_channel(feat, lone)
    want = torch.tensor(_brute_force(feat, lone, 1.0, False), dtype=torch.float64)
    # the mean over the 7 rows that have a partner; sample 7 still counts in the others' denominators
    torch.testing.assert_close(s.double(), want)
    with pytest.raises(FairdeployError, match="temperature must be > 0"):
        snnl_per_channel(feat, groups, temperature=0.0)


def test_balanced_batches_and_score_sets() -> None:
    groups = [0] * 30 + [1] * 7
    labels = [i % 3 for i in range(37)]
    order, bs = balanced_batch_order(groups, [0, 1], batch_size=16, n_batches=3, seed=0)
    assert bs == 14 and len(order) == 3 * 14  # 7 per group per batch: the smaller group sets the size
    for k in range(3):
        batch = order[k * bs:(k + 1) * bs]
        assert sum(groups[i] == 0 for i in batch) == sum(groups[i] == 1 for i in batch) == 7
    sets = group_score_sets(labels, groups, [0, 1], n_per_group=50, seed=0)
    assert len(sets[0]) == len(sets[1]) == 7  # the same count per group
    assert all(groups[i] == 0 for i in sets[0]) and all(groups[i] == 1 for i in sets[1])
    sets = group_score_sets(labels, groups, [0, 1], n_per_group=6, seed=0)
    assert sorted(labels[i] for i in sets[0]) == [0, 0, 1, 1, 2, 2]  # class-stratified


def test_feature_layer_resolution() -> None:
    model = torchvision.models.resnet18(num_classes=3)
    assert resolve_feature_layers(model, "last", "resnet18") == ["layer4.1.conv2"]
    assert resolve_feature_layers(model, "layer3.1.conv2, layer4.1.conv1", "resnet18") == ["layer3.1.conv2", "layer4.1.conv1"]
    with pytest.raises(FairdeployError, match="layer 'layer9.conv' does not exist in this resnet18"):
        resolve_feature_layers(model, "layer9.conv", "resnet18")
    with pytest.raises(FairdeployError, match="layer 'layer4.1.bn2' of this resnet18 is a BatchNorm2d"):
        resolve_feature_layers(model, "layer4.1.bn2", "resnet18")
    mnet = torchvision.models.mobilenet_v3_small(num_classes=3)
    assert resolve_feature_layers(mnet, "last", "mobilenet_v3_small") == ["features.12.0"]


def test_feature_layers_of_one_residual_stream_are_refused() -> None:
    """layer4.0.conv2 and layer4.1.conv2 write the same residual stream: removing a channel of one removes it from
    the other, so an SNNL step cannot rank them as two layers (each layer must be its own coupled group)."""
    from fairdeploy.pruning.snnl_prune import check_feature_layers

    model = torchvision.models.resnet18(num_classes=3)
    check_feature_layers(model, ["layer3.1.conv2", "layer4.1.conv2"], 32)  # two streams: fine
    check_feature_layers(model, ["layer4.0.conv1"], 32)  # inside a block: its own group
    with pytest.raises(FairdeployError, match="layers layer4.0.conv2 and layer4.1.conv2 are coupled"):
        check_feature_layers(model, ["layer4.0.conv2", "layer4.1.conv2"], 32)
