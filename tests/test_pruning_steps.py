"""What each FairPrune / SNNL step removes, pinned on a tiny residual model with fixed seeds (issue 20 §1: written
before the steps moved onto the Importance / pruner split, and unchanged by it).

Every expectation is derived here, independently of the step: the scores from the public scoring functions called
with the step's own inputs (curvature and gradients per group with the seed rule `seed * 1000 + step`, SNNL on the
group-balanced batches), the per-channel sums by hand over this model's coupled weights, and the selection by a
brute-force loop over (score, place) pairs that spells out each method's rule. The removed model must then give the
logits of a copy whose selected channels are silenced (zeroed), so the step removed exactly those channels.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from pruning_oracles import zero_channels
from torch import nn
from torch.utils.data import Subset, TensorDataset

from fairdeploy.pruning.curvature import group_curvature, group_gradient
from fairdeploy.pruning.fairprune import FairPruneConfig, FairPruneStep
from fairdeploy.pruning.snnl import snnl_channel_scores
from fairdeploy.pruning.snnl_prune import SnnlConfig, SnnlStep
from fairdeploy.pruning.structured import channel_groups, dependency_graph

pytestmark = pytest.mark.usefixtures("one_thread")

ARCH = "resnet18"  # the head's name ("fc") is the resnet family's; the model is the tiny one below
SIZE = 8
DEVICE = torch.device("cpu")


class TinyResidual(nn.Module):
    """stem (3->12) -> relu -> a (12->16) -> relu = x; y = relu(b(x) + x) (a and b coupled by the sum) -> mean ->
    fc (16->3). No BatchNorm, so every weight a channel's removal deletes is a conv / linear weight:

    - channel c of `stem`: row c of stem.weight and column c of a.weight;
    - channel c of the a/b stream: rows c of a.weight and b.weight, column c of b.weight and of fc.weight.
    """

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 12, 3, padding=1)
        self.a = nn.Conv2d(12, 16, 3, padding=1)
        self.b = nn.Conv2d(16, 16, 3, padding=1)
        self.fc = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.a(F.relu(self.stem(x))))
        x = F.relu(self.b(x) + x)
        return self.fc(x.mean((2, 3)))


def _model() -> TinyResidual:
    torch.manual_seed(0)
    return TinyResidual().eval()


def _data(n: int = 32) -> TensorDataset:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(n, 3, SIZE, SIZE, generator=g)
    y = torch.randint(0, 3, (n,), generator=g)
    return TensorDataset(x, y, torch.arange(n) % 2)


SETS = {"dark": list(range(0, 32, 2))[:12], "light": list(range(1, 32, 2))[:12]}


def _fairprune_step(cfg: FairPruneConfig, ds: TensorDataset, seed: int = 3) -> FairPruneStep:
    return FairPruneStep(cfg, ARCH, SIZE, ds, SETS, "dark", "light", DEVICE, seed=seed)


def _saliency(model: nn.Module, ds: TensorDataset, cfg: FairPruneConfig, layers: list[str],
              seed: int) -> dict[str, torch.Tensor]:
    """FairPrune's per-weight saliency 0.5 w^2 (H_u - beta H_p) [- w (g_u - beta g_p)], by its formula, from the
    public curvature / gradient functions called as the step's rule says (seed: the step's seed * 1000 + step)."""
    sets = {g: Subset(ds, SETS[g]) for g in SETS}
    h = {g: group_curvature(model, sets[g], cfg.curvature, DEVICE, layers=layers, batch_size=cfg.batch_size,
                            mc_samples=cfg.mc_samples, probes=cfg.probes, seed=seed) for g in SETS}
    modules = dict(model.named_modules())
    out = {}
    for n in layers:
        k = f"{n}.weight"
        w = modules[n].weight.detach().float()
        s = 0.5 * w.square() * (h["dark"][k] - cfg.beta * h["light"][k])
        if cfg.first_order:
            grads = {g: group_gradient(model, sets[g], DEVICE, layers=layers, batch_size=cfg.batch_size)
                     for g in SETS}
            s = s - w * (grads["dark"][k] - cfg.beta * grads["light"][k])
        out[k] = s
    return out


def _by_hand_channel_sums(s: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Per-channel sums over the weights each channel's removal deletes (see TinyResidual)."""
    d = {k: v.double() for k, v in s.items()}
    stem = d["stem.weight"].flatten(1).sum(1) + d["a.weight"].transpose(0, 1).flatten(1).sum(1)
    stream = (d["a.weight"].flatten(1).sum(1) + d["b.weight"].flatten(1).sum(1)
              + d["b.weight"].transpose(0, 1).flatten(1).sum(1) + d["fc.weight"].sum(0))
    return {"stem": stem, "stream": stream}


def _nearest_aligned(selected: int, channels: int, round_to: int) -> int:
    """FairPrune's alignment, spelled out: the remaining count goes to the nearest multiple of round_to (halves
    up), kept between round_to and the layer's width; a layer of at most round_to channels loses none."""
    if selected == 0 or channels <= round_to:
        return 0
    keep = round_to * math.floor((channels - selected) / round_to + 0.5)
    return channels - min(max(keep, round_to), channels)


def _fairprune_channel_oracle(scores: dict[str, torch.Tensor], order: list[str], ratio: float,
                              round_to: int) -> dict[str, list[int]]:
    """round(ratio * all channels) lowest scores over every group (ties: group order, then channel), each group's
    share aligned, its lowest channels removed; when every share aligns to nothing, round_to channels go from the
    group with the most picks."""
    pairs = sorted((float(scores[name][c]), gi, c) for gi, name in enumerate(order) for c in range(len(scores[name])))
    k = round(ratio * len(pairs))
    picked = {name: sum(1 for _, gi, _ in pairs[:k] if order[gi] == name) for name in order}
    counts = {name: _nearest_aligned(picked[name], len(scores[name]), round_to) for name in order}
    if k and not any(counts.values()):
        for name in sorted(order, key=lambda n: -picked[n]):
            if picked[name] and _nearest_aligned(round_to, len(scores[name]), round_to):
                counts[name] = _nearest_aligned(round_to, len(scores[name]), round_to)
                break
    out = {}
    for name in order:
        ranked = sorted(range(len(scores[name])), key=lambda c: (float(scores[name][c]), c))
        out[name] = sorted(ranked[:counts[name]])
    return out


def _silenced(model: nn.Module, plan: dict[str, list[int]]) -> nn.Module:
    ref = copy.deepcopy(model)
    dg = dependency_graph(ref, SIZE)
    modules = dict(ref.named_modules())
    for root, idxs in plan.items():
        if idxs:
            zero_channels(dg, modules[root], idxs)
    return ref


def _assert_same_logits(pruned: nn.Module, reference: nn.Module) -> None:
    x = torch.randn(4, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        want = reference(x)
        torch.testing.assert_close(pruned(x), want, rtol=1e-4, atol=1e-5 * float(want.abs().max()))


def test_fairprune_channel_steps_remove_the_lowest_saliency_channels_by_the_aligned_global_rule() -> None:
    cfg = FairPruneConfig(granularity="channel", ratio=0.3, round_to=4, curvature="fisher", mc_samples=2,
                          score_samples=12, batch_size=5)
    ds, model = _data(), _model()
    step = _fairprune_step(cfg, ds)
    groups = {g.root: g.channels for g in channel_groups(dependency_graph(model, SIZE), model, ignored=["fc"])}
    stream = next(r for r in groups if r in ("a", "b"))  # Torch-Pruning names the coupled a/b stream by one of them
    assert groups == {"stem": 12, stream: 16}
    order = [r for r in groups]  # the groups' order (ties across groups go to the first)
    ids = {r: list(range(n)) for r, n in groups.items()}
    for number in (1, 2):
        layers = ["stem", "a", "b", "fc"]
        sums = _by_hand_channel_sums(_saliency(model, ds, cfg, layers, seed=3 * 1000 + number))
        scores = {"stem": sums["stem"], stream: sums["stream"]}
        plan = _fairprune_channel_oracle(scores, order, cfg.ratio, cfg.round_to)
        reference = _silenced(model, plan)
        widths = {r: len(scores[r]) for r in order}
        out = step(model, {}, number)
        model = out.model
        _assert_same_logits(model, reference)
        expected_ids = {r: [ids[r][i] for i in plan[r]] for r in order if plan[r]}
        assert out.removed == {"kind": "channel", "channels_removed": sum(len(v) for v in plan.values()),
                               "channels": expected_ids, "groups": widths}, number
        assert out.exhausted is None and out.masks == {}
        assert set(out.stats) == {"curvature", "samples", "seconds", "samples_per_s", "device"}
        assert out.stats["samples"] == 24 and out.stats["curvature"] == "fisher"
        for r in order:
            ids[r] = [c for i, c in enumerate(ids[r]) if i not in set(plan[r])]
    # step 1: 0.3 * 28 = 8 picks; step 2 works on the pruned widths and keeps the original ids
    assert sum(len(v) for v in ids.values()) < 28
    assert model.b.out_channels == len(ids[stream]) and model.stem.out_channels == len(ids["stem"])
    assert all(len(v) % 4 == 0 for v in ids.values())


def test_fairprune_channel_step_that_aligns_to_nothing_says_so() -> None:
    """0.01 of 28 channels rounds to 0 picks: nothing is removed and the step reports why (the loop stops)."""
    cfg = FairPruneConfig(granularity="channel", ratio=0.01, round_to=4, curvature="empirical", score_samples=12,
                          batch_size=6)
    model = _model()
    out = _fairprune_step(cfg, _data())(model, {}, 1)
    assert out.removed["channels_removed"] == 0 and out.removed["channels"] == {}
    assert out.exhausted == "no group can lose channels at this ratio and alignment"
    assert (out.model.stem.out_channels, out.model.b.out_channels) == (12, 16)


@pytest.mark.parametrize("first_order", [False, True])
def test_fairprune_weight_steps_mask_the_lowest_saliency_weights_of_each_layer(first_order: bool) -> None:
    cfg = FairPruneConfig(granularity="weight", ratio=0.1, curvature="fisher", first_order=first_order,
                          score_samples=12, batch_size=5)
    ds, model = _data(), _model()
    dense = copy.deepcopy(model)
    step = _fairprune_step(cfg, ds, seed=2)
    keep: dict[str, torch.Tensor] = {}
    masks: dict[str, torch.Tensor] = {}
    layers = ["stem", "a", "b"]  # the head is left out by default
    for number in (1, 2):
        sal = _saliency(model, ds, cfg, layers, seed=2 * 1000 + number)
        expected = {}
        for k, s in sal.items():
            kept = keep.get(k, torch.ones_like(s, dtype=torch.bool))
            free = [i for i in range(s.numel()) if bool(kept.flatten()[i])]
            n = round(cfg.ratio * len(free))
            lowest = sorted(free, key=lambda i: (float(s.flatten()[i]), i))[:n]  # among the still-unpruned only
            new = kept.clone().flatten()
            new[lowest] = False
            expected[k] = new.reshape(s.shape)
        out = step(model, masks, number)
        model, masks = out.model, out.masks
        assert set(masks) == set(expected)
        for k in expected:
            assert torch.equal(masks[k], expected[k]), (number, k)
        per_layer = {k.removesuffix(".weight"): int((keep.get(k, torch.ones_like(v)) & ~v).sum())
                     for k, v in expected.items()}
        assert out.removed == {"kind": "weight", "weights_pruned": sum(per_layer.values()),
                               "per_layer": {n: c for n, c in per_layer.items() if c}}
        assert out.exhausted is None
        keep = expected
    modules, before = dict(model.named_modules()), dict(dense.named_modules())
    for n in layers:  # the masked weights are zero, the others untouched; the head is not masked
        w, w0, m = modules[n].weight.detach(), before[n].weight.detach(), keep[f"{n}.weight"]
        assert bool((w[~m] == 0).all()) and torch.equal(w[m], w0[m])
    assert torch.equal(modules["fc"].weight, before["fc"].weight)


def test_fairprune_2_4_step_keeps_the_two_most_salient_of_every_four_inputs() -> None:
    cfg = FairPruneConfig(granularity="2:4", curvature="empirical", score_samples=12, batch_size=6, include_head=True)
    ds, model = _data(), _model()
    sal = _saliency(model, ds, cfg, ["stem", "a", "b", "fc"], seed=0 * 1000 + 1)
    out = _fairprune_step(cfg, ds, seed=0)(model, {}, 1)
    eligible = ["a", "b", "fc"]  # stem has 3 input channels: no 2:4 pattern
    assert out.removed == {"kind": "2:4", "layers": eligible, "skipped_layers": ["stem"],
                           "weights_zeroed": sum(sal[f"{n}.weight"].numel() // 2 for n in eligible)}
    assert out.exhausted == "2:4 sparsity is reached in a single step" and set(out.masks) == {
        f"{n}.weight" for n in eligible}
    for n in eligible:
        s = sal[f"{n}.weight"]
        moved = s.movedim(1, -1).reshape(-1, 4)
        want = torch.zeros_like(moved, dtype=torch.bool)
        for row in range(moved.shape[0]):  # brute force: the two highest of each four (ties: the earlier)
            for i in sorted(range(4), key=lambda i: (-float(moved[row, i]), i))[:2]:
                want[row, i] = True
        want = want.reshape(s.movedim(1, -1).shape).movedim(-1, 1)
        assert torch.equal(out.masks[f"{n}.weight"], want), n


def _snnl_oracle(scores: dict[str, torch.Tensor], layers: list[str], room: dict[str, int], budget: int,
                 round_to: int) -> dict[str, list[int]]:
    """SNNL's rule: the `budget` lowest scores over the feature layers (ties: layer order, then position), no layer
    going below its room; each layer's picks cut to a multiple of round_to by dropping its highest-scored ones."""
    chosen: dict[str, list[int]] = {n: [] for n in layers}
    for _, li, pos in sorted((float(scores[n][i]), li, i) for li, n in enumerate(layers) for i in range(len(scores[n]))):
        if sum(len(v) for v in chosen.values()) >= budget:
            break
        if len(chosen[layers[li]]) < room[layers[li]]:
            chosen[layers[li]].append(pos)
    return {n: sorted(v[:len(v) - len(v) % round_to]) for n, v in chosen.items()}


def test_snnl_steps_remove_the_lowest_snnl_channels_of_the_feature_layers_up_to_the_cap() -> None:
    cfg = SnnlConfig(layers="stem,b", channels_per_round=6, round_to=2, max_channels=10, batches=2, batch_size=8,
                     temperature=0.5)
    ds, model = _data(), _model()
    order = list(range(16))  # two balanced batches of 8 (groups alternate)
    step = SnnlStep(cfg, ARCH, SIZE, ds, order, 8, DEVICE)
    layers = ["stem", "b"]
    ids = {"stem": list(range(12)), "b": list(range(16))}
    removed_total, numbers = 0, []
    for number in range(1, 6):
        # the round's budget: channels_per_round, at most what the cap leaves, a multiple of round_to
        budget = min(cfg.channels_per_round, cfg.max_channels - removed_total)
        budget -= budget % cfg.round_to
        scores = snnl_channel_scores(model, layers, Subset(ds, order), DEVICE, cfg.temperature, False, 8)
        room = {n: len(ids[n]) - cfg.round_to for n in layers}
        plan = _snnl_oracle(scores, layers, room, budget, cfg.round_to)
        dg = dependency_graph(model, SIZE)
        roots = {g.root for g in channel_groups(dg, model, ignored=["fc"])}
        stream = next(r for r in roots if r in ("a", "b"))
        reference = _silenced(model, {"stem": plan["stem"], stream: plan["b"]})
        out = step(model, {}, number)
        model = out.model
        numbers.append(number)
        _assert_same_logits(model, reference)
        total = sum(len(v) for v in plan.values())
        removed_total += total
        assert out.removed == {
            "kind": "channel", "layers": layers, "channels_removed": total,
            "channels": {n: sorted(ids[n][i] for i in plan[n]) for n in layers if plan[n]},
            "scores": {n: [round(float(s), 6) for s in scores[n]] for n in layers}}, number
        assert set(out.stats) == {"snnl_images", "seconds", "images_per_s", "device"} and out.stats["snnl_images"] == 16
        for n in layers:
            ids[n] = [c for i, c in enumerate(ids[n]) if i not in set(plan[n])]
        if total == 0:
            assert out.exhausted == "no channel left to remove in the SNNL layers"
            break
        assert out.exhausted == (None if removed_total < 10 else "--max-channels 10 reached")
        if out.exhausted:
            break
    assert len(numbers) >= 2 and removed_total <= 10
    assert model.stem.out_channels == len(ids["stem"]) and model.b.out_channels == len(ids["b"])


def test_snnl_step_with_nothing_left_to_remove_says_so() -> None:
    """Layers already at round_to channels: no room, nothing removed, the loop is told to stop."""
    cfg = SnnlConfig(layers="stem", channels_per_round=12, round_to=12, batches=1, batch_size=8)
    out = SnnlStep(cfg, ARCH, SIZE, _data(), list(range(8)), 8, DEVICE)(_model(), {}, 1)
    assert out.removed["channels_removed"] == 0 and out.removed["channels"] == {}
    assert out.exhausted == "no channel left to remove in the SNNL layers"
    assert math.isfinite(out.stats["seconds"])
