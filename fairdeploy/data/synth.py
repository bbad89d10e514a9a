"""A synthetic dermatology-like dataset with a controllable group bias (the demo's and the tests' data).

Each image is skin-coloured background with one lesion whose *shape* is the class (disc, ring, cross)
and a small coloured marker (think of a ruler sticker or ink mark). Two knobs make one group worse off:

- contrast: on `dark` skin the lesion is darkened by `dark_contrast` (0.8) instead of `light_contrast`
  (0.55), so it stands out about half as much; the `dark` group is also the minority (`dark_fraction`).
- a shortcut: for the `light` group the marker's colour agrees with the class with probability `bias`;
  for the `dark` group it is random (or agrees with probability `dark_bias`).

What a model actually does with this was measured (resnet18 at 32 px): the gap comes from the contrast
knob, not from the marker. The model gets light images right even when their marker disagrees, and learns
the low-contrast dark lesions later (dark validation accuracy 0.35 -> 0.47 -> 0.85 after 3 / 5 / 10 epochs,
light ~0.97); with `dark_contrast=0.1` (equal absolute contrast) the gap disappears. So a short training
run shows a large, real per-group gap, and fine-tuning is what closes most of it; the data does not show
that pruning removes a shortcut. Reports built on it say so.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from fairdeploy.data.manifest import Record, write_manifest
from fairdeploy.errors import FairdeployError
from fairdeploy.files.atomic import atomic_dir

CLASSES = ("disc", "ring", "cross")
GROUPS = ("dark", "light")
SYNTH_FILE = "synth.json"  # the generator's record: proves a folder is an earlier `data synth` output
SKIN = {"light": (224, 188, 160), "dark": (112, 76, 54)}
MARKER_COLOURS = ((230, 40, 40), (40, 200, 60), (50, 80, 235))


@dataclass(frozen=True)
class SynthConfig:
    n_images: int = 1200
    image_size: int = 32
    dark_fraction: float = 0.35  # share of the unprivileged group
    bias: float = 0.95  # P(marker colour == class colour) in the light group
    dark_bias: float | None = None  # same for the dark group; None = chance (1/K)
    light_contrast: float = 0.55  # lesion darkening factor (lower = more contrast)
    dark_contrast: float = 0.8
    noise: float = 14.0
    fractions: tuple[float, float, float] = (0.6, 0.2, 0.2)
    image_format: str = "png"
    seed: int = 0

    def validate(self) -> None:
        if self.n_images < 30:
            raise FairdeployError(f"n_images must be at least 30, got {self.n_images}")
        if not 16 <= self.image_size <= 512:
            raise FairdeployError(f"image_size must be in 16..512, got {self.image_size}")
        for name in ("dark_fraction", "bias", "light_contrast", "dark_contrast"):
            v = getattr(self, name)
            if not 0.0 <= v <= 1.0:
                raise FairdeployError(f"{name} must be in [0, 1], got {v}")
        if self.dark_bias is not None and not 0.0 <= self.dark_bias <= 1.0:
            raise FairdeployError(f"dark_bias must be in [0, 1], got {self.dark_bias}")
        if self.image_format not in ("png", "jpg"):
            raise FairdeployError(f"image_format must be png or jpg, got {self.image_format!r}")


def _lesion_mask(cls: int, size: int, rng: np.random.Generator) -> np.ndarray:
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    cy, cx = size / 2 + rng.uniform(-size * 0.08, size * 0.08, 2)
    r = size * rng.uniform(0.2, 0.3)
    d = np.sqrt((yy - cy) ** 2 + (xx - cx) ** 2)
    if cls == 0:  # disc
        return d <= r
    if cls == 1:  # ring
        return (d <= r) & (d >= r * 0.55)
    w = r * 0.35  # cross
    return ((np.abs(yy - cy) <= w) & (np.abs(xx - cx) <= r)) | ((np.abs(xx - cx) <= w) & (np.abs(yy - cy) <= r))


def render_image(cls: int, group: str, cfg: SynthConfig, rng: np.random.Generator) -> tuple[np.ndarray, int]:
    """One image as uint8 HxWx3 and the index of the marker colour drawn on it."""
    s = cfg.image_size
    skin = np.array(SKIN[group], dtype=np.float32) * rng.uniform(0.92, 1.08)
    img = np.broadcast_to(skin, (s, s, 3)).copy()
    contrast = cfg.light_contrast if group == "light" else cfg.dark_contrast
    img[_lesion_mask(cls, s, rng)] *= contrast
    agree = cfg.bias if group == "light" else (cfg.dark_bias if cfg.dark_bias is not None else None)
    if agree is not None and rng.random() < agree:
        marker = cls
    else:
        marker = int(rng.integers(len(MARKER_COLOURS)))
    m = max(3, s // 8)
    lo, hi = s // 8, s - s // 8 - m  # inside the eval centre crop
    band = rng.integers(4)
    a = int(rng.integers(lo, hi + 1))
    y, x = [(lo, a), (hi, a), (a, lo), (a, hi)][band]
    img[y : y + m, x : x + m] = MARKER_COLOURS[marker]
    img += rng.normal(0, cfg.noise, img.shape)
    return np.clip(img, 0, 255).astype(np.uint8), marker


def generate_synthetic(out_dir: str | os.PathLike[str], cfg: SynthConfig = SynthConfig()) -> Path:
    """Write images/ and manifest.csv under out_dir (atomically); return the manifest path."""
    from fairdeploy.data.splits import assign_splits

    cfg.validate()
    rng = np.random.default_rng(cfg.seed)
    out = Path(out_dir)
    records = []
    with atomic_dir(out, owner=SYNTH_FILE) as tmp:  # replaces only an earlier synth output
        (tmp / "images").mkdir()
        for i in range(cfg.n_images):
            group = "dark" if rng.random() < cfg.dark_fraction else "light"
            cls = int(rng.integers(len(CLASSES)))
            img, marker = render_image(cls, group, cfg, rng)
            name = f"images/{i:05d}.{cfg.image_format}"
            Image.fromarray(img).save(tmp / name, quality=95) if cfg.image_format == "jpg" else Image.fromarray(
                img
            ).save(tmp / name)
            records.append(
                Record(
                    image=name,
                    label=CLASSES[cls],
                    group=group,
                    split="train",
                    extra=(("marker", CLASSES[marker]),),
                )
            )
        records = assign_splits(records, fractions=cfg.fractions, seed=cfg.seed)
        write_manifest(records, tmp / "manifest.csv")
        (tmp / SYNTH_FILE).write_text(json.dumps({"generator": "fairdeploy data synth", "config": asdict(cfg)},
                                                 indent=2) + "\n")
    return out / "manifest.csv"
