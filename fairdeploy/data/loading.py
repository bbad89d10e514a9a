"""Image loading: torchvision transforms (train / eval), a Dataset over manifest records, DataLoaders."""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, WeightedRandomSampler
from torchvision import transforms as T

from fairdeploy.data.images import ImageRefused, to_rgb
from fairdeploy.data.manifest import Manifest, Record
from fairdeploy.errors import FairdeployError
from fairdeploy.files.entries import is_symlink_loop

BALANCE_CHOICES = ("none", "class", "group", "group-class")
EVAL_CROP_FRACTION = 0.875


def eval_transform(image_size: int, mean: Sequence[float], std: Sequence[float]) -> T.Compose:
    """Deterministic preprocessing shared by every runtime: resize, centre crop, tensor, normalise."""
    return T.Compose(
        [
            T.Resize(round(image_size / EVAL_CROP_FRACTION)),
            T.CenterCrop(image_size),
            T.ToTensor(),
            T.Normalize(mean, std),
        ]
    )


def train_transform(image_size: int, mean: Sequence[float], std: Sequence[float]) -> T.Compose:
    """Augmentation for training: random resized crop, flips (dermoscopy has no up), normalise."""
    return T.Compose(
        [
            T.RandomResizedCrop(image_size, scale=(0.7, 1.0), ratio=(0.9, 1.1)),
            T.RandomHorizontalFlip(),
            T.RandomVerticalFlip(),
            T.ToTensor(),
            T.Normalize(mean, std),
        ]
    )


@dataclass(frozen=True)
class Encoding:
    """Class and group name -> index maps, fixed by the model (not by the split)."""

    classes: tuple[str, ...]
    groups: tuple[str, ...]

    def class_index(self, record: Record, source: str, row: int) -> int:
        try:
            return self.classes.index(record.label)
        except ValueError:
            raise FairdeployError(
                f"{source}: row {row}: label {record.label!r} was not seen in training "
                f"(model classes: {', '.join(self.classes)})"
            ) from None

    def group_index(self, record: Record, source: str, row: int) -> int:
        try:
            return self.groups.index(record.group)
        except ValueError:
            raise FairdeployError(
                f"{source}: row {row}: group {record.group!r} was not seen in training "
                f"(model groups: {', '.join(self.groups)})"
            ) from None


# What reading a bad image raises: PIL's OSError / ValueError / SyntaxError, its decompression-bomb guard (an
# image of more pixels than Image.MAX_IMAGE_PIXELS: a warning up to twice that, an error beyond; both refused) and
# fairdeploy.data.images' refusals (ImageRefused is a ValueError: too small, floating-point, beyond 16 bits).
UNREADABLE_IMAGE = (OSError, ValueError, SyntaxError, Image.DecompressionBombError, Image.DecompressionBombWarning)


def open_rgb(path: Path) -> Image.Image:
    """Decode an image as 8-bit RGB (fairdeploy.data.images.to_rgb: 16-bit greyscale scaled, tiny images
    refused); a decompression bomb raises (DecompressionBombWarning made an error)."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        with Image.open(path) as im:
            return to_rgb(im, path)


def _decode_problem(path: Path) -> tuple[bool, str]:
    """Decode `path` once: (refused, why), refused when it decodes but cannot be used (ImageRefused)."""
    try:
        open_rgb(path)
    except ImageRefused as exc:
        return True, str(exc)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        return False, f"a decompression bomb: {exc}"
    except UNREADABLE_IMAGE:
        return False, "not a valid image file"
    return False, "decoding failed while loading"


def why_unreadable(path: Path) -> str:
    """Why `path` cannot be read, in a few words (for the one-line error)."""
    return _decode_problem(path)[1]


def image_failure(path: Path) -> str:
    """The one line for an image the loaders cannot use: 'image PATH could not be read (why)', or 'image PATH is
    refused: why' for one that decodes but cannot be used."""
    refused, why = _decode_problem(path)
    return f"image {path} is refused: {why}" if refused else f"image {path} could not be read ({why})"


def missing_image(path: Path) -> str:
    """Why an image path is not a file, to follow its name: 'not found', 'is a symlink loop', 'is a broken
    symlink' or 'is not a regular file'."""
    try:
        path.resolve(strict=True)
    except (RuntimeError, OSError) as exc:
        if is_symlink_loop(exc):
            return "is a symlink loop"
        return "is a broken symlink" if path.is_symlink() else "not found"
    return "not found" if not path.exists() else "is not a regular file"


class ImageDataset(Dataset):
    """Records of one split as (image tensor, class index, group index, ok flag, index)."""

    def __init__(self, records: Sequence[Record], root: Path, encoding: Encoding, transform: T.Compose, source: str):
        self.records = list(records)
        self.root = root
        self.transform = transform
        self.labels = [encoding.class_index(r, source, i + 2) for i, r in enumerate(self.records)]
        self.groups = [encoding.group_index(r, source, i + 2) for i, r in enumerate(self.records)]
        for r in self.records:
            p = root / r.image
            if not p.is_file():
                raise FairdeployError(f"{source}: image {p} {missing_image(p)}")
        self._fallback: torch.Tensor | None = None

    def __len__(self) -> int:
        return len(self.records)

    def path(self, index: int) -> Path:
        return self.root / self.records[index].image

    def load_image(self, index: int) -> Image.Image:
        return open_rgb(self.path(index))

    def __getitem__(self, index: int):
        try:
            x = self.transform(self.load_image(index))
            ok = True
        except UNREADABLE_IMAGE:
            # Reported by check_batch in the main process (a worker's exception would arrive as a traceback).
            x = torch.zeros(3, 1, 1)
            ok = False
        return x, self.labels[index], self.groups[index], ok, index


def collate(batch):
    ok = torch.tensor([b[3] for b in batch])
    idx = torch.tensor([b[4] for b in batch])
    if not bool(ok.all()):
        return None, None, None, ok, idx
    x = torch.stack([b[0] for b in batch])
    y = torch.tensor([b[1] for b in batch])
    g = torch.tensor([b[2] for b in batch])
    return x, y, g, ok, idx


def check_batch(dataset: ImageDataset, ok: torch.Tensor, idx: torch.Tensor) -> None:
    if not bool(ok.all()):
        bad = int(idx[~ok][0])
        raise FairdeployError(image_failure(dataset.path(bad)))


def balanced_weights(dataset: ImageDataset, balance: str) -> torch.Tensor:
    """Per-sample weights that make classes, groups or class × group cells equally likely."""
    if balance not in BALANCE_CHOICES:
        raise FairdeployError(f"unknown balance {balance!r}; choose one of {', '.join(BALANCE_CHOICES)}")
    keys = {
        "class": list(dataset.labels),
        "group": list(dataset.groups),
        "group-class": list(zip(dataset.groups, dataset.labels)),
    }[balance]
    counts: dict[object, int] = {}
    for k in keys:
        counts[k] = counts.get(k, 0) + 1
    return torch.tensor([1.0 / counts[k] for k in keys], dtype=torch.double)


def make_loader(
    dataset: ImageDataset,
    batch_size: int,
    shuffle: bool = False,
    balance: str = "none",
    workers: int = 0,
    generator: torch.Generator | None = None,
    pin_memory: bool = False,
    drop_last: bool = False,
    shard: tuple[int, int] | None = None,
) -> DataLoader:
    """`shard` = (rank, world size): this rank's share of the sequence one process would draw with
    `generator` (same shuffle / balance), `batch_size` being the per-rank batch (see distributed.ShardSampler)."""
    sampler = None
    if shard is not None:
        from fairdeploy.distributed import ShardSampler

        rank, size = shard
        weights = balanced_weights(dataset, balance) if balance != "none" else None
        step = batch_size * size
        total = len(dataset) // step * step if drop_last else None
        sampler = ShardSampler(len(dataset), rank, size, shuffle, weights, generator, total)
        shuffle = False
    elif balance != "none":
        sampler = WeightedRandomSampler(balanced_weights(dataset, balance), len(dataset), True, generator=generator)
        shuffle = False
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle,
        sampler=sampler,
        num_workers=workers,
        collate_fn=collate,
        generator=generator,
        pin_memory=pin_memory,
        drop_last=drop_last,
        persistent_workers=False,
    )


def split_dataset(
    manifest: Manifest, split: str, encoding: Encoding, transform: T.Compose
) -> ImageDataset:
    return ImageDataset(manifest.split(split), manifest.root, encoding, transform, manifest.source)
