"""Sample grids as uint8 images (for PNG files and TensorBoard)."""

from __future__ import annotations

import io

import numpy as np
from etils import epath
from PIL import Image


def to_uint8(images: np.ndarray) -> np.ndarray:
    """[-1, 1] floats to [0, 255] uint8, rounding like the usual evaluators (x * 127.5 + 128, clipped)."""
    return np.clip(np.asarray(images, np.float32) * 127.5 + 128.0, 0, 255).astype(np.uint8)


def image_grid(images: np.ndarray, rows: int, pad: int = 1) -> np.ndarray:
    """[N, H, W, C] in [-1, 1] -> one [rows*(H+pad)+pad, cols*(W+pad)+pad, C] uint8 grid, row-major."""
    n, h, w, c = images.shape
    cols = -(-n // rows)
    grid = np.full((rows * (h + pad) + pad, cols * (w + pad) + pad, c), 255, np.uint8)
    for i, img in enumerate(to_uint8(images)):
        r, q = divmod(i, cols)
        grid[pad + r * (h + pad): pad + r * (h + pad) + h, pad + q * (w + pad): pad + q * (w + pad) + w] = img
    return grid


def points_image(points: np.ndarray, size: int = 256, extent: float = 4.0) -> np.ndarray:
    """2-D samples as a density image [size, size, 1] (dark = many points) over [-extent, extent]^2."""
    hist, _, _ = np.histogram2d(points[:, 1], points[:, 0], bins=size, range=[[-extent, extent]] * 2)
    hist = np.log1p(hist[::-1])  # y axis up
    scaled = 255 - (255 * hist / max(hist.max(), 1e-9))
    return scaled.astype(np.uint8)[..., None]


def save_png(image: np.ndarray, path: str) -> None:
    """Write a PNG to a local path or a bucket (gs://...), creating the folder."""
    buffer = io.BytesIO()
    Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image).save(buffer, format="PNG")
    target = epath.Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes(buffer.getvalue())
