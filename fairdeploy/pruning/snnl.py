"""Per-channel soft nearest neighbour loss (SNNL) of conv features against the sensitive attribute.

Low SNNL = samples of one group cluster in that channel = the channel encodes the group (prune it first).
Under torchrun each rank scores every R-th batch; the per-batch scores are gathered and added in batch order
on every rank, so every rank (and one process) gets bit-identical scores.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from fairdeploy.data.batches import BatchSource, rank_batches
from fairdeploy.distributed import gather_rows, world
from fairdeploy.errors import FairdeployError
from fairdeploy.progress import Progress, no_progress

DEFAULT_SNNL_TEMPERATURE = 1.0
DEFAULT_SNNL_BATCHES = 4  # group-balanced batches whose scores are averaged
DEFAULT_SNNL_BATCH_SIZE = 64  # images per SNNL batch (each group equally represented)


def snnl_per_channel(features: torch.Tensor, groups: torch.Tensor,
                     temperature: float = DEFAULT_SNNL_TEMPERATURE,
                     compat: bool = False) -> torch.Tensor:
    """SNNL of each channel of `features` (B, C, ...) against `groups` (B,); returns (C,).

    d_ij = 1 - cos(z_i, z_j) on the flattened channel map z_i;
    SNNL_c = -(1/B') sum_i log( sum_{j!=i, s_j=s_i} exp(-d_ij/T) / sum_{j!=i} exp(-d_ij/T) ),
    averaged over the B' rows that have another sample of their group in the batch. `compat` adds the
    self pair (j = i) to the numerator only, as the published code does. An all-zero map has cosine 0 to
    everything (distance 1), itself included.
    """
    if temperature <= 0:
        raise FairdeployError(f"temperature must be > 0, got {temperature}")
    if features.dim() < 2 or features.shape[0] != groups.shape[0]:
        raise ValueError(f"features {tuple(features.shape)} do not match groups {tuple(groups.shape)}")
    b = features.shape[0]
    z = features.detach().to(torch.float64).reshape(b, features.shape[1], -1).transpose(0, 1)  # (C, B, D)
    z = F.normalize(z, dim=2, eps=1e-12)
    logits = -(1.0 - z @ z.transpose(1, 2)) / temperature  # (C, B, B) = -d_ij / T
    eye = torch.eye(b, dtype=torch.bool, device=z.device)
    same = groups[:, None].to(z.device) == groups[None, :].to(z.device)
    neg_inf = torch.tensor(float("-inf"), dtype=logits.dtype, device=z.device)
    den = torch.logsumexp(torch.where(~eye, logits, neg_inf), dim=2)
    num_mask = same if compat else same & ~eye
    num = torch.logsumexp(torch.where(num_mask, logits, neg_inf), dim=2)
    valid = (same & ~eye).any(1)
    if not bool(valid.any()):
        raise FairdeployError("an SNNL batch needs at least two samples of one group")
    return -(num - den)[:, valid].mean(1)


def snnl_channel_scores(
    model: nn.Module,
    layers: Sequence[str],
    batches: BatchSource,
    device: torch.device | str,
    temperature: float,
    compat: bool,
    batch_size: int,
    progress: Progress = no_progress,
) -> dict[str, torch.Tensor]:
    """Mean per-channel SNNL of each layer's output over `batches` (group labels from the batches)."""
    dev = torch.device(device)
    modules = dict(model.named_modules())
    captured: dict[str, torch.Tensor] = {}
    handles = []
    for name in layers:
        if name not in modules:
            raise FairdeployError(f"layer {name!r} does not exist in the model")

        def hook(_m, _i, out, name=name):
            captured[name] = out.detach()

        handles.append(modules[name].register_forward_hook(hook))
    per_batch: dict[str, list[torch.Tensor]] = {name: [] for name in layers}
    numbers: list[int] = []
    was_training = model.training
    model.to(dev).eval()
    total = len(batches) if hasattr(batches, "__len__") else 0
    try:
        with torch.no_grad():
            for b, (x, _y, g) in rank_batches(batches, batch_size, dev):
                captured.clear()
                model(x)
                for name in layers:
                    per_batch[name].append(snnl_per_channel(captured[name], g, temperature, compat).cpu())
                numbers.append(b)
                progress("snnl scores", len(numbers), max(total, len(numbers)))
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return {name: _batch_mean(per_batch[name], numbers) for name in layers}


def _batch_mean(scores: list[torch.Tensor], numbers: list[int]) -> torch.Tensor:
    """Mean of the per-batch (C,) float64 scores, added in batch order (every rank's batches, gathered)."""
    if world().active:
        width = len(scores[0]) if scores else 0
        local = torch.stack(scores).numpy() if scores else np.zeros((0, width))
        widths = gather_rows(np.asarray([width], dtype=np.int64))
        width = max(int(w[0]) for w in widths)
        if local.shape[1] != width:
            local = np.zeros((0, width))
        rows = np.concatenate(gather_rows(local.astype(np.float64)))
        order = np.argsort(np.concatenate(gather_rows(np.asarray(numbers, dtype=np.int64))), kind="stable")
        scores = [torch.from_numpy(rows[i].copy()) for i in order]
    if not scores:
        raise FairdeployError("no batches to compute SNNL scores from")
    total = scores[0]
    for s in scores[1:]:
        total = total + s
    return (total / len(scores)).float()
