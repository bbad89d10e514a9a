"""FairPrune's saliency on hand-computed numbers: the sign convention, beta, and the first-order option."""

from __future__ import annotations

import pytest
import torch

from fairdeploy.errors import FairdeployError
from fairdeploy.pruning.saliency import fairprune_saliency


def test_second_order_saliency_by_hand() -> None:
    # S = 0.5 * theta^2 * (H0 - beta * H1); group 0 is the unprivileged group.
    w = {"w": torch.tensor([2.0, -1.0, 0.5])}
    h0 = {"w": torch.tensor([1.0, 4.0, 0.0])}
    h1 = {"w": torch.tensor([3.0, 1.0, 8.0])}
    s = fairprune_saliency(w, h0, h1, beta=0.5)["w"]
    # 0.5*4*(1-1.5) = -1.0 ; 0.5*1*(4-0.5) = 1.75 ; 0.5*0.25*(0-4) = -0.5
    torch.testing.assert_close(s, torch.tensor([-1.0, 1.75, -0.5]))
    # pruned first = smallest: the weight that matters most to the privileged group relative to the
    # unprivileged one (index 0), never the one the unprivileged group relies on (index 1)
    assert int(s.argmin()) == 0 and int(s.argmax()) == 1


def test_beta_one_is_the_plain_difference_and_beta_is_checked() -> None:
    w = {"w": torch.tensor([1.0, 3.0])}
    h0, h1 = {"w": torch.tensor([2.0, 2.0])}, {"w": torch.tensor([2.0, 1.0])}
    torch.testing.assert_close(fairprune_saliency(w, h0, h1, beta=1.0)["w"], torch.tensor([0.0, 4.5]))
    for bad in (0.0, -0.1, 1.5):
        with pytest.raises(FairdeployError, match=r"beta must be in \(0, 1\]"):
            fairprune_saliency(w, h0, h1, beta=bad)


def test_first_order_option_is_the_taylor_loss_change_difference() -> None:
    # dE_g = -g_g * theta + 0.5 * h_g * theta^2 ; S = dE0 - beta * dE1
    theta, hu, hp = torch.tensor([1.5, -2.0]), torch.tensor([0.4, 1.0]), torch.tensor([2.0, 0.2])
    gu, gp = torch.tensor([0.3, -0.5]), torch.tensor([-1.0, 0.25])
    beta = 0.8
    s = fairprune_saliency({"w": theta}, {"w": hu}, {"w": hp}, beta, {"w": gu}, {"w": gp})["w"]
    by_hand = []
    for i in range(2):
        t = float(theta[i])
        de0 = -float(gu[i]) * t + 0.5 * float(hu[i]) * t * t
        de1 = -float(gp[i]) * t + 0.5 * float(hp[i]) * t * t
        by_hand.append(de0 - beta * de1)
    torch.testing.assert_close(s, torch.tensor(by_hand))
    with pytest.raises(ValueError, match="both groups' gradients"):
        fairprune_saliency({"w": theta}, {"w": hu}, {"w": hp}, beta, {"w": gu}, None)
