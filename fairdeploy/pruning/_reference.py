"""Slow reference implementations for the tests and benchmarks only (not part of the API): the per-sample
curvature loop `group_curvature` is checked against (tests/test_pruning_curvature.py) and timed against
(benchmarks/curvature.py)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from fairdeploy.data.batches import BatchSource, iter_batches
from fairdeploy.errors import FairdeployError
from fairdeploy.pruning.curvature import (
    DEFAULT_CURVATURE_BATCH_SIZE,
    DEFAULT_ESTIMATOR,
    _check,
    _eval_mode,
    _rademacher,
    _targets,
    batch_generator,
)


def group_curvature_loop(
    model: nn.Module,
    data: BatchSource,
    estimator: str = DEFAULT_ESTIMATOR,
    device: str | torch.device = "cpu",
    *,
    layers: Sequence[str] | None = None,
    batch_size: int = DEFAULT_CURVATURE_BATCH_SIZE,
    mc_samples: int = 1,
    probes: int = 1,
    seed: int = 0,
    **_: Any,
) -> dict[str, torch.Tensor]:
    """Reference implementation of `group_curvature`: a Python loop over samples (slow; for tests).

    Draws the same random targets / probe vectors in the same order as the fast path, so the two agree to
    float tolerance.
    """
    dev = torch.device(device)
    layers = _check(model, estimator, layers)
    modules = dict(model.named_modules())
    params = [modules[n].weight for n in layers]
    acc = {n: torch.zeros_like(modules[n].weight, dtype=torch.float64) for n in layers}
    n_seen = 0
    model.to(dev)
    with _eval_mode(model), torch.enable_grad():
        for b, (x, y, _g) in enumerate(iter_batches(data, batch_size, dev)):
            gen = batch_generator(seed, b)
            if estimator == "hutchinson":
                vs_all = [[_rademacher(w.shape, gen, dev) for w in params] for _ in range(probes)]
                for i in range(len(y)):
                    loss = F.cross_entropy(model(x[i:i + 1]).float(), y[i:i + 1])
                    grads = torch.autograd.grad(loss, params, create_graph=True)
                    for vs in vs_all:
                        hvs = torch.autograd.grad(grads, params, grad_outputs=vs, retain_graph=True)
                        for n, v, hv in zip(layers, vs, hvs):
                            acc[n] += (v * hv).double() / probes
            else:
                with torch.no_grad():
                    logits = model(x).float()
                targets = _targets(logits, y, estimator, mc_samples, gen)
                for i in range(len(y)):
                    for s in range(targets.shape[1]):
                        loss = F.cross_entropy(model(x[i:i + 1]).float(), targets[i:i + 1, s])
                        for n, g in zip(layers, torch.autograd.grad(loss, params)):
                            acc[n] += g.double().square() / targets.shape[1]
            n_seen += len(y)
    if n_seen == 0:
        raise FairdeployError("no samples to compute curvature from (empty score set)")
    return {f"{n}.weight": (a / n_seen).float().cpu() for n, a in acc.items()}
