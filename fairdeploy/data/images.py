"""What an image file must be for the loaders, and how it becomes the 8-bit RGB picture every model reads.

Refused (ImageRefused, one line naming the image): an image under MIN_IMAGE_SIDE pixels on a side (a 1x1
placeholder or tracking pixel, a failed download: resized to the model's input it is one flat colour, and it would
train and score without a word), a floating-point image, an integer image beyond 16 bits.
Converted: a 16-bit greyscale image (PIL mode I;16 / I) is scaled to 8 bits, value x 255 / 65535 rounded, with one
warning per process (PIL's own convert("RGB") clips every value above 255: an almost white picture). 16-bit RGB
PNGs need nothing: PIL reads them as 8-bit RGB already.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
from PIL import Image

MIN_IMAGE_SIDE = 8  # pixels; the synthetic test data is 8 px and up, real dermoscopy hundreds
SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I")  # PIL's greyscale modes wider than 8 bits
SIXTEEN_BIT_MAX = 65535


class ImageRefused(ValueError):
    """An image that decodes but cannot be used; the message says why (the caller names the file)."""


class SixteenBitImageWarning(UserWarning):
    """A 16-bit greyscale image was scaled to 8 bits."""


_warned_sixteen_bit = False


def check_usable(im: Image.Image) -> None:
    """Refuse what the header already shows: too small, or floating-point pixels."""
    w, h = im.size
    if min(w, h) < MIN_IMAGE_SIDE:
        raise ImageRefused(f"{w}x{h} pixels, smaller than the minimum of {MIN_IMAGE_SIDE}x{MIN_IMAGE_SIDE} "
                           "(a placeholder or a failed download?); remove the row or replace the file")
    if im.mode == "F":
        raise ImageRefused("a floating-point image (PIL mode F); save it with 8 or 16 bits per channel")


def to_rgb(im: Image.Image, path: str | Path) -> Image.Image:
    """`im` (opened from `path`) as 8-bit RGB, or ImageRefused."""
    global _warned_sixteen_bit

    check_usable(im)
    if im.mode not in SIXTEEN_BIT_MODES:
        return im.convert("RGB")
    values = np.asarray(im).astype(np.int64)
    low, high = (int(values.min()), int(values.max())) if values.size else (0, 0)
    if low < 0 or high > SIXTEEN_BIT_MAX:
        raise ImageRefused(f"a {im.mode} integer image with values {low}..{high}, beyond 16 bits; save it with 8 "
                           "or 16 bits per channel")
    if not _warned_sixteen_bit:
        _warned_sixteen_bit = True
        warnings.warn(f"{path}: a 16-bit greyscale image (PIL mode {im.mode}) is scaled to 8 bits "
                      "(value x 255 / 65535); other 16-bit images are converted the same way without a further "
                      "warning", SixteenBitImageWarning, stacklevel=3)
    eight = ((values * 255 + SIXTEEN_BIT_MAX // 2) // SIXTEEN_BIT_MAX).astype(np.uint8)
    return Image.fromarray(eight).convert("RGB")  # 2-D uint8: mode L
