"""Iterate (x, y, g) batches from a dataset, a subset of one, or a list of ready-made batches, on a device;
under torchrun, one rank's round-robin share of those batches (`rank_batches`)."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence

import torch
from torch.utils.data import DataLoader, Dataset, Subset

from fairdeploy.data.loading import ImageDataset, check_batch, collate
from fairdeploy.distributed import world

Batch = tuple[torch.Tensor, torch.Tensor, torch.Tensor]
BatchSource = Dataset | Iterable[Sequence[torch.Tensor]]


def _image_dataset(ds: Dataset) -> ImageDataset | None:
    while isinstance(ds, Subset):
        ds = ds.dataset
    return ds if isinstance(ds, ImageDataset) else None


def iter_batches(data: BatchSource, batch_size: int, device: torch.device, workers: int = 0) -> Iterator[Batch]:
    """Yield (x, y, g) on `device` in a fixed order.

    `data` is a Dataset of (x, y, g, ...) items (an ImageDataset or a Subset of one: unreadable images are
    reported as a FairdeployError), or an iterable of (x, y) / (x, y, g, ...) tensor batches. A missing
    group tensor becomes zeros.
    """
    pin = device.type == "cuda"
    if isinstance(data, Dataset):
        base = _image_dataset(data)
        loader = DataLoader(data, batch_size=batch_size, shuffle=False, num_workers=workers,
                            collate_fn=collate if base is not None else None, pin_memory=pin)
        for batch in loader:
            if base is not None:
                x, y, g, ok, idx = batch
                # idx is already the base dataset's index (ImageDataset returns the index it was asked for,
                # which a Subset has mapped): no second mapping through the Subset's indices
                check_batch(base, ok, idx)
            else:
                x, y = batch[0], batch[1]
                g = batch[2] if len(batch) > 2 else torch.zeros_like(y)
            yield _to(x, y, g, device)
        return
    for batch in data:
        x, y = batch[0], batch[1]
        g = batch[2] if len(batch) > 2 else torch.zeros_like(torch.as_tensor(y))
        yield _to(torch.as_tensor(x), torch.as_tensor(y), torch.as_tensor(g), device)


def rank_batches(data: BatchSource, batch_size: int, device: torch.device,
                 workers: int = 0) -> Iterator[tuple[int, Batch]]:
    """(batch number, batch) for this rank's share of `iter_batches(data, ...)`: batches b with b % R == r, the
    same batches one process would form (a Dataset is cut into the one-process batches before sharding, so
    only this rank's images are read). One process: every batch."""
    w = world()
    if not w.active:
        yield from enumerate(iter_batches(data, batch_size, device, workers))
        return
    if isinstance(data, Dataset):
        n = len(data)  # type: ignore[arg-type]
        mine = list(range(w.rank, -(-n // batch_size), w.size))
        idx = [i for b in mine for i in range(b * batch_size, min(n, (b + 1) * batch_size))]
        yield from zip(mine, iter_batches(Subset(data, idx), batch_size, device, workers))
        return
    for b, batch in enumerate(data):
        if b % w.size == w.rank:
            yield b, next(iter_batches([batch], batch_size, device))


def _to(x: torch.Tensor, y: torch.Tensor, g: torch.Tensor, device: torch.device) -> Batch:
    return (x.to(device, non_blocking=True).float(), y.to(device, non_blocking=True).long(),
            g.to(device, non_blocking=True).long())
