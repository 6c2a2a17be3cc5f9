"""Image preprocessing of the ADM/DiT ImageNet pipelines: the centre crop every published ImageNet-256 FID uses.

The rule (ADM's `center_crop_arr`, also used by DiT and SiT for their latents and reference batches):
1. while the short side is at least twice the target, halve both sides with a box filter (each output pixel is
   the mean of a 2x2 block, so large photos are antialiased exactly and cheaply);
2. one bicubic resize so that the short side equals the target (sides rounded to the nearest integer);
3. take the centre target x target crop (offsets rounded down).
Pixels stay uint8 until `to_model_range` maps them to [-1, 1] (x / 127.5 - 1), the VAE's input range.
"""

from __future__ import annotations

import numpy as np
from PIL import Image


def center_crop(image: Image.Image, size: int) -> np.ndarray:
    """The ADM centre crop of a PIL image: uint8 [size, size, 3] (RGB; grayscale, CMYK and alpha are converted)."""
    if size <= 0:
        raise ValueError(f"crop size must be positive, got {size}")
    image = image.convert("RGB")
    while min(image.size) >= 2 * size:
        image = image.resize((image.size[0] // 2, image.size[1] // 2), resample=Image.Resampling.BOX)
    scale = size / min(image.size)
    image = image.resize((round(image.size[0] * scale), round(image.size[1] * scale)),
                         resample=Image.Resampling.BICUBIC)
    pixels = np.asarray(image)
    top, left = (pixels.shape[0] - size) // 2, (pixels.shape[1] - size) // 2
    return np.ascontiguousarray(pixels[top:top + size, left:left + size])


def to_model_range(images: np.ndarray) -> np.ndarray:
    """uint8 pixels -> float32 in [-1, 1] (0 -> -1, 255 -> 1)."""
    if images.dtype != np.uint8:
        raise TypeError(f"expected uint8 pixels, got {images.dtype}")
    return images.astype(np.float32) / 127.5 - 1.0
