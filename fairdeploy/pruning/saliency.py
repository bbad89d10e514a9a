"""FairPrune saliency S = 0.5 * theta^2 * (H0 - beta * H1), optionally with each group's first-order term."""

from __future__ import annotations

from collections.abc import Mapping

import torch

from fairdeploy.errors import FairdeployError

DEFAULT_BETA = 0.5  # weight of the privileged group's curvature, in (0, 1]


def check_beta(beta: float) -> None:
    if not 0.0 < beta <= 1.0:
        raise FairdeployError(f"beta must be in (0, 1], got {beta}")


def fairprune_saliency(
    weights: Mapping[str, torch.Tensor],
    h_unprivileged: Mapping[str, torch.Tensor],
    h_privileged: Mapping[str, torch.Tensor],
    beta: float,
    g_unprivileged: Mapping[str, torch.Tensor] | None = None,
    g_privileged: Mapping[str, torch.Tensor] | None = None,
) -> dict[str, torch.Tensor]:
    """Per-weight saliency; prune the smallest first.

    Without gradients: S = 0.5 theta^2 (H0 - beta H1) (Optimal Brain Damage per group, group 0 unprivileged).
    With gradients (the first-order option): S = dE0 - beta dE1 with dE_g = -g_g theta + 0.5 h_g theta^2, the
    Taylor estimate of each group's loss change when theta is set to zero.
    """
    check_beta(beta)
    if (g_unprivileged is None) != (g_privileged is None):
        raise ValueError("give both groups' gradients or neither")
    out = {}
    for name, w in weights.items():
        theta = w.detach().to("cpu", torch.float32)
        s = 0.5 * theta.square() * (h_unprivileged[name] - beta * h_privileged[name])
        if g_unprivileged is not None and g_privileged is not None:
            s = s - theta * (g_unprivileged[name] - beta * g_privileged[name])
        out[name] = s
    return out
