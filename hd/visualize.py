"""Sample grids and token heat maps as uint8 images (for PNG files and TensorBoard)."""

from __future__ import annotations

import io

import numpy as np
from etils import epath
from PIL import Image


def to_uint8(images: np.ndarray) -> np.ndarray:
    """[-1, 1] floats to [0, 255] uint8, rounding like the usual evaluators (x * 127.5 + 128, clipped)."""
    return np.clip(np.asarray(images, np.float32) * 127.5 + 128.0, 0, 255).astype(np.uint8)


def upscale_nearest(images: np.ndarray, factor: int) -> np.ndarray:
    """[..., H, W, C] -> [..., factor*H, factor*W, C], each pixel repeated (no smoothing: pixels stay readable)."""
    if not isinstance(factor, (int, np.integer)) or factor < 1:
        raise ValueError(f"upscale factor {factor!r} must be a positive integer (1 = unchanged)")
    return images if factor == 1 else np.repeat(np.repeat(images, factor, axis=-3), factor, axis=-2)


def image_grid(images: np.ndarray, rows: int, pad: int = 1, upscale: int = 1) -> np.ndarray:
    """[N, H, W, C] in [-1, 1] (or already uint8) -> one [rows*(H'+pad)+pad, cols*(W'+pad)+pad, C] uint8 grid,
    row-major, where H' = upscale*H: `upscale` > 1 enlarges each image by nearest-neighbour repetition (e.g. 3
    for 28-pixel images in a README), the padding stays `pad` pixels."""
    images = upscale_nearest(images if images.dtype == np.uint8 else to_uint8(images), upscale)
    n, h, w, c = images.shape
    cols = -(-n // rows)
    grid = np.full((rows * (h + pad) + pad, cols * (w + pad) + pad, c), 255, np.uint8)
    for i, img in enumerate(images):
        r, q = divmod(i, cols)
        grid[pad + r * (h + pad): pad + r * (h + pad) + h, pad + q * (w + pad): pad + q * (w + pad) + w] = img
    return grid


def heat_colours(heat: np.ndarray) -> np.ndarray:
    """Values in [0, 1] [...] -> RGB floats in [0, 1] [..., 3] on a black-red-yellow-white ramp (dark = 0)."""
    heat = np.clip(np.asarray(heat, np.float32), 0.0, 1.0)[..., None]
    return np.clip(heat * 3.0 - np.array([0.0, 1.0, 2.0], np.float32), 0.0, 1.0)


def token_heatmaps(weights: np.ndarray, image_shape: tuple[int, int]) -> np.ndarray:
    """Token weights [N, T] on a square token grid (row-major, as the DiT patchifies) -> [N, H, W] maps, each
    token's weight repeated over its patch. H and W must be multiples of sqrt(T)."""
    n, t = weights.shape
    side = int(round(np.sqrt(t)))
    h, w = image_shape
    if side * side != t or h % side or w % side:
        raise ValueError(f"{t} token weights do not tile a {h}x{w} image: need a square token grid whose side "
                         "divides the image size (the feature network's patch grid)")
    grid = np.asarray(weights, np.float32).reshape(n, side, side)
    return np.repeat(np.repeat(grid, h // side, axis=1), w // side, axis=2)


def heatmap_overlay(images: np.ndarray, heat: np.ndarray, alpha: float = 0.6) -> np.ndarray:
    """Images [N, H, W, C] in [-1, 1] and maps [N, H, W] in [0, 1] -> uint8 RGB [N, H, W, 3]: the image in grey,
    blended with the heat colours (weight `alpha` where the map is 1, none where it is 0)."""
    grey = (np.clip(np.asarray(images, np.float32).mean(axis=-1), -1.0, 1.0) + 1.0) / 2.0
    a = alpha * np.clip(heat, 0.0, 1.0)[..., None]
    rgb = (1.0 - a) * grey[..., None] + a * heat_colours(heat)
    return np.clip(np.round(rgb * 255.0), 0, 255).astype(np.uint8)


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


_PALETTE = ((31, 119, 180), (214, 39, 40), (44, 160, 44), (148, 103, 189), (255, 127, 14), (23, 190, 207))


def line_chart(series: dict[str, list[tuple[float, float]]], *, title: str, x_label: str, y_label: str,
               size: tuple[int, int] = (720, 420)) -> np.ndarray:
    """Curves {name: [(x, y), ...]} as one uint8 RGB chart [H, W, 3]: linear axes from the data's range, five
    labelled ticks per axis, a marker at every point, a legend in the top right. Names keep the given order."""
    from PIL import ImageDraw  # the drawing module only here: grids are plain arrays

    if not series or not all(series.values()):
        raise ValueError(f"line_chart needs at least one point per curve, got {({k: len(v) for k, v in series.items()})}")
    width, height = size
    left, right, top, bottom = 70, 20, 30, 45
    xs = np.array([x for points in series.values() for x, _ in points], np.float64)
    ys = np.array([y for points in series.values() for _, y in points], np.float64)
    x0, x1 = float(xs.min()), float(xs.max()) if xs.max() > xs.min() else float(xs.min()) + 1.0
    pad = 0.05 * (ys.max() - ys.min() or abs(ys.max()) or 1.0)
    y0, y1 = float(ys.min() - pad), float(ys.max() + pad)
    px = lambda x: left + (x - x0) / (x1 - x0) * (width - left - right)
    py = lambda y: height - bottom - (y - y0) / (y1 - y0) * (height - top - bottom)

    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    draw.rectangle([left, top, width - right, height - bottom], outline=(0, 0, 0))
    for i in range(5):
        x, y = x0 + i * (x1 - x0) / 4, y0 + i * (y1 - y0) / 4
        draw.line([px(x), height - bottom, px(x), height - bottom + 4], fill=(0, 0, 0))
        draw.text((px(x) - 12, height - bottom + 6), f"{x:g}", fill=(0, 0, 0))
        draw.line([left - 4, py(y), left, py(y)], fill=(0, 0, 0))
        draw.text((6, py(y) - 6), f"{y:.4g}", fill=(0, 0, 0))
    draw.text((left, 8), title, fill=(0, 0, 0))
    draw.text(((width - len(x_label) * 6) // 2, height - 16), x_label, fill=(0, 0, 0))
    draw.text((6, top - 22), y_label, fill=(0, 0, 0))
    for k, (name, points) in enumerate(series.items()):
        colour = _PALETTE[k % len(_PALETTE)]
        xy = [(px(x), py(y)) for x, y in sorted(points)]
        if len(xy) > 1:
            draw.line(xy, fill=colour, width=2)
        for x, y in xy:
            draw.ellipse([x - 3, y - 3, x + 3, y + 3], fill=colour)
        ly = top + 8 + 14 * k
        draw.line([width - right - 170, ly + 5, width - right - 150, ly + 5], fill=colour, width=3)
        draw.text((width - right - 145, ly), name, fill=(0, 0, 0))
    return np.asarray(image)
