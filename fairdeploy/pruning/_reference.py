"""Slow reference implementations for the tests and benchmarks only (not part of the API): the per-sample
curvature terms `group_curvature`'s vectorised path is checked against (tests/test_pruning_curvature.py) and timed
against (benchmarks/curvature.py)."""

from __future__ import annotations

import functools
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from fairdeploy.pruning.curvature import BatchDraws, group_curvature


def per_sample_loop(model: nn.Module, layers: Sequence[str], acc: dict[str, torch.Tensor], x: torch.Tensor,
                    y: torch.Tensor, draws: BatchDraws) -> None:
    """BatchSums one sample at a time with plain autograd: each sample's own gradient squared (fisher, empirical:
    the targets drawn from the batch's logits, as the fast path draws them), or v * (H_i v) of each sample's own
    loss (hutchinson: the batch's probes, drawn up front, shared by its samples). Slow; the oracle."""
    modules = dict(model.named_modules())
    params = [modules[n].weight for n in layers]
    if draws.estimator == "hutchinson":
        vs_all = [draws.probe(params) for _ in range(draws.probes)]
        for i in range(len(y)):
            loss = F.cross_entropy(model(x[i:i + 1]).float(), y[i:i + 1])
            grads = torch.autograd.grad(loss, params, create_graph=True)
            for vs in vs_all:
                hvs = torch.autograd.grad(grads, params, grad_outputs=vs, retain_graph=True)
                for n, v, hv in zip(layers, vs, hvs):
                    acc[n] += (v * hv).double() / draws.probes
        return
    with torch.no_grad():
        logits = model(x).float()
    targets = draws.targets(logits, y)
    for i in range(len(y)):
        for s in range(targets.shape[1]):
            loss = F.cross_entropy(model(x[i:i + 1]).float(), targets[i:i + 1, s])
            for n, g in zip(layers, torch.autograd.grad(loss, params)):
                acc[n] += g.double().square() / targets.shape[1]


# `group_curvature` with the per-sample loop as its batch sums: the same batches, draws and averaging as the fast
# path, the per-sample terms formed independently of its closed forms.
group_curvature_loop = functools.partial(group_curvature, batch_sums=per_sample_loop)
