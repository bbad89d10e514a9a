"""Batched prediction of a PyTorch model over a dataset: logits, labels and group indices.

Under torchrun each rank predicts a round-robin share and every rank gets the whole split back, in order."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from torch.utils.data import Subset

from fairdeploy.data.loading import ImageDataset, check_batch, make_loader
from fairdeploy.distributed import gather_interleaved, shard_indices, world
from fairdeploy.errors import FairdeployError
from fairdeploy.progress import Progress, no_progress

DEFAULT_EVAL_BATCH_SIZE = 64  # evaluation passes: predict, evaluate_model, a pruning run's evaluations


@dataclass(frozen=True)
class Predictions:
    logits: np.ndarray  # (N, K) float32
    labels: np.ndarray  # (N,) int64
    groups: np.ndarray  # (N,) int64 index into the encoding's groups

    @property
    def predicted(self) -> np.ndarray:
        return self.logits.argmax(1)


@torch.no_grad()
def predict(
    model: nn.Module,
    dataset: ImageDataset,
    device: torch.device,
    batch_size: int = DEFAULT_EVAL_BATCH_SIZE,
    workers: int = 0,
    progress: Progress = no_progress,
    task: str = "predict",
) -> Predictions:
    model.eval()
    share = dataset if not world().active else Subset(dataset, shard_indices(len(dataset)))
    loader = make_loader(share, batch_size, workers=workers, pin_memory=device.type == "cuda")  # type: ignore[arg-type]
    if len(share) == 0 and len(dataset) > 0:
        raise FairdeployError(f"{len(dataset)} image(s) cannot be shared by {world().size} processes: "
                              "use fewer processes (--nproc-per-node)")
    out_logits, out_y, out_g = [], [], []
    done = 0
    for x, y, g, ok, idx in loader:
        check_batch(dataset, ok, idx)
        logits = model(x.to(device, non_blocking=True)).float()
        out_logits.append(logits.cpu().numpy())
        out_y.append(y.numpy())
        out_g.append(g.numpy())
        done += len(idx)
        progress(task, done, len(share))
    return Predictions(
        logits=gather_interleaved(np.concatenate(out_logits).astype(np.float32)),
        labels=gather_interleaved(np.concatenate(out_y).astype(np.int64)),
        groups=gather_interleaved(np.concatenate(out_g).astype(np.int64)),
    )
