"""Masks: the pruned set is exactly the k lowest scores among unpruned weights; 2:4 patterns; re-application."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from fairdeploy.errors import FairdeployError
from fairdeploy.models.sparsity import apply_masks, mask_reapplier, masks_from_model
from fairdeploy.pruning.masks import is_two_four, lowest_k, select_weights, two_four_eligible, two_four_mask

pytestmark = pytest.mark.usefixtures("one_thread")


def test_lowest_k_toy_tensor_skips_already_pruned() -> None:
    scores = torch.tensor([5.0, 1.0, 3.0, -9.0, 4.0, 2.0, 7.0, 6.0])
    pruned = torch.tensor([False, False, False, True, False, False, False, False])
    chosen = lowest_k(scores, pruned, 3)
    # index 3 has the lowest score but is already pruned: the next three lowest are 1.0, 2.0, 3.0
    assert torch.nonzero(chosen).flatten().tolist() == [1, 2, 5]
    # argsort is not a rank: using argsort(scores) < k as the mask would pick a different set
    wrong = torch.argsort(scores) < 3
    assert not torch.equal(wrong, chosen)


def test_lowest_k_rejects_more_than_unpruned() -> None:
    with pytest.raises(FairdeployError, match="only 2 remain"):
        lowest_k(torch.zeros(3), torch.tensor([True, False, False]), 3)


def _brute_force(scores: dict[str, torch.Tensor], keep: dict[str, torch.Tensor], k: int) -> set[tuple[str, int]]:
    cands = sorted(
        (float(s), name, i)
        for name, t in scores.items()
        for i, s in enumerate(t.flatten().tolist())
        if bool(keep[name].flatten()[i])
    )
    return {(name, i) for _, name, i in cands[:k]}


def test_select_weights_global_is_the_k_lowest_over_steps() -> None:
    g = torch.Generator().manual_seed(0)
    scores = {"a.weight": torch.randn(4, 3, generator=g), "b.weight": torch.randn(5, 2, generator=g) - 0.3}
    keep = {k: torch.ones_like(v, dtype=torch.bool) for k, v in scores.items()}
    ratio = 0.25
    for _step in range(3):
        unpruned = sum(int(m.sum()) for m in keep.values())
        k = round(ratio * unpruned)
        expected = _brute_force(scores, keep, k)
        new = select_weights(scores, keep, ratio, "global")
        got = {(n, int(i)) for n, m in new.items() for i in torch.nonzero(m.flatten()).flatten()}
        assert got == expected and len(got) == k
        for n in keep:
            assert not bool((new[n] & ~keep[n]).any())  # never re-selects a pruned weight
            keep[n] = keep[n] & ~new[n]
    assert sum(int((~m).sum()) for m in keep.values()) == 6 + 4 + 3  # 22 unpruned -> 16 -> 12 -> 9


def test_select_weights_layer_scope_ranks_within_each_layer() -> None:
    scores = {"a.weight": torch.arange(10.0), "b.weight": torch.arange(100.0, 110.0)}
    keep = {k: torch.ones_like(v, dtype=torch.bool) for k, v in scores.items()}
    new = select_weights(scores, keep, 0.2, "layer")
    assert torch.nonzero(new["a.weight"]).flatten().tolist() == [0, 1]
    assert torch.nonzero(new["b.weight"]).flatten().tolist() == [0, 1]
    glob = select_weights(scores, keep, 0.2, "global")
    assert int(glob["a.weight"].sum()) == 4 and int(glob["b.weight"].sum()) == 0


@pytest.mark.parametrize("ratio", [0.0, 1.0, -0.1, 1.5])
def test_select_weights_ratio_outside_unit_interval(ratio: float) -> None:
    s = {"a.weight": torch.zeros(4)}
    with pytest.raises(FairdeployError, match=r"ratio must be in \(0, 1\)"):
        select_weights(s, {"a.weight": torch.ones(4, dtype=torch.bool)}, ratio)


def test_two_four_mask_keeps_the_two_highest_of_every_four_input_channels() -> None:
    g = torch.Generator().manual_seed(1)
    scores = torch.randn(3, 8, 2, 2, generator=g)  # conv weight: out 3, in 8, 2x2 kernel
    keep = two_four_mask(scores)
    assert keep.shape == scores.shape
    for o in range(3):
        for y in range(2):
            for x in range(2):
                for start in (0, 4):
                    block = scores[o, start:start + 4, y, x]
                    top2 = set(torch.topk(block, 2).indices.tolist())
                    assert set(torch.nonzero(keep[o, start:start + 4, y, x]).flatten().tolist()) == top2
    w = torch.randn(3, 8, 2, 2) * keep
    assert is_two_four(w)
    assert not is_two_four(torch.ones(3, 8, 2, 2))


def test_two_four_eligibility() -> None:
    assert two_four_eligible(torch.zeros(4, 8))
    assert not two_four_eligible(torch.zeros(64, 3, 7, 7))  # the RGB stem
    assert not two_four_eligible(torch.zeros(16, 1, 3, 3))  # depthwise
    with pytest.raises(FairdeployError, match="multiple-of-4"):
        two_four_mask(torch.zeros(4, 6))


def test_masks_stay_applied_after_optimiser_steps() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3))
    scores = {"0.weight": torch.randn(5, 6)}
    keep = {"0.weight": ~select_weights(scores, {"0.weight": torch.ones(5, 6, dtype=torch.bool)}, 0.5)["0.weight"]}
    apply_masks(model, keep)
    pruned_before = model[0].weight.detach() == 0
    opt = torch.optim.AdamW(model.parameters(), lr=0.1, weight_decay=0.01)
    reapply = mask_reapplier(keep)
    x, y = torch.randn(32, 6), torch.randint(0, 3, (32,))
    for _ in range(5):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        reapply(model)
    assert torch.equal(model[0].weight.detach() == 0, pruned_before)  # exactly the pruned set is zero
    assert torch.equal(masks_from_model(model, ["0"])["0.weight"], keep["0.weight"])
